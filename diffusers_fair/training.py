"""Library side of fair finetuning: trainable adaptors, the combined objective, saving for stock diffusers.

`examples/train_fair_lora.py` is the glue around these pieces (arguments, Accelerate, the loop, checkpoints).
"""

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from .alignment import DistributionalAlignmentLoss
from .pipeline_fair_stable_diffusion import adapters_disabled
from .semantics import ImageSemanticsLoss
from .utils import atomic_save_file, atomic_write, atomic_write_json

FINETUNE_MODES = ("text_encoder_lora", "unet_lora", "text_encoder_and_unet_lora", "prompt_prefix")
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
PREFIX_WEIGHTS_NAME = "learned_embeds.safetensors"
ADAPTER_STATE_NAME = "adapter_state.safetensors"
SELECTED_STATE_NAME = "selected_adapter_state.safetensors"
SELECTION_HISTORY_NAME = "selection.json"


@dataclass
class FairAdapters:
    r"""
    What is trained on a pipeline, as set up by [`add_fair_adapters`].

    Args:
        pipeline: The pipeline the adaptors live in.
        finetune (`str`): One of `FINETUNE_MODES`.
        lora_configs (`dict[str, LoraConfig]`): Component name (`"text_encoder"`, `"unet"`) -> its LoRA config.
        prefix_token (`str`, *optional*): For `prompt_prefix`, the (multi-vector) token prepended to every prompt.
        prefix_token_ids (`list[int]`): The token ids of the prefix vectors in the tokenizer.
    """

    pipeline: object
    finetune: str
    lora_configs: dict[str, LoraConfig] = field(default_factory=dict)
    prefix_token: str | None = None
    prefix_token_ids: list[int] = field(default_factory=list)

    def parameters(self) -> list[nn.Parameter]:
        """The tensors the optimizer updates (for `prompt_prefix`, the whole embedding table: only the prefix rows
        receive gradient, so use no weight decay on it)."""
        if self.finetune == "prompt_prefix":
            return [self.pipeline.text_encoder.get_input_embeddings().weight]
        return [p for name in self.lora_configs for p in getattr(self.pipeline, name).parameters() if p.requires_grad]

    def apply_prompt(self, prompts: Sequence[str]) -> list[str]:
        """The prompts as the finetuned model must see them (the prefix token prepended for `prompt_prefix`)."""
        if self.prefix_token is None:
            return list(prompts)
        return [f"{self.prefix_token} {prompt}" for prompt in prompts]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Only the trained tensors (LoRA weights or prefix vectors), for checkpoints."""
        if self.finetune == "prompt_prefix":
            weight = self.pipeline.text_encoder.get_input_embeddings().weight
            return {"prefix": weight.detach()[self.prefix_token_ids].cpu().contiguous()}
        return {
            f"{name}.{key}": value.detach().cpu().contiguous()
            for name in self.lora_configs
            for key, value in get_peft_model_state_dict(getattr(self.pipeline, name)).items()
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores what [`~FairAdapters.state_dict`] returned."""
        if self.finetune == "prompt_prefix":
            weight = self.pipeline.text_encoder.get_input_embeddings().weight
            with torch.no_grad():
                weight[self.prefix_token_ids] = state["prefix"].to(weight)
            return
        for name in self.lora_configs:
            prefix = f"{name}."
            component_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            result = set_peft_model_state_dict(getattr(self.pipeline, name), component_state)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"Checkpoint has keys that {name} does not: {result.unexpected_keys[:5]}.")

    def save_state(self, directory: str | os.PathLike) -> None:
        """Writes the trained tensors to `directory/adapter_state.safetensors` (atomically)."""
        atomic_save_file(self.state_dict(), os.path.join(directory, ADAPTER_STATE_NAME))

    def load_state(self, directory: str | os.PathLike) -> None:
        self.load_state_dict(load_file(os.path.join(directory, ADAPTER_STATE_NAME)))

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        r"""
        Saves the adaptors in a format stock diffusers loads, and returns the file name written.

        LoRA modes write `pytorch_lora_weights.safetensors` with the pipeline's `save_lora_weights` and the LoRA
        configs as adapter metadata (without it `lora_alpha` is lost on reload), so
        `pipe.load_lora_weights(save_directory)` reproduces the finetuned model exactly. `prompt_prefix` writes
        `learned_embeds.safetensors`, one multi-vector textual-inversion token:
        `pipe.load_textual_inversion(save_directory, weight_name="learned_embeds.safetensors")`, then prefix every
        prompt with the token (see [`~FairAdapters.apply_prompt`]).

        Either file is written through a temporary one renamed over it, so a crash or kill mid-write leaves the
        previous adaptor (or none), never a truncated file.
        """
        os.makedirs(save_directory, exist_ok=True)
        if self.finetune == "prompt_prefix":
            weight = self.pipeline.text_encoder.get_input_embeddings().weight
            embeds = weight.detach()[self.prefix_token_ids].float().cpu().contiguous()
            atomic_save_file({self.prefix_token: embeds}, os.path.join(save_directory, PREFIX_WEIGHTS_NAME))
            return PREFIX_WEIGHTS_NAME
        layers, metadata = {}, {}
        for name, config in self.lora_configs.items():
            state = get_peft_model_state_dict(getattr(self.pipeline, name))
            layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(state)
            metadata[f"{name}_lora_adapter_metadata"] = config.to_dict()
        # Through a temporary file renamed over the old one: a kill mid-write never leaves a truncated adaptor.
        atomic_write(
            os.path.join(save_directory, LORA_WEIGHTS_NAME),
            lambda tmp: type(self.pipeline).save_lora_weights(
                save_directory, weight_name=os.path.basename(tmp), safe_serialization=True, **layers, **metadata
            ),
        )
        return LORA_WEIGHTS_NAME


@dataclass
class CheckpointSelection:
    r"""
    Keeps the trained tensors of the step with the lowest selection score, so that a run can end with its best
    checkpoint rather than its last one. The paper checkpoints every 200 iterations and reports the best checkpoint,
    judged on validation occupations kept apart from the training and test ones (appendix A.2); the score is then, for
    example, the mean bias on such prompts.

    A bias can fall because the images lose their meaning (a finetuning that breaks the occupation's context also
    scrambles the attribute). With `min_similarity`, each step is also given the similarity of its images to the
    original model's (e.g. the mean CLIP-I / DINO cosine on the same prompts and noise), and only steps at or above it
    can be selected. If no step reaches it, the most similar step is kept, so that a run that broke its images keeps
    the step that broke them least.

    Args:
        adapters ([`FairAdapters`]): The adaptors whose state is kept.
        min_similarity (`float`, *optional*):
            The lowest similarity a selected step may have (a cosine, in `[-1, 1]`); `None` selects on the score alone.
        history (`list[tuple[int, float, float | None]]`):
            `(step, score, similarity)` of every [`~CheckpointSelection.update`], in order (`similarity` is `None`
            where it was not given).
        selected_state (`dict[str, torch.Tensor]`, *optional*): The [`FairAdapters.state_dict`] of `selected_step`.
    """

    adapters: FairAdapters
    min_similarity: float | None = None
    history: list[tuple[int, float, float | None]] = field(default_factory=list)
    selected_state: dict[str, torch.Tensor] | None = None

    def __post_init__(self):
        if self.min_similarity is not None and not -1.0 <= self.min_similarity <= 1.0:
            raise ValueError(
                f"`min_similarity` is a cosine similarity and must be in [-1, 1] (or None), got {self.min_similarity}."
            )

    def _eligible_entries(self) -> list[tuple[int, float, float | None]]:
        floor = self.min_similarity
        return [entry for entry in self.history if floor is None or entry[2] >= floor]

    @property
    def eligible_steps(self) -> list[int]:
        """The scored steps whose similarity reaches `min_similarity` (every scored step without one), in order."""
        return [step for step, *_ in self._eligible_entries()]

    def _selected_entry(self) -> tuple[int, float, float | None] | None:
        eligible = self._eligible_entries()
        if eligible:  # the lowest score, the earliest of equal ones
            return min(eligible, key=lambda entry: entry[1])
        # Nothing reaches `min_similarity`: the most similar step, the earliest of equal ones.
        return max(self.history, key=lambda entry: entry[2]) if self.history else None

    @property
    def selected_step(self) -> int | None:
        """The step kept: the lowest score among `eligible_steps`, else the most similar (`None` before any update)."""
        entry = self._selected_entry()
        return None if entry is None else entry[0]

    @property
    def selected_score(self) -> float | None:
        """The score of `selected_step` (`None` before the first update)."""
        entry = self._selected_entry()
        return None if entry is None else entry[1]

    def has_score(self, step: int) -> bool:
        """Whether `step` has been scored (each step is scored once, e.g. not again by a run resumed at that step)."""
        return any(step == seen for seen, *_ in self.history)

    def update(self, step: int, score: float, similarity: float | None = None) -> bool:
        r"""
        Records the adaptors' current state at `step` with its `score` (lower is better) and, when the selection has
        a `min_similarity`, its images' `similarity` to the original model's; returns whether it became the selected
        one.
        """
        if not math.isfinite(score):
            raise ValueError(f"`score` must be a finite number, got {score} at step {step}.")
        if similarity is None and self.min_similarity is not None:
            raise ValueError(
                f"This selection keeps only steps whose similarity is at least `min_similarity` "
                f"({self.min_similarity}); pass the `similarity` of step {step}."
            )
        if similarity is not None and not math.isfinite(similarity):
            raise ValueError(f"`similarity` must be a finite number, got {similarity} at step {step}.")
        if self.has_score(step):
            raise ValueError(f"Step {step} already has a score; each step is measured once.")
        self.history.append((step, float(score), None if similarity is None else float(similarity)))
        if self.selected_step != step:
            return False
        self.selected_state = {key: value.clone() for key, value in self.adapters.state_dict().items()}
        return True

    def restore(self) -> int:
        """Loads the selected state into the adaptors and returns its step."""
        if self.selected_step is None:
            raise ValueError("No step has been scored yet; call `update` first.")
        self.adapters.load_state_dict(self.selected_state)
        return self.selected_step

    def save(self, directory: str | os.PathLike) -> None:
        """Writes the selected state and the history to `directory` (atomically), e.g. into a training checkpoint."""
        if self.selected_step is None:
            return
        atomic_save_file(self.selected_state, os.path.join(directory, SELECTED_STATE_NAME))
        atomic_write_json(os.path.join(directory, SELECTION_HISTORY_NAME), {"history": self.history})

    def load(self, directory: str | os.PathLike) -> None:
        """Restores what [`~CheckpointSelection.save`] wrote (nothing if `directory` holds no selection)."""
        path = os.path.join(directory, SELECTION_HISTORY_NAME)
        if not os.path.isfile(path):
            self.history, self.selected_state = [], None
            return
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)["history"]
        history = []
        for step, score, *similarity in entries:  # `(step, score)`: saved before similarities were recorded
            similarity = similarity[0] if similarity else None
            history.append((int(step), float(score), None if similarity is None else float(similarity)))
        if self.min_similarity is not None and any(similarity is None for *_, similarity in history):
            raise ValueError(
                f"The selection saved in {os.fspath(directory)!r} has steps without a similarity, so "
                f"`min_similarity` {self.min_similarity} cannot apply to them; resume it without `min_similarity`."
            )
        self.history = history
        self.selected_state = load_file(os.path.join(directory, SELECTED_STATE_NAME))


def add_fair_adapters(
    pipeline,
    finetune: str = "text_encoder_lora",
    rank: int = 50,
    lora_alpha: int | None = None,
    num_prefix_tokens: int = 5,
    prefix_token: str = "<fair>",
    initializer_token: str = "person",
) -> FairAdapters:
    r"""
    Freezes every weight of `pipeline` and adds what `finetune` trains (the paper's components, Sec. 5.1 and A.6).

    Args:
        pipeline: A Stable Diffusion pipeline (e.g. [`FairStableDiffusionPipeline`]).
        finetune (`str`, *optional*, defaults to `"text_encoder_lora"`):
            `"text_encoder_lora"` (recommended by the paper), `"unet_lora"`, `"text_encoder_and_unet_lora"` or
            `"prompt_prefix"` (soft prompt: `num_prefix_tokens` trainable token embeddings prepended to every prompt).
        rank (`int`, *optional*, defaults to 50): LoRA rank (the paper used 50 on the text encoder).
        lora_alpha (`int`, *optional*): LoRA alpha; defaults to `rank` (scale 1).
        num_prefix_tokens (`int`, *optional*, defaults to 5): Soft-prompt length for `prompt_prefix`.
        prefix_token (`str`, *optional*, defaults to `"<fair>"`): The soft prompt's token (must be new).
        initializer_token (`str`, *optional*, defaults to `"person"`): Initial value of every prefix vector.

    Returns:
        [`FairAdapters`].
    """
    if finetune not in FINETUNE_MODES:
        raise ValueError(f"`finetune` must be one of {FINETUNE_MODES}, got {finetune!r}.")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`rank` must be a positive integer, got {rank!r}.")
    for model in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        model.requires_grad_(False)
    adapters = FairAdapters(pipeline=pipeline, finetune=finetune)
    if finetune == "prompt_prefix":
        if not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 1:
            raise ValueError(f"`num_prefix_tokens` must be a positive integer, got {num_prefix_tokens!r}.")
        tokenizer, text_encoder = pipeline.tokenizer, pipeline.text_encoder
        # The names `load_textual_inversion` gives a multi-vector token, so `maybe_convert_prompt` expands
        # "<fair>" into all its vectors both here and after a stock reload.
        tokens = [prefix_token] + [f"{prefix_token}_{i}" for i in range(1, num_prefix_tokens)]
        if tokenizer.add_tokens(tokens) != num_prefix_tokens:
            raise ValueError(f"`prefix_token` {prefix_token!r} is already in the tokenizer; choose a new token.")
        init_ids = tokenizer.encode(initializer_token, add_special_tokens=False)
        if len(init_ids) != 1:
            raise ValueError(f"`initializer_token` {initializer_token!r} must be a single token, got {len(init_ids)}.")
        text_encoder.resize_token_embeddings(len(tokenizer))
        ids = tokenizer.convert_tokens_to_ids(tokens)
        weight = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[ids] = weight[init_ids[0]].clone()
        weight.requires_grad_(True)
        row_mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        row_mask[ids] = 1
        weight.register_hook(lambda grad: grad * row_mask.to(grad))  # only the prefix rows learn
        adapters.prefix_token, adapters.prefix_token_ids = prefix_token, ids
        return adapters
    lora_alpha = rank if lora_alpha is None else lora_alpha
    if finetune in ("text_encoder_lora", "text_encoder_and_unet_lora"):
        config = LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=TEXT_ENCODER_LORA_TARGETS)
        pipeline.text_encoder.add_adapter(config)
        adapters.lora_configs["text_encoder"] = config
    if finetune in ("unet_lora", "text_encoder_and_unet_lora"):
        config = LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=UNET_LORA_TARGETS)
        pipeline.unet.add_adapter(config)
        adapters.lora_configs["unet"] = config
    return adapters


class FairFinetuningObjective(nn.Module):
    r"""
    The paper's training loss (Sec. 4.1): `L_align + lambda_img L_img` with the dynamic per-image / per-region weights.

    The distributional alignment loss runs on the classifier's logits of the finetuned images; the semantics loss
    compares each finetuned image with the frozen model's image from the same noise. Its weight is `lambda_img_agree`
    for images whose target class (every aligned attribute) equals the original image's predicted class, otherwise
    `lambda_img_nonface` outside the face box and `lambda_img_face` inside it (see
    [`ImageSemanticsLoss.region_weights`]). Without face boxes the whole image of a disagreeing image gets
    `lambda_img_nonface`.

    Face-centric mode (a `face_detector`, see [`diffusers_fair.faces.load_detector`]): the classifier sees the largest
    face of each image, cropped differentiably to `face_crop_size`; images without a face are excluded from the
    alignment (and the face-realism loss) and only keep their look; the face boxes set the region weights; and
    `lambda_face * face_realism_loss` (paper Eq. 8) is added.

    Args:
        classifier ([`AttributeClassifier`]): Images `(B, 3, H, W)` in `[0, 1]` -> attribute logits.
        alignment_loss ([`DistributionalAlignmentLoss`]): The DAL with its target distribution.
        semantics_loss ([`ImageSemanticsLoss`], *optional*): `None` trains the DAL alone (not recommended).
        lambda_img_agree (`float`), lambda_img_nonface (`float`), lambda_img_face (`float`):
            The paper's `lambda_img,1..3`; defaults are its gender setting (8, 1.6, 0.32).
        face_detector ([`~diffusers_fair.faces.FaceDetector`], *optional*): Enables the face-centric mode.
        face_crop_size (`int`, *optional*, defaults to 224): Side of the face crops the classifier sees.
        face_realism_loss ([`~diffusers_fair.faces.FaceRealismLoss`], *optional*), lambda_face (`float`, *optional*,
            defaults to 0): The face realism term and its weight (the paper: 1 for gender, 0.1 otherwise).
    """

    def __init__(
        self,
        classifier: nn.Module,
        alignment_loss: DistributionalAlignmentLoss,
        semantics_loss: ImageSemanticsLoss | None = None,
        lambda_img_agree: float = 8.0,
        lambda_img_nonface: float = 1.6,
        lambda_img_face: float = 0.32,
        face_detector=None,
        face_crop_size: int = 224,
        face_realism_loss: nn.Module | None = None,
        lambda_face: float = 0.0,
    ):
        super().__init__()
        if lambda_face > 0 and (face_realism_loss is None or face_detector is None):
            raise ValueError("`lambda_face` > 0 needs a `face_realism_loss` and a `face_detector`.")
        self.classifier = classifier.requires_grad_(False)
        self.alignment_loss = alignment_loss
        self.semantics_loss = semantics_loss
        self.lambdas = (lambda_img_agree, lambda_img_nonface, lambda_img_face)
        self.face_detector, self.face_crop_size = face_detector, face_crop_size
        self.face_realism_loss, self.lambda_face = face_realism_loss, lambda_face

    def _faces(self, images: torch.Tensor):
        """Face-centric mode (paper Sec. 4.1): the classifier's input is the largest face, cropped differentiably."""
        if self.face_detector is None:
            return images, None, None
        from .faces import crop_faces

        boxes, mask = self.face_detector.largest_faces(images)
        return crop_faces(images, boxes, size=self.face_crop_size), boxes, mask

    def forward(
        self,
        images: torch.Tensor,
        original_images: torch.Tensor | None,
        face_boxes: torch.Tensor | None = None,
        face_mask: torch.Tensor | None = None,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
        process_index: int = 0,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        r"""
        Args:
            images (`torch.Tensor` of shape `(B, 3, H, W)` in `[0, 1]`): Finetuned images (differentiable).
            original_images (`torch.Tensor` of the same shape, *optional*): The frozen model's images, same noise.
            face_boxes (`torch.Tensor` of shape `(B, 4)`, *optional*): Face boxes in pixels, NaN rows for no face.
            face_mask (`torch.Tensor` of shape `(B,)`, *optional*): `False` for images without a usable face.
            gather, process_index: Data-parallel transport, see [`DistributionalAlignmentLoss.forward`].

        Returns:
            `(loss, logs)`: the scalar loss and floats to log (losses, batch and target class frequencies).
        """
        faces, boxes, mask = self._faces(images)
        if boxes is not None:
            face_boxes, face_mask = boxes, mask
        logits = self.classifier(faces)
        alignment, diagnostics = self.alignment_loss(logits, face_mask, gather=gather, process_index=process_index)
        logs = {"loss/alignment": float(alignment.detach()), **diagnostics.to_log_dict()}
        total = alignment
        if self.semantics_loss is not None and original_images is not None:
            rows = slice(process_index * images.shape[0], (process_index + 1) * images.shape[0])
            with torch.no_grad():
                original_faces, _, original_mask = self._faces(original_images)
                original_logits = self.classifier(original_faces)
            agree = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
            if original_mask is not None:
                agree &= original_mask  # an original without a face has no class to agree with
            for attribute, targets in diagnostics.targets.items():
                local = targets[rows].to(images.device)
                original_class = original_logits[attribute].argmax(dim=-1)
                agree &= local == original_class
            # Images excluded from the alignment (no usable face) only keep their look: the largest weight.
            excluded = diagnostics.targets[next(iter(diagnostics.targets))][rows].to(images.device) < 0
            agree |= excluded
            weights = ImageSemanticsLoss.region_weights(
                agree, face_boxes, images.shape[-2], images.shape[-1], *self.lambdas
            )
            semantics, distances = self.semantics_loss(images, original_images, pixel_weights=weights)
            total = total + semantics
            logs["loss/semantics"] = float(semantics.detach())
            logs["agree_fraction"] = float(agree.float().mean())
        if self.lambda_face > 0:
            realism, _ = self.face_realism_loss(images, boxes)
            total = total + self.lambda_face * realism
            logs["loss/face_realism"] = float(realism.detach())
        logs["loss/total"] = float(total.detach())
        return total, logs


def frozen_unconditional_embeds(pipeline, batch_size: int = 1) -> torch.Tensor:
    r"""
    The empty prompt's embedding from the base text encoder (adaptors disabled), `(batch_size, L, D)`: pass it as
    `negative_prompt_embeds` (one row per prompt; the pipeline repeats it per image) so that classifier-free guidance's
    unconditional branch stays the base model's while the prompts go through the adapted encoder.

    Args:
        pipeline: A Stable Diffusion pipeline with (or without) fair adaptors on its text encoder.
        batch_size (`int`, *optional*, defaults to 1): Rows, one per prompt of the pipeline call.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer (one row per prompt), got {batch_size!r}.")
    with torch.no_grad(), adapters_disabled(pipeline.text_encoder):
        embeds = pipeline.encode_prompt("", pipeline._execution_device, 1, False)[0]
    return embeds.repeat(batch_size, 1, 1)


class AdaptedPipeline:
    r"""
    A view of a pipeline with its fair adaptors on (`enabled=True`, prompts prefixed for `prompt_prefix`) or off (the
    frozen base model), callable like the pipeline (the contract of [`~diffusers_fair.metrics.generate_images`]).
    With `frozen_unconditional=True` the adapted view guides with the base encoder's empty-prompt embedding (see
    [`frozen_unconditional_embeds`]), as a model trained so must be sampled.
    """

    def __init__(self, adapters: FairAdapters, enabled: bool = True, frozen_unconditional: bool = False):
        self.adapters, self.enabled, self.frozen_unconditional = adapters, enabled, frozen_unconditional

    def __call__(self, prompt: str | Sequence[str], **kwargs):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        pipeline = self.adapters.pipeline
        if self.enabled:
            if self.frozen_unconditional and kwargs.get("negative_prompt_embeds") is None:
                kwargs["negative_prompt_embeds"] = frozen_unconditional_embeds(pipeline, len(prompts))
            return pipeline(prompt=self.adapters.apply_prompt(prompts), **kwargs)
        with adapters_disabled(pipeline.text_encoder, pipeline.unet):
            return pipeline(prompt=prompts, **kwargs)


@torch.no_grad()
def evaluate_adapters(
    adapters: FairAdapters,
    prompts: Sequence[str],
    classifier: nn.Module,
    num_images_per_prompt: int,
    context_classifier: nn.Module | None = None,
    enabled: bool = True,
    batch_size: int = 16,
    seed: int = 0,
    frozen_unconditional: bool = False,
    similarity_encoders: Mapping[str, nn.Module] | None = None,
    reference_cache: dict | None = None,
    **generation_kwargs,
) -> dict:
    r"""
    Bias of the adapted (or, with `enabled=False`, the base) model on `prompts`, and how much of the original images'
    meaning it keeps.

    Images are drawn with [`~diffusers_fair.metrics.generate_images`] (per-image seeds), scored with
    [`~diffusers_fair.metrics.score_images`]. With a `context_classifier` and `enabled=True`, the base model's images
    from the same noise are generated too and `context_kept` is the fraction of images whose predicted context class
    (e.g. the occupation) equals the original image's. With `similarity_encoders`, `{name}_similarity` is the mean
    cosine similarity of each image's features to its original's ([`~diffusers_fair.metrics.image_similarity`]: CLIP-I,
    DINO).

    Args:
        adapters ([`FairAdapters`]): The adaptors and their pipeline.
        prompts (`list[str]`): Evaluation prompts (plain, without any soft-prompt token).
        classifier ([`AttributeClassifier`]): The evaluation classifier.
        num_images_per_prompt (`int`): Images per prompt.
        context_classifier ([`AttributeClassifier`], *optional*): A classifier of what must not change.
        enabled (`bool`, *optional*, defaults to `True`): Evaluate the adapted model (`False`: the base model).
        batch_size (`int`, *optional*, defaults to 16), seed (`int`, *optional*, defaults to 0): Generation.
        frozen_unconditional (`bool`, *optional*, defaults to `False`): See [`AdaptedPipeline`].
        similarity_encoders (`dict[str, nn.Module]`, *optional*):
            Name -> `CLIPModel`, `Dinov2Model` or [`~diffusers_fair.semantics.ImageFeatureExtractor`] (with
            `enabled=True` only).
        reference_cache (`dict`, *optional*):
            Keeps what is measured on the base model's images (their context classes and similarity features) per
            prompt and generation settings, so that repeated evaluations (before training with `enabled=False`,
            then at each validation) generate the base images once. Pass the same dict, initially empty, to every
            call; entries are keyed by the prompt, `num_images_per_prompt`, `seed`, `batch_size`, the generation
            settings and the classifier or encoder object, so other settings measure afresh. Generation settings
            must then be plain values (no tensors).
        generation_kwargs: `num_inference_steps`, `guidance_scale`, `height`, `width`, ... for the pipeline.

    Returns:
        `dict` (JSON-serialisable): `"per_prompt"` rows and `"summary"` metric -> `[mean, sd]` over prompts.
    """
    from .metrics import generate_images, image_features, score_images

    settings = _reference_settings(reference_cache, num_images_per_prompt, seed, batch_size, generation_kwargs)
    view = AdaptedPipeline(adapters, enabled, frozen_unconditional)
    rows = []
    kwargs = {"batch_size": batch_size, "seed": seed, "progress_bar": False, **generation_kwargs}
    # (metric, object) -> what is measured on a set of images, and how it is compared with the base model's.
    measurers = {}
    if context_classifier is not None:
        (context,) = context_classifier.attributes
        measurers["context_kept", id(context_classifier)] = (
            lambda x: context_classifier(x)[context].argmax(-1),
            lambda value, reference: (value == reference).float().mean(),
        )
    for name, encoder in (similarity_encoders or {}).items():
        measurers[f"{name}_similarity", id(encoder)] = (
            lambda x, e=encoder: image_features(x, e, batch_size),
            lambda value, reference: torch.nn.functional.cosine_similarity(value, reference, dim=-1).mean(),
        )
    for prompt in prompts:
        images = generate_images(view, [prompt], num_images_per_prompt, **kwargs)[prompt]
        row = score_images({prompt: images}, classifier).per_prompt[0]
        cached = {} if reference_cache is None else reference_cache.setdefault((prompt, *settings), {})
        if not enabled:  # these are the base images: only keep what is measured on them
            if reference_cache is not None:
                cached.update({key: measure(images) for key, (measure, _) in measurers.items() if key not in cached})
        elif measurers:
            if any(key not in cached for key in measurers):
                base = AdaptedPipeline(adapters, False)
                originals = generate_images(base, [prompt], num_images_per_prompt, **kwargs)[prompt]
                cached.update(
                    {key: measure(originals) for key, (measure, _) in measurers.items() if key not in cached}
                )
            for (metric, obj), (measure, compare) in measurers.items():
                row[metric] = float(compare(measure(images), cached[metric, obj]))
        rows.append(row)
    return {"per_prompt": rows, "summary": summarize_per_prompt(rows)}


def _reference_settings(reference_cache: dict | None, *settings) -> tuple:
    """The part of a `reference_cache` key after the prompt: the settings the base model's images depend on."""
    *plain, generation_kwargs = settings
    if reference_cache is not None and any(isinstance(v, torch.Tensor) for v in generation_kwargs.values()):
        raise ValueError(
            "`reference_cache` keys entries by the generation settings' values, and tensors cannot be compared so: "
            "pass `reference_cache=None` with tensor arguments such as `negative_prompt_embeds`."
        )
    return (*plain, repr(sorted(generation_kwargs.items())))


def summarize_per_prompt(rows: Sequence[Mapping]) -> dict[str, list[float]]:
    r"""
    The `"summary"` of [`evaluate_adapters`]: metric -> `[mean, sd]` over prompts of every float field of the rows.

    Evaluations split over processes (each on its share of the prompts) summarise their gathered rows with it.

    Args:
        rows (`list[dict]`): One row per prompt, as in [`evaluate_adapters`]'s `"per_prompt"`.

    Returns:
        `dict[str, list[float]]`; empty without rows.
    """
    from .metrics import mean_std

    metrics = [k for k, v in rows[0].items() if isinstance(v, float)] if rows else []
    return {k: list(mean_std([row[k] for row in rows])) for k in metrics}


@torch.no_grad()
def validation_grid(
    adapters: FairAdapters,
    prompts: Sequence[str],
    classifier: nn.Module,
    num_images_per_prompt: int = 8,
    seed: int = 0,
    frozen_unconditional: bool = False,
    reference_cache: dict | None = None,
    **generation_kwargs,
):
    r"""
    The validation picture of a fair finetuning, as the paper's Fig. 3: per prompt, a row of the base model's images
    and, under it, a row of the adapted model's images from the same noise, each image with a bar per attribute
    coloured by the classifier's predicted class, as long as its confidence ([`~diffusers_fair.visualization`]).

    Args:
        adapters ([`FairAdapters`]): The adaptors and their pipeline.
        prompts (`list[str]`): Validation prompts (plain, without any soft-prompt token).
        classifier ([`AttributeClassifier`]): Predicts the attributes of the bars.
        num_images_per_prompt (`int`, *optional*, defaults to 8): Images (columns) per row.
        seed (`int`, *optional*, defaults to 0): Base seed of [`~diffusers_fair.metrics.generate_images`].
        frozen_unconditional (`bool`, *optional*, defaults to `False`): See [`AdaptedPipeline`].
        reference_cache (`dict`, *optional*):
            Keeps the base model's rows (images and class probabilities) per prompt, `num_images_per_prompt`, `seed`,
            generation settings and classifier, so that repeated validations generate them once. Pass the same
            dict, initially empty, to every call (not the one given to [`evaluate_adapters`]). Generation settings
            must then be plain values (no tensors).
        generation_kwargs: `num_inference_steps`, `guidance_scale`, `height`, `width`, ... for the pipeline.

    Returns:
        `PIL.Image.Image`: `2 * len(prompts)` rows (base, adapted) of `num_images_per_prompt` images.
    """
    from PIL import Image

    from .metrics import classify_images, generate_images
    from .visualization import annotated_grid

    settings = _reference_settings(reference_cache, num_images_per_prompt, seed, generation_kwargs)
    rows, probabilities = [], []
    kwargs = {"seed": seed, "progress_bar": False, **generation_kwargs}

    def row(enabled: bool, prompt: str) -> tuple:
        view = AdaptedPipeline(adapters, enabled, frozen_unconditional)
        images = generate_images(view, [prompt], num_images_per_prompt, **kwargs)[prompt]
        return images, classify_images(images, classifier)

    for prompt in prompts:
        cache, key = {} if reference_cache is None else reference_cache, (prompt, *settings, id(classifier))
        if key not in cache:
            cache[key] = row(False, prompt)
        for images, probs in (cache[key], row(True, prompt)):
            rows.append(images)
            probabilities.append(probs)
    return Image.fromarray(annotated_grid(rows, probabilities))

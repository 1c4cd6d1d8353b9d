"""`FairStableDiffusionPipeline`: Stable Diffusion whose sampling chain can be differentiated (direct finetuning)."""

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.utils import BaseOutput, logging
from peft.tuners.tuners_utils import BaseTunerLayer

from .scheduling_biased_gradient import BiasedGradientScheduler

logger = logging.get_logger(__name__)

GRADIENT_MODES = (None, "biased", "naive")
BIASED_GRADIENT_IMPLS = ("recompute", "autograd")


@dataclass
class FairStableDiffusionPipelineOutput(BaseOutput):
    r"""
    Output of [`FairStableDiffusionPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The generated images; with a gradient, a `(B, 3, H, W)` tensor in `[0, 1]` (`output_type="pt"`) or the
            final latents (`output_type="latent"`), differentiable w.r.t. whatever requires grad.
        nsfw_content_detected (`list[bool]`, *optional*):
            The safety checker's verdicts on `images`, `None` when it did not run.
        latents (`torch.Tensor`):
            The final latents `z_0` of shape `(B, C, h, w)` (differentiable when a gradient was asked for).
        original_images (same type as `images`, *optional*):
            With `return_original=True`, the frozen model's images (adapters disabled) from the same initial noise,
            never differentiable, filtered by the same safety checker; otherwise `None`.
    """

    images: Any
    nsfw_content_detected: list[bool] | None = None
    latents: torch.Tensor | None = None
    original_images: Any = None


@contextlib.contextmanager
def adapters_disabled(*models: torch.nn.Module | None):
    """Disables every peft adapter layer of `models` inside the block and restores their exact state after it."""
    layers = [m for model in models if model is not None for m in model.modules() if isinstance(m, BaseTunerLayer)]
    was_disabled = [layer.disable_adapters for layer in layers]
    # peft's `enable_adapters` also flips `requires_grad` of the adapter weights: remember and restore it.
    requires_grad = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, disabled in zip(layers, was_disabled):
            layer.enable_adapters(not disabled)
        for p, flag in requires_grad:
            p.requires_grad_(flag)


def has_active_adapters(model: torch.nn.Module | None) -> bool:
    """Whether `model` has a peft adapter layer that is enabled (so disabling adapters changes its output)."""
    if model is None:
        return False
    return any(isinstance(m, BaseTunerLayer) and not m.disable_adapters for m in model.modules())


@dataclass
class _Trajectory:
    """What the memory-flat biased gradient needs to recompute each step's noise prediction in backward."""

    pipeline: "FairStableDiffusionPipeline"
    latents: list[torch.Tensor]  # the U-Net input z_t of every step, finetuned rows only, no graph
    timesteps: list[torch.Tensor]
    coefficients: torch.Tensor  # M_i * C_i (times T/k for the sampled steps, 0 for the others), float64
    do_classifier_free_guidance: bool
    guidance_scale: float
    guidance_rescale: float
    cross_attention_kwargs: dict[str, Any] | None
    timestep_cond: torch.Tensor | None
    chunk_size: int
    autocast: tuple[str, bool, torch.dtype]


class _BiasedGradientFunction(torch.autograd.Function):
    """Identity on the precomputed `z_0` whose backward is the biased DFT gradient, recomputing one step at a time.

    Inputs: the trajectory, `z_0` (no graph), the prompt embeddings the U-Net saw, and the U-Net parameters that
    require grad. Backward returns `sum_i M_i C_i (d eps_i / d input)^T dL/dz_0` for the embeddings and parameters.
    """

    @staticmethod
    def forward(ctx, trajectory: _Trajectory, latents, prompt_embeds, *params):
        ctx.trajectory = trajectory
        ctx.save_for_backward(prompt_embeds, *params)
        return latents.clone()

    @staticmethod
    def backward(ctx, grad_latents):
        prompt_embeds, *params = ctx.saved_tensors
        grads = ctx.trajectory.pipeline._recompute_biased_gradient(ctx.trajectory, grad_latents, prompt_embeds, params)
        return (None, None, *grads)


class FairStableDiffusionPipeline(StableDiffusionPipeline):
    r"""
    [`~diffusers.StableDiffusionPipeline`] whose sampling chain can be backpropagated through, for direct finetuning
    (DFT) of the text encoder, the U-Net, LoRA adaptors or soft prompts with a loss on the generated images (Shen et
    al. 2024, "Finetuning Text-to-Image Diffusion Models for Fairness", Sec. 4.2).

    Same constructor, components and `from_pretrained` as the parent. `__call__` takes the parent's arguments plus
    `gradient`: `None` (default) samples without a graph and equals the parent's output exactly; `"biased"` gives the
    paper's biased gradient (every U-Net input detached, each step's noise-prediction gradient rescaled by the
    scheduler's `gradient_scales`); `"naive"` backpropagates exactly through the whole chain.
    """

    def to_json_string(self) -> str:
        # A saved folder is a plain Stable Diffusion pipeline (this class only adds call-time behaviour), so stock
        # `DiffusionPipeline.from_pretrained` loads it too; `FairStableDiffusionPipeline.from_pretrained` still gives
        # this class.
        config = json.loads(super().to_json_string())
        config["_class_name"] = StableDiffusionPipeline.__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    # 1-7 mirror `StableDiffusionPipeline.__call__`, whose body runs under `torch.no_grad()` and so cannot be reused.
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",),
        gradient: str | None = None,
        biased_gradient_impl: str = "recompute",
        backprop_steps: int | None = None,
        backprop_generator: torch.Generator | None = None,
        recompute_chunk_size: int = 2,
        return_original: bool = False,
        original_prompt: str | list[str] | None = None,
        original_prompt_embeds: torch.Tensor | None = None,
    ) -> FairStableDiffusionPipelineOutput | tuple:
        r"""
        Generates images, optionally with a differentiable path from the images back to the trainable weights.

        Args:
            prompt, height, width, num_inference_steps, timesteps, sigmas, guidance_scale, negative_prompt,
            num_images_per_prompt, eta, generator, latents, prompt_embeds, negative_prompt_embeds, output_type,
            return_dict, cross_attention_kwargs, guidance_rescale, clip_skip, callback_on_step_end,
            callback_on_step_end_tensor_inputs:
                As in [`~diffusers.StableDiffusionPipeline.__call__`]. With a gradient, `output_type` must be `"pt"`
                or `"latent"`, the safety checker must be off (`safety_checker=None`), and `callback_on_step_end` is
                not accepted.
            gradient (`str`, *optional*, defaults to `None`):
                `None`: no graph (equal to the parent's output bit for bit). `"biased"`: the paper's biased DFT
                gradient; if the scheduler is not a [`BiasedGradientScheduler`], one is built from its config.
                `"naive"`: the exact gradient through the whole chain (plain autograd; it explodes with the number
                of steps, which is why the paper's gradient exists).
            biased_gradient_impl (`str`, *optional*, defaults to `"recompute"`):
                `"recompute"`: memory-flat; sampling keeps only the latents `z_t`, and `loss.backward()` recomputes
                each step's noise prediction with a graph, `recompute_chunk_size` steps per U-Net call, so peak memory
                does not grow with `num_inference_steps`. `"autograd"`: Algorithm 1 literally (detach and gradient
                hooks, the whole graph kept), the reference the recompute path is tested against.
            backprop_steps (`int`, *optional*):
                Backpropagate through a random subset of this many steps only, rescaled by `T / k`, an unbiased
                estimate of the biased gradient (`"recompute"` only). The subset is drawn with `backprop_generator`.
            backprop_generator (`torch.Generator`, *optional*):
                CPU generator for the `backprop_steps` subset; the global RNG if `None`.
            recompute_chunk_size (`int`, *optional*, defaults to 2):
                How many steps the recompute path batches into one U-Net call. Peak memory grows with it; larger
                chunks pay off when one step's batch is too small to fill the device (on a CPU they do not).
            return_original (`bool`, *optional*, defaults to `False`):
                Also return the frozen model's images from the same initial noise (peft adapters of the text encoder
                and U-Net disabled), for the semantics-preserving loss. When the U-Net has no active adapter they
                are denoised in the same U-Net batches as the finetuned images.
            original_prompt (`str` or `list[str]`, *optional*):
                The prompt for the original images when it differs from `prompt` (e.g. without soft-prompt tokens).
            original_prompt_embeds (`torch.Tensor`, *optional*):
                Precomputed prompt embeddings for the original images; required when only `prompt_embeds` is given.

        Returns:
            [`FairStableDiffusionPipelineOutput`] or `tuple`: with `return_dict=False`, the tuple
            `(images, nsfw_content_detected, latents, original_images)`.
        """
        # 0. Default height and width to unet
        if not height or not width:
            sample_size = self.unet.config.sample_size
            sample_size = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
            height, width = sample_size[0] * self.vae_scale_factor, sample_size[1] * self.vae_scale_factor

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt,
            height,
            width,
            None,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            None,
            None,
            callback_on_step_end_tensor_inputs,
        )
        self._check_gradient_inputs(
            gradient,
            biased_gradient_impl,
            backprop_steps,
            None if timesteps is not None or sigmas is not None else num_inference_steps,
            recompute_chunk_size,
            output_type,
            callback_on_step_end,
            return_original,
            prompt,
            prompt_embeds,
            original_prompt,
            original_prompt_embeds,
        )
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

        grad_context = torch.no_grad() if gradient is None else contextlib.nullcontext()
        with grad_context:
            # 2. Define call parameters
            if prompt is not None and isinstance(prompt, str):
                batch_size = 1
            elif prompt is not None and isinstance(prompt, list):
                batch_size = len(prompt)
            else:
                batch_size = prompt_embeds.shape[0]
            device = self._execution_device
            scheduler = self._gradient_scheduler(gradient)

            # 3. Encode input prompt (with a graph when a gradient is asked for)
            user_negative_prompt_embeds = negative_prompt_embeds
            prompt_embeds, negative_prompt_embeds = self._encode(
                prompt, device, num_images_per_prompt, negative_prompt, prompt_embeds, negative_prompt_embeds
            )
            conditioning = (
                [negative_prompt_embeds, prompt_embeds] if self.do_classifier_free_guidance else [prompt_embeds]
            )

            # 3.1 The frozen model's conditioning for the original images: adapters off, no graph
            original_conditioning = None
            fuse_originals = return_original and not has_active_adapters(self.unet)
            if return_original:
                with torch.no_grad(), adapters_disabled(self.text_encoder):
                    if original_prompt_embeds is None and original_prompt is None and prompt is not None:
                        original_prompt = prompt
                    # Given negative embeddings are used as they are; a negative prompt is encoded by the frozen model.
                    original_negative = user_negative_prompt_embeds
                    original_embeds, original_negative = self._encode(
                        original_prompt,
                        device,
                        num_images_per_prompt,
                        negative_prompt,
                        original_prompt_embeds,
                        None if original_negative is None else original_negative.detach(),
                    )
                original_conditioning = (
                    [original_negative, original_embeds] if self.do_classifier_free_guidance else [original_embeds]
                )

            # 4-5. Prepare timesteps and latent variables
            latents = self.prepare_latents(
                batch_size * num_images_per_prompt,
                self.unet.config.in_channels,
                height,
                width,
                prompt_embeds.dtype,
                device,
                generator,
                latents,
            )
            initial_latents = latents.detach()
            extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

            # 6. Optionally get Guidance Scale Embedding
            timestep_cond = None
            if self.unet.config.time_cond_proj_dim is not None:
                guidance_scale_tensor = torch.tensor(self.guidance_scale - 1).repeat(
                    batch_size * num_images_per_prompt
                )
                timestep_cond = self.get_guidance_scale_embedding(
                    guidance_scale_tensor, embedding_dim=self.unet.config.time_cond_proj_dim
                ).to(device=device, dtype=latents.dtype)

            # 7. Denoising loop (the finetuned and, when fused, the original rows in the same U-Net batches)
            rows = latents.shape[0]
            if fuse_originals:
                latents = torch.cat([initial_latents, initial_latents])
                conditioning = [torch.cat([c, o]) for c, o in zip(conditioning, original_conditioning)]
                if timestep_cond is not None:
                    timestep_cond = torch.cat([timestep_cond, timestep_cond])
            mode = gradient if gradient != "biased" else f"biased-{biased_gradient_impl}"
            with torch.no_grad() if mode == "biased-recompute" else contextlib.nullcontext():
                latents, recorded, step_timesteps = self._denoise(
                    scheduler,
                    latents,
                    torch.cat(conditioning),
                    num_inference_steps,
                    timesteps,
                    sigmas,
                    device,
                    extra_step_kwargs,
                    timestep_cond,
                    mode,
                    callback_on_step_end,
                    callback_on_step_end_tensor_inputs,
                    record_rows=rows,
                    negative_prompt_embeds=negative_prompt_embeds,
                )
            original_latents = None
            if fuse_originals:
                latents, original_latents = latents[:rows], latents[rows:].detach()
                conditioning = [c[:rows] for c in conditioning]
                if timestep_cond is not None:
                    timestep_cond = timestep_cond[:rows]
            elif return_original:
                with torch.no_grad(), adapters_disabled(self.text_encoder, self.unet):
                    original_latents, _, _ = self._denoise(
                        scheduler,
                        initial_latents,
                        torch.cat(original_conditioning),
                        num_inference_steps,
                        timesteps,
                        sigmas,
                        device,
                        extra_step_kwargs,
                        timestep_cond,
                        None,
                    )

            # 7.1 Memory-flat biased gradient: attach the backward that recomputes each step
            if mode == "biased-recompute":
                device_type = latents.device.type
                trajectory = _Trajectory(
                    pipeline=self,
                    latents=recorded,
                    timesteps=list(step_timesteps),
                    coefficients=self._step_coefficients(scheduler, backprop_steps, backprop_generator),
                    do_classifier_free_guidance=self.do_classifier_free_guidance,
                    guidance_scale=self.guidance_scale,
                    guidance_rescale=self.guidance_rescale,
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    timestep_cond=timestep_cond,
                    chunk_size=recompute_chunk_size,
                    autocast=(
                        device_type,
                        torch.is_autocast_enabled(device_type),
                        torch.get_autocast_dtype(device_type),
                    ),
                )
                unet_params = [p for p in self.unet.parameters() if p.requires_grad]
                latents = _BiasedGradientFunction.apply(trajectory, latents, torch.cat(conditioning), *unet_params)

            # 8. Decode (with a gradient there is no safety checker: it is refused above, and it is not differentiable)
            image, has_nsfw_concept = self._decode(
                latents, output_type, generator, device, prompt_embeds.dtype, safety_check=gradient is None
            )
            original_images = None
            if original_latents is not None:
                with torch.no_grad():  # the same safety checker; the output keeps the main images' flags
                    original_images, _ = self._decode(
                        original_latents, output_type, generator, device, prompt_embeds.dtype, safety_check=True
                    )

            # Offload all models
            self.maybe_free_model_hooks()

            if not return_dict:
                return (image, has_nsfw_concept, latents, original_images)
            return FairStableDiffusionPipelineOutput(
                images=image, nsfw_content_detected=has_nsfw_concept, latents=latents, original_images=original_images
            )

    def _check_gradient_inputs(
        self,
        gradient,
        biased_gradient_impl,
        backprop_steps,
        num_inference_steps,
        recompute_chunk_size,
        output_type,
        callback_on_step_end,
        return_original,
        prompt,
        prompt_embeds,
        original_prompt,
        original_prompt_embeds,
    ):
        if gradient not in GRADIENT_MODES:
            raise ValueError(f"`gradient` must be one of {GRADIENT_MODES}, got {gradient!r}.")
        if biased_gradient_impl not in BIASED_GRADIENT_IMPLS:
            raise ValueError(
                f"`biased_gradient_impl` must be one of {BIASED_GRADIENT_IMPLS}, got {biased_gradient_impl!r}."
            )

        def is_count(value) -> bool:  # bool is an int subclass, but `True` is not a count
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        if not is_count(recompute_chunk_size):
            raise ValueError(f"`recompute_chunk_size` must be a positive integer, got {recompute_chunk_size!r}.")
        if backprop_steps is not None and not is_count(backprop_steps):
            raise ValueError(f"`backprop_steps` must be a positive integer, got {backprop_steps!r}.")
        # Checked again once the schedule is known (custom `timesteps` / `sigmas`); here before any sampling.
        if backprop_steps is not None and num_inference_steps is not None and backprop_steps > num_inference_steps:
            raise ValueError(
                f"`backprop_steps` ({backprop_steps}) must be at most `num_inference_steps` ({num_inference_steps})."
            )
        if backprop_steps is not None and (gradient != "biased" or biased_gradient_impl != "recompute"):
            raise ValueError(
                "`backprop_steps` needs `gradient='biased'` with `biased_gradient_impl='recompute'` (the memory-flat "
                f"path); got gradient={gradient!r}, biased_gradient_impl={biased_gradient_impl!r}."
            )
        if original_prompt is not None and original_prompt_embeds is not None:
            raise ValueError("Pass either `original_prompt` or `original_prompt_embeds`, not both.")
        if not return_original and (original_prompt is not None or original_prompt_embeds is not None):
            raise ValueError(
                "`original_prompt` / `original_prompt_embeds` prompt the frozen model's `original_images`, which only "
                "`return_original=True` draws; pass it, or drop them."
            )
        if return_original and prompt is None and original_prompt is None and original_prompt_embeds is None:
            raise ValueError(
                "`return_original=True` with `prompt_embeds` needs `original_prompt` or `original_prompt_embeds` to "
                "know what the frozen model should be prompted with."
            )
        if return_original and (original_prompt is not None or original_prompt_embeds is not None):
            # The original images start from the same noise, so they need one original prompt per prompt.
            num_prompts, num_originals = (
                1 if isinstance(text, str) else len(text) if isinstance(text, list) else embeds.shape[0]
                for text, embeds in ((prompt, prompt_embeds), (original_prompt, original_prompt_embeds))
            )
            if num_originals != num_prompts:
                name = "original_prompt" if original_prompt is not None else "original_prompt_embeds"
                main = "prompt" if prompt is not None else "prompt_embeds"
                raise ValueError(
                    f"`{name}` has {num_originals} prompt{'s' * (num_originals != 1)}, but it needs the same number "
                    f"as `{main}` ({num_prompts})."
                )
        if return_original and callback_on_step_end is not None:
            raise ValueError("`callback_on_step_end` is not supported together with `return_original=True`.")
        if gradient is None:
            return
        if output_type not in ("pt", "latent"):
            raise ValueError(
                f"With `gradient={gradient!r}`, `output_type` must be 'pt' or 'latent' (PIL and numpy outputs break "
                f"the graph); got {output_type!r}."
            )
        if self.safety_checker is not None:
            raise ValueError(
                f"With `gradient={gradient!r}` the safety checker must be off: it is not differentiable. Load the "
                "pipeline with `safety_checker=None` (or set `pipe.safety_checker = None`) for training."
            )
        if callback_on_step_end is not None:
            raise ValueError(f"`callback_on_step_end` is not supported with `gradient={gradient!r}`.")
        if gradient == "biased" and biased_gradient_impl == "recompute" and self.unet.training:
            if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in self.unet.modules()):
                raise ValueError(
                    "The memory-flat biased gradient recomputes the U-Net in backward and needs it deterministic, but "
                    "the U-Net is in training mode with active dropout. Call `pipe.unet.eval()` (LoRA weights still "
                    "train) or use `lora_dropout=0`."
                )

    def _gradient_scheduler(self, gradient: str | None):
        """The scheduler for this call: `BiasedGradientScheduler` for the biased gradient, otherwise the pipeline's."""
        if gradient != "biased" or isinstance(self.scheduler, BiasedGradientScheduler):
            return self.scheduler
        source, cached = getattr(self, "_biased_scheduler", (None, None))
        if source is not self.scheduler:
            logger.warning(
                f"`gradient='biased'` needs a `BiasedGradientScheduler`; building one from the pipeline's "
                f"{type(self.scheduler).__name__} config (DPM-Solver++, gradient_scaling='paper'). Set "
                "`pipe.scheduler = BiasedGradientScheduler.from_config(pipe.scheduler.config)` to choose yourself."
            )
            cached = BiasedGradientScheduler.from_config(self.scheduler.config)
            self._biased_scheduler = (self.scheduler, cached)
        return cached

    def _encode(self, prompt, device, num_images_per_prompt, negative_prompt, prompt_embeds, negative_prompt_embeds):
        """`encode_prompt` with this call's settings; returns the U-Net's conditioning (negatives first under CFG)."""
        lora_scale = self.cross_attention_kwargs.get("scale", None) if self.cross_attention_kwargs else None
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=self.clip_skip,
        )
        return prompt_embeds, negative_prompt_embeds

    def _decode(self, latents, output_type, generator, device, dtype, safety_check: bool):
        """The parent's decode, safety check and post-processing; returns `(images, nsfw flags or None)`."""
        if output_type == "latent":
            return latents, None
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        has_nsfw_concept = None
        if safety_check:
            image, has_nsfw_concept = self.run_safety_checker(image, device, dtype)
        do_denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not n for n in has_nsfw_concept]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        return image, has_nsfw_concept

    def _denoise(
        self,
        scheduler,
        latents,
        conditioning,
        num_inference_steps,
        timesteps,
        sigmas,
        device,
        extra_step_kwargs,
        timestep_cond,
        mode,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=(),
        record_rows=None,
        negative_prompt_embeds=None,
    ):
        """The sampling loop for every gradient mode.

        `mode` is `None` (as the parent), `"naive"` (plain autograd), `"biased-autograd"` (detached U-Net inputs and
        gradient hooks, Algorithm 1) or `"biased-recompute"` (run it without a graph; it records the first
        `record_rows` rows of every U-Net input for the backward). `negative_prompt_embeds` is only handed to
        `callback_on_step_end`. Returns the final latents, the recorded inputs (or `None`) and the timesteps.
        """
        timesteps, num_inference_steps = retrieve_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas)
        num_warmup_steps = len(timesteps) - num_inference_steps * scheduler.order
        self._num_timesteps = len(timesteps)
        recorded = [] if mode == "biased-recompute" else None
        # Algorithm 1's per-step scale C_i, applied to the gradient reaching the guided noise prediction.
        scales = scheduler.gradient_scales.tolist() if mode == "biased-autograd" else None

        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue

                # The biased gradient treats every U-Net input z_t as a constant (B_t = I in the paper's Eq. 9).
                unet_input = latents.detach() if mode in ("biased-autograd", "biased-recompute") else latents
                if recorded is not None:
                    recorded.append(unet_input[:record_rows].clone())
                latent_model_input = torch.cat([unet_input] * 2) if self.do_classifier_free_guidance else unet_input
                if hasattr(scheduler, "scale_model_input"):
                    latent_model_input = scheduler.scale_model_input(latent_model_input, t)
                noise_pred = self.unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=conditioning,
                    timestep_cond=timestep_cond,
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    return_dict=False,
                )[0]
                noise_pred = self._guide(noise_pred)
                if scales is not None and noise_pred.requires_grad:
                    noise_pred.register_hook(lambda grad, scale=scales[i]: grad * scale)

                latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    # The parent's `_callback_tensor_inputs`. As there, `prompt_embeds` is the U-Net's conditioning
                    # (negatives first under CFG), and a returned `negative_prompt_embeds` feeds later callbacks only.
                    callback_kwargs = {
                        "latents": latents,
                        "prompt_embeds": conditioning,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    callback_kwargs = {k: callback_kwargs[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    conditioning = callback_outputs.pop("prompt_embeds", conditioning)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % scheduler.order == 0):
                    progress_bar.update()
        return latents, recorded, timesteps

    def _guide(self, noise_pred: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance (and its rescale) of a `[uncond; cond]` U-Net output, as the parent does it."""
        if not self.do_classifier_free_guidance:
            return noise_pred
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        guided = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
        if self.guidance_rescale > 0.0:
            # Based on 3.4. in https://huggingface.co/papers/2305.08891
            guided = rescale_noise_cfg(guided, noise_pred_text, guidance_rescale=self.guidance_rescale)
        return guided

    @staticmethod
    def _step_coefficients(scheduler, backprop_steps, backprop_generator) -> torch.Tensor:
        """`M_i * C_i` per step; with `backprop_steps=k`, kept for `k` random steps and scaled by `T / k`."""
        coefficients = scheduler.noise_prediction_coefficients * scheduler.gradient_scales
        num_steps = len(coefficients)
        if backprop_steps is None:
            return coefficients
        if not isinstance(backprop_steps, int) or not 1 <= backprop_steps <= num_steps:
            raise ValueError(
                f"`backprop_steps` must be an integer between 1 and the number of steps ({num_steps}), "
                f"got {backprop_steps!r}."
            )
        chosen = torch.randperm(num_steps, generator=backprop_generator)[:backprop_steps]
        mask = torch.zeros(num_steps, dtype=coefficients.dtype)
        mask[chosen] = num_steps / backprop_steps
        return coefficients * mask

    def _recompute_biased_gradient(self, trajectory: _Trajectory, grad_latents, conditioning, params):
        """Backward of the memory-flat biased gradient: `sum_i M_i C_i (d eps_i / d inputs)^T dL/dz_0`."""
        needs_grad = [conditioning.requires_grad] + [True] * len(params)
        conditioning_leaf = conditioning.detach().requires_grad_(conditioning.requires_grad)
        inputs = ([conditioning_leaf] if conditioning.requires_grad else []) + list(params)
        totals = [None] * len(inputs)
        steps = [i for i, c in enumerate(trajectory.coefficients.tolist()) if c != 0.0]
        rows = grad_latents.shape[0]
        copies = 2 if trajectory.do_classifier_free_guidance else 1
        device_type, autocast_enabled, autocast_dtype = trajectory.autocast
        # The guidance helpers read the call's settings from the pipeline: restore them for the recompute.
        saved = (self._guidance_scale, self._guidance_rescale)
        self._guidance_scale, self._guidance_rescale = trajectory.guidance_scale, trajectory.guidance_rescale
        try:
            for start in range(0, len(steps), trajectory.chunk_size):
                chunk = steps[start : start + trajectory.chunk_size]
                with torch.enable_grad(), torch.autocast(device_type, autocast_dtype, enabled=autocast_enabled):
                    # One U-Net call for several steps: [z_i; z_i] (CFG) per step, with per-row timesteps.
                    unet_input = torch.cat([trajectory.latents[i] for i in chunk for _ in range(copies)])
                    step_t = torch.cat([trajectory.timesteps[i].expand(rows * copies) for i in chunk])
                    timestep_cond = trajectory.timestep_cond
                    if timestep_cond is not None:
                        timestep_cond = timestep_cond.repeat(len(chunk) * copies, 1)
                    noise_pred = self.unet(
                        unet_input,
                        step_t.to(unet_input.device),
                        encoder_hidden_states=conditioning_leaf.repeat(len(chunk), 1, 1),
                        timestep_cond=timestep_cond,
                        cross_attention_kwargs=trajectory.cross_attention_kwargs,
                        return_dict=False,
                    )[0]
                    guided = torch.cat([self._guide(step) for step in noise_pred.chunk(len(chunk))])
                    weights = trajectory.coefficients[chunk].to(grad_latents.device, torch.float32)
                    grad_outputs = (weights.view(-1, 1, 1, 1, 1) * grad_latents.float().unsqueeze(0)).flatten(0, 1)
                    grads = torch.autograd.grad(guided, inputs, grad_outputs.to(guided.dtype), allow_unused=True)
                for k, g in enumerate(grads):
                    if g is not None:
                        totals[k] = g if totals[k] is None else totals[k] + g
        finally:
            self._guidance_scale, self._guidance_rescale = saved
        totals = iter(totals)
        return [next(totals) if flag else None for flag in needs_grad]

"""The audit's command line, model loading, per-prompt cache and run loop."""

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .. import __version__
from ..metrics import classify_images, clip_text_similarity, generate_images, image_similarity, score_predictions
from ..utils import atomic_save_file, atomic_write_folder, atomic_write_json

CONFIG_FILE = "audit.json"
CACHE_DIR = "cache"
IMAGES_DIR = "images"
MINIATURE_CLASSIFIERS = {"miniature-train": "train", "miniature-eval": "eval", "miniature-context": "context"}
BASE = "base"


@dataclass
class AuditConfig:
    r"""
    Everything an audit's results depend on; two runs with equal configs may share one output folder (resume).

    `batch_size`, `output` and the report options are not part of it: per-image seeds make results independent of the
    batch size, so a resumed audit may use another one.

    Args:
        model (`str`): Pipeline folder or Hub id, or `"miniature"`.
        loras (`list[str]`): LoRA folders or Hub ids, each audited as its own model.
        compare_base (`bool`): Also audit the base model, and measure CLIP-I / DINO of each adaptor against it.
        prompts (`list[str]`): The prompts themselves (not the set's name, so an edited file is noticed).
        prompt_set (`str`): The set's name or file, for the report.
        classifier (`str`): Classifier folder or Hub id, or `"miniature-eval"` / `"miniature-train"`.
        attributes (`list[str]`): The classifier heads that are scored.
        num_images_per_prompt (`int`): Images per prompt and model.
        num_inference_steps (`int`): Denoising steps.
        guidance_scale (`float`): Classifier-free guidance scale.
        seed (`int`): Base seed; image `j` of prompt `p` uses `image_seed(seed, p, j)` for every model.
        resolution (`int`, *optional*): Image side in pixels; `None` uses the pipeline's default.
        negative_prompt (`str`, *optional*): Passed to the pipeline.
        clip (`str`, *optional*), dino (`str`, *optional*): Similarity encoders (`"miniature"` for the miniature
            CLIP).
        face_detector (`str`, *optional*): Name for `diffusers_fair.faces.load_detector`; the classifier then sees the
            largest face of each image (paper Sec. 4.1), and images without a face are counted, not classified.
        face_crop_size (`int`, *optional*): Side of those face crops; `None` uses the generated image's side.
        device (`str`), dtype (`str`): Where and in which precision the pipeline runs.
    """

    model: str
    prompts: list[str]
    prompt_set: str
    classifier: str
    attributes: list[str]
    num_images_per_prompt: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    loras: list[str] = field(default_factory=list)
    compare_base: bool = False
    resolution: int | None = None
    negative_prompt: str | None = None
    clip: str | None = None
    dino: str | None = None
    face_detector: str | None = None
    face_crop_size: int | None = None
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def model_names(self) -> list[str]:
        """
        The audited models in order: `"base"` (without LoRAs or with `compare_base`), then one per LoRA, named after
        its folder. A name is also the LoRA's peft adapter name, which cannot hold a `.`: "fair-v1.0" -> "fair-v1-0".
        """
        names, taken = [], {BASE}
        for path in self.loras:
            stem = re.sub(r"[^A-Za-z0-9_-]+", "-", os.path.basename(os.path.normpath(path))).strip("-") or "lora"
            name, k = stem, 2
            while name in taken:
                name, k = f"{stem}-{k}", k + 1
            taken.add(name)
            names.append(name)
        return ([BASE] if self.compare_base or not self.loras else []) + names


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusers-fair audit",
        description="Measure a diffusers pipeline's (and its LoRA adaptors') demographic bias on a prompt set. "
        "Resumable: rerun with the same arguments to continue a stopped audit.",
    )
    parser.add_argument(
        "--model", required=True, help="Pipeline folder or Hub id; 'miniature' for the miniature world."
    )
    parser.add_argument("--lora", action="append", default=[], help="LoRA folder or Hub id (repeatable).")
    parser.add_argument(
        "--compare-base", action="store_true", help="Also audit the base model; CLIP-I/DINO of each LoRA against it."
    )
    parser.add_argument("--prompts", required=True, help="Prompt set name (e.g. occupations-test) or text file.")
    parser.add_argument("--max-prompts", type=_positive_int, default=None, help="Use only the first N prompts.")
    parser.add_argument(
        "--classifier",
        required=True,
        help="AttributeClassifier folder or Hub id; 'miniature-eval' / 'miniature-train'.",
    )
    parser.add_argument("--attributes", default=None, help="Comma-separated heads to score (default: all).")
    parser.add_argument("--target", default=None, help="Target distribution, e.g. 'age=young:0.75,old:0.25'.")
    parser.add_argument("--num-images-per-prompt", type=_positive_int, default=64)
    parser.add_argument("--batch-size", type=_positive_int, default=16, help="Images per pipeline/classifier call.")
    parser.add_argument("--steps", type=_positive_int, default=None, help="Denoising steps (20; miniature: its own).")
    parser.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (7.5; miniature: its own).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=_positive_int, default=None, help="Image side (pipeline default).")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument(
        "--clip", default=None, help="CLIP model for CLIP-T/CLIP-I ('miniature' for the miniature one)."
    )
    parser.add_argument(
        "--dino",
        default=None,
        help="DINOv2 model folder or Hub id for DINO similarity ('miniature' for the miniature one).",
    )
    parser.add_argument(
        "--face-detector",
        default=None,
        help="diffusers_fair.faces detector name: classify the largest face; images without one are counted apart.",
    )
    parser.add_argument(
        "--face-crop-size", type=_positive_int, default=None, help="Side of the face crops (default: image side)."
    )
    parser.add_argument("--device", default=None, help="Defaults to cuda when available, else cpu.")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--grid-images", type=_positive_int, default=8, help="Images per prompt in the report grids.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    parser.add_argument("--output", required=True, help="Output folder (cache and report).")
    return parser


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the audit's arguments (`input_args` defaults to `sys.argv[1:]`)."""
    return build_parser().parse_args(input_args)


# --- loading ------------------------------------------------------------------------------------------------------


def looks_like_path(name: str) -> bool:
    return os.path.exists(name) or name.startswith((".", "/", "~")) or os.sep + os.sep in name


def load_pipeline(model: str, device: str, dtype: torch.dtype):
    r"""
    Loads `--model`: `"miniature"`, a folder written by `save_pretrained`, or a Hub id.

    Returns:
        The pipeline on `device`, progress bars off.
    """
    if model == "miniature":
        from ..miniature import load_pipeline as load_miniature

        pipeline = load_miniature()
        if dtype != torch.float32:
            pipeline = pipeline.to(dtype=dtype)
    else:
        from diffusers import DiffusionPipeline

        if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "model_index.json")):
            raise ValueError(
                f"`--model` {model!r} is a folder without model_index.json, so not a diffusers pipeline; give a "
                "folder written by `pipeline.save_pretrained`, a Hub id such as 'runwayml/stable-diffusion-v1-5', or "
                "'miniature'."
            )
        if not os.path.isdir(model) and looks_like_path(model):
            raise ValueError(f"`--model` {model!r} does not exist; give a pipeline folder, a Hub id or 'miniature'.")
        try:
            pipeline_class = DiffusionPipeline
            # Stock diffusers resolves `_class_name` inside `diffusers`, so a saved FairStableDiffusionPipeline needs
            # its own class.
            if DiffusionPipeline.load_config(model).get("_class_name") == "FairStableDiffusionPipeline":
                from ..pipeline_fair_stable_diffusion import FairStableDiffusionPipeline as pipeline_class
            pipeline = pipeline_class.from_pretrained(model, dtype=dtype)
        except (OSError, ValueError) as error:
            raise ValueError(f"`--model` {model!r} could not be loaded as a diffusers pipeline: {error}") from error
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def check_sampling_args(pipeline, config: AuditConfig) -> None:
    """Refuses `--resolution` and `--steps` the pipeline would refuse mid-run (after the output folder is written)."""
    if config.resolution is not None and config.resolution % 8 != 0:
        raise ValueError(
            f"`--resolution` {config.resolution} is not divisible by 8, as Stable Diffusion's VAE needs; give e.g. "
            f"{max(8, config.resolution // 8 * 8)}."
        )
    num_train_timesteps = pipeline.scheduler.config.num_train_timesteps
    if config.num_inference_steps > num_train_timesteps:
        raise ValueError(
            f"`--steps` {config.num_inference_steps} is more than the scheduler's {num_train_timesteps} training "
            "timesteps; give at most that many."
        )


def load_loras(pipeline, loras: Sequence[str], names: Sequence[str], model: str) -> None:
    """Loads each LoRA as a named adapter and checks it attached to the pipeline (a LoRA for another base fails)."""
    for path, name in zip(loras, names):
        if looks_like_path(path) and not os.path.exists(path):
            raise ValueError(f"`--lora` {path!r} does not exist; give a folder with the LoRA weights or a Hub id.")
        try:
            pipeline.load_lora_weights(path, adapter_name=name)
        except Exception as error:  # peft/diffusers raise RuntimeError on shape mismatches, ValueError, OSError...
            if isinstance(error, OSError):  # no weights file there, or the Hub could not be reached
                fix = "Give a folder or Hub id that holds diffusers LoRA weights (`pytorch_lora_weights.safetensors`)."
            else:
                fix = "Its layers do not fit this model's: give an adaptor trained for this base model."
            raise ValueError(
                f"`--lora` {path!r} could not be loaded into `--model` {model!r}: {type(error).__name__}: "
                f"{str(error).splitlines()[0][:300]}. {fix}"
            ) from error
        attached = [component for component, adapters in pipeline.get_list_adapters().items() if name in adapters]
        if not attached:
            raise ValueError(
                f"`--lora` {path!r} matched no module of `--model` {model!r} (no LoRA layer was attached); it is "
                "probably an adaptor for another base model. Give one trained for this model."
            )


def select_model(pipeline, name: str, has_loras: bool) -> None:
    """Activates adapter `name`, or disables every adapter for the base model."""
    if not has_loras:
        return
    if name == BASE:
        pipeline.disable_lora()
    else:
        pipeline.enable_lora()
        pipeline.set_adapters(name)


def load_classifier(name: str, device: str):
    """Loads `--classifier`: `"miniature-eval"` / `"miniature-train"`, a `save_pretrained` folder or a Hub id."""
    from .. import miniature  # registers MiniatureClassifier for `from_pretrained`'s dispatch
    from ..classifiers import AttributeClassifier

    if name in MINIATURE_CLASSIFIERS:
        classifier = miniature.load_classifier(MINIATURE_CLASSIFIERS[name])
    else:
        if looks_like_path(name) and not os.path.isdir(name):
            raise ValueError(
                f"`--classifier` {name!r} is not a folder; give a folder written by `AttributeClassifier."
                f"save_pretrained`, a Hub id, or one of {sorted(MINIATURE_CLASSIFIERS)}."
            )
        try:
            classifier = AttributeClassifier.from_pretrained(name)
        except (OSError, ValueError) as error:  # OSError: no such Hub id, or offline without it in the cache
            raise ValueError(
                f"`--classifier` {name!r} could not be loaded as an `AttributeClassifier`: {error}"
            ) from error
    return classifier.to(device).eval()


def select_attributes(classifier, attributes: str | None) -> list[str]:
    if attributes is None:
        return list(classifier.attributes)
    names = [a.strip() for a in attributes.split(",") if a.strip()]
    missing = [a for a in names if a not in classifier.attributes]
    if not names or missing:
        raise ValueError(
            f"`--attributes` {attributes!r}: the classifier has no head {missing or names} (it predicts "
            f"{', '.join(classifier.attributes)}); choose among those or use a classifier that predicts them."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"`--attributes` {attributes!r} names an attribute twice; name each once.")
    return names


def load_clip(name: str, device: str):
    """`--clip`: `"miniature"` or a `CLIPModel` folder / Hub id. Returns `(model, tokenizer)`."""
    if name == "miniature":
        from ..miniature import load_clip as load_miniature_clip

        model, processor = load_miniature_clip()
        return model.to(device), processor.tokenizer
    from transformers import AutoTokenizer, CLIPModel

    try:
        return CLIPModel.from_pretrained(name).to(device).eval(), AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"`--clip` {name!r} could not be loaded as a CLIPModel with its tokenizer: {error}"
        ) from error


def load_dino(name: str, device: str):
    """`--dino`: `"miniature"`, or a DINOv2 (or any vision `AutoModel` with a `pooler_output`) folder / Hub id."""
    if name == "miniature":
        from ..miniature import load_dino as load_miniature_dino

        return load_miniature_dino().to(device)
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(name).to(device).eval()
    except (OSError, ValueError) as error:
        raise ValueError(f"`--dino` {name!r} could not be loaded as a transformers vision model: {error}") from error


def load_face_detector(name: str):
    try:
        from ..faces import load_detector
    except ImportError as error:
        raise ValueError(
            f"`--face-detector` {name!r} needs `diffusers_fair.faces` (face detection, with the `faces` extra: "
            f"`pip install diffusers-fair[faces]`), which is not available here ({error}); leave --face-detector out."
        ) from error
    try:
        return load_detector(name)
    except (ImportError, OSError, ValueError) as error:  # unknown name, missing package, missing model files
        raise ValueError(f"`--face-detector` {name!r} could not be loaded: {error}") from error


def _largest_face_crops(detector, images: torch.Tensor, size: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest face of each image, cropped square (black where there is none), and the `(B,)` has-face mask."""
    from ..faces import crop_faces, has_face, largest_face

    detections = [torch.as_tensor(d, dtype=torch.float32).reshape(-1, 5) for d in detector(images.to(device))]
    boxes = largest_face(detections).cpu()
    crops = crop_faces(images, boxes, size=size or images.shape[-1])
    return crops, has_face(boxes)


# --- the cache ----------------------------------------------------------------------------------------------------


def record_path(output: str, model: str, index: int) -> str:
    return os.path.join(output, CACHE_DIR, model, f"{index:05d}.safetensors")


def image_dir(output: str, model: str, index: int) -> str:
    return os.path.join(output, IMAGES_DIR, model, f"{index:05d}")


def load_record(output: str, model: str, index: int, prompt: str) -> dict[str, torch.Tensor] | None:
    """The cached predictions of one prompt and model, or `None` when that prompt has not finished."""
    from safetensors import safe_open

    path = record_path(output, model, index)
    if not os.path.isfile(path):
        return None
    with safe_open(path, framework="pt") as f:
        if f.metadata().get("prompt") != prompt:
            raise ValueError(
                f"The cache file {path!r} belongs to the prompt {f.metadata().get('prompt')!r}, not {prompt!r}; the "
                "output folder was changed by hand. Use a new --output folder."
            )
        return {key: f.get_tensor(key) for key in f.keys()}


def load_images(output: str, model: str, index: int, count: int) -> torch.Tensor:
    """The saved PNGs of one prompt: `(count, 3, H, W)` float32 in `[0, 1]` (exactly the images that were scored)."""
    from PIL import Image

    folder = image_dir(output, model, index)
    arrays = [np.asarray(Image.open(os.path.join(folder, f"{j:04d}.png")).convert("RGB")) for j in range(count)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def _save_images(images_uint8: torch.Tensor, folder: str) -> None:
    from PIL import Image

    def write(tmp: str) -> None:
        for j, image in enumerate(images_uint8.permute(0, 2, 3, 1).numpy()):
            Image.fromarray(image).save(os.path.join(tmp, f"{j:04d}.png"))

    atomic_write_folder(folder, write)


def _save_record(tensors: dict[str, torch.Tensor], path: str, prompt: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # The record is the commit marker of the prompt: written last, atomically.
    atomic_save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"prompt": prompt})


def prepare_output(output: str, config: AuditConfig) -> bool:
    r"""
    Checks `--output` before anything is written: a new or empty folder, or an audit with the same config.

    Returns:
        `True` when an earlier audit with the same arguments is resumed.
    """
    path = os.path.join(output, CONFIG_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f).get("config", {})
        current = json.loads(json.dumps(asdict(config)))
        if saved != current:
            differences = [
                f"{key}: {_short(saved.get(key))} there, {_short(current.get(key))} now"
                for key in sorted(set(saved) | set(current))
                if saved.get(key) != current.get(key)
            ]
            raise ValueError(
                f"`--output` {output!r} holds an audit made with other arguments ({'; '.join(differences)}). Results "
                "of different arguments are never mixed: rerun with the same arguments to resume it, or give a new "
                "--output folder."
            )
        return True
    if os.path.isdir(output) and os.listdir(output):
        raise ValueError(
            f"`--output` {output!r} is a non-empty folder that holds no audit ({CONFIG_FILE} is missing); give a new "
            "or empty folder."
        )
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"`--output` {output!r} is a file; give a folder.")
    return False


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(value)} entries)" if isinstance(value, list) else text


def versions() -> dict[str, str]:
    import diffusers
    import transformers

    found = {"diffusers-fair": __version__, "python": sys.version.split()[0], "torch": torch.__version__}
    found.update({"diffusers": diffusers.__version__, "transformers": transformers.__version__})
    try:
        import peft

        found["peft"] = peft.__version__
    except ImportError:
        pass
    return found


# --- the run ------------------------------------------------------------------------------------------------------


def _config_from_args(args: argparse.Namespace, prompts: list[str], attributes: list[str], device: str) -> AuditConfig:
    miniature = args.model == "miniature"
    if miniature:
        from ..miniature import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS
    steps = args.steps or (DEFAULT_NUM_INFERENCE_STEPS if miniature else 20)
    guidance = (
        args.guidance_scale if args.guidance_scale is not None else (DEFAULT_GUIDANCE_SCALE if miniature else 7.5)
    )
    return AuditConfig(
        model=args.model,
        loras=list(args.lora),
        compare_base=args.compare_base,
        prompts=prompts,
        prompt_set=str(args.prompts),
        classifier=args.classifier,
        attributes=attributes,
        num_images_per_prompt=args.num_images_per_prompt,
        num_inference_steps=steps,
        guidance_scale=float(guidance),
        seed=args.seed,
        resolution=args.resolution,
        negative_prompt=args.negative_prompt,
        clip=args.clip,
        dino=args.dino,
        face_detector=args.face_detector,
        face_crop_size=args.face_crop_size,
        device=device,
        dtype=args.dtype,
    )


def run_audit(
    args: argparse.Namespace,
    on_prompt_done: Callable[[str, int, str], None] | None = None,
) -> dict:
    r"""
    Runs (or resumes) an audit and writes its report.

    Every input is loaded and checked before the output folder is touched, so bad input leaves nothing behind. Then
    for each prompt and model: generate (per-image seeds, the same noises for every model), save the PNGs, classify,
    measure CLIP-T / CLIP-I / DINO and detect faces, and write the prompt's record atomically; a prompt with a
    record is never recomputed. The report is built from the records alone.

    Args:
        args (`argparse.Namespace`): From [`parse_args`].
        on_prompt_done (`Callable[[str, int, str], None]`, *optional*): Called as `(model, index, prompt)` after
            each record is written (tests stop an audit from here).

    Returns:
        `dict`: The report (as written to `report.json`).
    """
    from ..prompts import load_prompts
    from ..target_distribution import TargetDistribution
    from .report import build_report, check_report_dependencies, write_report

    # 1. Check and load every input before anything is written.
    check_report_dependencies()
    try:
        prompts = load_prompts(args.prompts, limit=args.max_prompts)
    except ValueError as error:
        raise ValueError(f"`--prompts`: {error}") from error
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    classifier = load_classifier(args.classifier, device)
    attributes = select_attributes(classifier, args.attributes)
    selected = {a: classifier.attributes[a] for a in attributes}
    target = None
    if args.target is not None:
        try:
            target = TargetDistribution.from_string(args.target, attributes=selected)
            score_predictions({a: torch.zeros(0, len(c)) for a, c in selected.items()}, selected, target)  # aligns
        except ValueError as error:
            raise ValueError(f"`--target` {args.target!r}: {error}") from error
    config = _config_from_args(args, prompts, attributes, device)
    if config.face_crop_size is not None and config.face_detector is None:
        raise ValueError("`--face-crop-size` sizes the crops of `--face-detector`: add a detector or drop it.")
    if config.dino and not config.compare_base:
        raise ValueError("`--dino` measures each LoRA's images against the base model's: add --compare-base.")
    dtype = getattr(torch, config.dtype)
    pipeline = load_pipeline(config.model, device, dtype)
    check_sampling_args(pipeline, config)
    models = config.model_names
    load_loras(pipeline, config.loras, [m for m in models if m != BASE], config.model)
    clip_model, clip_tokenizer = load_clip(config.clip, device) if config.clip else (None, None)
    dino_model = load_dino(config.dino, device) if config.dino else None
    detector = load_face_detector(config.face_detector) if config.face_detector else None
    resumed = prepare_output(args.output, config)

    # 2. Write the config (the resume key), then run prompt by prompt.
    os.makedirs(args.output, exist_ok=True)
    if not resumed:
        atomic_write_json(os.path.join(args.output, CONFIG_FILE), {"config": asdict(config), "versions": versions()})
    pipeline_kwargs = {}
    if config.resolution is not None:
        pipeline_kwargs.update(height=config.resolution, width=config.resolution)
    if config.negative_prompt is not None:
        pipeline_kwargs["negative_prompt"] = config.negative_prompt
    n = config.num_images_per_prompt
    done = sum(os.path.isfile(record_path(args.output, m, i)) for m in models for i in range(len(prompts)))
    from tqdm.auto import tqdm

    with tqdm(
        total=len(models) * len(prompts) * n,
        initial=done * n,
        unit="img",
        desc="Auditing",
        disable=args.no_progress,
        dynamic_ncols=True,
    ) as bar:
        for index, prompt in enumerate(prompts):
            base_images = None
            for model in models:
                if load_record(args.output, model, index, prompt) is not None:
                    continue
                bar.set_postfix_str(f"prompt {index + 1}/{len(prompts)}, {model}")
                select_model(pipeline, model, bool(config.loras))
                images = generate_images(
                    pipeline,
                    [prompt],
                    n,
                    num_inference_steps=config.num_inference_steps,
                    guidance_scale=config.guidance_scale,
                    batch_size=args.batch_size,
                    seed=config.seed,
                    progress_bar=False,
                    **pipeline_kwargs,
                )[prompt]
                # Score exactly what is saved (8-bit PNGs), so a resumed audit and a recomputation from the files
                # see the same pixels as an uninterrupted run.
                images_uint8 = (images.clamp(0, 1) * 255).round().to(torch.uint8)
                _save_images(images_uint8, image_dir(args.output, model, index))
                images = images_uint8.float() / 255.0
                classifier_input, face = images, None
                if detector is not None:
                    classifier_input, face = _largest_face_crops(detector, images, config.face_crop_size, device)
                record = {
                    f"probabilities/{a}": p
                    for a, p in classify_images(classifier_input, classifier, args.batch_size).items()
                }
                if clip_model is not None:
                    record["clip_t"] = clip_text_similarity(
                        images, prompt, clip_model, clip_tokenizer, args.batch_size
                    )
                if model != BASE and BASE in models and (clip_model is not None or dino_model is not None):
                    if base_images is None:
                        base_images = load_images(args.output, BASE, index, n)
                    if clip_model is not None:
                        record["clip_i"] = image_similarity(images, base_images, clip_model, args.batch_size)
                    if dino_model is not None:
                        record["dino"] = image_similarity(images, base_images, dino_model, args.batch_size)
                if face is not None:
                    record["has_face"] = face
                _save_record(record, record_path(args.output, model, index), prompt)
                if model == BASE:
                    base_images = images
                bar.update(n)
                if on_prompt_done is not None:
                    on_prompt_done(model, index, prompt)

    # 3. The report, from the records alone.
    records = {m: [load_record(args.output, m, i, p) for i, p in enumerate(prompts)] for m in models}
    report = build_report(config, records, classifier.attributes, target, versions())
    write_report(report, args.output, config, grid_images=args.grid_images)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    r"""
    Entry point of `diffusers-fair audit` and `python -m diffusers_fair.audit`.

    Bad input exits with status 2 and a message that names the argument and the fix; nothing is written then.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        report = run_audit(args)
    except ValueError as error:
        parser.error(str(error))
    print(f"Report written to {os.path.join(args.output, 'index.html')}")
    print(report["summary_table"])
    return 0

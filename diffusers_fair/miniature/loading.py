"""Loaders of the shipped miniature-world artefacts (offline, seconds, CPU)."""

import os
from pathlib import Path

from .models import MiniatureClassifier

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# Sampling settings the measurements in the miniature README use.
RESOLUTION = 32
DEFAULT_NUM_INFERENCE_STEPS = 20
DEFAULT_GUIDANCE_SCALE = 3.0
CLASSIFIER_KINDS = ("train", "eval", "context")


def _weights_dir(weights_dir: str | os.PathLike | None) -> Path:
    folder = WEIGHTS_DIR if weights_dir is None else Path(weights_dir)
    if not (folder / "pipeline" / "model_index.json").is_file():
        raise ValueError(
            f"`weights_dir` {str(folder)!r} holds no miniature artefacts (no pipeline/model_index.json); pass a "
            "folder written by `python -m diffusers_fair.miniature.train --output_dir DIR`, or None."
        )
    return folder


def load_pipeline(weights_dir: str | os.PathLike | None = None):
    r"""
    Loads the miniature Stable Diffusion with a DPM-Solver++ scheduler ([`BiasedGradientScheduler`]).

    Generate 32x32 images with `num_inference_steps=DEFAULT_NUM_INFERENCE_STEPS` (20) and
    `guidance_scale=DEFAULT_GUIDANCE_SCALE` (3.0), the settings of the measurements in the miniature README (the
    pipeline's own defaults, 50 steps and guidance 7.5, are those of real Stable Diffusion).

    Args:
        weights_dir (`str` or `os.PathLike`, *optional*):
            A folder written by `python -m diffusers_fair.miniature.train`; defaults to the weights shipped in the
            package.

    Returns:
        `FairStableDiffusionPipeline` in float32 on CPU, without safety checker.
    """
    from ..pipeline_fair_stable_diffusion import FairStableDiffusionPipeline
    from ..scheduling_biased_gradient import BiasedGradientScheduler

    folder = _weights_dir(weights_dir) / "pipeline"
    pipeline = FairStableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    # DPM-Solver++; its forward is DPMSolverMultistepScheduler's, and it also carries the biased-gradient scales.
    pipeline.scheduler = BiasedGradientScheduler.from_config(pipeline.scheduler.config, algorithm_type="dpmsolver++")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load_classifier(kind: str = "train", weights_dir: str | os.PathLike | None = None) -> MiniatureClassifier:
    r"""
    Loads one of the miniature world's classifiers.

    Args:
        kind (`str`, *optional*, defaults to `"train"`):
            `"train"`: the attribute classifier (`hair`, `skin`, `age`) the alignment loss trains against;
            `"eval"`: an independently trained one (other seed, architecture, augmentation) for evaluation;
            `"context"`: the occupation classifier (attribute `occupation`) that measures semantics preservation.
        weights_dir (`str` or `os.PathLike`, *optional*): as in `load_pipeline`.

    Returns:
        `MiniatureClassifier` in eval mode: images `(B, 3, 32, 32)` in `[0, 1]` -> dict of logits `(B, K)`.
    """
    if kind not in CLASSIFIER_KINDS:
        raise ValueError(f"`kind` must be one of {CLASSIFIER_KINDS}, got {kind!r}.")
    return MiniatureClassifier.from_pretrained(_weights_dir(weights_dir) / f"classifier-{kind}")


def load_clip(weights_dir: str | os.PathLike | None = None):
    r"""
    Loads the miniature CLIP.

    Args:
        weights_dir (`str` or `os.PathLike`, *optional*): as in `load_pipeline`.

    Returns:
        `tuple[transformers.CLIPModel, transformers.CLIPProcessor]`: the model in eval mode and its processor (which
        normalises 32x32 images with CLIP's mean and std and tokenizes with the miniature vocabulary).
    """
    from transformers import CLIPModel, CLIPProcessor

    folder = _weights_dir(weights_dir) / "clip"
    return CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)


def load_dino(weights_dir: str | os.PathLike | None = None):
    r"""
    Loads the miniature world's second image encoder, a `Dinov2Model` trained by DINO self-distillation.

    Args:
        weights_dir (`str` or `os.PathLike`, *optional*): as in `load_pipeline`.

    Returns:
        [`~diffusers_fair.semantics.ImageFeatureExtractor`] in eval mode: images `(B, 3, H, W)` in `[0, 1]` ->
        features `(B, 64)` (the layer-normed CLS token), resized to 32x32 and normalised with ImageNet's mean and std
        differentiably. Pass it wherever a DINOv2 model is accepted (`ImageSemanticsLoss`, `image_similarity`); the
        bare model is its `.model`.
    """
    from transformers import Dinov2Model

    from ..semantics import IMAGENET_MEAN, IMAGENET_STD, ImageFeatureExtractor

    folder = _weights_dir(weights_dir) / "dino"
    model = Dinov2Model.from_pretrained(folder).eval()
    return ImageFeatureExtractor(
        model, crop_size=RESOLUTION, resize_size=RESOLUTION, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )

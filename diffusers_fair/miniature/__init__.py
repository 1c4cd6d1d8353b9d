"""The miniature world: a bias-controlled people dataset and a miniature Stable Diffusion trained on it.

See `diffusers_fair/miniature/README.md` for what it is, how it was trained and what it measures.
"""

from .loading import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NUM_INFERENCE_STEPS,
    RESOLUTION,
    WEIGHTS_DIR,
    load_classifier,
    load_clip,
    load_dino,
    load_pipeline,
)
from .models import MiniatureClassifier
from .world import (
    ATTRIBUTE_WORDS,
    ATTRIBUTES,
    OCCUPATION_NAMES,
    OCCUPATIONS,
    OCCUPATIONS_HELDOUT,
    OCCUPATIONS_TRAIN,
    TEMPLATES,
    MiniatureDataset,
    Occupation,
    attribute_caption,
    get_occupation,
    hair_growth,
    render,
    sample_dataset,
)

__all__ = [
    "ATTRIBUTES",
    "ATTRIBUTE_WORDS",
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_NUM_INFERENCE_STEPS",
    "MiniatureClassifier",
    "MiniatureDataset",
    "OCCUPATIONS",
    "OCCUPATIONS_HELDOUT",
    "OCCUPATIONS_TRAIN",
    "OCCUPATION_NAMES",
    "Occupation",
    "RESOLUTION",
    "TEMPLATES",
    "WEIGHTS_DIR",
    "attribute_caption",
    "get_occupation",
    "hair_growth",
    "load_classifier",
    "load_clip",
    "load_dino",
    "load_pipeline",
    "render",
    "sample_dataset",
]

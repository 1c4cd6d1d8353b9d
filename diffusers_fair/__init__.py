"""diffusers-fair: audit and correct the demographic distribution of text-to-image diffusion models."""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0.dev0"

# Public name -> module that defines it. Imports are lazy (as in diffusers) so that `import diffusers_fair`
# stays fast and a missing optional dependency only fails the name that needs it.
_import_structure = {
    "pipeline_fair_stable_diffusion": ["FairStableDiffusionPipeline", "FairStableDiffusionPipelineOutput"],
    "scheduling_biased_gradient": ["BiasedGradientScheduler"],
    "target_distribution": ["TargetDistribution"],
    "alignment": ["DistributionalAlignmentLoss", "expected_ot_targets"],
    "semantics": ["ImageSemanticsLoss"],
    "classifiers": ["AttributeClassifier", "CLIPZeroShotClassifier"],
    "metrics": ["bias_score", "evaluate", "expected_bias", "sampling_floor"],
}

_name_to_module = {name: module for module, names in _import_structure.items() for name in names}

__all__ = sorted(_name_to_module)

if TYPE_CHECKING:
    from .alignment import DistributionalAlignmentLoss, expected_ot_targets
    from .classifiers import AttributeClassifier, CLIPZeroShotClassifier
    from .metrics import bias_score, evaluate, expected_bias, sampling_floor
    from .pipeline_fair_stable_diffusion import FairStableDiffusionPipeline, FairStableDiffusionPipelineOutput
    from .scheduling_biased_gradient import BiasedGradientScheduler
    from .semantics import ImageSemanticsLoss
    from .target_distribution import TargetDistribution


def __getattr__(name: str):
    module = _name_to_module.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)

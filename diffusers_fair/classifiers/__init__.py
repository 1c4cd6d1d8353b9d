from .base import AttributeClassifier
from .clip_zero_shot import CLIPZeroShotClassifier
from .offline import OfflineAgeGenderClassifier, load_offline_age_gender
from .train import FaceAttributeClassifier

__all__ = [
    "AttributeClassifier",
    "CLIPZeroShotClassifier",
    "FaceAttributeClassifier",
    "OfflineAgeGenderClassifier",
    "load_offline_age_gender",
]

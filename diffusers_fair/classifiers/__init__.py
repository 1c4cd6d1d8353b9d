from .base import AttributeClassifier
from .clip_zero_shot import CLIPZeroShotClassifier
from .face_attribute import FaceAttributeClassifier
from .offline import OfflineAgeGenderClassifier, load_offline_age_gender

__all__ = [
    "AttributeClassifier",
    "CLIPZeroShotClassifier",
    "FaceAttributeClassifier",
    "OfflineAgeGenderClassifier",
    "load_offline_age_gender",
]

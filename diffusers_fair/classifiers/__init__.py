from .base import AttributeClassifier
from .clip_zero_shot import CLIPZeroShotClassifier
from .offline import OfflineAgeGenderClassifier, load_offline_age_gender

__all__ = ["AttributeClassifier", "CLIPZeroShotClassifier", "OfflineAgeGenderClassifier", "load_offline_age_gender"]

from .base import AttributeClassifier
from .clip_zero_shot import CLIPZeroShotClassifier

__all__ = ["AttributeClassifier", "CLIPZeroShotClassifier"]

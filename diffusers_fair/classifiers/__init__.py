from .base import AttributeClassifier

__all__ = ["AttributeClassifier"]

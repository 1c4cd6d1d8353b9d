"""An attribute classifier made of linear heads over a transformers vision encoder (trained by `classifiers.train`)."""

from collections.abc import Sequence

import torch
from torch import nn

from ..semantics import ImageFeatureExtractor
from .base import AttributeClassifier


class FaceAttributeClassifier(AttributeClassifier):
    r"""
    A linear head per attribute over the global features of a transformers vision model (CLIP's image embedding,
    DINOv2's CLS token, ...), trained by this module. Self-contained: the encoder's config is saved with the weights.

    Args:
        attributes (`dict[str, list[str]]`): Attribute -> class names.
        backbone_config (`dict`): `config.to_dict()` of the encoder (rebuilt with `AutoModel.from_config`).
        image_size (`int`, *optional*, defaults to 224): Input side (images are resized to it, differentiably).
        mean (`list[float]`, *optional*), std (`list[float]`, *optional*): Normalisation; defaults: CLIP's or
            ImageNet's, as in `ImageFeatureExtractor`.
    """

    def __init__(
        self,
        attributes: dict[str, list[str]],
        backbone_config: dict,
        image_size: int = 224,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        from transformers import AutoConfig, AutoModel

        config = dict(backbone_config)
        backbone = AutoModel.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
        features = ImageFeatureExtractor(backbone, crop_size=image_size, resize_size=image_size, mean=mean, std=std)
        super().__init__(
            attributes,
            backbone_config=backbone_config,
            image_size=int(image_size),
            mean=list(features.mean),
            std=list(features.std),
        )
        self.features = features
        with torch.no_grad():
            dim = features(torch.zeros(1, 3, image_size, image_size)).shape[-1]
        self.heads = nn.ModuleDict({name: nn.Linear(dim, len(classes)) for name, classes in self.attributes.items()})

    @classmethod
    def from_backbone(
        cls, pretrained_model_name_or_path: str, attributes: dict[str, list[str]], image_size: int | None = None
    ) -> "FaceAttributeClassifier":
        """Heads (random) over a pretrained encoder given by Hub name or local folder."""
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(pretrained_model_name_or_path)
        if image_size is None:
            vision = getattr(backbone.config, "vision_config", backbone.config)
            image_size = getattr(vision, "image_size", 224)
        model = cls(attributes, backbone.config.to_dict(), image_size=image_size)
        model.features.model.load_state_dict(backbone.state_dict())
        return model

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        r"""
        Args:
            images (`torch.Tensor` of shape `(B, 3, H, W)`): Face crops in `[0, 1]`.

        Returns:
            `dict`: attribute -> logits `(B, K)`.
        """
        features = self.features(images).float()
        return {name: head(features) for name, head in self.heads.items()}

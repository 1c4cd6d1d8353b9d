"""A differentiable zero-shot attribute classifier from any CLIP model and text prompts."""

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..semantics import CLIP_MEAN, CLIP_STD, ImageFeatureExtractor, text_features
from .base import AttributeClassifier

DEFAULT_TEMPLATE = "a photo of the face of a {} person"


class CLIPZeroShotClassifier(AttributeClassifier):
    r"""
    Zero-shot attribute classifier: logits are `logit_scale * cos(image embedding, class text embedding)`.

    Build it with [`~CLIPZeroShotClassifier.from_clip`] from a `CLIPModel` and its tokenizer; only the vision tower,
    its projection and the (prompt-averaged, normalised) class text embeddings are kept, so `save_pretrained` /
    `from_pretrained` need neither the text tower nor the tokenizer. Differentiable w.r.t. the images.

    Limits (use a classifier trained on labelled faces when you can): CLIP inherits the social biases of its
    web-scraped training data, so its zero-shot predictions of gender, race or age are themselves biased and
    their errors differ across groups; the probabilities are poorly calibrated (they depend on `logit_scale` and the
    wording of the prompts, which you should validate on labelled faces); race and age categories are social
    constructs that a text prompt describes only loosely; it looks at the whole image unless you crop the face
    first, so background and clothing leak into the prediction; and using the same CLIP model in the alignment loss
    and in the evaluation rewards fooling CLIP rather than changing the attribute.

    Args:
        attributes (`dict[str, list[str]]`): Attribute -> ordered class names.
        vision_config (`dict`): A `CLIPVisionConfig` as a dict (its `projection_dim` set to the CLIP projection).
        prompts (`dict[str, list[list[str]]]`): Attribute -> per class, the prompts whose embeddings were averaged
            (kept for the record; the embeddings themselves are stored as buffers).
        logit_scale (`float`, *optional*, defaults to 100.0): Temperature of the logits (CLIP's learned one).
        crop_size (`int`, *optional*), resize_size (`int`, *optional*): Preprocessing, see [`ImageFeatureExtractor`].
    """

    def __init__(
        self,
        attributes: dict[str, list[str]],
        vision_config: dict,
        prompts: dict[str, list[list[str]]],
        logit_scale: float = 100.0,
        crop_size: int | None = None,
        resize_size: int | None = None,
    ):
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        super().__init__(
            attributes,
            vision_config=vision_config,
            prompts=prompts,
            logit_scale=logit_scale,
            crop_size=crop_size,
            resize_size=resize_size,
        )
        config = CLIPVisionConfig(**vision_config)
        self.vision = ImageFeatureExtractor(
            CLIPVisionModelWithProjection(config), crop_size, resize_size, CLIP_MEAN, CLIP_STD
        )
        self.logit_scale = float(logit_scale)
        for index, classes in enumerate(self.attributes.values()):
            self.register_buffer(f"class_embeddings_{index}", torch.zeros(len(classes), config.projection_dim))

    @classmethod
    def from_clip(
        cls,
        clip_model,
        tokenizer,
        attributes: Mapping[str, Sequence[str]],
        prompts: Mapping[str, Sequence[str | Sequence[str]]] | None = None,
        template: str = DEFAULT_TEMPLATE,
        crop_size: int | None = None,
        resize_size: int | None = None,
    ) -> "CLIPZeroShotClassifier":
        r"""
        Builds the classifier from a transformers `CLIPModel` and its tokenizer.

        Args:
            clip_model (`CLIPModel`): E.g. `CLIPModel.from_pretrained("openai/clip-vit-large-patch14")`.
            tokenizer: Its tokenizer (called as `tokenizer(texts, padding=True, truncation=True,
                return_tensors="pt")`).
            attributes (`dict[str, list[str]]`): Attribute -> class names, e.g. `{"gender": ["male", "female"]}`.
            prompts (`dict[str, list[str | list[str]]]`, *optional*): Attribute -> per class one prompt or a list of
                prompts (their normalised embeddings are averaged). Defaults to `template.format(class_name)`.
            template (`str`, *optional*, defaults to `"a photo of the face of a {} person"`): Used without `prompts`.
            crop_size (`int`, *optional*), resize_size (`int`, *optional*): Preprocessing overrides.
        """
        attributes = {name: list(classes) for name, classes in attributes.items()}
        resolved: dict[str, list[list[str]]] = {}
        for name, classes in attributes.items():
            given = (prompts or {}).get(name)
            if given is None:
                resolved[name] = [[template.format(c)] for c in classes]
                continue
            if len(given) != len(classes):
                raise ValueError(
                    f"`prompts[{name!r}]` has {len(given)} entries for {len(classes)} classes {classes}; give one "
                    "prompt (or list of prompts) per class."
                )
            resolved[name] = [[p] if isinstance(p, str) else list(p) for p in given]
            if any(not group for group in resolved[name]):
                raise ValueError(f"`prompts[{name!r}]` has a class with no prompt; give at least one per class.")
        unknown = sorted(set(prompts or {}) - set(attributes))
        if unknown:
            raise ValueError(f"`prompts` has attributes {unknown} not in `attributes` {sorted(attributes)}.")
        vision_config = clip_model.config.vision_config.to_dict()
        vision_config["projection_dim"] = clip_model.config.projection_dim
        model = cls(
            attributes,
            vision_config=vision_config,
            prompts=resolved,
            logit_scale=float(clip_model.logit_scale.detach().exp()),
            crop_size=crop_size,
            resize_size=resize_size,
        )
        vision = model.vision.model
        vision.vision_model.load_state_dict(clip_model.vision_model.state_dict())
        vision.visual_projection.load_state_dict(clip_model.visual_projection.state_dict())
        with torch.no_grad():
            for index, name in enumerate(attributes):
                rows = []
                for group in resolved[name]:
                    embeddings = F.normalize(text_features(clip_model, tokenizer, group).float(), dim=-1)
                    rows.append(F.normalize(embeddings.mean(dim=0), dim=-1))
                getattr(model, f"class_embeddings_{index}").copy_(torch.stack(rows))
        param = next(clip_model.parameters())
        return model.to(device=param.device).eval()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        r"""
        Args:
            images (`torch.Tensor` of shape `(B, 3, H, W)`): Values in `[0, 1]`.

        Returns:
            `dict[str, torch.Tensor]`: attribute -> logits `(B, K)` (float32).
        """
        embeddings = F.normalize(self.vision(images).float(), dim=-1)
        return {
            name: self.logit_scale * embeddings @ getattr(self, f"class_embeddings_{index}").T
            for index, name in enumerate(self.attributes)
        }

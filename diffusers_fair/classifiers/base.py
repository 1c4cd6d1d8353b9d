"""The attribute-classifier contract shared by the alignment loss, the training example and the audit."""

import json
import os
from typing import ClassVar

import torch
from huggingface_hub import snapshot_download
from safetensors.torch import load_file
from torch import nn

from ..utils import atomic_save_file, atomic_write_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class AttributeClassifier(nn.Module):
    r"""
    Base class of every attribute classifier: images in, per-attribute logits out.

    Contract: `forward(images)` takes `images` of shape `(B, 3, H, W)`, values in `[0, 1]`, on the module's device,
    and returns a `dict` mapping each attribute name to logits of shape `(B, K)`, where `K = len(attributes[name])`
    and column `k` is the class `attributes[name][k]`. The forward pass must be differentiable w.r.t. `images` so
    the distributional alignment loss can backpropagate into the generator.

    Subclasses pass their constructor arguments through `config` (JSON-serialisable) so that `save_pretrained` /
    `from_pretrained` can rebuild them; `from_pretrained` on this base class dispatches to the subclass named in
    the saved config. Weights are stored as safetensors only.

    Args:
        attributes (`dict[str, list[str]]`):
            Attribute name to its ordered class names, e.g. `{"gender": ["male", "female"]}`.
    """

    _registry: ClassVar[dict[str, type["AttributeClassifier"]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        AttributeClassifier._registry[cls.__name__] = cls

    def __init__(self, attributes: dict[str, list[str]], **config):
        super().__init__()
        if not isinstance(attributes, dict) or not attributes:
            raise ValueError(f"`attributes` must be a non-empty dict of attribute -> class names, got {attributes!r}.")
        for name, classes in attributes.items():
            if len(classes) < 2 or len(set(classes)) != len(classes):
                raise ValueError(
                    f"`attributes[{name!r}]` must list at least two distinct class names, got {list(classes)!r}."
                )
        self.attributes = {name: list(classes) for name, classes in attributes.items()}
        self.config = {"attributes": self.attributes, **config}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement `forward(images) -> dict of logits`.")

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Writes `config.json` (with the class name) and `model.safetensors` into `save_directory`."""
        os.makedirs(save_directory, exist_ok=True)
        config = {"classifier_class": type(self).__name__, **self.config}
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_save_file(state, os.path.join(save_directory, WEIGHTS_NAME))
        atomic_write_json(os.path.join(save_directory, CONFIG_NAME), config)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, revision: str | None = None, **kwargs
    ) -> "AttributeClassifier":
        """Loads a classifier saved with `save_pretrained` from a local folder or a Hub repository id."""
        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            if os.path.exists(path) or path.startswith((".", "/")):
                raise ValueError(f"`pretrained_model_name_or_path` {path!r} is not a folder with a saved classifier.")
            path = snapshot_download(path, revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME], **kwargs)
        config_path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise ValueError(f"{path!r} has no {CONFIG_NAME}: it is not a folder written by `save_pretrained`.")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        class_name = config.pop("classifier_class", cls.__name__)
        target = cls._registry.get(class_name)
        if target is None or not issubclass(target, cls):
            raise ValueError(
                f"The classifier in {path!r} is a {class_name!r}, which is not a registered subclass of "
                f"{cls.__name__} (known: {sorted(cls._registry)}). Import the module that defines it first."
            )
        model = target(**config)
        model.load_state_dict(load_file(os.path.join(path, WEIGHTS_NAME)))
        return model.eval()

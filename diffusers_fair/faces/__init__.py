"""Face-centric alignment (paper Sec. 4.1): face detectors, differentiable face crops, region masks, face realism."""

from .crops import DEFAULT_MARGIN, crop_faces, face_region_masks, square_boxes
from .detection import (
    FaceDetector,
    InsightFaceDetector,
    RetinaFaceDetector,
    YuFaceDetector,
    available_detectors,
    has_face,
    largest_face,
    load_detector,
)
from .realism import FaceBank, FaceRealismLoss, build_face_bank, embedder_fingerprint

__all__ = [
    "DEFAULT_MARGIN",
    "FaceBank",
    "FaceRealismLoss",
    "FaceDetector",
    "InsightFaceDetector",
    "RetinaFaceDetector",
    "YuFaceDetector",
    "available_detectors",
    "build_face_bank",
    "crop_faces",
    "embedder_fingerprint",
    "face_region_masks",
    "has_face",
    "largest_face",
    "load_detector",
    "square_boxes",
]

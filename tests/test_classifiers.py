import json

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_clip_model, tiny_clip_tokenizer

from diffusers_fair import AttributeClassifier, CLIPZeroShotClassifier
from diffusers_fair.semantics import CLIP_MEAN, CLIP_STD, preprocess_images

torch.set_num_threads(1)


def _tiny_clip():
    return tiny_clip_model(image_size=32)


ATTRIBUTES = {"gender": ["male", "female"], "age": ["young", "middle", "old"]}


def _classifier(clip=None, **kwargs):
    return CLIPZeroShotClassifier.from_clip(clip or _tiny_clip(), tiny_clip_tokenizer(), ATTRIBUTES, **kwargs)


def test_zero_shot_logits_match_clip_similarity():
    clip = _tiny_clip()
    prompts = {"gender": ["a man", ["a woman", "a female person"]]}
    classifier = _classifier(clip, prompts=prompts)
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    logits = classifier(images)
    assert set(logits) == set(ATTRIBUTES) and logits["age"].shape == (3, 3)

    tokenizer = tiny_clip_tokenizer()
    with torch.no_grad():
        pixels = preprocess_images(images, 32, 32, CLIP_MEAN, CLIP_STD)
        image_embeds = F.normalize(clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        man = F.normalize(
            clip.get_text_features(**tokenizer(["a man"], padding=True, return_tensors="pt")).pooler_output, dim=-1
        )[0]
        women = F.normalize(
            clip.get_text_features(
                **tokenizer(["a woman", "a female person"], padding=True, return_tensors="pt")
            ).pooler_output,
            dim=-1,
        )
        woman = F.normalize(women.mean(0), dim=-1)
        expected = clip.logit_scale.exp() * image_embeds @ torch.stack([man, woman]).T
    torch.testing.assert_close(logits["gender"], expected, atol=1e-4, rtol=1e-4)
    assert classifier.config["prompts"]["age"][2] == ["a photo of the face of a old person"]


def test_zero_shot_is_differentiable_and_round_trips(tmp_path):
    classifier = _classifier()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    logits = classifier(images)
    logits["gender"][:, 0].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0

    classifier.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["classifier_class"] == "CLIPZeroShotClassifier"
    reloaded = AttributeClassifier.from_pretrained(tmp_path)
    assert isinstance(reloaded, CLIPZeroShotClassifier) and reloaded.attributes == ATTRIBUTES
    with torch.no_grad():
        for name, value in classifier(images).items():
            torch.testing.assert_close(reloaded(images)[name], value)
    # Only the vision tower is stored: no text-tower weights.
    assert not any(k.startswith("text") for k in reloaded.state_dict())


def test_zero_shot_errors():
    clip = _tiny_clip()
    with pytest.raises(ValueError, match="has 1 entries for 2 classes"):
        _classifier(clip, prompts={"gender": ["a man"]})
    with pytest.raises(ValueError, match="not in `attributes`"):
        _classifier(clip, prompts={"race": ["a", "b"]})
    with pytest.raises(ValueError, match="has a class with no prompt"):
        _classifier(clip, prompts={"gender": ["a man", []]})


class _Linear(AttributeClassifier):
    def __init__(self, attributes, hidden=4):
        super().__init__(attributes, hidden=hidden)
        self.heads = torch.nn.ModuleDict({a: torch.nn.Linear(3, len(c)) for a, c in attributes.items()})

    def forward(self, images):
        pooled = images.mean(dim=(2, 3))
        return {a: head(pooled) for a, head in self.heads.items()}


def test_base_contract_errors(tmp_path):
    with pytest.raises(ValueError, match="non-empty dict"):
        _Linear({})
    with pytest.raises(ValueError, match="at least two distinct class names"):
        _Linear({"gender": ["male", "male"]})
    with pytest.raises(NotImplementedError):
        AttributeClassifier({"g": ["a", "b"]})(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="is not a folder"):
        AttributeClassifier.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="has no config.json"):
        AttributeClassifier.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"classifier_class": "Nope", "attributes": {"g": ["a", "b"]}}))
    with pytest.raises(ValueError, match="not a registered subclass"):
        AttributeClassifier.from_pretrained(tmp_path)


def test_base_subclass_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _Linear({"g": ["a", "b"]})
    model.save_pretrained(tmp_path)
    again = AttributeClassifier.from_pretrained(tmp_path)
    images = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(again(images)["g"], model(images)["g"])
    assert again.config == model.config

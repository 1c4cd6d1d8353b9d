import math
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_clip_model, tiny_clip_tokenizer, tiny_dino_model

from diffusers_fair import AttributeClassifier, TargetDistribution, bias_score, evaluate, expected_bias, sampling_floor
from diffusers_fair.metrics import (
    deviation_from_target,
    expected_deviation,
    generate_images,
    image_similarity,
    mean_std,
    score_images,
)

torch.set_num_threads(1)


@pytest.mark.parametrize(
    "frequencies, expected",
    [
        ([0.9, 0.1], 0.8),
        ([0.5, 0.5], 0.0),
        ([0.25] * 4, 0.0),
        ([1.0, 0.0, 0.0, 0.0], 3 / 6),
        ([0.4, 0.3, 0.2, 0.1], (0.1 + 0.2 + 0.3 + 0.1 + 0.2 + 0.1) / 6),
    ],
)
def test_bias_score_hand_computed(frequencies, expected):
    assert bias_score(frequencies) == pytest.approx(expected)


def test_bias_score_errors():
    with pytest.raises(ValueError, match="at least two classes"):
        bias_score([1.0])
    with pytest.raises(ValueError, match="sum to 1"):
        bias_score([0.6, 0.6])


@pytest.mark.parametrize(
    "function, arguments, match",
    [
        (bias_score, ([float("nan"), float("nan")],), "`frequencies` must be finite"),
        (bias_score, ([float("inf"), 0.0],), "`frequencies` must be finite"),
        (deviation_from_target, ([0.5, 0.5], [float("nan"), 1.0]), "`target_probs` must be finite"),
        (expected_bias, (4, [float("nan"), float("nan")]), "`probabilities` must be finite"),
        (expected_deviation, (4, [0.5, float("nan")]), "`target_probs` must be finite"),
        (bias_score, ([0.5, 0.500002],), r"sum 1\.000002\)"),
    ],
)
def test_non_finite_probabilities_are_refused(function, arguments, match):
    with pytest.raises(ValueError, match=match):
        function(*arguments)


def test_deviation_from_target_and_mean_std():
    assert deviation_from_target([0.5, 0.5], [0.75, 0.25]) == pytest.approx(0.25)
    assert deviation_from_target([0.75, 0.25], [0.75, 0.25]) == 0.0
    assert deviation_from_target([1, 0, 0, 0], [0.25] * 4) == pytest.approx(0.75)
    mean, sd = mean_std([1.0, 2.0, float("nan"), 3.0])
    assert mean == pytest.approx(2.0) and sd == pytest.approx(math.sqrt(2 / 3))
    assert all(math.isnan(v) for v in mean_std([float("nan")]))
    with pytest.raises(ValueError, match="has 2 classes but `target_probs` has 3"):
        deviation_from_target([0.5, 0.5], [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="`target_probs` must be non-negative and sum to 1"):
        deviation_from_target([0.5, 0.5], [0.2, 0.3])


def _compositions(n, k):
    if k == 1:
        yield (n,)
        return
    for first in range(n + 1):
        for rest in _compositions(n - first, k - 1):
            yield (first, *rest)


@pytest.mark.parametrize("probabilities", [[0.1, 0.2, 0.3, 0.4], [0.25] * 4, [0.5, 0.0, 0.5], [0.7, 0.3]])
def test_expected_bias_and_deviation_match_enumeration(probabilities):
    # Every count vector of 7 images, weighted by its multinomial probability, scored by the plain metrics.
    n = 7
    mean_bias = mean_deviation = 0.0
    for counts in _compositions(n, len(probabilities)):
        weight = math.factorial(n)
        for count, p in zip(counts, probabilities):
            weight *= p**count / math.factorial(count)
        freqs = [c / n for c in counts]
        mean_bias += weight * bias_score(freqs)
        mean_deviation += weight * deviation_from_target(freqs, probabilities)
    assert expected_bias(n, probabilities) == pytest.approx(mean_bias, abs=1e-12)
    assert expected_deviation(n, probabilities) == pytest.approx(mean_deviation, abs=1e-12)


def test_expected_bias_binary_closed_form_and_limits():
    for n in (32, 33):  # E|2 k / n - 1| for k ~ Binomial(n, 1/2), in exact integer arithmetic
        exact = sum(math.comb(n, k) * abs(2 * k - n) for k in range(n + 1)) / (n * 2**n)
        assert expected_bias(n, [0.5, 0.5]) == pytest.approx(exact, rel=1e-12)
    assert expected_bias(32, [0.5, 0.5]) == pytest.approx(0.1400, abs=1e-4)
    # Large n: the normal approximation E|Z| / sqrt(n) = sqrt(2 / (pi n)).
    assert expected_bias(1024, [0.5, 0.5]) == pytest.approx(math.sqrt(2 / (math.pi * 1024)), rel=2e-3)
    for k in (2, 4, 8):  # one image is one class: bias 2 / K whatever the probabilities
        assert expected_bias(1, [1.0 / k] * k) == pytest.approx(2 / k)
    assert expected_bias(50, [1.0, 0.0]) == pytest.approx(1.0)
    assert expected_deviation(50, [1.0, 0.0]) == pytest.approx(0.0, abs=1e-12)
    assert expected_bias(64, [0.25] * 4) < expected_bias(32, [0.25] * 4)


def test_sampling_floor_groups():
    attributes = {"hair": ["short", "long"], "skin": ["a", "b", "c", "d"]}
    target = TargetDistribution.from_string("hair=short:0.75,long:0.25")
    floors = sampling_floor(attributes, 32, target)
    assert set(floors) == {"bias/hair", "deviation/hair", "bias/skin"}
    assert floors["bias/hair"] == pytest.approx(expected_bias(32, [0.75, 0.25]))
    assert floors["deviation/hair"] == pytest.approx(expected_deviation(32, [0.75, 0.25]))
    assert floors["bias/skin"] == pytest.approx(expected_bias(32, [0.25] * 4))  # outside the target: balanced
    joint = sampling_floor(attributes, 16, TargetDistribution.from_string("hair,skin=uniform", attributes))
    assert joint["bias/hair,skin"] == pytest.approx(expected_bias(16, [1 / 8] * 8))
    assert sampling_floor(attributes, 16) == {
        "bias/hair": expected_bias(16, [0.5] * 2),
        "bias/skin": joint["bias/skin"],
    }


def test_expected_bias_errors():
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="`num_images` must be a positive integer"):
            expected_bias(bad, [0.5, 0.5])
    with pytest.raises(ValueError, match="`probabilities` needs at least two classes"):
        expected_bias(4, [1.0])
    with pytest.raises(ValueError, match="`target_probs` must be non-negative and sum to 1"):
        expected_deviation(4, [0.6, 0.6])


class _ToyPipeline:
    """Follows the diffusers call contract; each image comes from its generator's noise plus a per-prompt shift."""

    def __init__(self, shift=0.0, size=16):
        self.shift, self.size, self.calls = shift, size, []

    def __call__(self, prompt, num_images_per_prompt, num_inference_steps, guidance_scale, generator, output_type):
        assert output_type == "pt" and len(generator) == num_images_per_prompt
        self.calls.append(num_images_per_prompt)
        bias = (len(prompt) % 5 - 2) * 0.3 + self.shift
        noise = torch.stack([torch.randn(3, self.size, self.size, generator=g) for g in generator])
        return SimpleNamespace(images=torch.sigmoid(noise + bias))


class _ColorClassifier(AttributeClassifier):
    """gender from the red channel's mean; race from the argmax of (R, G, B, 0.5) means."""

    def __init__(self, attributes=None):
        super().__init__(attributes or {"gender": ["male", "female"], "race": ["WMELH", "Asian", "Black", "Indian"]})

    def forward(self, images):
        means = images.mean(dim=(2, 3))
        red = means[:, :1] - 0.5
        race = torch.cat([means, torch.full_like(means[:, :1], 0.5)], dim=1)
        return {"gender": 100 * torch.cat([red, -red], dim=1), "race": 100 * race}


def test_generate_images_seeded_per_image():
    pipe = _ToyPipeline()
    prompts = ["a photo of a nurse", "a photo of a pilot"]
    batched = generate_images(pipe, prompts, 5, batch_size=2, progress_bar=False)
    assert pipe.calls == [2, 2, 1, 2, 2, 1]
    single = generate_images(_ToyPipeline(), prompts[::-1], 5, batch_size=5, progress_bar=False)
    for prompt in prompts:
        assert batched[prompt].shape == (5, 3, 16, 16)
        torch.testing.assert_close(batched[prompt], single[prompt])
    assert not torch.allclose(batched[prompts[0]][0], batched[prompts[0]][1])
    other_seed = generate_images(_ToyPipeline(), prompts[:1], 2, seed=1, progress_bar=False)
    assert not torch.allclose(other_seed[prompts[0]], batched[prompts[0]][:2])


def _tiny_clip_and_tokenizer():
    return tiny_clip_model(), tiny_clip_tokenizer()


def _tiny_dino():
    return tiny_dino_model()


def test_evaluate_matches_manual_scoring_and_rescoring():
    prompts = ["a photo of a nurse", "a photo of the face of a ceo", "a dancer"]
    classifier = _ColorClassifier()
    clip, tokenizer = _tiny_clip_and_tokenizer()
    dino = _tiny_dino()
    target = TargetDistribution.from_string("gender,race=uniform")
    result = evaluate(
        _ToyPipeline(),
        prompts,
        classifier,
        num_images_per_prompt=6,
        reference_pipeline=_ToyPipeline(shift=0.0),
        target_distribution=target,
        clip_model=clip,
        clip_tokenizer=tokenizer,
        dino_model=dino,
        batch_size=4,
        return_images=True,
        progress_bar=False,
    )
    assert [row["prompt"] for row in result.per_prompt] == prompts
    assert len(result.classes["gender,race"]) == 8 and result.classes["gender,race"][1] == "male/Asian"
    for row in result.per_prompt:
        images = result.images[row["prompt"]]
        male = (images[:, 0].mean(dim=(1, 2)) > 0.5).double().mean()
        assert row["freq/gender"] == pytest.approx([float(male), float(1 - male)])
        assert row["bias/gender"] == pytest.approx(abs(2 * float(male) - 1))
        joint = torch.tensor(row["freq/gender,race"])
        assert joint.sum() == pytest.approx(1.0) and len(joint) == 8
        assert row["deviation/gender,race"] == pytest.approx(0.5 * float((joint - 1 / 8).abs().sum()))
        # Same noises and an identical reference model: CLIP-I and DINO are 1.
        assert row["clip_i"] == pytest.approx(1.0, abs=1e-5) and row["dino"] == pytest.approx(1.0, abs=1e-5)
        assert -1.0 <= row["clip_t"] <= 1.0
    mean, sd = result.summary["bias/gender"]
    assert (mean, sd) == pytest.approx(mean_std([row["bias/gender"] for row in result.per_prompt]))
    assert "bias/gender: " in result.to_table()

    rescored = score_images(result.images, classifier, target_distribution=target)
    for old, new in zip(result.per_prompt, rescored.per_prompt):
        assert new["freq/gender,race"] == old["freq/gender,race"] and "clip_i" not in new


def test_reference_similarity_drops_when_models_differ():
    prompts = ["a photo of a nurse"]
    dino = _tiny_dino()
    kwargs = {"num_images_per_prompt": 4, "progress_bar": False, "batch_size": 4}
    same = generate_images(_ToyPipeline(), prompts, **kwargs)
    shifted = generate_images(_ToyPipeline(shift=1.5), prompts, **kwargs)
    identical = image_similarity(same[prompts[0]], same[prompts[0]], dino)
    different = image_similarity(same[prompts[0]], shifted[prompts[0]], dino)
    torch.testing.assert_close(identical, torch.ones(4), atol=1e-5, rtol=0)
    assert (different < identical - 1e-4).all()


def test_evaluation_errors():
    pipe, classifier = _ToyPipeline(), _ColorClassifier()
    with pytest.raises(ValueError, match="`num_images_per_prompt` must be at least 1"):
        generate_images(pipe, ["a"], 0)
    with pytest.raises(ValueError, match="`batch_size` must be at least 1"):
        generate_images(pipe, ["a"], 2, batch_size=0)
    with pytest.raises(ValueError, match="contains duplicates"):
        generate_images(pipe, ["a", "a"], 2)
    with pytest.raises(ValueError, match="`prompts` is empty"):
        evaluate(pipe, [], classifier, 2)
    clip, _ = _tiny_clip_and_tokenizer()
    images = {"a": torch.rand(2, 3, 16, 16)}
    with pytest.raises(ValueError, match="`clip_tokenizer` is required"):
        score_images(images, classifier, clip_model=clip)
    with pytest.raises(ValueError, match="no images for the prompt 'a'"):
        score_images(images, classifier, reference_images={"b": images["a"]}, dino_model=_tiny_dino())
    with pytest.raises(ValueError, match="pair each image"):
        image_similarity(torch.rand(2, 3, 16, 16), torch.rand(3, 3, 16, 16), _tiny_dino())
    with pytest.raises(ValueError, match="classifier has no such head"):
        score_images(images, classifier, target_distribution=TargetDistribution.from_string("age=uniform"))

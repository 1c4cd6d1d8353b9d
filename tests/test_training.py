"""The library side of fair finetuning on tiny models: adaptors, saving for stock diffusers, the objective."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from tiny_models import BrightnessClassifier, tiny_clip_model, tiny_pipeline

from diffusers_fair import DistributionalAlignmentLoss, ImageSemanticsLoss
from diffusers_fair.metrics import generate_images
from diffusers_fair.semantics import ImageFeatureExtractor
from diffusers_fair.training import (
    FINETUNE_MODES,
    SELECTION_HISTORY_NAME,
    AdaptedPipeline,
    CheckpointSelection,
    FairFinetuningObjective,
    add_fair_adapters,
    evaluate_adapters,
    frozen_unconditional_embeds,
    summarize_per_prompt,
    validation_grid,
)

KWARGS = {"num_inference_steps": 3, "guidance_scale": 2.0, "output_type": "pt"}


def perturbed_adapters(mode):
    pipe = tiny_pipeline()
    adapters = add_fair_adapters(pipe, mode, rank=2, num_prefix_tokens=3)
    torch.manual_seed(1)
    for p in adapters.parameters():
        with torch.no_grad():
            if mode == "prompt_prefix":
                p[adapters.prefix_token_ids] += torch.randn(len(adapters.prefix_token_ids), p.shape[1])
            else:
                p.normal_(0, 0.2)
    return pipe, adapters


@pytest.mark.parametrize("mode", FINETUNE_MODES)
def test_saved_adaptor_reproduces_the_model_in_stock_diffusers(mode, tmp_path):
    pipe, adapters = perturbed_adapters(mode)
    weight_name = adapters.save_pretrained(tmp_path)
    prompt = adapters.apply_prompt(["a photo of the face of a doctor"])
    finetuned = pipe(prompt, generator=torch.Generator().manual_seed(0), **KWARGS).images
    stock = tiny_pipeline(StableDiffusionPipeline)
    base = stock(["a photo of the face of a doctor"], generator=torch.Generator().manual_seed(0), **KWARGS).images
    if mode == "prompt_prefix":
        stock.load_textual_inversion(tmp_path, weight_name=weight_name)
    else:
        stock.load_lora_weights(tmp_path)
    reloaded = stock(prompt, generator=torch.Generator().manual_seed(0), **KWARGS).images
    assert torch.equal(finetuned, reloaded)
    assert (finetuned - base).abs().max() > 1e-3  # the adaptor does change the model


@pytest.mark.parametrize("mode", ["text_encoder_lora", "prompt_prefix"])
def test_a_save_that_fails_mid_write_keeps_the_previous_adaptor(mode, tmp_path, monkeypatch):
    import safetensors.torch

    pipe, adapters = perturbed_adapters(mode)
    weight_name = adapters.save_pretrained(tmp_path)
    saved = safetensors.torch.load_file(tmp_path / weight_name)
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(1.0)

    def truncated_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", truncated_write)
    with pytest.raises(OSError, match="disk full"):
        adapters.save_pretrained(tmp_path)
    monkeypatch.undo()
    kept = safetensors.torch.load_file(tmp_path / weight_name)
    assert kept.keys() == saved.keys() and all(torch.equal(kept[k], saved[k]) for k in saved)
    assert sorted(p.name for p in tmp_path.iterdir()) == [weight_name]


@pytest.mark.parametrize("mode", FINETUNE_MODES)
def test_adapter_state_round_trips_and_only_adaptors_train(mode, tmp_path):
    pipe, adapters = perturbed_adapters(mode)
    adapters.save_state(tmp_path)
    state = adapters.state_dict()
    _, other = perturbed_adapters(mode)
    for p in other.parameters():
        with torch.no_grad():
            p.add_(1.0)
    other.load_state(tmp_path)
    assert all(torch.equal(state[k], v) for k, v in other.state_dict().items())
    trainable = {id(p) for p in adapters.parameters()}
    frozen = [p for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters() if id(p) not in trainable]
    assert not any(p.requires_grad for p in frozen)


@pytest.mark.parametrize("mode", ["text_encoder_and_unet_lora", "prompt_prefix"])
def test_checkpoint_selection_restores_the_lowest_scoring_state_and_round_trips(mode, tmp_path):
    _, adapters = perturbed_adapters(mode)
    selection = CheckpointSelection(adapters)
    with pytest.raises(ValueError, match="No step has been scored"):
        selection.restore()
    states = {}
    for step, score in [(10, 0.5), (20, 0.3), (30, 0.3), (40, 0.4)]:
        with torch.no_grad():
            for p in adapters.parameters():
                p.add_(0.1 * step)
        states[step] = {k: v.clone() for k, v in adapters.state_dict().items()}
        became = selection.update(step, score)
        assert became == (step in (10, 20))  # a tie keeps the earlier step
    assert selection.history == [(10, 0.5, None), (20, 0.3, None), (30, 0.3, None), (40, 0.4, None)]
    assert selection.selected_step == 20 and selection.selected_score == 0.3
    assert selection.has_score(30) and not selection.has_score(50)
    with pytest.raises(ValueError, match="`score` must be a finite number"):
        selection.update(50, float("nan"))
    with pytest.raises(ValueError, match="Step 40 already has a score"):
        selection.update(40, 0.1)

    selection.save(tmp_path)
    assert selection.restore() == 20
    restored = adapters.state_dict()
    assert restored.keys() == states[20].keys() and all(torch.equal(restored[k], states[20][k]) for k in restored)

    # A fresh run resumed from the folder selects and restores the same state, whatever its adaptors hold.
    _, other = perturbed_adapters(mode)
    resumed = CheckpointSelection(other)
    resumed.load(tmp_path)
    assert resumed.history == selection.history and resumed.selected_step == 20
    assert resumed.restore() == 20
    assert all(torch.equal(v, states[20][k]) for k, v in other.state_dict().items())
    resumed.load(tmp_path / "nothing-saved-here")
    assert resumed.history == [] and resumed.selected_step is None


def test_checkpoint_selection_with_a_similarity_floor(tmp_path):
    _, adapters = perturbed_adapters("text_encoder_lora")
    with pytest.raises(ValueError, match=r"`min_similarity` is a cosine similarity and must be in \[-1, 1\]"):
        CheckpointSelection(adapters, min_similarity=1.5)
    selection = CheckpointSelection(adapters, min_similarity=0.85)
    with pytest.raises(ValueError, match=r"pass the `similarity` of step 10"):
        selection.update(10, 0.5)
    with pytest.raises(ValueError, match="`similarity` must be a finite number"):
        selection.update(10, 0.5, float("nan"))
    assert selection.history == []
    # Scores with similarities: the lowest score (step 30) broke its images, so the lowest among the rest is kept.
    kept = []
    for step, score, similarity in [(10, 0.5, 0.84), (20, 0.4, 0.90), (30, 0.1, 0.60), (40, 0.3, 0.85)]:
        with torch.no_grad():
            for p in adapters.parameters():
                p.add_(0.1)
        if selection.update(step, score, similarity):
            kept.append(step)
            state = {k: v.clone() for k, v in adapters.state_dict().items()}
    # Step 10 was kept while nothing reached the floor (the most similar so far), then 20, then 40.
    assert kept == [10, 20, 40] and selection.eligible_steps == [20, 40]
    assert selection.selected_step == 40 and selection.selected_score == 0.3
    selection.save(tmp_path)
    assert selection.restore() == 40 and all(torch.equal(v, state[k]) for k, v in adapters.state_dict().items())

    # Resumed with the same floor it selects the same step; without one, the lowest score whatever its similarity.
    resumed = CheckpointSelection(adapters, min_similarity=0.85)
    resumed.load(tmp_path)
    assert resumed.history == selection.history and resumed.selected_step == 40
    unguarded = CheckpointSelection(adapters)
    unguarded.load(tmp_path)
    assert unguarded.selected_step == 30 and unguarded.eligible_steps == [10, 20, 30, 40]

    # When no step reaches the floor, the most similar one is kept (the earliest of equal ones).
    broken = CheckpointSelection(adapters, min_similarity=0.95)
    for step, score, similarity in [(10, 0.5, 0.70), (20, 0.2, 0.80), (30, 0.1, 0.80)]:
        broken.update(step, score, similarity)
    assert broken.eligible_steps == [] and broken.selected_step == 20 and broken.selected_score == 0.2

    # A history saved as `(step, score)` pairs (before similarities were recorded) loads without a floor only.
    (tmp_path / "pairs").mkdir()
    selection.save(tmp_path / "pairs")
    path = tmp_path / "pairs" / SELECTION_HISTORY_NAME
    path.write_text(json.dumps({"history": [[10, 0.5], [20, 0.3]]}))
    unguarded.load(tmp_path / "pairs")
    assert unguarded.history == [(10, 0.5, None), (20, 0.3, None)] and unguarded.selected_step == 20
    with pytest.raises(ValueError, match="has steps without a similarity"):
        resumed.load(tmp_path / "pairs")


def test_prompt_prefix_trains_only_its_rows():
    pipe, adapters = perturbed_adapters("prompt_prefix")
    weight = adapters.parameters()[0]
    before = weight.detach().clone()
    out = pipe(
        adapters.apply_prompt(["a doctor"]), gradient="biased", generator=torch.Generator().manual_seed(0), **KWARGS
    )
    out.images.mean().backward()
    optimizer = torch.optim.AdamW([weight], lr=0.1, weight_decay=0.0)
    optimizer.step()
    changed = (weight.detach() - before).abs().sum(dim=1) > 0
    assert changed[adapters.prefix_token_ids].all() and changed.sum() == len(adapters.prefix_token_ids)


def test_objective_gradient_reaches_the_adaptor_and_weights_follow_agreement():
    pipe, adapters = perturbed_adapters("text_encoder_lora")
    classifier = BrightnessClassifier()
    out = pipe(
        ["a doctor"],
        num_images_per_prompt=4,
        gradient="biased",
        return_original=True,
        generator=torch.Generator().manual_seed(0),
        **KWARGS,
    )
    classifier.threshold = float(out.original_images.mean())
    dal = DistributionalAlignmentLoss("brightness=uniform", 0.5, classifier.attributes, seed=0)
    objective = FairFinetuningObjective(classifier, dal, ImageSemanticsLoss({"clip": tiny_clip_model()}))
    loss, logs = objective(out.images, out.original_images)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.parameters())
    assert {"loss/alignment", "loss/semantics", "loss/total", "agree_fraction"} <= set(logs)
    assert logs["loss/total"] == pytest.approx(logs["loss/alignment"] + logs["loss/semantics"], rel=1e-6)
    assert 0.0 <= logs["agree_fraction"] <= 1.0


def test_evaluate_adapters_base_and_adapted_views():
    pipe, adapters = perturbed_adapters("text_encoder_lora")
    classifier, context = BrightnessClassifier(), BrightnessClassifier({"context": ["a", "b"]})
    context.forward = lambda images: {"context": BrightnessClassifier.forward(context, images)["brightness"]}
    kwargs = {"num_inference_steps": 3, "guidance_scale": 2.0, "batch_size": 4}
    before = evaluate_adapters(adapters, ["a doctor", "a nurse"], classifier, 4, enabled=False, **kwargs)
    after = evaluate_adapters(adapters, ["a doctor", "a nurse"], classifier, 4, context, **kwargs)
    assert set(before["summary"]) >= {"bias/brightness"} and "context_kept" in after["summary"]
    base = AdaptedPipeline(adapters, enabled=False)("a doctor", generator=torch.Generator().manual_seed(0), **KWARGS)
    pipe.disable_lora()
    plain = pipe("a doctor", generator=torch.Generator().manual_seed(0), **KWARGS)
    assert torch.equal(base.images, plain.images)


def test_summarize_per_prompt_is_evaluate_adapters_summary_and_splits_over_prompts():
    _, adapters = perturbed_adapters("text_encoder_lora")
    kwargs = {"num_inference_steps": 3, "guidance_scale": 2.0, "batch_size": 4}
    prompts = ["a doctor", "a nurse", "a pilot"]
    whole = evaluate_adapters(adapters, prompts, BrightnessClassifier(), 4, **kwargs)
    assert summarize_per_prompt(whole["per_prompt"]) == whole["summary"]
    # Evaluated in two shares (as processes do), the gathered rows summarise to the same numbers.
    shares = [
        evaluate_adapters(adapters, p, BrightnessClassifier(), 4, **kwargs) for p in (prompts[::2], prompts[1::2])
    ]
    rows = [shares[0]["per_prompt"][0], shares[1]["per_prompt"][0], shares[0]["per_prompt"][1]]
    assert rows == whole["per_prompt"] and summarize_per_prompt(rows) == whole["summary"]
    nan_row = {"prompt": "x", "num_images": 0, "bias/a": float("nan")}
    assert summarize_per_prompt([{"prompt": "y", "num_images": 4, "bias/a": 0.5}, nan_row]) == {"bias/a": [0.5, 0.0]}
    assert summarize_per_prompt([]) == {}


class Pixels(ImageFeatureExtractor):
    """A stand-in encoder: an image's pixels, centred."""

    def __init__(self):
        super().__init__(torch.nn.Identity(), crop_size=8)

    def forward(self, images):
        return images.flatten(1) - 0.5


def test_evaluate_adapters_measures_similarity_to_the_originals():
    pipe, adapters = perturbed_adapters("text_encoder_lora")
    classifier, encoders = BrightnessClassifier(), {"pixels": Pixels()}
    kwargs = {"num_inference_steps": 3, "guidance_scale": 2.0, "batch_size": 4, "seed": 3}
    adapted = evaluate_adapters(adapters, ["a doctor"], classifier, 4, similarity_encoders=encoders, **kwargs)
    images = generate_images(AdaptedPipeline(adapters), "a doctor", 4, progress_bar=False, **kwargs)["a doctor"]
    originals = generate_images(AdaptedPipeline(adapters, False), "a doctor", 4, progress_bar=False, **kwargs)
    expected = torch.nn.functional.cosine_similarity(images.flatten(1) - 0.5, originals["a doctor"].flatten(1) - 0.5)
    assert adapted["per_prompt"][0]["pixels_similarity"] == pytest.approx(expected.mean().item(), abs=1e-6)
    assert adapted["per_prompt"][0]["pixels_similarity"] < 1 - 1e-6  # the perturbed adaptor changes the images
    with torch.no_grad():
        for p in adapters.parameters():
            p.zero_()
    unchanged = evaluate_adapters(adapters, ["a doctor"], classifier, 4, similarity_encoders=encoders, **kwargs)
    assert unchanged["summary"]["pixels_similarity"][0] == pytest.approx(1.0, abs=1e-6)


def record_base_calls(monkeypatch) -> list[bool]:
    """Patches `AdaptedPipeline.__call__` to record, per call, whether it ran the base model (adaptors disabled)."""
    base_calls = []
    call = AdaptedPipeline.__call__

    def counting_call(self, prompt, **call_kwargs):
        base_calls.append(not self.enabled)
        return call(self, prompt, **call_kwargs)

    monkeypatch.setattr(AdaptedPipeline, "__call__", counting_call)
    return base_calls


def test_reference_cache_generates_the_base_images_once_with_the_same_results(monkeypatch):
    pipe, adapters = perturbed_adapters("text_encoder_lora")
    classifier, encoders = BrightnessClassifier(), {"pixels": Pixels()}
    context = BrightnessClassifier({"context": ["a", "b"]})
    context.forward = lambda images: {"context": BrightnessClassifier.forward(context, images)["brightness"]}
    prompts, kwargs = ["a doctor", "a nurse"], {"num_inference_steps": 3, "guidance_scale": 2.0, "batch_size": 4}
    uncached = evaluate_adapters(adapters, prompts, classifier, 4, context, similarity_encoders=encoders, **kwargs)
    base_calls = record_base_calls(monkeypatch)
    cache = {}
    evaluated = [
        evaluate_adapters(adapters, prompts, classifier, 4, context, enabled, similarity_encoders=encoders,
                          reference_cache=cache, **kwargs)
        for enabled in (False, True, True)
    ]  # fmt: skip
    assert sum(base_calls) == len(prompts)  # the before pass only; each prompt is one call of 4 images
    assert evaluated[1] == uncached and evaluated[2] == uncached
    assert "context_kept" not in evaluated[0]["summary"]  # the base model is not compared with itself
    # Other generation settings are measured afresh, not read from the cache.
    other = {**kwargs, "num_inference_steps": 2}
    base_calls.clear()
    fresh = evaluate_adapters(adapters, prompts, classifier, 4, context, reference_cache=cache, **other)
    assert sum(base_calls) == len(prompts)
    assert fresh == evaluate_adapters(adapters, prompts, classifier, 4, context, **other)
    with pytest.raises(ValueError, match="reference_cache"):
        evaluate_adapters(adapters, prompts, classifier, 4, reference_cache={}, negative_prompt_embeds=torch.zeros(1))


def test_validation_grid_reference_cache_generates_the_base_rows_once(monkeypatch):
    pipe, adapters = perturbed_adapters("text_encoder_lora")
    classifier = BrightnessClassifier()
    prompts, kwargs = ["a doctor", "a nurse"], {"num_inference_steps": 3, "guidance_scale": 2.0, "seed": 1}
    uncached = np.asarray(validation_grid(adapters, prompts, classifier, 2, **kwargs))
    base_calls = record_base_calls(monkeypatch)
    cache = {}
    for _ in range(2):
        cached = np.asarray(validation_grid(adapters, prompts, classifier, 2, reference_cache=cache, **kwargs))
        np.testing.assert_array_equal(cached, uncached)
    assert sum(base_calls) == len(prompts) and len(base_calls) == 3 * len(prompts)
    # Other generation settings draw their own base rows.
    base_calls.clear()
    validation_grid(adapters, prompts, classifier, 2, reference_cache=cache, **{**kwargs, "num_inference_steps": 2})
    assert sum(base_calls) == len(prompts)
    with pytest.raises(ValueError, match="reference_cache"):
        validation_grid(adapters, prompts, classifier, 2, reference_cache={}, negative_prompt_embeds=torch.zeros(1))


def test_frozen_unconditional_view_guides_with_the_base_empty_prompt():
    pipe, adapters = perturbed_adapters("text_encoder_lora")
    prompts = ["a photo of the face of a doctor", "a photo of the face of a nurse"]
    negative = tiny_pipeline(StableDiffusionPipeline).encode_prompt("", "cpu", 1, False)[0]  # a pipeline never adapted

    def draw(view, **kwargs):
        return view(prompts, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0), **KWARGS, **kwargs)

    frozen = draw(AdaptedPipeline(adapters, frozen_unconditional=True)).images
    expected = draw(pipe, negative_prompt_embeds=negative.repeat(len(prompts), 1, 1)).images
    torch.testing.assert_close(frozen, expected)
    adapted = draw(AdaptedPipeline(adapters)).images  # the empty prompt through the adapted encoder
    assert (adapted - frozen).abs().max() > 1e-3


def test_errors():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="finetune"):
        add_fair_adapters(pipe, "full")
    with pytest.raises(ValueError, match="rank"):
        add_fair_adapters(pipe, "unet_lora", rank=0)
    add_fair_adapters(pipe, "prompt_prefix", num_prefix_tokens=2)
    with pytest.raises(ValueError, match="prefix_token"):
        add_fair_adapters(pipe, "prompt_prefix", num_prefix_tokens=2)
    with pytest.raises(ValueError, match="batch_size"):
        frozen_unconditional_embeds(pipe, 0)


def test_objective_face_centric_mode_classifies_the_largest_face_and_excludes_faceless_images():
    from diffusers_fair.faces import FaceDetector

    class HalfDetector(FaceDetector):
        """A stand-in detector: the left half of every image with an even index is a face; odd images have none."""

        def __init__(self):
            super().__init__(score_threshold=0.5)

        def _detect(self, images):
            width = images.shape[2]
            return [[[0, 0, width // 2, width // 2, 0.9]] if i % 2 == 0 else [] for i in range(len(images))]

    seen = []

    class RecordingClassifier(BrightnessClassifier):
        def forward(self, images):
            seen.append(images.shape)
            return super().forward(images)

    torch.manual_seed(0)
    images = torch.rand(4, 3, 16, 16, requires_grad=True)
    originals = torch.rand(4, 3, 16, 16)
    classifier = RecordingClassifier()
    dal = DistributionalAlignmentLoss("brightness=uniform", 0.0, classifier.attributes, seed=0)
    semantics = ImageSemanticsLoss({"clip": tiny_clip_model()})
    masks = []
    original_forward = dal.forward
    dal.forward = lambda logits, mask=None, **kw: masks.append(mask) or original_forward(logits, mask, **kw)
    objective = FairFinetuningObjective(classifier, dal, semantics, face_detector=HalfDetector(), face_crop_size=8)
    loss, logs = objective(images, originals)
    assert seen[0] == (4, 3, 8, 8)  # the classifier sees the face crops
    assert masks[0].tolist() == [True, False, True, False]  # faceless images leave the alignment
    loss.backward()
    assert images.grad.abs().sum() > 0
    # gradients reach only pixels that a loss sees: the faceless images through the semantics loss alone
    assert images.grad[1].abs().sum() > 0

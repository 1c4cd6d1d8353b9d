"""`evaluate` end to end on a real (tiny) FairStableDiffusionPipeline, with and without a LoRA."""

import torch
from peft import LoraConfig
from tiny_models import BrightnessClassifier, tiny_pipeline

from diffusers_fair import bias_score, evaluate
from diffusers_fair.metrics import generate_images, score_images


def test_evaluate_with_a_real_pipeline_reproduces_and_scores():
    pipe = tiny_pipeline()
    classifier = BrightnessClassifier()
    kwargs = {"num_inference_steps": 3, "guidance_scale": 2.0, "batch_size": 3, "progress_bar": False}
    prompts = ["a photo of a doctor", "a nurse"]
    images = generate_images(pipe, prompts, 5, **kwargs)
    again = generate_images(pipe, prompts, 5, **{**kwargs, "batch_size": 5})
    assert all(torch.equal(images[p], again[p]) for p in prompts)  # per-image seeds: batch size does not matter
    threshold = float(torch.cat(list(images.values())).mean())
    classifier.threshold = threshold  # a threshold that splits the generated images, so frequencies are not trivial

    result = evaluate(pipe, prompts, classifier, 5, reference_pipeline=pipe, **kwargs)
    for row in result.per_prompt:
        predicted = classifier(images[row["prompt"]])["brightness"].argmax(-1)
        freqs = torch.bincount(predicted, minlength=2).double() / 5
        assert row["freq/brightness"] == freqs.tolist()
        assert row["bias/brightness"] == bias_score(freqs)
    mean, _ = result.summary["bias/brightness"]
    assert abs(mean - sum(r["bias/brightness"] for r in result.per_prompt) / 2) < 1e-12
    # scoring stored images gives the same numbers as evaluate
    rescored = score_images(images, classifier)
    assert [r["freq/brightness"] for r in rescored.per_prompt] == [r["freq/brightness"] for r in result.per_prompt]


def test_a_lora_pipeline_and_its_frozen_reference_share_noise():
    pipe, frozen = tiny_pipeline(), tiny_pipeline()
    pipe.text_encoder.add_adapter(LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    kwargs = {"num_inference_steps": 3, "guidance_scale": 2.0, "batch_size": 4, "progress_bar": False}
    with_lora = generate_images(pipe, ["a doctor"], 4, **kwargs)["a doctor"]
    reference = generate_images(frozen, ["a doctor"], 4, **kwargs)["a doctor"]
    pipe.disable_lora()
    without_lora = generate_images(pipe, ["a doctor"], 4, **kwargs)["a doctor"]
    assert torch.equal(without_lora, reference)
    assert (with_lora - reference).abs().max() > 1e-3

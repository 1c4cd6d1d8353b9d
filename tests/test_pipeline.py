import logging

import pytest
import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, PNDMScheduler, StableDiffusionPipeline
from peft import LoraConfig
from tiny_models import tiny_components, tiny_pipeline

from diffusers_fair import BiasedGradientScheduler, FairStableDiffusionPipeline, FairStableDiffusionPipelineOutput

PROMPTS = ["a photo of the face of a doctor", "a nurse"]


def add_loras(pipe, text_encoder=True, unet=True):
    """LoRA on both models with B perturbed away from peft's zero init (else A's gradient is 0)."""
    if text_encoder:
        pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
    if unet:
        pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v", "to_k"]))
    torch.manual_seed(1)
    params = trainable(pipe)
    for p in params:
        p.data.normal_(0, 0.1)
    return params


def trainable(pipe):
    return [p for m in (pipe.text_encoder, pipe.unet) for p in m.parameters() if p.requires_grad]


def grads_of(pipe, params, leaf=None, **kwargs):
    for p in params + ([leaf] if leaf is not None else []):
        p.grad = None
    out = pipe(generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs)
    loss = (out.images - 0.3).pow(2).mean()
    loss.backward()
    return [p.grad.clone() for p in params + ([leaf] if leaf is not None else [])], out


def assert_grads_match(reference, other, rtol=1e-5):
    scale = max(g.abs().max() for g in reference)
    assert scale > 0
    diff = max((a - b).abs().max() for a, b in zip(reference, other))
    assert diff <= rtol * scale, f"max |diff| {float(diff):.3g} > {rtol} * max |grad| {float(scale):.3g}"


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7])
def test_no_gradient_equals_stable_diffusion_pipeline(guidance_scale, guidance_rescale):
    fair, stock = tiny_pipeline(), tiny_pipeline(StableDiffusionPipeline)
    kwargs = {"prompt": PROMPTS, "num_inference_steps": 4, "guidance_scale": guidance_scale}
    kwargs.update(guidance_rescale=guidance_rescale, negative_prompt=["long hair", ""], num_images_per_prompt=2)
    for output_type in ("pt", "np", "latent"):
        a = fair(**kwargs, output_type=output_type, generator=torch.Generator().manual_seed(3))
        b = stock(**kwargs, output_type=output_type, generator=torch.Generator().manual_seed(3))
        assert isinstance(a, FairStableDiffusionPipelineOutput)
        assert a.images.shape == b.images.shape and (a.images == b.images).all()
        assert a.original_images is None and not a.latents.requires_grad
    pil = fair(**kwargs, generator=torch.Generator().manual_seed(3)).images
    assert len(pil) == 4 and pil[0].size == (16, 16)


def test_callback_on_step_end_gets_and_applies_every_tensor_input_as_stable_diffusion_pipeline():
    fair, stock = tiny_pipeline(), tiny_pipeline(StableDiffusionPipeline)
    kwargs = {"prompt": PROMPTS, "negative_prompt": ["long hair", ""], "num_inference_steps": 3, "guidance_scale": 4.0}
    kwargs.update(output_type="pt", callback_on_step_end_tensor_inputs=list(stock._callback_tensor_inputs))

    def run(pipe):
        seen = []

        def callback(pipe, i, t, tensors):
            seen.append({k: v.clone() for k, v in tensors.items()})
            return {
                "latents": tensors["latents"] * 0.9,
                "prompt_embeds": tensors["prompt_embeds"] * 1.1,
                "negative_prompt_embeds": tensors["negative_prompt_embeds"] + 1.0,
            }

        images = pipe(**kwargs, callback_on_step_end=callback, generator=torch.Generator().manual_seed(3)).images
        return images, seen

    (a, seen_fair), (b, seen_stock) = run(fair), run(stock)
    assert torch.equal(a, b)
    assert (
        [sorted(s) for s in seen_fair]
        == [sorted(s) for s in seen_stock]
        == [sorted(stock._callback_tensor_inputs)] * 3
    )
    for s_fair, s_stock in zip(seen_fair, seen_stock):
        assert all(torch.equal(s_fair[k], s_stock[k]) for k in s_stock)
    # the returned `negative_prompt_embeds` is what the next step's callback receives
    torch.testing.assert_close(seen_fair[1]["negative_prompt_embeds"], seen_fair[0]["negative_prompt_embeds"] + 1.0)


@pytest.mark.parametrize("scaling", ["paper", "exact", "none"])
@pytest.mark.parametrize("solver_order", [1, 2])
@pytest.mark.parametrize("num_inference_steps", [2, 5, 20])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_memory_flat_biased_gradient_equals_autograd_hooks(scaling, solver_order, num_inference_steps, guidance_scale):
    pipe = tiny_pipeline(scheduler_kwargs={"solver_order": solver_order, "gradient_scaling": scaling})
    params = add_loras(pipe)
    kwargs = {"prompt": PROMPTS, "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
    reference, out_ref = grads_of(pipe, params, gradient="biased", biased_gradient_impl="autograd", **kwargs)
    flat, out_flat = grads_of(pipe, params, gradient="biased", recompute_chunk_size=3, **kwargs)
    assert torch.equal(out_ref.images, out_flat.images)
    assert_grads_match(reference, flat)
    # both the text-encoder LoRA and the U-Net LoRA receive gradient
    te = len([p for p in pipe.text_encoder.parameters() if p.requires_grad])
    assert max(g.abs().max() for g in reference[:te]) > 0 and max(g.abs().max() for g in reference[te:]) > 0


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_memory_flat_biased_gradient_for_prompt_embeds(guidance_scale):
    pipe = tiny_pipeline()
    params = add_loras(pipe, text_encoder=False)
    torch.manual_seed(2)
    embeds = torch.randn(2, 77, 16, requires_grad=True)
    negative = torch.zeros(2, 77, 16)
    kwargs = {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "num_inference_steps": 5}
    kwargs["guidance_scale"] = guidance_scale
    reference, _ = grads_of(pipe, params, embeds, gradient="biased", biased_gradient_impl="autograd", **kwargs)
    flat, _ = grads_of(pipe, params, embeds, gradient="biased", **kwargs)
    assert reference[-1].abs().max() > 0
    assert_grads_match(reference[-1:], flat[-1:])
    assert_grads_match(reference[:-1], flat[:-1])


def test_naive_gradient_matches_finite_differences():
    # float64 weights (the scheduler still steps in float32, which limits how small h can be)
    pipe = tiny_pipeline().to(torch.float64)
    torch.manual_seed(2)
    base, weights = torch.randn(1, 77, 16, dtype=torch.float64), torch.randn(1, 4, 8, 8, dtype=torch.float64)
    kwargs = {"negative_prompt_embeds": torch.zeros(1, 77, 16, dtype=torch.float64), "num_inference_steps": 3}
    kwargs.update(guidance_scale=6.0, output_type="latent")

    def loss(scale, **extra):
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        return (pipe(prompt_embeds=base * scale, latents=latents, **kwargs, **extra).images * weights).sum()

    scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    (naive,) = torch.autograd.grad(loss(scale, gradient="naive"), scale)
    h = 1e-2
    finite_difference = (loss(1 + h) - loss(1 - h)) / (2 * h)
    assert abs(float(naive) - float(finite_difference)) <= 1e-3 * abs(float(finite_difference))
    # the biased gradient is another estimator: it must not coincide with the exact one
    (biased,) = torch.autograd.grad(loss(scale, gradient="biased"), scale)
    assert abs(float(biased) - float(naive)) > 1e-2 * abs(float(naive))


def test_backprop_steps_is_unbiased():
    pipe = tiny_pipeline()
    params = add_loras(pipe)
    kwargs = {"prompt": PROMPTS[:1], "num_inference_steps": 3, "guidance_scale": 3.0, "gradient": "biased"}
    full, _ = grads_of(pipe, params, **kwargs)
    all_steps, _ = grads_of(pipe, params, backprop_steps=3, **kwargs)
    assert_grads_match(full, all_steps, rtol=1e-6)

    generator = torch.Generator().manual_seed(0)
    draws = [grads_of(pipe, params, backprop_steps=1, backprop_generator=generator, **kwargs)[0] for _ in range(24)]
    flat = [torch.cat([g.flatten() for g in draw]) for draw in draws]
    # with k = 1 every draw is T * (one step's contribution): three distinct values whose mean is the full gradient
    distinct = []
    for draw in flat:
        if not any(torch.allclose(draw, d, rtol=1e-4, atol=1e-9) for d in distinct):
            distinct.append(draw)
    assert len(distinct) == 3
    full_flat = torch.cat([g.flatten() for g in full])
    assert_grads_match([full_flat], [torch.stack(distinct).mean(0)], rtol=1e-5)
    # and the mean of the draws is within four standard errors of it
    stacked = torch.stack(flat)
    standard_error = (stacked.var(0).sum() / len(flat)).sqrt()
    assert (stacked.mean(0) - full_flat).norm() <= 4 * standard_error


def test_return_original_fused_with_text_encoder_lora():
    pipe = tiny_pipeline()
    params = add_loras(pipe, unet=False)
    kwargs = {"prompt": PROMPTS, "num_inference_steps": 4, "guidance_scale": 3.0}
    with_original, out = grads_of(pipe, params, gradient="biased", return_original=True, **kwargs)
    without, out_plain = grads_of(pipe, params, gradient="biased", **kwargs)
    assert_grads_match(without, with_original)
    torch.testing.assert_close(out.images, out_plain.images, rtol=0, atol=1e-5)
    assert out.original_images.shape == out.images.shape and not out.original_images.requires_grad
    # the originals are the frozen model's images from the same noise
    pipe.disable_lora()
    frozen = pipe(generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images
    pipe.enable_lora()
    torch.testing.assert_close(out.original_images, frozen, rtol=0, atol=1e-5)
    assert (out.original_images - out.images).abs().max() > 1e-3
    assert all(p.requires_grad for p in params)


def test_return_original_with_unet_lora_and_original_prompt():
    pipe = tiny_pipeline()
    params = add_loras(pipe)
    kwargs = {"prompt": PROMPTS, "num_inference_steps": 4, "guidance_scale": 3.0}
    _, out = grads_of(
        pipe, params, gradient="biased", return_original=True, original_prompt=["a doctor", "a nurse"], **kwargs
    )
    pipe.disable_lora()
    frozen = pipe(
        prompt=["a doctor", "a nurse"],
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    pipe.enable_lora()
    torch.testing.assert_close(out.original_images, frozen, rtol=0, atol=1e-5)
    assert all(p.requires_grad for p in params)


@pytest.mark.parametrize(
    "inputs, match",
    [
        ({"prompt": PROMPTS, "original_prompt": "a person"}, r"`original_prompt` has 1 prompt.*`prompt` \(2\)"),
        ({"prompt": "a doctor", "original_prompt": PROMPTS}, r"`original_prompt` has 2 prompts.*`prompt` \(1\)"),
        (
            {"prompt_embeds": torch.zeros(2, 77, 16), "original_prompt_embeds": torch.zeros(1, 77, 16)},
            r"`original_prompt_embeds` has 1 prompt.*`prompt_embeds` \(2\)",
        ),
    ],
)
def test_return_original_refuses_a_batch_size_mismatch(inputs, match):
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match=match):
        pipe(**inputs, num_inference_steps=2, output_type="pt", return_original=True)


def test_return_original_goes_through_the_safety_checker(monkeypatch):
    pipe = tiny_pipeline()

    def black_out(image, device, dtype):
        return torch.zeros_like(image), [True] * len(image)

    monkeypatch.setattr(pipe, "run_safety_checker", black_out)
    kwargs = {"prompt": PROMPTS, "num_inference_steps": 2, "output_type": "pt", "return_original": True}
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    assert out.nsfw_content_detected == [True, True]
    assert (out.images == 0).all()
    assert out.original_images.shape == out.images.shape and (out.original_images == 0).all()


def test_gradient_checkpointing_gives_the_same_gradient():
    pipe = tiny_pipeline()
    params = add_loras(pipe)
    kwargs = {"prompt": PROMPTS, "num_inference_steps": 3, "guidance_scale": 3.0, "gradient": "biased"}
    plain, _ = grads_of(pipe, params, **kwargs)
    pipe.unet.enable_gradient_checkpointing()
    pipe.text_encoder.gradient_checkpointing_enable()
    checkpointed, _ = grads_of(pipe, params, **kwargs)
    assert_grads_match(plain, checkpointed)


def test_bfloat16_autocast_runs_and_stays_close():
    pipe = tiny_pipeline()
    params = add_loras(pipe)
    kwargs = {"prompt": PROMPTS, "num_inference_steps": 3, "guidance_scale": 3.0, "gradient": "biased"}
    plain, _ = grads_of(pipe, params, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pipe(generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs)
    for p in params:
        p.grad = None
    (out.images.float() - 0.3).pow(2).mean().backward()
    low = [p.grad for p in params]
    assert all(torch.isfinite(g).all() for g in low)
    cosine = torch.nn.functional.cosine_similarity(
        torch.cat([g.flatten() for g in plain]), torch.cat([g.flatten() for g in low]), dim=0
    )
    assert cosine > 0.9


@pytest.mark.parametrize("scheduler_class", [DPMSolverMultistepScheduler, PNDMScheduler])
def test_biased_gradient_builds_its_scheduler_and_says_so_once(scheduler_class, caplog):
    pipe = tiny_pipeline()
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    params = add_loras(pipe, unet=False)
    kwargs = {"prompt": PROMPTS[:1], "num_inference_steps": 3, "guidance_scale": 3.0}
    with caplog.at_level(logging.WARNING):
        grads_of(pipe, params, gradient="biased", **kwargs)
        grads_of(pipe, params, gradient="biased", **kwargs)
    assert sum("BiasedGradientScheduler" in r.getMessage() for r in caplog.records) == 1
    assert isinstance(pipe.scheduler, scheduler_class)


def test_save_and_reload_with_biased_scheduler(tmp_path):
    pipe = tiny_pipeline(scheduler_kwargs={"gradient_scaling": "exact"})
    pipe.save_pretrained(tmp_path)
    reloaded = FairStableDiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(reloaded.scheduler, BiasedGradientScheduler)
    assert reloaded.scheduler.config.gradient_scaling == "exact"
    stock = StableDiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(stock.scheduler, BiasedGradientScheduler)
    generic = DiffusionPipeline.from_pretrained(tmp_path)  # the folder is a standard Stable Diffusion folder
    assert type(generic) is StableDiffusionPipeline
    kwargs = {"prompt": "a doctor", "num_inference_steps": 3, "output_type": "pt"}
    a = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    b = reloaded(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(a, b)


def test_errors():
    pipe = tiny_pipeline()
    kwargs = {"prompt": "a doctor", "num_inference_steps": 2}
    with pytest.raises(ValueError, match="`gradient` must be one of"):
        pipe(**kwargs, gradient="exact")
    with pytest.raises(ValueError, match="output_type"):
        pipe(**kwargs, gradient="biased")  # default output_type is "pil"
    with pytest.raises(ValueError, match="biased_gradient_impl"):
        pipe(**kwargs, gradient="biased", output_type="pt", biased_gradient_impl="hooks")
    with pytest.raises(ValueError, match="backprop_steps"):
        pipe(**kwargs, gradient="biased", output_type="pt", biased_gradient_impl="autograd", backprop_steps=1)
    unet_calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *a: unet_calls.append(1))
    with pytest.raises(ValueError, match=r"`backprop_steps` \(3\) must be at most `num_inference_steps` \(2\)"):
        pipe(**kwargs, gradient="biased", output_type="pt", backprop_steps=3)
    assert not unet_calls  # refused before sampling, not after
    hook.remove()
    for bad in (0, True):  # `True` is an int, not a count
        with pytest.raises(ValueError, match="backprop_steps"):
            pipe(**kwargs, gradient="biased", output_type="pt", backprop_steps=bad)
        with pytest.raises(ValueError, match="recompute_chunk_size"):
            pipe(**kwargs, gradient="biased", output_type="pt", recompute_chunk_size=bad)
    with pytest.raises(ValueError, match="callback_on_step_end"):
        pipe(**kwargs, gradient="naive", output_type="pt", callback_on_step_end=lambda *a: {})
    with pytest.raises(ValueError, match="original_prompt"):
        pipe(prompt_embeds=torch.zeros(1, 77, 16), num_inference_steps=2, return_original=True)
    with pytest.raises(ValueError, match="only `return_original=True` draws"):
        pipe(**kwargs, original_prompt="a person")
    with pytest.raises(ValueError, match="safety checker"):
        components = tiny_components()
        components["safety_checker"] = torch.nn.Identity()
        FairStableDiffusionPipeline(**components)(**kwargs, gradient="biased", output_type="pt")
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"], lora_dropout=0.1))
    pipe.unet.train()
    with pytest.raises(ValueError, match="dropout"):
        pipe(**kwargs, gradient="biased", output_type="pt")

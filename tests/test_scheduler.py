import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, PNDMScheduler

from diffusers_fair import BiasedGradientScheduler

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}

CONFIGS = [
    {},
    {"solver_order": 1},
    {"solver_order": 3},
    {"algorithm_type": "sde-dpmsolver++"},
    {"use_karras_sigmas": True},
    {"prediction_type": "v_prediction"},
    {"final_sigmas_type": "sigma_min"},
    {"solver_type": "heun", "lower_order_final": False},
    {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
]


def run_chain(scheduler, num_steps, noise_predictions, sample, seed=0):
    scheduler.set_timesteps(num_steps)
    generator = torch.Generator().manual_seed(seed)
    for t, eps in zip(scheduler.timesteps, noise_predictions):
        sample = scheduler.step(eps, t, sample, generator=generator).prev_sample
    return sample


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("num_steps", [2, 5, 20])
def test_forward_is_bit_identical_to_parent(config, num_steps):
    torch.manual_seed(0)
    sample = torch.randn(2, 4, 8, 8)
    eps = [torch.randn(2, 4, 8, 8) for _ in range(num_steps)]
    stock = run_chain(DPMSolverMultistepScheduler(**SD_BETAS, **config), num_steps, eps, sample)
    biased = run_chain(BiasedGradientScheduler(**SD_BETAS, **config), num_steps, eps, sample)
    assert torch.equal(stock, biased)


@pytest.mark.parametrize("config", [c for c in CONFIGS if not c.get("algorithm_type", "").startswith("sde")])
@pytest.mark.parametrize("num_steps", [2, 5, 20])
def test_noise_prediction_coefficients_are_the_exact_linear_map(config, num_steps):
    # z_0(eps) - z_0(0) must equal sum_i M_i eps_i for arbitrary eps: the solver is linear in the predictions.
    scheduler = BiasedGradientScheduler(**SD_BETAS, **config)
    scheduler.set_timesteps(num_steps)
    coefficients = scheduler.noise_prediction_coefficients
    assert coefficients.shape == (num_steps,)
    torch.manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, dtype=torch.float32)
    eps = [torch.randn(1, 4, 8, 8) for _ in range(num_steps)]
    stock = DPMSolverMultistepScheduler(**SD_BETAS, **config)
    with_eps = run_chain(stock, num_steps, eps, sample)
    without_eps = run_chain(stock, num_steps, [torch.zeros_like(e) for e in eps], sample)
    predicted = sum(float(m) * e for m, e in zip(coefficients, eps))
    scale = with_eps.abs().max()
    assert (with_eps - without_eps - predicted).abs().max() <= 2e-6 * scale


def test_paper_scales_follow_algorithm_1():
    scheduler = BiasedGradientScheduler(**SD_BETAS)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps.long()
    alphabar = scheduler.alphas_cumprod.double()[t]
    beta = scheduler.betas.double()[t]
    a_t = (1 / alphabar.sqrt()) * beta / (1 - alphabar).sqrt()
    expected = (1 / a_t) / torch.exp(torch.log(1 / a_t).mean())
    torch.testing.assert_close(scheduler.gradient_scales, expected)
    assert torch.log(scheduler.gradient_scales).mean().abs() < 1e-12  # geometric mean 1


def test_exact_scaling_equalises_every_step_and_none_is_one():
    exact = BiasedGradientScheduler(**SD_BETAS, gradient_scaling="exact")
    exact.set_timesteps(7)
    product = exact.noise_prediction_coefficients * exact.gradient_scales
    torch.testing.assert_close(product, product[0].expand(7))
    none = BiasedGradientScheduler(**SD_BETAS, gradient_scaling="none")
    none.set_timesteps(7)
    assert torch.equal(none.gradient_scales, torch.ones(7, dtype=torch.float64))


def test_config_round_trips(tmp_path):
    scheduler = BiasedGradientScheduler(**SD_BETAS, solver_order=1, gradient_scaling="exact")
    scheduler.save_pretrained(tmp_path)
    reloaded = BiasedGradientScheduler.from_pretrained(tmp_path)
    assert reloaded.config.gradient_scaling == "exact" and reloaded.config.solver_order == 1
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(reloaded.config) == public(scheduler.config)
    # from another scheduler's config: its settings are kept, ours default
    pndm = PNDMScheduler(**SD_BETAS, steps_offset=1)
    converted = BiasedGradientScheduler.from_config(pndm.config)
    assert converted.config.gradient_scaling == "paper"
    assert converted.config.beta_end == 0.012 and converted.config.steps_offset == 1
    # and back to the stock solver
    stock = DPMSolverMultistepScheduler.from_config(scheduler.config)
    assert stock.config.solver_order == 1


def test_errors():
    with pytest.raises(ValueError, match="thresholding"):
        BiasedGradientScheduler(thresholding=True)
    with pytest.raises(ValueError, match="thresholding"):
        BiasedGradientScheduler.from_config(DPMSolverMultistepScheduler(thresholding=True).config)
    with pytest.raises(ValueError, match="thresholding"):  # positionally: the parent's 8th parameter
        BiasedGradientScheduler(1000, 0.0001, 0.02, "linear", None, 2, "epsilon", True)
    with pytest.raises(ValueError, match="gradient_scaling"):
        BiasedGradientScheduler(gradient_scaling="paperish")

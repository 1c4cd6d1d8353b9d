"""`BiasedGradientScheduler`: DPM-Solver++ with the per-step gradient coefficients of biased direct finetuning."""

import copy
import inspect
import math

import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (diffusers' loader looks for it here)

GRADIENT_SCALINGS = ("paper", "exact", "none")


class BiasedGradientScheduler(DPMSolverMultistepScheduler):
    r"""
    [`~diffusers.DPMSolverMultistepScheduler`] that also provides, for the current timesteps, the coefficients that
    biased direct finetuning (DFT, Shen et al. 2024, Sec. 4.2 and Algorithm 1) needs. Its forward pass is the
    parent's, unchanged, for every configuration: `step` returns the same `prev_sample` bit for bit.

    With every U-Net input `z_t` detached, the multistep update is linear in the noise predictions with scalar
    coefficients, so the final latent is `z_0 = a * z_T + sum_i M_i * eps_i` (plus injected noise for the `sde-*`
    variants). `noise_prediction_coefficients` holds those exact `M_i`; `gradient_scales` holds the factor `C_i` by
    which the gradient reaching `eps_i` is multiplied, so that step `i` contributes `M_i * C_i * dL/dz_0`.

    Args:
        gradient_scaling (`str`, *optional*, defaults to `"paper"`):
            How `C_i` standardises the steps' influence:
            - `"paper"`: Algorithm 1, `C_i = 1 / A_{t_i}` with `A_t = beta_t / (sqrt(alphabar_t) sqrt(1 - alphabar_t))`
              (the DDPM coefficient of `eps_t` in `z_0`), divided by the geometric mean over the steps.
            - `"exact"`: `C_i = 1 / |M_i|` divided by its geometric mean, so `|M_i * C_i|` is the same for every step
              (the paper's intent, `A_t = 1`, for the solver actually used). Each step keeps the sign of its `M_i`:
              all are negative with the default second-order solver, but `solver_order=3` or
              `final_sigmas_type="sigma_min"` can make a few positive, and a step whose `M_i` is close to zero then
              gets a large `C_i` (Stable Diffusion's betas at 20 steps: the largest `C_i` is 28 times the smallest at
              second order, 4,338 times at third order). Check `gradient_scales` for such configurations.
            - `"none"`: `C_i = 1`, detaching only (the middle curve of the paper's Fig. 1a).
        **kwargs:
            Every argument of [`~diffusers.DPMSolverMultistepScheduler`]. `thresholding=True` is refused: dynamic
            thresholding makes the update non-linear in the noise prediction.
    """

    def __init__(self, *args, gradient_scaling: str = "paper", **kwargs):
        if gradient_scaling not in GRADIENT_SCALINGS:
            raise ValueError(f"`gradient_scaling` must be one of {GRADIENT_SCALINGS}, got {gradient_scaling!r}.")
        # By keyword or by position (the parent's 8th parameter).
        arguments = inspect.signature(DPMSolverMultistepScheduler.__init__).bind(None, *args, **kwargs).arguments
        if arguments.get("thresholding", False):
            raise ValueError(
                "`thresholding=True` makes the solver update non-linear in the noise prediction, so the biased "
                "gradient's per-step coefficients do not exist; use `thresholding=False` (the default, and the right "
                "choice for latent diffusion)."
            )
        super().__init__(*args, **kwargs)
        self.noise_prediction_coefficients: torch.Tensor | None = None
        self.gradient_scales: torch.Tensor | None = None

    # The parent's arguments plus ours, so that `register_to_config`, `from_config` and `save_pretrained` see every
    # key without this file copying the parent's signature (which changes between diffusers releases).
    __init__.__signature__ = inspect.Signature(
        list(inspect.signature(DPMSolverMultistepScheduler.__init__).parameters.values())
        + [inspect.Parameter("gradient_scaling", inspect.Parameter.KEYWORD_ONLY, default="paper", annotation=str)]
    )
    __init__ = register_to_config(__init__)

    def set_timesteps(self, *args, **kwargs):
        """Same as the parent's; then computes `noise_prediction_coefficients` and `gradient_scales` for them."""
        output = super().set_timesteps(*args, **kwargs)
        self.noise_prediction_coefficients = self._compute_noise_prediction_coefficients()
        self.gradient_scales = self._compute_gradient_scales(self.noise_prediction_coefficients)
        return output

    def _compute_noise_prediction_coefficients(self) -> torch.Tensor:
        # Run the parent's own update on one-element tensors, on a fresh copy of this scheduler, and differentiate:
        # the map (eps_1, ..., eps_n) -> z_0 is linear, so the gradient is exactly the coefficient vector, whatever
        # the solver order, the lower-order final steps or the sigma schedule.
        probe = copy.deepcopy(self)
        shape = (1, 1, 1, 1)
        sample = torch.zeros(shape)
        noise_predictions = [torch.zeros(shape, requires_grad=True) for _ in probe.timesteps]
        with torch.enable_grad():
            for t, model_output in zip(probe.timesteps, noise_predictions):
                # `variance_noise` only matters for the `sde-*` variants: the injected noise does not depend on eps.
                sample = probe.step(model_output, t, sample, variance_noise=torch.zeros(shape), return_dict=False)[0]
            grads = torch.autograd.grad(sample.sum(), noise_predictions, allow_unused=True)
        return torch.tensor([0.0 if g is None else float(g.sum()) for g in grads], dtype=torch.float64)

    def _compute_gradient_scales(self, coefficients: torch.Tensor) -> torch.Tensor:
        scaling = self.config.gradient_scaling
        if scaling == "none":
            return torch.ones_like(coefficients)
        if scaling == "paper":
            t = self.timesteps.long().cpu()
            alphas_cumprod = self.alphas_cumprod.to(torch.float64)[t]
            betas = self.betas.to(torch.float64)[t]
            scales = torch.sqrt(alphas_cumprod) * torch.sqrt(1 - alphas_cumprod) / betas  # 1 / A_t
        else:
            if (coefficients == 0).any():
                zero_steps = torch.nonzero(coefficients == 0).flatten().tolist()
                raise ValueError(
                    f"`gradient_scaling='exact'` needs every step to reach z_0, but steps {zero_steps} have "
                    "coefficient 0 for this configuration; use `gradient_scaling='paper'` or `'none'`."
                )
            scales = 1.0 / coefficients.abs()
        geometric_mean = math.exp(float(torch.log(scales).mean()))
        return scales / geometric_mean

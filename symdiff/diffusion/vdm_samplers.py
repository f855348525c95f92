"""Few-step samplers of the vdm process: DDIM and DPM-Solver++(2M), on any sub-grid of the T integer times.

Both read the trained eps-network as a data predictor x-hat_0 = (z_t - sigma_t eps_hat) / alpha_t and move
z_t -> z_s (s < t) on the same variance-preserving marginals q(z_t | x) = N(alpha_t x, sigma_t^2 I) as the
ancestral step (alpha_t^2 + sigma_t^2 = 1, gamma_t = -log SNR from the schedule's table).

* DDIM (Song et al. 2021, eq. 12): z_s = alpha_s x-hat_0 + sqrt(sigma_s^2 - c^2) eps_hat + c xi, with
  c = ddim_eta * sigma_s sigma_{t|s} / sigma_t and sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2.
  With this convention ddim_eta = 1 makes c^2 the variance of the posterior q(z_s | z_t, x) and the mean that
  posterior's mean at x = x-hat_0: exactly the ancestral step (SPEC §2.5) on any grid; ddim_eta = 0 is the
  deterministic (probability-flow-like) sampler.
* DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in lambda = log(alpha / sigma) = -gamma / 2: with h = lambda_s - lambda_t,
  z_s = (sigma_s / sigma_t) z_t - alpha_s expm1(-h) D, D = x-hat_0 at the first step and afterwards the
  second-order multistep D = (1 + 1/(2r)) x-hat_0 - 1/(2r) x-hat_0_prev, r = h_prev / h. One network call a step;
  the sampler takes the last step (into t = 0) at first order, as the solver's authors advise for few steps.

Coefficients are formed in float64 from gamma and applied in the state's dtype. x stays CoM-free because z_t,
eps_hat and the noise are; each step still re-projects (and zeroes padding) as the ancestral step does.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional

import torch

from symdiff.diffusion import edm

if TYPE_CHECKING:
    from symdiff.diffusion.vdm import VDM
    from symdiff.models.denoiser import DenoiseFn


class DPMHistory(NamedTuple):
    """What DPM-Solver++(2M) carries between steps: the last data prediction and its log-SNR step."""
    x0: torch.Tensor
    h: torch.Tensor


def _gammas(proc: "VDM", z: torch.Tensor, t_int: int | torch.Tensor, s_int: int | torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B = z.shape[0]
    t = torch.as_tensor(t_int, device=z.device).long().expand(B)
    s = torch.as_tensor(s_int, device=z.device).long().expand(B)
    return t, s, proc.schedule.gamma(t), proc.schedule.gamma(s)


def _x0_hat(proc: "VDM", denoise: "DenoiseFn", z_t: torch.Tensor, mask: torch.Tensor, t: torch.Tensor,
            g_t: torch.Tensor, R, R0, eta, generator) -> tuple[torch.Tensor, torch.Tensor]:
    eps_hat = denoise(z_t, mask, t.to(z_t.dtype) / proc.timesteps, R=R, R0=R0, eta=eta, generator=generator)
    a_t, s_t = proc.schedule.alpha(g_t), proc.schedule.sigma(g_t)
    return (z_t - edm._bcast(s_t, z_t) * eps_hat) / edm._bcast(a_t, z_t), eps_hat


def ddim_step(proc: "VDM", denoise: "DenoiseFn", z_t: torch.Tensor, mask: torch.Tensor,
              t_int: int | torch.Tensor, s_int: int | torch.Tensor, ddim_eta: float = 0.0,
              R: Optional[torch.Tensor] = None, R0: Optional[torch.Tensor] = None, eta: Optional[torch.Tensor] = None,
              noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One DDIM step z_t -> z_s. ``eta`` is gamma's noise (as in the denoiser); ``ddim_eta`` DDIM's.

    Randomness is drawn in the ancestral step's order (the denoiser's, then the step noise), so ddim_eta = 1
    with one generator reproduces the ancestral chain.
    """
    mask = mask.bool()
    t, _, g_t, g_s = _gammas(proc, z_t, t_int, s_int)
    x0, eps_hat = _x0_hat(proc, denoise, z_t, mask, t, g_t, R, R0, eta, generator)
    sched = proc.schedule
    sigma_t, sigma_s, alpha_s = sched.sigma(g_t), sched.sigma(g_s), sched.alpha(g_s)
    c = float(ddim_eta) * sigma_s * torch.sqrt(sched.sigma2_t_given_s(g_t, g_s)) / sigma_t
    # sigma_s^2 - c^2 >= 0 for ddim_eta <= 1; clamped so rounding at ddim_eta = 1 cannot make a NaN.
    z_s = edm._bcast(alpha_s, z_t) * x0 + edm._bcast(torch.sqrt((sigma_s ** 2 - c ** 2).clamp_min(0)), z_t) * eps_hat
    if float(ddim_eta) != 0.0:
        if noise is None:
            noise = edm.sample_noise(mask, proc.d, z_t.dtype, proc.backend, generator)
        z_s = z_s + edm._bcast(c, z_t) * noise
    return proc._finish(z_s, mask)


def dpmpp2m_step(proc: "VDM", denoise: "DenoiseFn", z_t: torch.Tensor, mask: torch.Tensor,
                 t_int: int | torch.Tensor, s_int: int | torch.Tensor, history: Optional[DPMHistory] = None,
                 R: Optional[torch.Tensor] = None, R0: Optional[torch.Tensor] = None, eta: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, DPMHistory]:
    """One DPM-Solver++(2M) step z_t -> z_s; first order without ``history`` (the first step). Returns the
    new state and the history for the next step."""
    mask = mask.bool()
    t, _, g_t, g_s = _gammas(proc, z_t, t_int, s_int)
    x0, _ = _x0_hat(proc, denoise, z_t, mask, t, g_t, R, R0, eta, generator)
    sched = proc.schedule
    h = 0.5 * (g_t - g_s)  # lambda_s - lambda_t with lambda = -gamma / 2; > 0 going towards the data
    d = x0
    if history is not None:
        r = history.h / h
        d = edm._bcast(1.0 + 0.5 / r, x0) * x0 - edm._bcast(0.5 / r, x0) * history.x0
    ratio = sched.sigma(g_s) / sched.sigma(g_t)
    z_s = edm._bcast(ratio, z_t) * z_t - edm._bcast(sched.alpha(g_s) * torch.expm1(-h), z_t) * d
    return proc._finish(z_s, mask), DPMHistory(x0, h)

"""EDM-style variational diffusion on the centre-of-mass-free subspace (SPEC §2.1-2.5).

The state is z = [x, h] of shape [B, N, 3 + d] on normalised features with a boolean atom mask [B, N]. The
functions here are independent of the network: they take ``eps_fn(z_t, t) -> eps_hat`` (t in [0, 1], shape [B]),
so the symmetrised SymDiff denoiser and the plain DiT share one code path.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from symdiff import kernels
from symdiff.diffusion.schedule import NoiseSchedule

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOG_2PI = math.log(2.0 * math.pi)


def remove_mean(x: torch.Tensor, mask: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Centre each molecule on its real atoms; padding rows become 0."""
    return kernels.com_project_rotate(x, mask, None, backend=backend)


def sample_noise(mask: torch.Tensor, d: int, dtype: torch.dtype, backend: str = "auto",
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[B, N, 3 + d]: CoM-free N(0, I) on x, N(0, I) on h, zero at padding. From ``generator``, else the global RNG."""
    B, N = mask.shape
    eps = torch.randn(B, N, 3 + d, dtype=dtype, device=mask.device, generator=generator)
    m = mask.to(dtype).unsqueeze(-1)
    return torch.cat([remove_mean(eps[..., :3], mask, backend), eps[..., 3:] * m], dim=-1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def kl_prior(xh: torch.Tensor, mask: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """KL(q(z_T | x, h) || N(0, I)) per molecule, with (N - 1) * 3 degrees of freedom for x (SPEC §2.4a)."""
    B = xh.shape[0]
    gT = schedule.gamma(torch.full((B,), schedule.timesteps, device=xh.device, dtype=torch.long))
    aT, sT = _bcast(schedule.alpha(gT), xh), schedule.sigma(gT).to(xh.dtype)
    m = mask.to(xh.dtype)
    n = m.sum(1)
    mu = aT * xh * m.unsqueeze(-1)
    d_h = (xh.shape[-1] - 3) * n
    kl_h = d_h * (-torch.log(sT) + 0.5 * sT ** 2 - 0.5) + 0.5 * (mu[..., 3:] ** 2).sum((1, 2))
    d_x = (n - 1) * 3
    kl_x = d_x * (-torch.log(sT) + 0.5 * sT ** 2 - 0.5) + 0.5 * (mu[..., :3] ** 2).sum((1, 2))
    return kl_x + kl_h


def log_p_h_given_z0(z0: torch.Tensor, h_cat: torch.Tensor, h_int: Optional[torch.Tensor], mask: torch.Tensor,
                     sigma0: torch.Tensor, norm_cat: float, norm_int: float) -> torch.Tensor:
    """Discrete likelihood of the atom types (and integer feature) read from z_0 itself (SPEC §2.4c, D10).

    h_cat: [B, N, C] one-hot (0/1), h_int: [B, N, 1] integer values or None. Returns [B] log-probabilities.
    """
    m = mask.to(z0.dtype)
    C = h_cat.shape[-1]
    s0 = _bcast(sigma0, z0)
    est_cat = z0[..., 3:3 + C] * norm_cat
    c = est_cat - 1.0
    s_cat = s0 * norm_cat
    log_p = torch.log(std_normal_cdf((c + 0.5) / s_cat) - std_normal_cdf((c - 0.5) / s_cat) + 1e-10)
    log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
    out = (log_p * h_cat * m.unsqueeze(-1)).sum((1, 2))
    if h_int is not None:
        est = z0[..., 3 + C:4 + C] * norm_int
        c = torch.round(h_int) - est
        s_int = s0 * norm_int
        lp = torch.log(std_normal_cdf((c + 0.5) / s_int) - std_normal_cdf((c - 0.5) / s_int) + 1e-10)
        out = out + (lp * m.unsqueeze(-1)).sum((1, 2))
    return out


def strided_times(timesteps: int, steps: int) -> list[int]:
    """Integer times T = t_S > ... > t_0 = 0 for an S-step ancestral sampler (S = T: every step)."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"sampling steps must be in 1..{timesteps}, got {steps}")
    grid = torch.linspace(0, timesteps, steps + 1, dtype=torch.float64).round().long().unique().tolist()
    return sorted(grid, reverse=True)

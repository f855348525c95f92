"""`flow`: flow matching of the paper's App. D.2, symmetrised by the same denoiser as vdm.

Time runs the other way from vdm: t = 0 is the prior, t = 1 the data. The prior is N(0, I) on the CoM-free x
and on h (the same draw as vdm's z_T); the path is the straight line z_t = (1 - t) z_0 + t z_1 with velocity
target z_1 - z_0, and the model's velocity is the symmetrised denoiser output R v(R^T x_t, h_t) (x channels
rotated back, h not). The objective is eq. 33 with lambda(t) = 1, t ~ U(0, 1). Sampling integrates dz/dt = v
from t = 0 to 1 with Euler or Heun steps on a uniform grid; atom types are the argmax of the categorical
channels at t = 1, as vdm reads them from z_0. The likelihood (``nll``) is that of this ODE itself, integrated
from the data at t = 1 back to the prior with the Hutchinson divergence (symdiff/diffusion/ode_likelihood.py),
the data dequantised by vdm's t = 0 kernel of ``diffusion.precision`` (the flow has no noise of its own).

The denoiser gets t itself as its time input. The prior draw is paired with the data molecule independently
(``diffusion.flow_align: none``) or re-paired before the path is built (:func:`align_prior`): ``hungarian``
permutes the prior's atoms within each molecule by the assignment that minimises sum |x_1 - x_0|^2
(scipy's linear_sum_assignment), ``hungarian_kabsch`` then also applies the orthogonal Procrustes (Kabsch)
map of the prior onto the data. That map is taken in O(3) (reflections allowed, no det correction): the
model's symmetry group is O(3), and with an O(3) map the coupling is equivariant pathwise, aligned(g x_0, g x_1)
= g aligned(x_0, x_1) for every g in O(3), so with the isotropic, exchangeable prior it stays equivariant in
distribution (tests/test_flow_align.py).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from symdiff.diffusion import edm
from symdiff.diffusion.ode_likelihood import ODELikelihood, ODEOptions
from symdiff.diffusion.process import Process
from symdiff.diffusion.vdm import Features

if TYPE_CHECKING:
    from symdiff.models.denoiser import DenoiseFn

SAMPLERS = ("heun", "euler")
ALIGNS = ("none", "hungarian", "hungarian_kabsch")


def align_prior(z0: torch.Tensor, z1: torch.Tensor, mask: torch.Tensor, align: str) -> torch.Tensor:
    """The prior ``z0`` [B, N, 3 + d] re-paired with the data ``z1``: its real atoms permuted per molecule (x and
    h together, so each prior atom stays one token) and, for ``hungarian_kabsch``, its x rotated by the O(3)
    Procrustes map onto the data's x. Padding rows are left as they are. No gradient flows (the coupling is data)."""
    if align == "none":
        return z0
    if align not in ALIGNS:
        raise ValueError(f"flow align '{align}' is not one of {', '.join(ALIGNS)}")
    out = z0.detach().clone()
    x0s, x1s = z0[..., :3].detach().double().cpu().numpy(), z1[..., :3].detach().double().cpu().numpy()
    mask_np = mask.bool().cpu().numpy()
    for b in range(z0.shape[0]):
        idx = np.flatnonzero(mask_np[b])
        if idx.size == 0:
            continue
        a, c = x1s[b, idx], x0s[b, idx]
        cost = ((a[:, None, :] - c[None, :, :]) ** 2).sum(-1)  # [data atom, prior atom]
        rows, cols = linear_sum_assignment(cost)
        perm = torch.as_tensor(idx[cols[np.argsort(rows)]], device=z0.device)
        dst = torch.as_tensor(idx, device=z0.device)
        out[b, dst] = z0[b, perm].detach()
        if align == "hungarian_kabsch":
            p = out[b, dst, :3].double()
            # argmin_{R in O(3)} |R p - q|^2 = U V^T for the SVD q^T p = U S V^T (both CoM-free already).
            u, _, vh = torch.linalg.svd(z1[b, dst, :3].detach().double().T @ p)
            out[b, dst, :3] = (p @ (u @ vh).T).to(out.dtype)
    return out


class Flow(ODELikelihood, Process):
    """The flow process. ``timesteps`` is only the largest step count a sampler takes (sample.steps <= it)."""

    name = "flow"
    samplers = SAMPLERS
    default_sampler = "heun"

    def __init__(self, d: int, num_classes: int, norm_x: float, norm_cat: float, norm_int: float,
                 timesteps: int = 1000, backend: str = "auto", align: str = "none", precision: float = 1e-5,
                 **_: Any) -> None:
        super().__init__()
        if align not in ALIGNS:
            raise ValueError(f"flow align '{align}' is not one of {', '.join(ALIGNS)}")
        self.align = align
        self.d, self.num_classes = int(d), int(num_classes)
        self.norm_x, self.norm_cat, self.norm_int = float(norm_x), float(norm_cat), float(norm_int)
        self.precision = float(precision)
        self.timesteps = int(timesteps)
        self.backend = backend

    def prior(self, mask: torch.Tensor, dtype: torch.dtype, generator: Optional[torch.Generator] = None
              ) -> torch.Tensor:
        """z_0 ~ N(0, I) on the CoM-free subspace (x) and on h, zero at padding."""
        return edm.sample_noise(mask, self.d, dtype, self.backend, generator)

    def loss(self, denoise: "DenoiseFn", f: Features, generator: Optional[torch.Generator] = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 33 with lambda = 1: |v(z_t, t) - (z_1 - z_0)|^2 over the real channels / ((3 + d) N_pad)."""
        x, h, mask = f.x, f.h, f.mask
        B, N = mask.shape
        z1 = torch.cat([x, h], dim=-1)
        t = torch.rand(B, dtype=z1.dtype, device=z1.device, generator=generator)
        z0 = align_prior(self.prior(mask, z1.dtype, generator), z1, mask, self.align)
        tb = t.view(-1, 1, 1)
        z_t = (1 - tb) * z0 + tb * z1
        err = (denoise(z_t, mask, t, generator=generator) - (z1 - z0)) ** 2
        denom = (3 + self.d) * N
        err_x, err_h = err[..., :3].sum((1, 2)), err[..., 3:].sum((1, 2))
        loss = ((err_x + err_h) / denom).mean()
        stats = {"loss": loss.detach(), "l2_x": (err_x / denom).mean().detach(),
                 "l2_h": (err_h / denom).mean().detach(),
                 "atoms_per_mol": mask.sum(1).to(z1.dtype).mean().detach(),
                 "padding_fraction": 1.0 - mask.to(z1.dtype).mean().detach()}
        return loss, stats

    @staticmethod
    def _t(t: float | torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(t, dtype=z.dtype, device=z.device).expand(z.shape[0])

    def euler_step(self, denoise: "DenoiseFn", z: torch.Tensor, mask: torch.Tensor, t: float, s: float,
                   R: Optional[torch.Tensor] = None, R0: Optional[torch.Tensor] = None,
                   eta: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """z_s = z_t + (s - t) v(z_t, t), s > t (eq. 29 with the symmetrised velocity)."""
        mask = mask.bool()
        v = denoise(z, mask, self._t(t, z), R=R, R0=R0, eta=eta, generator=generator)
        return self._finish(z + (s - t) * v, mask)

    def heun_step(self, denoise: "DenoiseFn", z: torch.Tensor, mask: torch.Tensor, t: float, s: float,
                  R0: Optional[torch.Tensor] = None, eta: Optional[torch.Tensor] = None,
                  R0_2: Optional[torch.Tensor] = None, eta_2: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Heun (explicit trapezoid): the Euler predictor, then the mean of the two velocities. Two network calls;
        gamma is drawn afresh for each (``R0``/``eta`` fix the first, ``R0_2``/``eta_2`` the second)."""
        mask = mask.bool()
        v1 = denoise(z, mask, self._t(t, z), R0=R0, eta=eta, generator=generator)
        pred = self._finish(z + (s - t) * v1, mask)
        v2 = denoise(pred, mask, self._t(s, z), R0=R0_2, eta=eta_2, generator=generator)
        return self._finish(z + (s - t) * 0.5 * (v1 + v2), mask)

    # ------------------------------------------------------------------ likelihood
    @staticmethod
    def likelihood_times(ode: ODEOptions) -> torch.Tensor:
        """Data (t = 1) to prior (t = 0): the two ends for dopri5, the sampler's uniform grid for rk4."""
        if ode.solver == "dopri5":
            return torch.tensor([1.0, 0.0], dtype=torch.float64)
        return torch.linspace(1.0, 0.0, int(ode.steps) + 1, dtype=torch.float64)

    def likelihood_field(self, denoise: "DenoiseFn", mask: torch.Tensor) -> Callable[..., torch.Tensor]:
        """The flow's own field dz/dt = v(z, t) at gamma's fixed draw."""
        return lambda z, t, R0, eta, gen: denoise(z, mask, self._t(float(t), z), R0=R0, eta=eta, generator=gen)

    def dequantisation(self) -> tuple[float, float]:
        """vdm's t = 0 kernel of diffusion.precision s (the flow has no noise of its own): sqrt(1 - s), sqrt(s)."""
        return math.sqrt(1.0 - self.precision), math.sqrt(self.precision)

    def decode(self, denoise: "DenoiseFn", z1: torch.Tensor, mask: torch.Tensor, **_: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x on the normalised scale, class index): the state at t = 1 itself, no network call."""
        mask = mask.bool()
        return edm.remove_mean(z1[..., :3], mask, self.backend), z1[..., 3:3 + self.num_classes].argmax(-1)

    def sample(self, denoise: "DenoiseFn", mask: torch.Tensor, dtype: torch.dtype, sampler: Optional[str] = None,
               steps: Optional[int] = None, progress: Any = None, generator: Optional[torch.Generator] = None,
               **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Integrate from the prior at t = 0 to t = 1 in ``steps`` uniform steps (default: 100)."""
        sampler = self.check_sampler(sampler)
        K = int(steps or 100)
        if not 1 <= K <= self.timesteps:
            raise ValueError(f"sampling steps must be in 1..{self.timesteps}, got {K}")
        z = self.prior(mask, dtype, generator)
        grid = torch.linspace(0.0, 1.0, K + 1, dtype=torch.float64).tolist()
        for t, s in zip(grid[:-1], grid[1:]):
            step = self.euler_step if sampler == "euler" else self.heun_step
            z = step(denoise, z, mask, t, s, generator=generator)
            if progress is not None:
                progress.update(1)
        if progress is not None:
            progress.update(1)
        return self.decode(denoise, z, mask)

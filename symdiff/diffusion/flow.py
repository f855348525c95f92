"""`flow`: flow matching of the paper's App. D.2, symmetrised by the same denoiser as vdm.

Time runs the other way from vdm: t = 0 is the prior, t = 1 the data. The prior is N(0, I) on the CoM-free x
and on h (the same draw as vdm's z_T); the path is the straight line z_t = (1 - t) z_0 + t z_1 with velocity
target z_1 - z_0, and the model's velocity is the symmetrised denoiser output R v(R^T x_t, h_t) (x channels
rotated back, h not). The objective is eq. 33 with lambda(t) = 1, t ~ U(0, 1). Sampling integrates dz/dt = v
from t = 0 to 1 with Euler or Heun steps on a uniform grid; atom types are the argmax of the categorical
channels at t = 1, as vdm reads them from z_0. There is no likelihood (no NLL) for this process here.

The denoiser gets t itself as its time input; pairing with the prior is independent (no optimal-transport
re-pairing: ``flow.align`` of issue 13 is not implemented).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

from symdiff.diffusion import edm
from symdiff.diffusion.process import Process
from symdiff.diffusion.vdm import Features

if TYPE_CHECKING:
    from symdiff.models.denoiser import DenoiseFn

SAMPLERS = ("heun", "euler")


class Flow(Process):
    """The flow process. ``timesteps`` is only the largest step count a sampler takes (sample.steps <= it)."""

    name = "flow"
    samplers = SAMPLERS
    default_sampler = "heun"

    def __init__(self, d: int, num_classes: int, norm_x: float, norm_cat: float, norm_int: float,
                 timesteps: int = 1000, backend: str = "auto", **_: Any) -> None:
        super().__init__()
        self.d, self.num_classes = int(d), int(num_classes)
        self.norm_x = float(norm_x)
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
        z0 = self.prior(mask, z1.dtype, generator)
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

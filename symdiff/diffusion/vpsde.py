"""`vpsde`: the continuous-time variance-preserving score model of the paper's App. D.1.

Time runs as in vdm: t = 0 is the data, t = 1 the prior. The noise level is vdm's polynomial_2 schedule read as a
continuous function of t: the closed form of SPEC §2.2 without the discrete clipping,

    alpha^2(t) = (1 - 2 s) (1 - t^p)^2 + s,    sigma^2(t) = 1 - alpha^2(t),    gamma(t) = log(sigma^2 / alpha^2)

(s = diffusion.precision, p = 2). It is smooth on [0, 1] (the SDE's coefficients too, which Heun's second order
needs), and equals vdm's float64 table at every grid point t_int / T except the last, where vdm's ratio clip
changes gamma(1) by ~4e-4 (tests/test_process_vpsde.py). The forward SDE is dz = -beta/2 z dt + sqrt(beta) dW
with beta(t) = -d log alpha^2 / dt = 2 p t^(p-1) (1 - 2 s) (1 - t^p) / alpha^2(t), so that z_t | x ~
N(alpha_t x, sigma_t^2 I) on the CoM-free subspace (x) and on h.

The network predicts eps (the same denoiser as vdm, called with t itself), the score is s = -eps_hat / sigma_t,
and the objective is eq. 26 with lambda(t) = sigma_t^2: |eps_hat - eps|^2, t ~ U(t_min, 1] (t_min = 1e-5: t = 0
is left out as the open interval (0, 1] says; sigma_0 = sqrt(s) > 0 keeps the score finite down to 0).
Samplers integrate from t = 1 to t = 0 on a uniform grid: Euler-Maruyama of the reverse SDE (``em``) and the
probability-flow ODE with Heun's method (``heun``). Decoding is vdm's: positions the denoised x-hat_0 (no extra
noise), types the argmax of the categorical channels of z_0.

The likelihood (``nll``) is that of the probability-flow ODE, integrated from the data at t = 0 to the prior at
t = 1 with the Hutchinson divergence (symdiff/diffusion/ode_likelihood.py); its fixed-step grid is uniform in
gamma, because beta(t) peaks (~600) in the last few thousandths of t, where a uniform t grid would step over it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from symdiff.diffusion import edm
from symdiff.diffusion.ode_likelihood import ODELikelihood, ODEOptions
from symdiff.diffusion.process import Process
from symdiff.diffusion.quotient import training_target
from symdiff.diffusion.vdm import Features

if TYPE_CHECKING:
    from symdiff.models.denoiser import DenoiseFn

SAMPLERS = ("em", "heun")
T_MIN = 1e-5


class VPSDE(ODELikelihood, Process):
    """The vpsde process. ``timesteps`` is only the largest step count a sampler takes (sample.steps <= it)."""

    name = "vpsde"
    samplers = SAMPLERS
    default_sampler = "em"

    def __init__(self, d: int, num_classes: int, norm_x: float, norm_cat: float, norm_int: float,
                 timesteps: int = 1000, schedule: str = "polynomial_2", precision: float = 1e-5,
                 backend: str = "auto", target: str = "standard", target_options: Optional[dict[str, Any]] = None,
                 **_: Any) -> None:
        super().__init__()
        self._set_target(target, target_options)
        if not schedule.startswith("polynomial_"):
            raise ValueError(f"unknown noise schedule '{schedule}' (supported: polynomial_<power>)")
        self.power = float(schedule.split("_", 1)[1])
        self.precision = float(precision)
        self.d, self.num_classes = int(d), int(num_classes)
        self.norm_x, self.norm_cat, self.norm_int = float(norm_x), float(norm_cat), float(norm_int)
        self.timesteps = int(timesteps)
        self.backend = backend

    # ------------------------------------------------------------------ the continuous schedule (float64)
    def _t64(self, t: float | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float64)

    def alpha2(self, t: float | torch.Tensor) -> torch.Tensor:
        t = self._t64(t)
        return (1.0 - 2.0 * self.precision) * (1.0 - t ** self.power) ** 2 + self.precision

    def gamma(self, t: float | torch.Tensor) -> torch.Tensor:
        """gamma(t) = -log SNR(t), float64."""
        a2 = self.alpha2(t)
        return torch.log1p(-a2) - torch.log(a2)

    def alpha(self, t: float | torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.alpha2(t))

    def sigma(self, t: float | torch.Tensor) -> torch.Tensor:
        # 1 - alpha^2 directly (not sqrt(sigmoid(gamma))): the same number to rounding, one log fewer.
        return torch.sqrt(1.0 - self.alpha2(t))

    def beta(self, t: float | torch.Tensor) -> torch.Tensor:
        """beta(t) = -d log alpha^2 / dt, the VP SDE's drift/diffusion rate (f = -beta/2, g^2 = beta)."""
        t, p = self._t64(t), self.power
        return 2.0 * p * t ** (p - 1) * (1.0 - 2.0 * self.precision) * (1.0 - t ** p) / self.alpha2(t)

    def _b(self, v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """A float64 scalar or per-molecule value broadcast against z in z's dtype."""
        return edm._bcast(v.to(z.device).expand(z.shape[0]), z).to(z.dtype)

    # ------------------------------------------------------------------ training
    def prior(self, mask: torch.Tensor, dtype: torch.dtype, generator: Optional[torch.Generator] = None
              ) -> torch.Tensor:
        """z_1 ~ N(0, I) on the CoM-free subspace (x) and on h, zero at padding (alpha_1^2 = s: close enough)."""
        return edm.sample_noise(mask, self.d, dtype, self.backend, generator)

    def loss(self, denoise: "DenoiseFn", f: Features, generator: Optional[torch.Generator] = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 26 with lambda = sigma_t^2: sigma_t^2 |s_theta - grad log p_t|^2 = |eps_hat - eps|^2, halved and
        divided by (3 + d) N_pad as vdm's; t = 1 - (1 - t_min) u, u ~ U[0, 1), so t in (t_min, 1]."""
        x, h, mask = f.x, f.h, f.mask
        B, N = mask.shape
        xh = torch.cat([x, h], dim=-1)
        u = torch.rand(B, dtype=torch.float64, device=x.device, generator=generator)
        t = 1.0 - (1.0 - T_MIN) * u
        alpha, sigma = edm._bcast(self.alpha(t), xh).to(xh.dtype), edm._bcast(self.sigma(t), xh).to(xh.dtype)
        eps = edm.sample_noise(mask, self.d, xh.dtype, self.backend, generator)
        z_t = alpha * xh + sigma * eps
        target = training_target(self.target, eps, z_t, xh, mask, alpha.view(-1), sigma.view(-1), generator,
                                 self.target_options)
        err = (denoise(z_t, mask, t.to(xh.dtype), generator=generator) - target) ** 2
        denom = (3 + self.d) * N
        err_x, err_h = err[..., :3].sum((1, 2)), err[..., 3:].sum((1, 2))
        loss = (0.5 * (err_x + err_h) / denom).mean()
        return loss, self._loss_stats(loss, err_x, err_h, denom, mask, target, eps)

    # ------------------------------------------------------------------ samplers
    def _t(self, t: float, z: torch.Tensor) -> torch.Tensor:
        return torch.full((z.shape[0],), float(t), dtype=z.dtype, device=z.device)

    def _ode_field(self, denoise: "DenoiseFn", z: torch.Tensor, mask: torch.Tensor, t: float,
                   R0: Optional[torch.Tensor], eta: Optional[torch.Tensor], generator: Optional[torch.Generator]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(dz/dt of the probability-flow ODE, eps_hat): f z - g^2 score / 2 = -beta/2 (z - eps_hat / sigma)."""
        eps_hat = denoise(z, mask, self._t(t, z), R0=R0, eta=eta, generator=generator)
        beta, sigma = self.beta(t), self.sigma(t)
        return -0.5 * self._b(beta, z) * (z - eps_hat / self._b(sigma, z)), eps_hat

    def em_step(self, denoise: "DenoiseFn", z: torch.Tensor, mask: torch.Tensor, t: float, s: float,
                R0: Optional[torch.Tensor] = None, eta: Optional[torch.Tensor] = None,
                noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One Euler-Maruyama step t -> s < t of the reverse SDE dz = [f z - g^2 score] dt + g dW-bar:
        z_s = z_t + (t - s) beta_t (z_t / 2 - eps_hat / sigma_t) + sqrt(beta_t (t - s)) noise (CoM-free noise)."""
        mask = mask.bool()
        eps_hat = denoise(z, mask, self._t(t, z), R0=R0, eta=eta, generator=generator)
        beta, sigma, h = self.beta(t), self.sigma(t), float(t) - float(s)
        if noise is None:
            noise = edm.sample_noise(mask, self.d, z.dtype, self.backend, generator)
        drift = self._b(beta, z) * (0.5 * z - eps_hat / self._b(sigma, z))
        return self._finish(z + h * drift + self._b(torch.sqrt(beta * h), z) * noise, mask)

    def heun_step(self, denoise: "DenoiseFn", z: torch.Tensor, mask: torch.Tensor, t: float, s: float,
                  R0: Optional[torch.Tensor] = None, eta: Optional[torch.Tensor] = None,
                  R0_2: Optional[torch.Tensor] = None, eta_2: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Heun (explicit trapezoid) on the probability-flow ODE, t -> s < t. Two network calls; gamma is drawn
        afresh for each (``R0``/``eta`` fix the first, ``R0_2``/``eta_2`` the second)."""
        mask = mask.bool()
        h = float(s) - float(t)
        v1, _ = self._ode_field(denoise, z, mask, t, R0, eta, generator)
        pred = self._finish(z + h * v1, mask)
        v2, _ = self._ode_field(denoise, pred, mask, s, R0_2, eta_2, generator)
        return self._finish(z + h * 0.5 * (v1 + v2), mask)

    # ------------------------------------------------------------------ likelihood
    def likelihood_times(self, ode: ODEOptions) -> torch.Tensor:
        """The times the ODE likelihood integrates over, data (t = 0) to prior (t = 1): the two ends for dopri5,
        for rk4 a grid uniform in gamma (where the field is smooth; beta(t) is not) mapped back to t."""
        if ode.solver == "dopri5":
            return torch.tensor([0.0, 1.0], dtype=torch.float64)
        g = torch.linspace(float(self.gamma(0.0)), float(self.gamma(1.0)), int(ode.steps) + 1, dtype=torch.float64)
        # alpha^2 = sigmoid(-gamma) = (1 - 2 s)(1 - t^p)^2 + s, solved for t.
        inner = ((torch.sigmoid(-g) - self.precision) / (1.0 - 2.0 * self.precision)).clamp(0.0, 1.0)
        t = (1.0 - torch.sqrt(inner)).clamp(0.0, 1.0) ** (1.0 / self.power)
        t[0], t[-1] = 0.0, 1.0
        return t

    def likelihood_field(self, denoise: "DenoiseFn", mask: torch.Tensor) -> Callable[..., torch.Tensor]:
        """The probability-flow field dz/dt = -beta/2 (z - eps_hat / sigma) at gamma's fixed draw."""
        return lambda z, t, R0, eta, gen: self._ode_field(denoise, z, mask, float(t), R0, eta, gen)[0]

    def dequantisation(self) -> tuple[float, float]:
        """The t = 0 kernel, which is vdm's: alpha_0^2 = 1 - s, sigma_0^2 = s."""
        return float(self.alpha(0.0)), float(self.sigma(0.0))

    def decode(self, denoise: "DenoiseFn", z0: torch.Tensor, mask: torch.Tensor, R: Optional[torch.Tensor] = None,
               R0: Optional[torch.Tensor] = None, eta: Optional[torch.Tensor] = None, **_: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x on the normalised scale, class index): x-hat_0 = (z_0 - sigma_0 eps_hat) / alpha_0 at t = 0, types
        the argmax of z_0's categorical channels."""
        mask = mask.bool()
        eps_hat = denoise(z0, mask, self._t(0.0, z0), R=R, R0=R0, eta=eta)
        x_hat = (z0[..., :3] - self._b(self.sigma(0.0), z0) * eps_hat[..., :3]) / self._b(self.alpha(0.0), z0)
        return edm.remove_mean(x_hat, mask, self.backend), z0[..., 3:3 + self.num_classes].argmax(-1)

    def sample(self, denoise: "DenoiseFn", mask: torch.Tensor, dtype: torch.dtype, sampler: Optional[str] = None,
               steps: Optional[int] = None, progress: Any = None, generator: Optional[torch.Generator] = None,
               **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Integrate from the prior at t = 1 to t = 0 in ``steps`` uniform steps (default: 1000 for em, 100 for
        heun), then decode. em: one network call per step; heun: two; the decoder one."""
        sampler = self.check_sampler(sampler)
        K = int(steps or min(1000 if sampler == "em" else 100, self.timesteps))
        if not 1 <= K <= self.timesteps:
            raise ValueError(f"sampling steps must be in 1..{self.timesteps}, got {K}")
        z = self.prior(mask.bool(), dtype, generator)
        grid = torch.linspace(1.0, 0.0, K + 1, dtype=torch.float64).tolist()
        for t, s in zip(grid[:-1], grid[1:]):
            if sampler == "em":
                z = self.em_step(denoise, z, mask, t, s, generator=generator)
            else:
                z = self.heun_step(denoise, z, mask, t, s, generator=generator)
            if progress is not None:
                progress.update(1)
        x, cls = self.decode(denoise, z, mask)
        if progress is not None:
            progress.update(1)
        return x, cls

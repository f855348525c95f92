"""`vdm`: EDM's discrete-time variational diffusion on the CoM-free subspace (SPEC §2), as a process.

The process owns the mathematics of the generative model: the training loss (Algorithm 1), the NLL bound
(SPEC §2.4), the reverse step and the decoder p(x, h | z_0), and the samplers. It calls the network only through
a ``denoise(z, mask, t, R=None, R0=None, eta=None, generator=None) -> eps_hat`` function (the symmetrised
denoiser), with t = t_int / T in [0, 1]; it knows nothing of the network or of its symmetry.

State z = [x, h] on normalised features, [B, N, 3 + d], with a boolean atom mask [B, N]. Everything here runs in
the state's dtype (float32 even with bf16 weights, SPEC §2.6); the schedule is float64.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import torch

from symdiff.config import LOSS_WEIGHTS, T_SAMPLINGS
from symdiff.diffusion import edm, vdm_samplers
from symdiff.diffusion.process import Process
from symdiff.diffusion.quotient import training_target
from symdiff.diffusion.schedule import NoiseSchedule

if TYPE_CHECKING:  # the process only calls the denoiser; importing the models package here would be circular
    from symdiff.models.denoiser import DenoiseFn

# The strided ancestral sampler of Algorithm 2 and the few-step samplers of vdm_samplers.py.
SAMPLERS = ("ancestral", "ddim", "dpmpp2m")
DEFAULT_SAMPLER = "ancestral"


class Features(NamedTuple):
    """A batch on the diffusion's scale: centred x / norm_x, normalised h, mask, the one-hot and integer feature."""
    x: torch.Tensor
    h: torch.Tensor
    mask: torch.Tensor
    onehot: torch.Tensor
    integer: Optional[torch.Tensor]


class Recipe(NamedTuple):
    """The training-recipe options of issue 18 the process owns; the defaults are the paper's."""
    t_sampling: str = "uniform"  # uniform | low_noise
    t_low_noise_power: float = 2.0
    loss_weight: str = "uniform"  # uniform | snr_clamped
    loss_weight_min: float = 0.05
    loss_weight_max: float = 1.5
    self_condition: bool = False  # the denoiser takes x_self (model.self_condition)


def recipe_options(cfg: Any) -> Recipe:
    """The :class:`Recipe` a config names (keys a config predating them lacks take the paper's defaults)."""
    dc, mc, r = cfg.diffusion, cfg.model, Recipe()
    return Recipe(*(type(v)(getattr(dc, k, v)) for k, v in zip(Recipe._fields[:5], r[:5])),
                  bool(getattr(mc, "self_condition", False)))


# Self-conditioning feeds x-hat_0 = (z_t - sigma eps_hat) / alpha back; at high noise alpha -> 0 makes it huge
# and meaningless. Atoms further than this (on the normalised scale, in units of 1 / norm_x Angstrom) from the
# centre are pulled in along their own direction, which keeps the clamp rotation-equivariant (a per-coordinate
# clamp would not be).
X_SELF_MAX_RADIUS = 10.0


class VDM(Process):
    """The vdm process: T discrete steps of the polynomial noise schedule, eps-parameterised."""

    name = "vdm"
    samplers = SAMPLERS
    default_sampler = DEFAULT_SAMPLER

    def __init__(self, d: int, num_classes: int, norm_x: float, norm_cat: float, norm_int: float,
                 timesteps: int = 1000, schedule: str = "polynomial_2", precision: float = 1e-5,
                 backend: str = "auto", target: str = "standard", target_options: Optional[dict[str, Any]] = None,
                 recipe: Optional[Recipe] = None) -> None:
        super().__init__()
        self.recipe = recipe or Recipe()
        if self.recipe.t_sampling not in T_SAMPLINGS:
            raise ValueError(f"t_sampling '{self.recipe.t_sampling}' is not one of {', '.join(T_SAMPLINGS)}")
        if self.recipe.loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"loss_weight '{self.recipe.loss_weight}' is not one of {', '.join(LOSS_WEIGHTS)}")
        self._set_target(target, target_options)
        self.d, self.num_classes = int(d), int(num_classes)
        self.norm_x, self.norm_cat, self.norm_int = float(norm_x), float(norm_cat), float(norm_int)
        self.backend = backend
        self.schedule = NoiseSchedule(int(timesteps), str(schedule), float(precision))

    @property
    def timesteps(self) -> int:
        return self.schedule.timesteps

    def _noise(self, mask: torch.Tensor, dtype: torch.dtype, generator: Optional[torch.Generator],
               d: Optional[int] = None) -> torch.Tensor:
        # Through the module attribute, so a spy on edm.sample_noise sees every draw.
        return edm.sample_noise(mask, self.d if d is None else d, dtype, self.backend, generator)

    # ------------------------------------------------------------------ training
    def train_times(self, B: int, device: torch.device, generator: Optional[torch.Generator] = None
                    ) -> torch.Tensor:
        """Training times t_int [B] in 0..T: uniform (the paper), or u^p-skewed toward t = 0 (low_noise)."""
        T = self.timesteps
        if self.recipe.t_sampling == "uniform":
            return torch.randint(0, T + 1, (B,), device=device, generator=generator)
        u = torch.rand(B, dtype=torch.float64, device=device, generator=generator)
        return torch.floor((T + 1) * u ** self.recipe.t_low_noise_power).long().clamp(max=T)

    def loss_weights(self, gamma: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-molecule weights of the eps error (float64 [B]), None for the paper's uniform weight."""
        if self.recipe.loss_weight == "uniform":
            return None
        return torch.exp(-gamma).clamp(self.recipe.loss_weight_min, self.recipe.loss_weight_max)

    def x0_estimate(self, z_t: torch.Tensor, eps_hat: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """x-hat_0 = (x_t - sigma eps_hat_x) / alpha [B, N, 3], radius-clamped (X_SELF_MAX_RADIUS): the
        self-conditioning input."""
        a, s = edm._bcast(self.schedule.alpha(gamma), z_t), edm._bcast(self.schedule.sigma(gamma), z_t)
        x = (z_t[..., :3] - s * eps_hat[..., :3]) / a
        r_max = X_SELF_MAX_RADIUS / self.norm_x
        r = x.norm(dim=-1, keepdim=True)
        return x * torch.where(r > r_max, r_max / r.clamp_min(1e-12), torch.ones_like(r))

    def _self_condition(self, denoise: DenoiseFn, z_t: torch.Tensor, mask: torch.Tensor, t: torch.Tensor,
                        gamma: torch.Tensor, generator: Optional[torch.Generator]) -> dict[str, torch.Tensor]:
        """Training: with probability 1/2 (per batch) a first, gradient-free pass gives x-hat_0, fed back as x_self;
        otherwise no estimate (the denoiser sees zeros, as at the first sampling step)."""
        if not self.recipe.self_condition:
            return {}
        if bool(torch.rand((), device=z_t.device, generator=generator) >= 0.5):
            return {"x_self": torch.zeros_like(z_t[..., :3])}
        with torch.no_grad():
            eps_hat = denoise(z_t, mask, t, generator=generator, x_self=torch.zeros_like(z_t[..., :3]))
        return {"x_self": self.x0_estimate(z_t, eps_hat.detach(), gamma)}

    def self_conditioned(self, denoise: DenoiseFn) -> DenoiseFn:
        """The denoiser a sampler calls: each call is given the previous call's x-hat_0 (zeros at the first)."""
        if not self.recipe.self_condition:
            return denoise
        last: dict[str, torch.Tensor] = {}

        def fn(z: torch.Tensor, mask: torch.Tensor, t: torch.Tensor, **kw: Any) -> torch.Tensor:
            x_self = last.get("x", torch.zeros_like(z[..., :3]))
            eps_hat = denoise(z, mask, t, x_self=x_self, **kw)
            t_int = (torch.as_tensor(t, device=z.device).double() * self.timesteps).round().long()
            last["x"] = self.x0_estimate(z, eps_hat, self.schedule.gamma(t_int.expand(z.shape[0])))
            return eps_hat

        return fn

    def loss(self, denoise: DenoiseFn, f: Features, generator: Optional[torch.Generator] = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Algorithm 1 with the EDM details of SPEC §2.3: l2 on eps, t ~ U{0..T}, divided by (3 + d) * N_pad.

        Returns the mean over molecules (the only term with a gradient) and detached statistics.
        """
        x, h, mask = f.x, f.h, f.mask
        B, N = mask.shape
        xh = torch.cat([x, h], dim=-1)
        t_int = self.train_times(B, x.device, generator)
        gam = self.schedule.gamma(t_int)
        alpha, sigma = edm._bcast(self.schedule.alpha(gam), xh), edm._bcast(self.schedule.sigma(gam), xh)
        eps = self._noise(mask, xh.dtype, generator)
        z_t = alpha * xh + sigma * eps
        target = training_target(self.target, eps, z_t, xh, mask, alpha.view(-1), sigma.view(-1), generator,
                                 self.target_options)
        t = t_int.to(xh.dtype) / self.timesteps
        cond = self._self_condition(denoise, z_t, mask, t, gam, generator)
        eps_hat = denoise(z_t, mask, t, generator=generator, **cond)
        err = (target - eps_hat) ** 2
        err_x = err[..., :3].sum((1, 2))
        err_h = err[..., 3:].sum((1, 2))
        denom = (3 + self.d) * N
        # t = 0: only the x part is Gaussian; the h part is scored by the discrete likelihood (constant in theta).
        per_mol = 0.5 * torch.where(t_int == 0, err_x, err_x + err_h) / denom
        weights = self.loss_weights(gam)
        if weights is not None:  # cast to the state dtype: the loss stays float32
            per_mol = per_mol * weights.to(per_mol.dtype)
        loss = per_mol.mean()
        return loss, self._loss_stats(loss, err_x, err_h, denom, mask, target, eps)

    # ------------------------------------------------------------------ likelihood
    def nll(self, denoise: DenoiseFn, f: Features, log_p_n: torch.Tensor, t_int: Optional[torch.Tensor] = None,
            generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-molecule NLL in nats, the paper's Jensen bound (SPEC §2.4), and its terms.

        ``log_p_n`` [B] is log p(N) of each molecule's size; ``t_int`` ([B] in 1..T) fixes the diffusion term's
        time, drawn uniformly by default.
        """
        x, h, mask, onehot, integer = f
        B = mask.shape[0]
        T = self.timesteps
        xh = torch.cat([x, h], dim=-1)
        n = mask.sum(1)
        kl = edm.kl_prior(xh, mask, self.schedule)
        # (b) one diffusion term, weighted by T
        if t_int is None:
            t_int = torch.randint(1, T + 1, (B,), device=x.device, generator=generator)
        t_int = t_int.to(x.device).long()
        g_t, g_s = self.schedule.gamma(t_int), self.schedule.gamma(t_int - 1)
        eps = self._noise(mask, xh.dtype, generator)
        z_t = edm._bcast(self.schedule.alpha(g_t), xh) * xh + edm._bcast(self.schedule.sigma(g_t), xh) * eps
        eps_hat = denoise(z_t, mask, t_int.to(xh.dtype) / T, generator=generator)
        err = ((eps - eps_hat) ** 2).sum((1, 2))
        diffusion = T * 0.5 * torch.expm1(g_t - g_s).to(xh.dtype) * err
        # (c) reconstruction at t = 0 with fresh noise
        t0 = torch.zeros(B, dtype=torch.long, device=x.device)
        g0 = self.schedule.gamma(t0)
        a0, s0 = self.schedule.alpha(g0), self.schedule.sigma(g0)
        eps0 = self._noise(mask, xh.dtype, generator)
        z0 = edm._bcast(a0, xh) * xh + edm._bcast(s0, xh) * eps0
        eps0_hat = denoise(z0, mask, t0.to(xh.dtype), generator=generator)
        dof_x = (n - 1).to(xh.dtype) * 3
        x_const = dof_x * (0.5 * g0.to(xh.dtype) + 0.5 * math.log(2 * math.pi))
        x_err = 0.5 * ((eps0[..., :3] - eps0_hat[..., :3]) ** 2).sum((1, 2))
        log_ph = edm.log_p_h_given_z0(z0, onehot, integer, mask, s0, self.norm_cat, self.norm_int)
        log_pn = log_p_n.to(xh.dtype)
        # x is normalised by a factor; its log-volume change is -(N - 1) * 3 * log(norm_x) (0 for the default 1).
        delta_log_px = -dof_x * math.log(self.norm_x)
        total = kl + diffusion + x_const + x_err - log_ph - delta_log_px - log_pn
        return total, {"kl_prior": kl, "diffusion": diffusion, "x_const": x_const, "x_err": x_err,
                       "log_p_h": log_ph, "log_p_n": log_pn}

    # ------------------------------------------------------------------ sampling
    def prior(self, mask: torch.Tensor, dtype: torch.dtype, generator: Optional[torch.Generator] = None
              ) -> torch.Tensor:
        """z_T ~ N(0, I) on the CoM-free subspace (x) and on h, zero at padding."""
        return self._noise(mask, dtype, generator)

    def _times(self, t_int: int | torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(t_int, device=z.device).long().expand(z.shape[0])

    def reverse_step(self, denoise: DenoiseFn, z_t: torch.Tensor, mask: torch.Tensor, t_int: int | torch.Tensor,
                     s_int: int | torch.Tensor, R: Optional[torch.Tensor] = None, R0: Optional[torch.Tensor] = None,
                     eta: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One ancestral step z_t -> z_s (s < t) of Algorithm 2 with the squared sigma_{t|s} (SPEC §2.5).

        ``noise`` ([B, N, 3 + d], CoM-free in x) and gamma's ``R``/``R0``/``eta`` may be fixed; otherwise drawn.
        """
        mask = mask.bool()
        t_int, s_int = self._times(t_int, z_t), self._times(s_int, z_t)
        g_t, g_s = self.schedule.gamma(t_int), self.schedule.gamma(s_int)
        sigma2_ts = self.schedule.sigma2_t_given_s(g_t, g_s)
        alpha_ts = self.schedule.alpha_t_given_s(g_t, g_s)
        sigma_t, sigma_s = self.schedule.sigma(g_t), self.schedule.sigma(g_s)
        eps_hat = denoise(z_t, mask, t_int.to(z_t.dtype) / self.timesteps, R=R, R0=R0, eta=eta, generator=generator)
        mu = z_t / edm._bcast(alpha_ts, z_t) - edm._bcast(sigma2_ts / (alpha_ts * sigma_t), z_t) * eps_hat
        sigma_q = torch.sqrt(sigma2_ts) * sigma_s / sigma_t
        if noise is None:
            noise = self._noise(mask, z_t.dtype, generator)
        return self._finish(mu + edm._bcast(sigma_q, z_t) * noise, mask)

    def decode(self, denoise: DenoiseFn, z0: torch.Tensor, mask: torch.Tensor, R: Optional[torch.Tensor] = None,
               R0: Optional[torch.Tensor] = None, eta: Optional[torch.Tensor] = None,
               noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """p(x, h | z_0): (x on the normalised scale, class index [B, N]).

        Positions are the denoised x-hat_0 plus sigma_0/alpha_0 noise; types are the argmax of z_0's categorical
        channels (sliced exactly by the number of classes: SPEC §2.5, no lost last class).
        """
        mask = mask.bool()
        B = z0.shape[0]
        g0 = self.schedule.gamma(torch.zeros(B, dtype=torch.long, device=z0.device))
        a0, s0 = self.schedule.alpha(g0), self.schedule.sigma(g0)
        eps_hat = denoise(z0, mask, torch.zeros(B, dtype=z0.dtype, device=z0.device), R=R, R0=R0, eta=eta,
                          generator=generator)
        x_hat = (z0[..., :3] - edm._bcast(s0, z0) * eps_hat[..., :3]) / edm._bcast(a0, z0)
        if noise is None:
            noise = self._noise(mask, z0.dtype, generator, d=0)
        x = edm.remove_mean(x_hat + edm._bcast(s0 / a0, z0) * noise[..., :3], mask, self.backend)
        return x, z0[..., 3:3 + self.num_classes].argmax(-1)

    def sample(self, denoise: DenoiseFn, mask: torch.Tensor, dtype: torch.dtype, sampler: Optional[str] = None,
               steps: Optional[int] = None, progress: Any = None, generator: Optional[torch.Generator] = None,
               ddim_eta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw z_T from the prior, run ``sampler`` over ``steps`` steps of the strided grid, decode.

        Returns (x normalised, class index). ``ddim_eta`` is DDIM's noise scale (0 deterministic, 1 the
        ancestral step); the other samplers ignore it. One network call per step plus the decoder's.
        """
        sampler = self.check_sampler(sampler)
        if not 0.0 <= float(ddim_eta) <= 1.0:
            raise ValueError(f"ddim_eta {ddim_eta}: must be in [0, 1]")
        denoise = self.self_conditioned(denoise)
        z = self.prior(mask, dtype, generator)
        times = edm.strided_times(self.timesteps, steps or self.timesteps)
        history: Optional[vdm_samplers.DPMHistory] = None
        for i, (t, s) in enumerate(zip(times[:-1], times[1:])):
            if sampler == "ancestral":
                z = self.reverse_step(denoise, z, mask, t, s, generator=generator)
            elif sampler == "ddim":
                z = vdm_samplers.ddim_step(self, denoise, z, mask, t, s, ddim_eta=ddim_eta, generator=generator)
            else:
                # First order into t = 0 (lower_order_final): the last log-SNR step is the largest by far on
                # this schedule, and extrapolating x-hat_0 across it costs more than it gains.
                final = i == len(times) - 2
                z, history = vdm_samplers.dpmpp2m_step(self, denoise, z, mask, t, s, None if final else history,
                                                       generator=generator)
            if progress is not None:
                progress.update(1)
        x, cls = self.decode(denoise, z, mask, generator=generator)
        if progress is not None:
            progress.update(1)
        return x, cls

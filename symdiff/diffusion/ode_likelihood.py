"""Likelihood through an ODE: the change of variables of the probability-flow (vpsde) or flow (flow) ODE.

For dz/dt = F(z, t), log p_t(z(t)) changes by -div F along a solution, so with the data end t_data and the prior
end t_prior,

    log p_data(z(t_data)) = log p_prior(z(t_prior)) + integral from t_data to t_prior of div F(z(t), t) dt,

both integrated together by torchdiffeq (adaptive Dormand-Prince ``dopri5`` by default, or fixed-step ``rk4`` on
a grid the process chooses). The x part lives in the CoM-free subspace: the prior is N(0, I) there ((N - 1) * 3
dimensions, as vdm's KL term counts them) and the divergence is the trace of the field's Jacobian restricted to
it. That trace is Hutchinson's estimate v^T J v averaged over ``n_probes`` probes held fixed along the ODE (a
fresh probe per evaluation would make the integrand rough, and adaptive steps need a smooth one). A probe has
E[v v^T] = P, the projector onto the subspace: ``rademacher`` draws +-1 coordinates in an orthonormal (Helmert)
basis of the CoM-free x of each molecule and in the standard basis of h, so |v|^2 = D exactly and a field
isotropic on the subspace has a zero-variance estimate; ``gaussian`` is N(0, P) (edm.sample_noise's draw).

Discrete h (and the continuous x) are dequantised by vdm's own t = 0 kernel q(z_0 | x, h) = N(alpha_0 [x, h],
sigma_0^2 I) and read back by vdm's decoder, which gives the variational bound

    -log P(x, h) <= E_q[-log p_ODE(z_0) - log p(x, h | z_0) + log q(z_0 | x, h)],

one q draw per molecule. The x decoder N(x; z_0x / alpha_0, (sigma_0 / alpha_0)^2) makes its part exactly
-(N - 1) 3 log alpha_0 (no network call); the h decoder is vdm's discretised Gaussian read from z_0 itself
(edm.log_p_h_given_z0); log q's h part is taken at its exact expectation, minus the entropy N d (log sigma_0 +
log(2 pi e) / 2). -log p(N) and the x normalisation are added as vdm adds them (SPEC §2.4 d). Everything runs in
the state's dtype (float32, or float64 for a double model); docs/model.md, "Likelihoods by process".
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torchdiffeq import odeint

from symdiff.diffusion import edm
from symdiff.diffusion.vdm import Features

if TYPE_CHECKING:
    from symdiff.models.denoiser import DenoiseFn

SOLVERS = ("dopri5", "rk4")
PROBES = ("rademacher", "gaussian")

# dz/dt = field(z, t) with t a 0-dim tensor on the process's own clock.
Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ODEOptions:
    """How the ODE likelihood is computed: solver, its tolerance or step count, and the Hutchinson probes."""

    solver: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    steps: int = 100  # rk4 only: steps of the process's grid
    n_probes: int = 1
    probe: str = "rademacher"

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"ODE solver '{self.solver}' is not one of {', '.join(SOLVERS)}")
        if self.probe not in PROBES:
            raise ValueError(f"Hutchinson probe '{self.probe}' is not one of {', '.join(PROBES)}")
        if int(self.steps) < 1 or int(self.n_probes) < 1:
            raise ValueError(f"ODE steps ({self.steps}) and Hutchinson probes ({self.n_probes}) must be at least 1")
        if not (self.rtol > 0 and self.atol > 0):
            raise ValueError(f"ODE tolerances must be positive (rtol {self.rtol}, atol {self.atol})")

    def describe(self) -> str:
        how = f"dopri5 rtol {self.rtol:g} atol {self.atol:g}" if self.solver == "dopri5" else f"rk4 {self.steps} steps"
        return f"{how}, Hutchinson {self.n_probes} {self.probe} probe(s)"


@functools.lru_cache(maxsize=256)
def _helmert(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[n - 1, n]: orthonormal rows spanning the vectors of zero sum (row k: k ones, then -k, over sqrt(k(k + 1)))."""
    k = torch.arange(1, n, dtype=torch.float64)
    H = (torch.arange(n, dtype=torch.float64)[None] < k[:, None]).double()
    H[torch.arange(n - 1), torch.arange(1, n)] = -k
    return (H / torch.sqrt(k * (k + 1))[:, None]).to(dtype=dtype, device=device)


def draw_probes(mask: torch.Tensor, d: int, n_probes: int, probe: str, dtype: torch.dtype,
                generator: Optional[torch.Generator] = None, backend: str = "auto") -> torch.Tensor:
    """[n_probes, B, N, 3 + d] Hutchinson probes with E[v v^T] = the projector onto CoM-free x and real h."""
    if probe not in PROBES:
        raise ValueError(f"Hutchinson probe '{probe}' is not one of {', '.join(PROBES)}")
    mask = mask.bool()
    if probe == "gaussian":
        return torch.stack([edm.sample_noise(mask, d, dtype, backend, generator) for _ in range(n_probes)])
    B, N = mask.shape
    signs = torch.randint(0, 2, (n_probes, B, N, 3 + d), device=mask.device, generator=generator).to(dtype) * 2 - 1
    out = torch.zeros_like(signs)
    out[..., 3:] = signs[..., 3:] * mask.to(dtype)[None, :, :, None]
    for b in range(B):
        idx = mask[b].nonzero().flatten()
        if idx.numel() > 1:  # a one-atom molecule has no x degrees of freedom
            out[:, b, idx, :3] = _helmert(idx.numel(), dtype, mask.device).T @ signs[:, b, :idx.numel() - 1, :3]
    return out


def hutchinson_divergence(out: torch.Tensor, z: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """[B]: the mean over probes of v^T (d out / d z) v, one vector-Jacobian product per probe."""
    div = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    for k in range(probes.shape[0]):
        (vjp,) = torch.autograd.grad(out, z, probes[k], retain_graph=k + 1 < probes.shape[0])
        div = div + (vjp * probes[k]).sum((1, 2))
    return div / probes.shape[0]


def standard_normal_log_density(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B]: log N(z; 0, I) with (N - 1) * 3 dimensions for the CoM-free x and N * d for h."""
    n = mask.sum(1).to(z.dtype)
    dof = (n - 1) * 3 + n * (z.shape[-1] - 3)
    return -0.5 * (z * mask.to(z.dtype).unsqueeze(-1)).pow(2).sum((1, 2)) - 0.5 * dof * edm.LOG_2PI


def log_density(field: Field, z: torch.Tensor, mask: torch.Tensor, times: torch.Tensor, probes: torch.Tensor,
                options: ODEOptions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """log p(z) [B] at the data end ``times[0]`` of the ODE dz/dt = field(z, t), the prior end ``times[-1]``.

    ``times`` is [t_data, t_prior] for dopri5 or the whole grid for rk4 (either direction). Returns the log density
    and its terms: log_p_prior, divergence_integral and nfe (the field evaluations, each one forward pass and
    ``n_probes`` vector-Jacobian products).
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("the ODE likelihood differentiates the field: call it outside torch.inference_mode()")
    nfe = [0]

    def dynamics(t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        nfe[0] += 1
        with torch.enable_grad():
            zt = state[0].detach().requires_grad_(True)
            out = field(zt, t)
            div = hutchinson_divergence(out, zt, probes)
        return out.detach(), div.detach()

    state0 = (z.detach(), torch.zeros(z.shape[0], dtype=z.dtype, device=z.device))
    times = times.to(device=z.device, dtype=torch.float64)
    kw: dict = {"method": options.solver}
    if options.solver == "dopri5":
        kw.update(rtol=options.rtol, atol=options.atol)
    z_path, div_path = odeint(dynamics, state0, times, **kw)
    z_prior, div_int = z_path[-1], div_path[-1]
    log_prior = standard_normal_log_density(z_prior, mask)
    nfe_t = torch.full_like(log_prior, float(nfe[0]))
    return log_prior + div_int, {"log_p_prior": log_prior, "divergence_integral": div_int, "nfe": nfe_t}


def fixed_generator(generator: Optional[torch.Generator], device: torch.device) -> Callable[[], torch.Generator]:
    """A maker of generators that all replay one seed drawn from ``generator``: handed to the denoiser at every
    field evaluation, it draws the same gamma randomness (R0, eta) each time, so the field is one function."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator,
                             device=generator.device if generator is not None else "cpu"))
    return lambda: torch.Generator(device=device).manual_seed(seed)


def symmetrised_log_density(field_at: Callable[..., torch.Tensor], z: torch.Tensor, mask: torch.Tensor,
                            times: torch.Tensor, options: Optional[ODEOptions] = None,
                            R0: Optional[torch.Tensor] = None, eta: Optional[torch.Tensor] = None,
                            probes: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                            backend: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`log_density` of a process's field ``field_at(z, t, R0, eta, generator)`` with gamma's randomness
    fixed for the whole ODE: ``R0``/``eta`` when given, else one draw per molecule replayed at every evaluation
    (:func:`fixed_generator`). ``probes`` ([n_probes, B, N, 3 + d]) are drawn from ``generator`` when None."""
    options = options or ODEOptions()
    mask = mask.bool()
    if probes is None:
        probes = draw_probes(mask, z.shape[-1] - 3, options.n_probes, options.probe, z.dtype, generator, backend)
    replay = fixed_generator(generator, z.device)
    return log_density(lambda zt, t: field_at(zt, t, R0, eta, replay()), z, mask, times, probes.to(z.dtype), options)


def dequantised_nll(f: Features, log_p_n: torch.Tensor, density: Callable[[torch.Tensor], tuple[torch.Tensor, dict]],
                    alpha0: float, sigma0: float, norm_x: float, norm_cat: float, norm_int: float,
                    noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                    backend: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-molecule NLL bound (nats) of the molecule ``f``: -log p_ODE(z_0) at one draw z_0 ~ q(z_0 | x, h) (or
    ``noise``, CoM-free in x), plus vdm's decoder and q's terms, -log p(N) and the x scale (module docstring)."""
    x, h, mask, onehot, integer = f
    xh = torch.cat([x, h], dim=-1)
    d = h.shape[-1]
    n = mask.sum(1).to(xh.dtype)
    dof_x, dof_h = (n - 1) * 3, n * d
    eps0 = noise if noise is not None else edm.sample_noise(mask, d, xh.dtype, backend, generator)
    z0 = (alpha0 * xh + sigma0 * eps0.to(xh.dtype)) * mask.to(xh.dtype).unsqueeze(-1)
    log_pz, terms = density(z0)
    x_decoder = -dof_x * math.log(alpha0)
    s0 = torch.full_like(n, sigma0)
    log_ph = edm.log_p_h_given_z0(z0, onehot, integer, mask, s0, norm_cat, norm_int)
    entropy_h = dof_h * (math.log(sigma0) + 0.5 * math.log(2 * math.pi * math.e))
    log_pn = log_p_n.to(xh.dtype)
    x_scale = dof_x * math.log(norm_x)
    total = -log_pz + x_decoder - log_ph - entropy_h - log_pn + x_scale
    return total, {**terms, "log_p_z0": log_pz, "x_decoder": x_decoder, "log_p_h": log_ph, "entropy_h": entropy_h,
                   "log_p_n": log_pn, "x_scale": x_scale}


class ODELikelihood:
    """The likelihood of a process whose model is an ODE (mixed into vpsde and flow before Process): ``nll`` and
    ``ode_log_density`` from the process's ``likelihood_field``, ``likelihood_times`` and ``dequantisation``."""

    name: str
    backend: str
    norm_x: float
    norm_cat: float
    norm_int: float

    def likelihood_field(self, denoise: "DenoiseFn", mask: torch.Tensor) -> Callable[..., torch.Tensor]:
        """``field(z, t, R0, eta, generator) -> dz/dt`` on the process's clock."""
        raise NotImplementedError

    def likelihood_times(self, ode: ODEOptions) -> torch.Tensor:
        """[t_data, t_prior] for dopri5, the grid from the data end to the prior end for rk4."""
        raise NotImplementedError

    def dequantisation(self) -> tuple[float, float]:
        """(alpha_0, sigma_0) of q(z_0 | x, h) = N(alpha_0 [x, h], sigma_0^2 I)."""
        raise NotImplementedError

    def ode_log_density(self, denoise: "DenoiseFn", z: torch.Tensor, mask: torch.Tensor,
                        ode: Optional[ODEOptions] = None, R0: Optional[torch.Tensor] = None,
                        eta: Optional[torch.Tensor] = None, probes: Optional[torch.Tensor] = None,
                        generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """log p(z) [B] at the data end of the process's ODE and its terms, gamma's randomness fixed per molecule
        along the ODE (:func:`symmetrised_log_density`)."""
        ode = ode or ODEOptions()
        return symmetrised_log_density(self.likelihood_field(denoise, mask.bool()), z, mask,
                                       self.likelihood_times(ode), ode, R0, eta, probes, generator, self.backend)

    def nll(self, denoise: "DenoiseFn", f: Features, log_p_n: torch.Tensor, t_int: Optional[torch.Tensor] = None,
            generator: Optional[torch.Generator] = None, ode: Optional[ODEOptions] = None,
            R0: Optional[torch.Tensor] = None, eta: Optional[torch.Tensor] = None,
            noise: Optional[torch.Tensor] = None, probes: Optional[torch.Tensor] = None
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-molecule NLL bound in nats through the ODE, dequantised by q (:func:`dequantised_nll`), and its
        terms. ``noise`` fixes q's draw, ``R0``/``eta`` gamma's, ``probes`` Hutchinson's."""
        if t_int is not None:
            raise ValueError(f"t_int fixes vdm's diffusion-term time; the {self.name} likelihood integrates over "
                             "every t")
        alpha0, sigma0 = self.dequantisation()
        return dequantised_nll(
            f, log_p_n, lambda z: self.ode_log_density(denoise, z, f.mask, ode, R0, eta, probes, generator),
            alpha0, sigma0, self.norm_x, self.norm_cat, self.norm_int, noise, generator, self.backend)

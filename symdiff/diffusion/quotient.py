"""The quotient-space (permutation-symmetrised) eps target of the second seed, for any Gaussian process.

On R^{N x (3+d)} / S_N the forward kernel is the sum over atom permutations pi of N(z_t; alpha_t pi(x), sigma_t^2 I),
with pi(x)_i = x_{pi(i)} (whole atoms: positions and features together). Given z_t and the unlabelled x, the
posterior over labellings is

    w(pi) ~ exp(sum_i C[i, pi(i)]),    C[i, j] = -|z_t,i - alpha_t x_j|^2 / (2 sigma_t^2)  over all 3 + d channels,

and the eps target is E_w[(z_t - alpha_t pi(x)) / sigma_t] = (z_t - alpha_t M x) / sigma_t with M[i, j] = P_w(pi(i)
= j), the posterior's marginal assignment matrix. Each estimator estimates M: ``exact`` enumerates the n! labellings
(n <= 8), ``hungarian`` puts all mass on the argmax labelling, ``mcmc`` averages K states of the seed's swap chain
(docs/quotient.md derives the chain's Metropolis-Hastings ratio). Padded atoms are never permuted: their rows of M
are the identity, so their target is z_t's padding (zero) like the standard one's.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Optional

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from symdiff.errors import UserError

ESTIMATORS = ("exact", "hungarian", "mcmc")
TARGETS = ("standard",) + ESTIMATORS
# n! grows past 40,320 labellings (x N x N floats each) at n = 9: the oracle stops at 8.
EXACT_MAX_ATOMS = 8
MCMC_DEFAULTS = {"steps": 64, "burn_in": 16, "samples": 8}


class QuotientTargetError(UserError):
    """A quotient target that cannot be computed for this input (too many atoms for ``exact``, bad settings)."""


def cost_matrix(z_t: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """C [B, N, N]: -|z_t,i - alpha x_j|^2 / (2 sigma^2) over all channels, padding included (the callers mask it).

    Differences, not the |a|^2 - 2ab + |b|^2 expansion: at small t the matched pair's distance (~sigma) is far below
    float32's rounding of |z|^2, and the expansion would swamp the weights with noise.
    """
    a = alpha.to(x.dtype).view(-1, 1, 1)
    s2 = (sigma.to(x.dtype) ** 2).view(-1, 1, 1)
    d = torch.cdist(z_t, a * x, compute_mode="donot_use_mm_for_euclid_dist")
    return -(d * d) / (2.0 * s2)


def _check(z_t: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> None:
    if z_t.shape != x.shape or z_t.dim() != 3 or mask.shape != z_t.shape[:2]:
        raise ValueError(f"permutation_target: z_t {tuple(z_t.shape)} and x {tuple(x.shape)} must both be "
                         f"[B, N, 3 + d] and mask {tuple(mask.shape)} [B, N]")
    if alpha.shape != (z_t.shape[0],) or sigma.shape != (z_t.shape[0],):
        raise ValueError(f"permutation_target: alpha {tuple(alpha.shape)} and sigma {tuple(sigma.shape)} must be [B]")


def _target(z_t: torch.Tensor, x: torch.Tensor, mx: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
            ) -> torch.Tensor:
    """(z_t - alpha E[pi(x)]) / sigma, with E[pi(x)] = ``mx`` [B, N, 3 + d]."""
    a, s = alpha.to(x.dtype).view(-1, 1, 1), sigma.to(x.dtype).view(-1, 1, 1)
    return (z_t - a * mx) / s


# ------------------------------------------------------------------------------------------------ exact
def _exact_marginals(C: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """M [B, N, N] by enumeration of every labelling of each molecule's real atoms (identity on padding)."""
    B, N, _ = C.shape
    M = torch.zeros_like(C)
    n_atoms = mask.sum(1)
    if B and int(n_atoms.max()) > EXACT_MAX_ATOMS:
        raise QuotientTargetError(
            f"diffusion.target=exact enumerates n! atom permutations and is limited to molecules of at most "
            f"{EXACT_MAX_ATOMS} atoms; this batch has one of {int(n_atoms.max())}: use mcmc or hungarian")
    perms_of: dict[int, torch.Tensor] = {}
    for b in range(B):  # the test oracle: clarity over speed
        idx = torch.nonzero(mask[b], as_tuple=False).flatten()
        n = idx.numel()
        pad = torch.nonzero(~mask[b], as_tuple=False).flatten()
        M[b, pad, pad] = 1.0
        if n == 0:
            continue
        if n not in perms_of:
            perms_of[n] = torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long, device=C.device)
        P = perms_of[n]  # [n!, n]
        c = C[b][idx][:, idx]  # [n, n]
        logw = c.gather(1, P.T).sum(0)  # [n!]: sum_i c[i, P[p, i]]
        w = torch.softmax(logw, dim=0)
        m = torch.zeros(n, n, dtype=C.dtype, device=C.device)
        m.scatter_add_(1, P.T, w.unsqueeze(0).expand(n, -1).contiguous())
        M[b, idx.unsqueeze(1), idx.unsqueeze(0)] = m
    return M


# ------------------------------------------------------------------------------------------------ hungarian
def hungarian_permutation(C: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pi [B, N] (long): the most likely labelling, argmax_pi sum_i C[i, pi(i)] over real atoms; identity on padding."""
    B, N, _ = C.shape
    perm = torch.arange(N, device=C.device).expand(B, N).clone()
    c_np, m_np = C.detach().double().cpu().numpy(), mask.bool().cpu().numpy()
    for b in range(B):  # scipy's assignment is per matrix
        idx = np.flatnonzero(m_np[b])
        if idx.size < 2:
            continue
        rows, cols = linear_sum_assignment(c_np[b][np.ix_(idx, idx)], maximize=True)
        perm[b, torch.as_tensor(idx[rows], device=C.device)] = torch.as_tensor(idx[cols], device=C.device)
    return perm


# ------------------------------------------------------------------------------------------------ mcmc
def _masked_cost(C: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """C restricted to real (i, j) pairs; a padded row i may only map to itself (so it is never moved)."""
    N = C.shape[1]
    eye = torch.eye(N, dtype=torch.bool, device=C.device)
    pair = mask.unsqueeze(2) & mask.unsqueeze(1)
    out = torch.where(pair, C, torch.full_like(C, -math.inf))
    return torch.where(~mask.unsqueeze(2) & eye, torch.zeros_like(C), out)


class SwapChain:
    """One swap chain per molecule of C [B, N, N], advanced together; ``perm`` [B, N] is the state (identity at
    the start, or ``start``), ``inv`` its inverse."""

    def __init__(self, C: torch.Tensor, mask: torch.Tensor, start: Optional[torch.Tensor] = None) -> None:
        B, N, _ = C.shape
        self.cost = _masked_cost(C, mask)
        self.logp = torch.log_softmax(self.cost, dim=2)  # p_i(j): each row has at least one finite entry
        # Inverse-CDF draws (one uniform each, no multinomial): j from the row's cumulative p_i, i from the real
        # atoms listed first (a molecule with none lists a padded row, whose only move is to itself).
        self.cdf = torch.cumsum(self.logp.exp(), dim=2)
        self.real = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        self.n_real = mask.sum(1).clamp(min=1)
        self.bidx = torch.arange(B, device=C.device)
        self.perm = (torch.arange(N, device=C.device).expand(B, N) if start is None else start).clone()
        self.inv = torch.argsort(self.perm, dim=1)

    def step(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One Metropolis-Hastings step of every chain; returns which chains moved [B]."""
        b, Cm, logp = self.bidx, self.cost, self.logp
        u = torch.rand(3, b.shape[0], dtype=Cm.dtype, device=Cm.device, generator=generator)
        i = self.real[b, torch.minimum((u[0] * self.n_real).long(), self.n_real - 1)]
        cdf = self.cdf[b, i]
        j = torch.searchsorted(cdf, (u[1] * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1).clamp(max=Cm.shape[1] - 1)
        pi_i = self.perm[b, i]
        pi_k = torch.where(torch.isfinite(Cm[b, i, j]), j, pi_i)  # a draw rounded past the last real atom: stay
        k = self.inv[b, pi_k]
        # log w(pi') - log w(pi): rows i and k exchange their images.
        dlogw = Cm[b, i, pi_k] + Cm[b, k, pi_i] - Cm[b, i, pi_i] - Cm[b, k, pi_k]
        log_back = torch.logaddexp(logp[b, i, pi_i], logp[b, k, pi_k])
        log_fwd = torch.logaddexp(logp[b, i, pi_k], logp[b, k, pi_i])
        moved = k != i  # j = pi(i) proposes staying put
        log_ratio = torch.where(moved, dlogw + log_back - log_fwd, torch.zeros_like(dlogw))
        accept = (torch.log(u[2]) < log_ratio) & moved
        new_i, new_k = torch.where(accept, pi_k, pi_i), torch.where(accept, pi_i, pi_k)
        self.perm[b, i], self.perm[b, k] = new_i, new_k
        self.inv[b, new_i], self.inv[b, new_k] = i, k
        return accept


def mcmc_chain(C: torch.Tensor, mask: torch.Tensor, steps: int, burn_in: int, samples: int,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """K = ``samples`` retained states [K, B, N] of the swap chain on w(pi) ~ exp(sum_i C[i, pi(i)]), one chain per
    molecule, all molecules in one set of tensor ops.

    From pi = identity, each of ``steps`` steps picks a real atom i uniformly and a data atom j with probability
    p_i(j) = softmax_j C[i, j], proposes the transposition that sends i to j (k = pi^-1(j) takes pi(i)), and accepts
    with the exact Metropolis-Hastings ratio of this non-symmetric proposal (docs/quotient.md):

        w(pi') (p_i(pi(i)) + p_k(pi(k)))  /  w(pi) (p_i(pi(k)) + p_k(pi(i))).

    The states after steps burn_in + r * thin (r = 1..K, thin = (steps - burn_in) // K) are retained.
    """
    if not (steps >= 1 and 0 <= burn_in < steps and 1 <= samples <= steps - burn_in):
        raise QuotientTargetError(f"mcmc settings: need steps >= 1, 0 <= burn_in < steps and 1 <= samples <= "
                                  f"steps - burn_in; got steps={steps}, burn_in={burn_in}, samples={samples}")
    thin = (steps - burn_in) // samples
    keep = {burn_in + r * thin for r in range(1, samples + 1)}
    chain = SwapChain(C, mask)
    out = []
    for step in range(1, steps + 1):
        chain.step(generator)
        if step in keep:
            out.append(chain.perm.clone())
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------ the target
def _gather_atoms(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """pi(x) [..., B, N, D] for perm [..., B, N]: row i of molecule b is x[b, perm[b, i]]."""
    return torch.gather(x.expand(*perm.shape, x.shape[-1]), -2,
                        perm.unsqueeze(-1).expand(*perm.shape, x.shape[-1]))


def permutation_target(z_t: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, alpha: torch.Tensor,
                       sigma: torch.Tensor, estimator: str = "mcmc", generator: Optional[torch.Generator] = None,
                       **options: Any) -> torch.Tensor:
    """The quotient-space eps target [B, N, 3 + d]: E_w[(z_t - alpha pi(x)) / sigma] over atom labellings pi.

    ``z_t``, ``x`` [B, N, 3 + d] as the process sees them (normalised, CoM-free x), ``mask`` [B, N] bool, ``alpha``,
    ``sigma`` [B]. ``estimator``: ``exact`` (every labelling, molecules of <= 8 atoms), ``hungarian`` (the argmax
    labelling only: biased, cheap), ``mcmc`` (the mean over K states of the seed's swap chain; options ``steps``,
    ``burn_in``, ``samples`` = K, defaults in :data:`MCMC_DEFAULTS`; randomness from ``generator``). Runs in the
    inputs' dtype and on their device; no gradient flows (the target is data).
    """
    _check(z_t, x, mask, alpha, sigma)
    if estimator not in ESTIMATORS:
        raise QuotientTargetError(f"permutation target estimator '{estimator}' is not one of {', '.join(ESTIMATORS)}")
    unknown = set(options) - (set(MCMC_DEFAULTS) if estimator == "mcmc" else set())
    if unknown:
        raise QuotientTargetError(f"permutation target '{estimator}': unknown option(s) {', '.join(sorted(unknown))}")
    mask = mask.bool()
    with torch.no_grad():
        z_t, x = z_t.detach(), x.detach()
        C = cost_matrix(z_t, x, alpha, sigma)
        if estimator == "exact":
            mx = torch.bmm(_exact_marginals(C, mask), x)
        elif estimator == "hungarian":
            mx = _gather_atoms(x, hungarian_permutation(C, mask))
        else:
            opts = {**MCMC_DEFAULTS, **options}
            states = mcmc_chain(C, mask, int(opts["steps"]), int(opts["burn_in"]), int(opts["samples"]), generator)
            mx = _gather_atoms(x, states).mean(0)
        return _target(z_t, x, mx, alpha, sigma)


def training_target(target: str, eps: torch.Tensor, z_t: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                    alpha: torch.Tensor, sigma: torch.Tensor, generator: Optional[torch.Generator] = None,
                    options: Optional[dict[str, Any]] = None) -> torch.Tensor:
    """What a Gaussian process regresses eps_hat on: the drawn ``eps`` itself for ``standard`` (the very tensor,
    so today's loss is bitwise unchanged), else :func:`permutation_target` with ``target`` as the estimator."""
    if target == "standard":
        return eps
    return permutation_target(z_t, x, mask, alpha, sigma, target, generator, **(options or {}))


def target_options(diffusion_cfg: Any) -> dict[str, Any]:
    """The estimator settings a ``diffusion`` config section holds for its target (only mcmc has any)."""
    if str(getattr(diffusion_cfg, "target", "standard")) != "mcmc":
        return {}
    return {k: int(getattr(diffusion_cfg, f"mcmc_{k}", v)) for k, v in MCMC_DEFAULTS.items()}

"""The quotient-space eps target (symdiff/diffusion/quotient.py) against exact enumeration for n <= 6: the swap
chain's law (chi-square), its detailed balance, its target's mean, hungarian == the exact argmax, padding, dtypes,
the symmetries, and the Rao-Blackwellisation of the standard target."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy import stats

from symdiff.diffusion import permutation_target
from symdiff.diffusion.quotient import (QuotientTargetError, SwapChain, cost_matrix, hungarian_permutation,
                                        mcmc_chain)
from symdiff.errors import UserError

D = 6  # 3 positions + 3 feature channels


def molecule(n: int, seed: int, N: int | None = None, spread: float = 1.0, dtype=torch.float64):
    """x [1, N, D] with n real atoms (CoM-free positions), the rest padding."""
    g = torch.Generator().manual_seed(seed)
    N = N or n
    x = torch.zeros(1, N, D, dtype=dtype)
    pts = spread * torch.randn(n, D, dtype=dtype, generator=g)
    pts[:, :3] -= pts[:, :3].mean(0)
    x[0, :n] = pts
    mask = torch.zeros(1, N, dtype=torch.bool)
    mask[0, :n] = True
    return x, mask


def noised(x, mask, alpha: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.full((x.shape[0],), alpha, dtype=x.dtype)
    s = torch.sqrt(1 - a * a)
    eps = torch.randn(x.shape, dtype=x.dtype, generator=g) * mask.unsqueeze(-1)
    return a.view(-1, 1, 1) * x + s.view(-1, 1, 1) * eps, a, s, eps


def brute_force(z, x, mask, a, s):
    """Every labelling of molecule 0's real atoms with its normalised weight and eps target, straight from the
    Gaussian kernel N(z; a pi(x), s^2 I) (independent of quotient.py's cost matrix and marginals)."""
    idx = torch.nonzero(mask[0]).flatten().tolist()
    perms, logw, targets = [], [], []
    for p in itertools.permutations(range(len(idx))):
        perm = list(range(x.shape[1]))
        for r, c in enumerate(p):
            perm[idx[r]] = idx[c]
        px = x[0, perm]
        perms.append(tuple(perm))
        logw.append(-float(((z[0] - a[0] * px) ** 2).sum()) / (2 * float(s[0]) ** 2))
        targets.append((z[0] - a[0] * px) / s[0])
    w = torch.softmax(torch.tensor(logw, dtype=torch.float64), 0)
    return perms, w, torch.stack(targets)


def rep(t: torch.Tensor, R: int) -> torch.Tensor:
    return t.repeat(R, *([1] * (t.dim() - 1)))


def state_ids(perms: torch.Tensor, n: int) -> torch.Tensor:
    """Each permutation of range(n) [..., n] as one integer (base n)."""
    return (perms[..., :n] * (n ** torch.arange(n))).sum(-1)


def test_exact_is_the_weighted_sum_over_every_labelling_and_refuses_more_than_8_atoms():
    x, mask = molecule(5, 0, N=7, spread=0.5)
    z, a, s, _ = noised(x, mask, 0.8, 1)
    _, w, targets = brute_force(z, x, mask, a, s)
    want = (w.view(-1, 1, 1) * targets).sum(0)
    got = permutation_target(z, x, mask, a, s, "exact")
    torch.testing.assert_close(got[0], want, atol=1e-12, rtol=1e-10)
    big, bmask = molecule(9, 0)
    bz, ba, bs, _ = noised(big, bmask, 0.8, 1)
    with pytest.raises(UserError, match="at most 8 atoms"):
        permutation_target(bz, big, bmask, ba, bs, "exact")


@pytest.mark.parametrize("seed", range(4))
def test_hungarian_is_the_exact_argmax(seed):
    n = 4 + seed % 3
    x, mask = molecule(n, seed, N=n + 2, spread=0.4)
    z, a, s, _ = noised(x, mask, 0.6, seed + 10)
    perms, w, targets = brute_force(z, x, mask, a, s)
    best = int(torch.argmax(w))
    assert tuple(hungarian_permutation(cost_matrix(z, x, a, s), mask)[0].tolist()) == perms[best]
    torch.testing.assert_close(permutation_target(z, x, mask, a, s, "hungarian")[0], targets[best])


def _spread_case():
    """A 4-atom molecule and a noise level where the posterior over the 24 labellings is far from a point mass."""
    x, mask = molecule(4, 3, spread=0.35)
    z, a, s, _ = noised(x, mask, 0.7, 4)
    return x, mask, z, a, s


def test_mcmc_law_pooled_over_chains_passes_a_chi_square_test_against_w():
    x, mask, z, a, s = _spread_case()
    perms, w, _ = brute_force(z, x, mask, a, s)
    assert float(w.max()) < 0.5 and int((w > 0.01).sum()) >= 6  # the test has something to find
    R = 20000
    C = cost_matrix(rep(z, R), rep(x, R), rep(a, R), rep(s, R))
    g = torch.Generator().manual_seed(0)
    # One retained state per chain (its last): the chains are independent, so the counts are multinomial.
    last = mcmc_chain(C, rep(mask, R), steps=40, burn_in=39, samples=1, generator=g)[0]
    ids = state_ids(last, 4)
    want_ids = state_ids(torch.tensor(perms), 4)
    counts = torch.stack([(ids == i).sum() for i in want_ids]).double()
    assert int(counts.sum()) == R  # every state is a labelling of the 4 real atoms
    expected = w * R
    big = expected >= 5
    rest = [] if big.all() else [slice(None)]  # the rare labellings pooled into one bin, if there are any
    obs = torch.cat([counts[big]] + [counts[~big].sum().view(1) for _ in rest]).numpy()
    exp = torch.cat([expected[big]] + [expected[~big].sum().view(1) for _ in rest]).numpy()
    assert stats.chisquare(obs, exp).pvalue > 1e-3


def test_the_swap_kernel_satisfies_detailed_balance():
    """From every one of the 24 states, many one-step moves: the fluxes w(s) T(s, s') and w(s') T(s', s) agree
    pair by pair (a chi-square over the pairs of their binomial z-scores)."""
    x, mask, z, a, s = _spread_case()
    perms, w, _ = brute_force(z, x, mask, a, s)
    S, R = len(perms), 6000
    start = torch.tensor(perms).repeat_interleave(R, 0)
    C = cost_matrix(z, x, a, s).expand(S * R, 4, 4)
    chain = SwapChain(C, mask.expand(S * R, 4), start=start)
    chain.step(torch.Generator().manual_seed(1))
    src = torch.arange(S).repeat_interleave(R)
    pos = {int(i): k for k, i in enumerate(state_ids(torch.tensor(perms), 4))}
    dst = torch.tensor([pos[int(i)] for i in state_ids(chain.perm, 4)])
    T = torch.zeros(S, S, dtype=torch.float64)
    T.index_put_((src, dst), torch.ones(S * R, dtype=torch.float64), accumulate=True)
    T /= R
    zs = []
    for u, v in itertools.combinations(range(S), 2):
        if T[u, v] == 0 and T[v, u] == 0:
            continue
        flux_uv, flux_vu = w[u] * T[u, v], w[v] * T[v, u]
        var = w[u] ** 2 * T[u, v] * (1 - T[u, v]) / R + w[v] ** 2 * T[v, u] * (1 - T[v, u]) / R
        zs.append(float((flux_uv - flux_vu) / var.sqrt()))
    assert len(zs) >= 30  # transpositions connect each state to 6 others
    assert stats.chi2.sf(sum(v * v for v in zs), len(zs)) > 1e-3
    # Only transpositions (or staying): every move changes exactly 0 or 2 rows.
    changed = (chain.perm != start).sum(1)
    assert set(changed.unique().tolist()) <= {0, 2}


def _projected_z(est, exact, u) -> float:
    """(mean - exact) / standard error of a fixed random projection of the [N, D] target, one scalar per chain."""
    proj, want = (est * u).sum((-2, -1)), float((exact * u).sum())
    se = float(proj.std()) / math.sqrt(proj.numel())
    return abs(float(proj.mean()) - want) / max(se, 1e-12) if abs(float(proj.mean()) - want) > 1e-9 else 0.0


@pytest.mark.parametrize("alpha", [0.995, 0.8, 0.3])
def test_mcmc_target_mean_is_within_3_standard_errors_of_the_exact_expectation(alpha):
    """Small, medium and large t (alpha_t near 1, middle, small) on a 6-atom molecule padded to 8, one fixed
    labelling: a chain long enough to forget its start (1,024 steps) averages to the exact target."""
    x, mask = molecule(6, 5, N=8, spread=0.5)
    z, a, s, _ = noised(x, mask, alpha, 6)
    exact = permutation_target(z, x, mask, a, s, "exact")[0]
    R = 2000
    g = torch.Generator().manual_seed(2)
    est = permutation_target(rep(z, R), rep(x, R), rep(mask, R), rep(a, R), rep(s, R), "mcmc", generator=g,
                             steps=1024, burn_in=256, samples=16)
    u = torch.randn(8, D, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    assert _projected_z(est, exact, u) < 3
    # Padding is never permuted: its target is the standard one (zero).
    assert torch.equal(est[:, 6:], torch.zeros_like(est[:, 6:]))


@pytest.mark.parametrize("alpha", [0.8, 0.3])
def test_short_chains_from_the_drawn_labelling_are_unbiased_for_the_exact_target(alpha):
    """In training the chain starts from the data's own labelling, which (the data permutation invariant) is itself
    a draw from w given (z_t, unlabelled x): a w-reversible chain stays w-distributed, so even 4 steps average to
    the exact target (the optimum is kept at any chain length). Starts drawn from w here, then 0 and 4 steps."""
    x, mask = molecule(6, 5, N=6, spread=0.5)
    z, a, s, _ = noised(x, mask, alpha, 6)
    exact = permutation_target(z, x, mask, a, s, "exact")[0]
    perms, w, _ = brute_force(z, x, mask, a, s)
    R = 3000
    g = torch.Generator().manual_seed(11)
    start = torch.tensor(perms)[torch.multinomial(w, R, replacement=True, generator=g)]
    chain = SwapChain(cost_matrix(rep(z, R), rep(x, R), rep(a, R), rep(s, R)), rep(mask, R), start=start)
    u = torch.randn(6, D, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for _ in range(4):
        chain.step(g)
    est = (rep(z, R) - a[0] * rep(x, R)[torch.arange(R).unsqueeze(1), chain.perm]) / s[0]
    assert _projected_z(est, exact, u) < 3
    assert (chain.perm != start).any(1).float().mean() > 0.2  # the chains did move


def test_padding_is_never_permuted_and_dtype_and_shape_follow_the_input():
    x, mask = molecule(5, 8, N=7, spread=0.3, dtype=torch.float32)
    x = torch.cat([x, molecule(3, 9, N=7, spread=0.3, dtype=torch.float32)[0]])
    mask = torch.cat([mask, molecule(3, 9, N=7)[1], ])
    x = torch.cat([x, torch.zeros(1, 7, D)])  # an empty molecule
    mask = torch.cat([mask, torch.zeros(1, 7, dtype=torch.bool)])
    z, a, s, _ = noised(x, mask, 0.5, 3)
    for est in ("exact", "hungarian", "mcmc"):
        t = permutation_target(z, x, mask, a, s, est, generator=torch.Generator().manual_seed(0))
        assert t.dtype == torch.float32 and t.shape == x.shape
        assert torch.equal(t[~mask], torch.zeros_like(t[~mask]))
        assert torch.isfinite(t).all()
    states = mcmc_chain(cost_matrix(z, x, a, s), mask, 30, 10, 5, torch.Generator().manual_seed(0))
    ar = torch.arange(7).expand_as(states)
    assert torch.equal(states[:, ~mask], ar[:, ~mask])
    assert not torch.equal(states[:, :2], ar[:, :2])  # the real atoms did move
    # every retained state is a permutation of each molecule's real atoms
    assert torch.equal(states.sort(-1).values, ar)


def test_bad_estimators_and_settings_are_one_line_errors():
    x, mask = molecule(3, 0)
    z, a, s, _ = noised(x, mask, 0.5, 0)
    with pytest.raises(QuotientTargetError, match="not one of exact, hungarian, mcmc"):
        permutation_target(z, x, mask, a, s, "sinkhorn")
    with pytest.raises(QuotientTargetError, match="burn_in"):
        permutation_target(z, x, mask, a, s, "mcmc", steps=10, burn_in=10)
    with pytest.raises(QuotientTargetError, match="unknown option"):
        permutation_target(z, x, mask, a, s, "hungarian", steps=10)


def _orthogonal(seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q if torch.det(q) < 0 else -q  # a reflection: O(3), not only SO(3)


@pytest.mark.parametrize("estimator", ["exact", "hungarian", "mcmc"])
def test_symmetries_relabel_x_relabel_z_and_rotate_reflect(estimator):
    x, mask = molecule(6, 11, spread=0.4)
    z, a, s, _ = noised(x, mask, 0.7, 12)
    rho = torch.tensor([3, 0, 5, 1, 4, 2])

    def target(zz, xx):
        return permutation_target(zz, xx, mask, a, s, estimator, generator=torch.Generator().manual_seed(3))

    base = target(z, x)
    Q = _orthogonal(13)
    rot = lambda t: torch.cat([t[..., :3] @ Q.T, t[..., 3:]], -1)  # noqa: E731
    torch.testing.assert_close(target(rot(z), rot(x)), rot(base), atol=1e-9, rtol=1e-9)
    if estimator == "mcmc":  # the chain starts from the identity: relabelling holds in law, not draw by draw
        return
    torch.testing.assert_close(target(z, x[:, rho]), base, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(target(z[:, rho], x), base[:, rho], atol=1e-12, rtol=1e-12)


def test_the_exact_target_rao_blackwellises_the_standard_one():
    """Data: one 5-atom molecule in a uniformly random labelling (a permutation-invariant distribution). Per draw
    the standard target is eps and the quotient one its conditional mean given (z_t, unlabelled x): the variance
    falls, and the difference is orthogonal to functions of z_t (the same optimum E[eps | z_t])."""
    x0, mask = molecule(5, 21, spread=0.5)
    R = 4000
    g = torch.Generator().manual_seed(5)
    perms = torch.argsort(torch.rand(R, 5, generator=g), dim=1)
    x = x0[0][perms]  # [R, 5, D], each draw a random labelling
    m = mask.expand(R, 5)
    a = torch.full((R,), 0.75, dtype=torch.float64)
    s = torch.sqrt(1 - a * a)
    eps = torch.randn(R, 5, D, dtype=torch.float64, generator=g)
    z = a.view(-1, 1, 1) * x + s.view(-1, 1, 1) * eps
    rb = permutation_target(z, x, m, a, s, "exact")
    var_std, var_rb = float((eps ** 2).sum((1, 2)).mean()), float((rb ** 2).sum((1, 2)).mean())
    assert var_rb < 0.9 * var_std
    diff = eps - rb
    for feature in (z, torch.tanh(2 * z), z ** 2):  # E[(eps - rb) g(z_t)] = 0
        prod = (diff * feature).sum((1, 2))
        assert abs(float(prod.mean())) < 3 * float(prod.std()) / math.sqrt(R)

"""diffusion.flow_align (issue 13): the flow process's prior re-paired with the data by an optimal permutation
(hungarian) and optionally the O(3) Kabsch map (hungarian_kabsch); default none is bitwise today's loss."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from symdiff.config import ConfigError, load_config
from symdiff.diffusion import edm
from symdiff.diffusion.flow import Flow, align_prior
from symdiff.diffusion.vdm import Features
from test_model_equivariance import act, rotation, state


def _cost(z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    """Per molecule sum |x_1 - x_0|^2 over atoms (padding is zero in both)."""
    return ((z1[..., :3] - z0[..., :3]) ** 2).sum((1, 2))


def _real_qm9(n_mols: int = 64, N: int = 29) -> tuple[torch.Tensor, torch.Tensor]:
    """The first bundled QM9 molecules as CoM-free x in Angstrom [B, N, 3] (padding zero) and their mask."""
    from symdiff.data.bundled import subset_path

    with np.load(subset_path()) as q:
        pos, off = q["positions"], q["offsets"]
        x = torch.zeros(n_mols, N, 3, dtype=torch.float64)
        mask = torch.zeros(n_mols, N, dtype=torch.bool)
        for b in range(n_mols):
            p = torch.as_tensor(pos[off[b]:off[b + 1]], dtype=torch.float64)
            x[b, :len(p)], mask[b, :len(p)] = p, True
    return edm.remove_mean(x, mask, "torch"), mask


def test_hungarian_is_the_brute_force_optimum_and_moves_whole_tokens():
    z0, mask = state(sizes=(7, 4, 6), seed=1)
    z1, _ = state(sizes=(7, 4, 6), seed=2)
    out = align_prior(z0, z1, mask, "hungarian")
    for b in range(3):
        n = int(mask[b].sum())
        best = min(float(((z1[b, :n, :3] - z0[b, list(p), :3]) ** 2).sum())
                   for p in itertools.permutations(range(n)))
        assert float(_cost(out, z1)[b]) == pytest.approx(best, abs=1e-12)
        # Each aligned row is a whole row (x and h) of the prior: a permutation of the real atoms.
        rows = {tuple(r.tolist()) for r in z0[b, :n]}
        assert {tuple(r.tolist()) for r in out[b, :n]} == rows
        assert torch.equal(out[b, n:], z0[b, n:])  # padding untouched
    assert bool((_cost(out, z1) < _cost(z0, z1)).all())


def test_kabsch_is_the_o3_procrustes_optimum():
    z0, mask = state(sizes=(7, 4, 6), seed=1)
    z1, _ = state(sizes=(7, 4, 6), seed=2)
    hun, kab = align_prior(z0, z1, mask, "hungarian"), align_prior(z0, z1, mask, "hungarian_kabsch")
    for b in range(3):
        n = int(mask[b].sum())
        p, q = hun[b, :n, :3], z1[b, :n, :3]
        # min over O(3) of |R p - q|^2 is |p|^2 + |q|^2 - 2 (sum of singular values of q^T p).
        opt = float((p ** 2).sum() + (q ** 2).sum() - 2 * torch.linalg.svdvals(q.T @ p).sum())
        assert float(_cost(kab, z1)[b]) == pytest.approx(opt, abs=1e-10)
        # Kabsch moves x by an orthogonal map only; h stays the hungarian one.
        R = torch.linalg.lstsq(p, kab[b, :n, :3]).solution.T
        torch.testing.assert_close(R @ R.T, torch.eye(3, dtype=torch.float64), atol=1e-10, rtol=0)
        torch.testing.assert_close(kab[b, :, 3:], hun[b, :, 3:], atol=0, rtol=0)
        # No random orthogonal map beats it.
        for s in range(20):
            g = rotation("rotation" if s % 2 else "reflection", seed=s)
            assert float(((p @ g.T - q) ** 2).sum()) >= float(_cost(kab, z1)[b]) - 1e-12


def test_kabsch_allows_reflections():
    # A prior that is the data's mirror image (through the xy plane, the data nearly planar so the assignment is
    # the identity): the O(3) map recovers the data exactly; a rotation-only (SO(3)) Kabsch could not.
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 6, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 3.0, 0.3], dtype=torch.float64)
    q = q - q.mean(1, keepdim=True)
    mask = torch.ones(1, 6, dtype=torch.bool)
    mirror = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    z1, z0 = torch.cat([q, q[..., :1]], -1), torch.cat([q @ mirror, q[..., :1]], -1)
    assert torch.equal(align_prior(z0, z1, mask, "hungarian"), z0)
    torch.testing.assert_close(align_prior(z0, z1, mask, "hungarian_kabsch"), z1, atol=1e-12, rtol=0)


def test_alignment_lowers_the_transport_cost_on_real_qm9():
    x1, mask = _real_qm9()
    z1 = torch.cat([x1, torch.zeros(*x1.shape[:2], 6, dtype=torch.float64)], -1)
    proc = Flow(6, 5, 1.0, 4.0, 10.0, backend="torch")
    g = torch.Generator().manual_seed(0)
    z0 = proc.prior(mask, torch.float64, g)
    n = mask.sum(1).double()
    cost = {a: float((_cost(align_prior(z0, z1, mask, a), z1) / n).mean()) for a in ("none", "hungarian",
                                                                                  "hungarian_kabsch")}
    # Mean squared transport per atom (Angstrom^2, norm_x = 1) on 64 molecules, seed 0: 6.568 unaligned
    # (about 3 from the prior plus the molecule's mean |x|^2), 1.952 hungarian, 1.643 hungarian_kabsch.
    assert 6.0 < cost["none"] < 7.0
    assert cost["hungarian"] < 0.35 * cost["none"]
    assert cost["hungarian_kabsch"] < 0.9 * cost["hungarian"]


@pytest.mark.parametrize("align", ["hungarian", "hungarian_kabsch"])
@pytest.mark.parametrize("kind", ["rotation", "reflection"])
def test_aligned_coupling_is_o3_equivariant_pathwise(align, kind):
    # aligned(g x_0, g x_1) = g aligned(x_0, x_1): with the isotropic prior (g x_0 has the law of x_0) the coupling
    # of g x_1 has the law of g times the coupling of x_1 -- equivariance in distribution.
    x1, mask = _real_qm9(16)
    z1 = torch.cat([x1, torch.randn(*x1.shape[:2], 6, dtype=torch.float64) * mask.unsqueeze(-1)], -1)
    z0 = Flow(6, 5, 1.0, 4.0, 10.0, backend="torch").prior(mask, torch.float64, torch.Generator().manual_seed(3))
    g = rotation(kind)
    torch.testing.assert_close(align_prior(act(g, z0), act(g, z1), mask, align), act(g, align_prior(z0, z1, mask,
                                                                                                   align)),
                               atol=1e-9, rtol=0)


@pytest.mark.parametrize("align", ["hungarian", "hungarian_kabsch"])
def test_aligned_coupling_is_permutation_equivariant_pathwise(align):
    # Permuting the data's atoms (and the exchangeable prior's the same way) permutes the aligned prior the same way.
    x1, mask = _real_qm9(16)
    z1 = torch.cat([x1, torch.randn(*x1.shape[:2], 6, dtype=torch.float64) * mask.unsqueeze(-1)], -1)
    z0 = Flow(6, 5, 1.0, 4.0, 10.0, backend="torch").prior(mask, torch.float64, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(5)
    perm = torch.arange(mask.shape[1]).repeat(mask.shape[0], 1)
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        perm[b, :n] = torch.randperm(n, generator=g)
    P = lambda z: torch.gather(z, 1, perm.unsqueeze(-1).expand_as(z))  # noqa: E731
    torch.testing.assert_close(align_prior(P(z0), P(z1), mask, align), P(align_prior(z0, z1, mask, align)),
                               atol=1e-9, rtol=0)


def test_default_none_is_bitwise_the_independent_coupling_loss():
    z1, mask = state()
    f = Features(z1[..., :3], z1[..., 3:], mask, None, None)
    field = lambda z, m, t, **_: torch.tanh(z) * t.view(-1, 1, 1)  # noqa: E731
    proc = Flow(6, 5, 1.0, 4.0, 10.0, backend="torch")
    assert proc.align == "none"
    loss, _ = proc.loss(field, f, torch.Generator().manual_seed(7))
    # Today's (pre-flow_align) loss, written out at the same generator.
    g = torch.Generator().manual_seed(7)
    t = torch.rand(3, dtype=torch.float64, generator=g)
    z0 = proc.prior(mask, torch.float64, g)
    zt = (1 - t.view(-1, 1, 1)) * z0 + t.view(-1, 1, 1) * z1
    err = (field(zt, mask, t) - (z1 - z0)) ** 2
    assert torch.equal(loss, (err.sum((1, 2)) / (9 * 7)).mean())
    # An aligned loss uses the same draws, re-paired: a different, finite number.
    aligned, _ = Flow(6, 5, 1.0, 4.0, 10.0, backend="torch", align="hungarian").loss(
        field, f, torch.Generator().manual_seed(7))
    assert torch.isfinite(aligned) and float(aligned) != float(loss)


def test_config_key():
    assert load_config(None, ["data.root=x"]).diffusion.flow_align == "none"
    cfg = load_config(None, ["data.root=x", "diffusion.process=flow", "diffusion.flow_align=hungarian_kabsch"])
    from symdiff.diffusion import build_process
    assert build_process(cfg, 6, 5, "torch").align == "hungarian_kabsch"
    with pytest.raises(ConfigError, match="flow_align"):
        load_config(None, ["data.root=x", "diffusion.process=flow", "diffusion.flow_align=sinkhorn"])
    with pytest.raises(ConfigError, match="flow process only"):
        load_config(None, ["data.root=x", "diffusion.flow_align=hungarian"])

"""Fused batched 3x3 QR (Triton, interpreter) against the float64 reference, incl. near-singular behaviour."""
from __future__ import annotations

import os

import pytest
import torch

import symdiff.kernels as K
from symdiff.kernels import _common
from symdiff.kernels.qr import QR_EPS, batched_qr_triton


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


def _orth_err(Q):
    Q = Q.double()
    return (Q.transpose(-1, -2) @ Q - torch.eye(3, dtype=torch.float64)).abs().max().item()


@pytest.mark.parametrize("shape,seed", [((1, 3, 3), 0), ((7, 3, 3), 1), ((2, 5, 3, 3), 2), ((300, 3, 3), 3)])
def test_matches_float64_reference(shape, seed):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(shape, generator=g) * 2
    Md = M.double().requires_grad_()
    ref = K.batched_qr_ref(Md)
    gout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    gref, = torch.autograd.grad((ref * gout).sum(), Md)
    Mt = M.clone().requires_grad_()
    Q = K.batched_qr(Mt, backend="triton")
    gtri, = torch.autograd.grad((Q * gout.float()).sum(), Mt)
    assert Q.dtype == torch.float32 and Q.shape == M.shape
    torch.testing.assert_close(Q.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gtri.double(), gref, rtol=1e-4, atol=1e-5 * (1 + gref.abs().max().item()))
    # positive diagonal of the triangular factor R = Q^T M
    Rt = Q.double().transpose(-1, -2) @ M.double()
    assert (torch.diagonal(Rt, dim1=-2, dim2=-1) > 0).all()
    assert _orth_err(Q) < 1e-6


def test_fresh_random_inputs():
    seed = int.from_bytes(os.urandom(4), "little")  # new every run; a failure's message carries it
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 400, (1,), generator=g))
    # scaled columns: condition numbers up to ~1e4, still far from the near-singular threshold
    M = torch.randn(n, 3, 3, generator=g) * torch.exp(torch.randn(n, 1, 3, generator=g) * 3)
    Md = M.double().requires_grad_()
    ref = K.batched_qr_ref(Md)
    gout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    gref, = torch.autograd.grad((ref * gout).sum(), Md)
    Mt = M.clone().requires_grad_()
    Q = batched_qr_triton(Mt)
    gtri, = torch.autograd.grad((Q * gout.float()).sum(), Mt)
    assert torch.allclose(Q.double(), ref, rtol=1e-5, atol=1e-6), f"seed {seed}"
    # per-matrix relative check: gradients scale like 1/|column|
    err = (gtri.double() - gref).abs().amax((1, 2)) / (1 + gref.abs().amax((1, 2)))
    assert err.max() < 1e-4, f"seed {seed}: worst relative grad error {err.max():.2e}"


def test_float64_gradcheck_of_fused_and_reference():
    M = torch.randn(6, 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(K.batched_qr_ref, (M,))
    assert torch.autograd.gradcheck(batched_qr_triton, (M,))
    Q = batched_qr_triton(M.detach())
    torch.testing.assert_close(Q, K.batched_qr_ref(M.detach()), rtol=1e-12, atol=1e-12)


def test_haar_sampling_from_gaussian_input():
    G = torch.randn(4096, 3, 3, generator=torch.Generator().manual_seed(8))
    Q = batched_qr_triton(G)
    assert _orth_err(Q) < 1e-6
    det = torch.linalg.det(Q.double())
    assert torch.allclose(det.abs(), torch.ones_like(det), atol=1e-6)
    frac_reflections = (det < 0).double().mean().item()
    assert 0.45 < frac_reflections < 0.55  # O(3), not SO(3): half are reflections
    # Haar: E[Q] = 0 and E[Q_ab^2] = 1/3
    assert Q.double().mean(0).abs().max() < 0.05
    assert ((Q.double() ** 2).mean(0) - 1 / 3).abs().max() < 0.03


def _singular_cases():
    a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    b = torch.tensor([0.3, 0.1, 2.0], dtype=torch.float64)
    cases = {
        "zero": torch.zeros(3, 3, dtype=torch.float64),
        "rank1": torch.outer(a, torch.tensor([1.0, 3.0, -2.0], dtype=torch.float64)),
        "rank2_last_dependent": torch.stack([a, b, 2 * a - b], 1),
        "rank2_middle_dependent": torch.stack([a, -4 * a, b], 1),
        "zero_first_column": torch.stack([torch.zeros(3, dtype=torch.float64), a, b], 1),
        "tiny_residual": torch.stack([a, a + 1e-14 * b, b], 1),
    }
    return cases


@pytest.mark.parametrize("name", list(_singular_cases()))
def test_near_singular_input_gives_orthogonal_deterministic_q(name):
    M = _singular_cases()[name]
    Q = batched_qr_triton(M[None])[0]
    assert torch.isfinite(Q).all()
    assert _orth_err(Q) < 1e-12
    # still a QR factorisation: R = Q^T M is upper triangular with a non-negative diagonal and Q R = M
    R = Q.T @ M
    s = M.abs().max().item() or 1.0
    assert torch.tril(R, -1).abs().max() <= 1e-10 * s
    assert (torch.diagonal(R) >= -1e-10 * s).all()
    torch.testing.assert_close(Q @ R, M, rtol=0, atol=1e-10 * s)
    # deterministic: repeated and batched with other matrices gives bitwise the same Q
    other = torch.randn(5, 3, 3, dtype=torch.float64)
    Qb = batched_qr_triton(torch.cat([other, M[None], other]))[5]
    assert torch.equal(Qb, Q)
    # gradients exist (clamped pivots) rather than inf/nan
    Mg = M.clone().requires_grad_()
    gA, = torch.autograd.grad(batched_qr_triton(Mg[None]).sum(), Mg)
    assert torch.isfinite(gA).all()


def test_completion_rules():
    # all zeros -> identity; the third column follows the cross-product rule (det +1 when r22 vanishes)
    Q0 = batched_qr_triton(torch.zeros(1, 3, 3, dtype=torch.float64))[0]
    torch.testing.assert_close(Q0, torch.eye(3, dtype=torch.float64), rtol=0, atol=0)
    a = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    Q = batched_qr_triton(torch.stack([a, b, a + b], 1)[None])[0]
    assert torch.linalg.det(Q) > 0
    # below the threshold the column counts as dependent; above it its direction is used
    assert QR_EPS == 1e-12
    eps_dir = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    Qs = batched_qr_triton(torch.stack([a, a + 1e-3 * eps_dir, b], 1)[None])[0]
    ref = K.batched_qr_ref(torch.stack([a, a + 1e-3 * eps_dir, b], 1)[None])[0]
    torch.testing.assert_close(Qs, ref, rtol=1e-9, atol=1e-9)


def test_scale_invariance_over_extreme_magnitudes():
    M = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    Q = batched_qr_triton(M)
    for c in (1e-150, 1e150):
        torch.testing.assert_close(batched_qr_triton(M * c), Q, rtol=1e-12, atol=1e-12)


def test_empty_batch_and_shape_errors():
    assert batched_qr_triton(torch.zeros(0, 3, 3)).shape == (0, 3, 3)
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, 3\]"):
        batched_qr_triton(torch.zeros(2, 2, 3))

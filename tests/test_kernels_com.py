"""Fused CoM projection + rotation (padded and varlen) against the float64 references."""
from __future__ import annotations

import os

import pytest
import torch

import symdiff.kernels as K
from symdiff.kernels import _common
from symdiff.kernels.com import com_project_rotate_triton, com_project_rotate_varlen_triton


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


def _rot(B, g):
    Q = torch.linalg.qr(torch.randn(B, 3, 3, generator=g, dtype=torch.float64))[0]
    return Q.float()


def _grads(fn, x, R, gout):
    leaves = [x] + ([R] if R is not None else [])
    out = fn(x, R)
    return out, torch.autograd.grad((out * gout.to(out.dtype)).sum(), leaves)


# N=300 > the 256-row tile: the row loop runs twice per molecule
@pytest.mark.parametrize("B,N", [(1, 1), (3, 7), (2, 181), (3, 300)])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("with_R", [True, False])
def test_padded_matches_float64_reference(B, N, transpose, with_R):
    g = torch.Generator().manual_seed(B * 1000 + N)
    x = torch.randn(B, N, 3, generator=g) * 3 + 2  # off-centre on purpose
    mask = torch.rand(B, N, generator=g) < 0.7
    if B >= 2:
        mask[0] = False
        mask[1] = True
    R = _rot(B, g) if with_R else None
    gout = torch.randn(B, N, 3, generator=g, dtype=torch.float64)
    ref, gref = _grads(lambda a, r: K.com_project_rotate_ref(a, mask, r, transpose),
                       x.double().requires_grad_(), R.double().requires_grad_() if with_R else None, gout)
    out, gtri = _grads(lambda a, r: K.com_project_rotate(a, mask, r, backend="triton", transpose=transpose),
                       x.clone().requires_grad_(), R.clone().requires_grad_() if with_R else None, gout)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.all(out[~mask] == 0)
    for a, b in zip(gtri, gref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * (1 + b.abs().max().item()))
    # the real rows are centred
    if with_R is False and mask.any():
        real_mean = (out * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        assert real_mean.abs().max() < 1e-5


def test_fresh_random_shapes():
    seed = int.from_bytes(os.urandom(4), "little")  # new every run; a failure's message carries it
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        B, N = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 60, (1,), generator=g))
        tr = bool(torch.randint(0, 2, (1,), generator=g))
        x = torch.randn(B, N, 3, generator=g) * 4
        mask = torch.rand(B, N, generator=g) < torch.rand(1, generator=g)
        R = torch.randn(B, 3, 3, generator=g)
        gout = torch.randn(B, N, 3, generator=g, dtype=torch.float64)
        ref, gref = _grads(lambda a, r: K.com_project_rotate_ref(a, mask, r, tr), x.double().requires_grad_(),
                           R.double().requires_grad_(), gout)
        out, gtri = _grads(lambda a, r: com_project_rotate_triton(a, mask, r, tr), x.clone().requires_grad_(),
                           R.clone().requires_grad_(), gout)
        msg = f"seed {seed}, B={B} N={N} transpose={tr}"
        assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5), msg
        for a, b in zip(gtri, gref):
            assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-5 * (1 + b.abs().max().item())), msg


def _packed(counts, seed):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    x = torch.randn(int(counts.sum()), 3, generator=g) * 2 - 1
    return x, offsets, _rot(len(counts), g), g


@pytest.mark.parametrize("transpose", [False, True])
def test_varlen_matches_reference_and_padded_layout(transpose):
    counts = [0, 5, 1, 181, 3, 290]  # empty, single atom, GEOM size, two tiles
    x, offsets, R, g = _packed(counts, 3)
    gout = torch.randn(x.shape, generator=g, dtype=torch.float64)
    ref, gref = _grads(lambda a, r: K.com_project_rotate_varlen_ref(a, offsets, r, transpose),
                       x.double().requires_grad_(), R.double().requires_grad_(), gout)
    out, gtri = _grads(lambda a, r: K.com_project_rotate_varlen(a, offsets, r, backend="triton", transpose=transpose),
                       x.clone().requires_grad_(), R.clone().requires_grad_(), gout)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(gtri, gref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * (1 + b.abs().max().item()))
    # same molecules laid out padded give the same rows
    B, N = len(counts), max(counts)
    xp = torch.zeros(B, N, 3)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b, c in enumerate(counts):
        xp[b, :c] = x[offsets[b]:offsets[b + 1]]
        mask[b, :c] = True
    padded = com_project_rotate_triton(xp, mask, R, transpose)
    torch.testing.assert_close(padded[mask], out, rtol=0, atol=1e-6)


def test_float64_gradcheck_of_fused_and_reference():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0]], dtype=torch.bool)
    R = torch.randn(2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)  # any matrix, not only O(3)
    for tr in (False, True):
        assert torch.autograd.gradcheck(lambda a, r: K.com_project_rotate_ref(a, mask, r, tr), (x, R))
        # fast mode (random projections) keeps the interpreter launches few; full Jacobians are compared above
        assert torch.autograd.gradcheck(lambda a, r: com_project_rotate_triton(a, mask, r, tr), (x, R),
                                        fast_mode=True)
    counts = torch.tensor([0, 3, 2])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    xv = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    Rv = torch.randn(3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, r: com_project_rotate_varlen_triton(a, offsets, r, True), (xv, Rv),
                                    fast_mode=True)


def test_shape_errors_name_the_problem():
    x = torch.randn(2, 4, 3)
    mask = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"R must be \[2, 3, 3\]"):
        com_project_rotate_triton(x, mask, torch.eye(3), False)
    with pytest.raises(ValueError, match="offsets"):
        com_project_rotate_varlen_triton(x, torch.tensor([0, 4]), None)
    with pytest.raises(ValueError, match="non-decreasing"):
        com_project_rotate_varlen_triton(torch.randn(5, 3), torch.tensor([0, 3, 2, 5]), None)
    with pytest.raises(ValueError, match="non-decreasing"):
        com_project_rotate_varlen_triton(torch.randn(5, 3), torch.tensor([0, 3, 6]), None)

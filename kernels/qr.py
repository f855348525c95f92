"""Batched 3x3 QR (orthogonal factor, positive-diagonal sign convention) as a Triton kernel with its backward.

Each molecule's matrix lives in registers as nine lanes of a [BLOCK] vector. Like the reference (SPEC D14) the
arithmetic is float64 whatever the input dtype; the result is cast back.

Forward (A = QR, columns a0, a1, a2, all divided by s = max|A_rc| first, which leaves Q unchanged):
  q0 = a0 / |a0|;  q1 = normalised (a1 - (q0.a1) q0), re-orthogonalised once;
  q2 = sign(c.a2) c with c = q0 x q1 -- in 3-D the last column is fixed by the first two up to the sign of r22.
Gram-Schmidt norms are positive, so this *is* the sign-fixed factor (R with a positive diagonal).

Near-singular input (defined behaviour, documented in docs/kernels.md): a column whose remaining norm r_kk is
<= QR_EPS * s (QR_EPS = 1e-12, s = max|A_rc|) carries no direction, so a deterministic completion replaces it:
  r00 small -> q0 = e0;  r11 small -> q1 = the unit vector of (e_p - q0_p q0) for p = argmin_p |q0_p|;
  |r22| small -> q2 = +c.  Q stays exactly orthogonal (all zeros -> identity). In the backward, r00 and r11 are
  clamped to at least QR_EPS * s so gradients stay finite there (the exact derivative does not exist).

Backward, from dA = dQ R + Q dR with Q^T dQ antisymmetric and dR R^{-1} upper triangular:
  gA = Q S R^{-T},  S = strictly-lower part of (Q^T gQ - gQ^T Q).
S's last column and R^{-T}'s structure make gA's third column zero (Q does not depend on a2 except via a sign).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_launchable, new_empty

QR_EPS = 1e-12
BLOCK_MOL = 128
NUM_WARPS = 4


@triton.jit
def _load9(p, offs, inb):
    base = p + offs * 9
    a00 = tl.load(base + 0, mask=inb, other=0.0).to(tl.float64)
    a01 = tl.load(base + 1, mask=inb, other=0.0).to(tl.float64)
    a02 = tl.load(base + 2, mask=inb, other=0.0).to(tl.float64)
    a10 = tl.load(base + 3, mask=inb, other=0.0).to(tl.float64)
    a11 = tl.load(base + 4, mask=inb, other=0.0).to(tl.float64)
    a12 = tl.load(base + 5, mask=inb, other=0.0).to(tl.float64)
    a20 = tl.load(base + 6, mask=inb, other=0.0).to(tl.float64)
    a21 = tl.load(base + 7, mask=inb, other=0.0).to(tl.float64)
    a22 = tl.load(base + 8, mask=inb, other=0.0).to(tl.float64)
    return a00, a01, a02, a10, a11, a12, a20, a21, a22


@triton.jit
def _store9(p, offs, inb, v00, v01, v02, v10, v11, v12, v20, v21, v22):
    base = p + offs * 9
    tl.store(base + 0, v00, mask=inb)
    tl.store(base + 1, v01, mask=inb)
    tl.store(base + 2, v02, mask=inb)
    tl.store(base + 3, v10, mask=inb)
    tl.store(base + 4, v11, mask=inb)
    tl.store(base + 5, v12, mask=inb)
    tl.store(base + 6, v20, mask=inb)
    tl.store(base + 7, v21, mask=inb)
    tl.store(base + 8, v22, mask=inb)


@triton.jit
def _qr3(a00, a01, a02, a10, a11, a12, a20, a21, a22, EPS: tl.constexpr):
    """Q columns (q0, q1, q2) plus r00, r01, r11 of the scaled matrix and the scale s."""
    s = tl.maximum(tl.maximum(tl.maximum(tl.abs(a00), tl.abs(a01)), tl.maximum(tl.abs(a02), tl.abs(a10))),
                   tl.maximum(tl.maximum(tl.abs(a11), tl.abs(a12)),
                              tl.maximum(tl.maximum(tl.abs(a20), tl.abs(a21)), tl.abs(a22))))
    s = tl.where(s > 0.0, s, 1.0)
    inv = 1.0 / s
    # column 0
    v0 = a00 * inv
    v1 = a10 * inv
    v2 = a20 * inv
    r00 = tl.sqrt(v0 * v0 + v1 * v1 + v2 * v2)
    deg0 = r00 <= EPS
    rinv = 1.0 / tl.where(deg0, 1.0, r00)
    q00 = tl.where(deg0, 1.0, v0 * rinv)
    q10 = tl.where(deg0, 0.0, v1 * rinv)
    q20 = tl.where(deg0, 0.0, v2 * rinv)
    # column 1 (classical Gram-Schmidt twice: orthogonal to rounding even when a1 is nearly parallel to a0)
    b0 = a01 * inv
    b1 = a11 * inv
    b2 = a21 * inv
    r01 = q00 * b0 + q10 * b1 + q20 * b2
    w0 = b0 - r01 * q00
    w1 = b1 - r01 * q10
    w2 = b2 - r01 * q20
    t = q00 * w0 + q10 * w1 + q20 * w2
    w0 = w0 - t * q00
    w1 = w1 - t * q10
    w2 = w2 - t * q20
    r01 = r01 + t
    r11 = tl.sqrt(w0 * w0 + w1 * w1 + w2 * w2)
    deg1 = r11 <= EPS
    # completion: the basis vector least aligned with q0, made orthogonal to it (its norm^2 >= 2/3)
    aq0 = tl.abs(q00)
    aq1 = tl.abs(q10)
    aq2 = tl.abs(q20)
    p0 = (aq0 <= aq1) & (aq0 <= aq2)
    p1 = (~p0) & (aq1 <= aq2)
    p2 = (~p0) & (~p1)
    e0 = tl.where(p0, 1.0, 0.0)
    e1 = tl.where(p1, 1.0, 0.0)
    e2 = tl.where(p2, 1.0, 0.0)
    qp = q00 * e0 + q10 * e1 + q20 * e2
    f0 = e0 - qp * q00
    f1 = e1 - qp * q10
    f2 = e2 - qp * q20
    fn = 1.0 / tl.sqrt(f0 * f0 + f1 * f1 + f2 * f2)
    winv = 1.0 / tl.where(deg1, 1.0, r11)
    q01 = tl.where(deg1, f0 * fn, w0 * winv)
    q11 = tl.where(deg1, f1 * fn, w1 * winv)
    q21 = tl.where(deg1, f2 * fn, w2 * winv)
    # column 2: the cross product, signed so that r22 = q2.a2 >= 0
    c0 = q10 * q21 - q20 * q11
    c1 = q20 * q01 - q00 * q21
    c2 = q00 * q11 - q10 * q01
    r22 = (c0 * a02 + c1 * a12 + c2 * a22) * inv
    sg = tl.where(r22 < -EPS, -1.0, 1.0)
    return q00, q01, sg * c0, q10, q11, sg * c1, q20, q21, sg * c2, r00, r01, r11, s


@triton.jit
def _qr_fwd_kernel(m_ptr, q_ptr, n_mol, EPS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n_mol
    a00, a01, a02, a10, a11, a12, a20, a21, a22 = _load9(m_ptr, offs, inb)
    q00, q01, q02, q10, q11, q12, q20, q21, q22, r00, r01, r11, s = _qr3(a00, a01, a02, a10, a11, a12, a20, a21,
                                                                         a22, EPS)
    _store9(q_ptr, offs, inb, q00, q01, q02, q10, q11, q12, q20, q21, q22)


@triton.jit
def _qr_bwd_kernel(m_ptr, gq_ptr, ga_ptr, n_mol, EPS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n_mol
    a00, a01, a02, a10, a11, a12, a20, a21, a22 = _load9(m_ptr, offs, inb)
    q00, q01, q02, q10, q11, q12, q20, q21, q22, r00, r01, r11, s = _qr3(a00, a01, a02, a10, a11, a12, a20, a21,
                                                                         a22, EPS)
    g00, g01, g02, g10, g11, g12, g20, g21, g22 = _load9(gq_ptr, offs, inb)
    # S = strictly-lower part of Q^T gQ - gQ^T Q; entry (p, q) = q_p . g_q - q_q . g_p (columns)
    s10 = (q01 * g00 + q11 * g10 + q21 * g20) - (q00 * g01 + q10 * g11 + q20 * g21)
    s20 = (q02 * g00 + q12 * g10 + q22 * g20) - (q00 * g02 + q10 * g12 + q20 * g22)
    s21 = (q02 * g01 + q12 * g11 + q22 * g21) - (q01 * g02 + q11 * g12 + q21 * g22)
    # W = Q S has columns (q1 s10 + q2 s20, q2 s21, 0); gA = W R^{-T} by back substitution per row, in the units
    # of the unscaled R (= s * scaled R). Only r00, r01, r11 enter because W's last column is zero.
    r00c = tl.maximum(r00, EPS) * s
    r11c = tl.maximum(r11, EPS) * s
    r01u = r01 * s
    w00 = q01 * s10 + q02 * s20
    w10 = q11 * s10 + q12 * s20
    w20 = q21 * s10 + q22 * s20
    g_01 = q02 * s21 / r11c
    g_11 = q12 * s21 / r11c
    g_21 = q22 * s21 / r11c
    g_00 = (w00 - r01u * g_01) / r00c
    g_10 = (w10 - r01u * g_11) / r00c
    g_20 = (w20 - r01u * g_21) / r00c
    zero = tl.zeros([BLOCK], dtype=tl.float64)
    _store9(ga_ptr, offs, inb, g_00, g_01, zero, g_10, g_11, zero, g_20, g_21, zero)


def _flat(M: torch.Tensor) -> torch.Tensor:
    return M.reshape(-1, 3, 3).contiguous()


class BatchedQRFn(torch.autograd.Function):
    """Saves only the input; the backward kernel recomputes Q and R in registers."""

    @staticmethod
    def forward(ctx, M: torch.Tensor) -> torch.Tensor:
        Mf = _flat(M)
        n = Mf.shape[0]
        Q = new_empty(n, 3, 3, device=M.device, dtype=torch.float64)
        if n > 0:
            _qr_fwd_kernel[(triton.cdiv(n, BLOCK_MOL),)](Mf, Q, n, EPS=QR_EPS, BLOCK=BLOCK_MOL, num_warps=NUM_WARPS)
        ctx.save_for_backward(Mf)
        ctx.shape = M.shape
        return Q.to(M.dtype).reshape(M.shape)

    @staticmethod
    def backward(ctx, gQ: torch.Tensor):
        (Mf,) = ctx.saved_tensors
        n = Mf.shape[0]
        gA = new_empty(n, 3, 3, device=Mf.device, dtype=torch.float64)
        if n > 0:
            gq = _flat(gQ)
            _qr_bwd_kernel[(triton.cdiv(n, BLOCK_MOL),)](Mf, gq, gA, n, EPS=QR_EPS, BLOCK=BLOCK_MOL,
                                                         num_warps=NUM_WARPS)
        return gA.to(Mf.dtype).reshape(ctx.shape)


def batched_qr_triton(M: torch.Tensor) -> torch.Tensor:
    """Fused ``batched_qr_ref`` for [..., 3, 3] input (float32 or float64; computed in float64)."""
    check_launchable(M, "batched_qr")
    if M.dim() < 2 or M.shape[-2:] != (3, 3):
        raise ValueError(f"batched_qr: the fused kernel handles [..., 3, 3] matrices, got {tuple(M.shape)}")
    if not M.is_floating_point():
        raise ValueError(f"batched_qr: need a floating-point tensor, got {M.dtype}")
    return BatchedQRFn.apply(M)

"""Fused pooled Gaussian pairwise-distance embedding (forward and backward Triton kernels).

out[b, i, k] = m_i / n_b * sum_j m_j * exp(-((d_ij - mu_k) / s_k)^2 / 2) / (sqrt(2 pi) s_k),
d_ij = sqrt(|x_i - x_j|^2 + 1e-12), s_k = |sigma_k| + 0.01 (computed outside, so torch differentiates the abs).

Each program owns a [BLOCK_I, BLOCK_K] output tile and walks j in BLOCK_J tiles, so the largest live object is a
[BLOCK_I, BLOCK_J, BLOCK_K] register tile: the B x N x N x K tensor of the reference never exists. The backward
recomputes the same tiles instead of saving them; what autograd keeps is x, the mask, mu and s (linear in N).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_launchable, compute_dtype, new_empty, tl_dtype

# Tile sizes. Not yet timed on a GPU: chosen from sm_90 register counts of the ahead-of-time build
# (``python -m symdiff.kernels.compile_check``): the forward at 96 registers/thread fits 5 blocks per SM; the
# backward needs 255 without spilling at this tile (as do others with the same values per thread; a 16x8x16 tile
# needs ~165 but does a quarter of the work per program; larger tiles spill). Retune with profile numbers.
FWD_BLOCKS = dict(BLOCK_I=16, BLOCK_J=16, BLOCK_K=32, num_warps=4)
BWD_BLOCKS = dict(BLOCK_I=16, BLOCK_J=16, BLOCK_K=32, num_warps=8)


@triton.jit
def _load_xyz(xb, offs, inb, DT: tl.constexpr):
    x0 = tl.load(xb + offs * 3 + 0, mask=inb, other=0.0).to(DT)
    x1 = tl.load(xb + offs * 3 + 1, mask=inb, other=0.0).to(DT)
    x2 = tl.load(xb + offs * 3 + 2, mask=inb, other=0.0).to(DT)
    return x0, x1, x2


@triton.jit
def _pair_tile(xb, m_ptr, xi0, xi1, xi2, offs_j, in_j, DT: tl.constexpr):
    """Mask of the j tile, the [BLOCK_I, BLOCK_J] coordinate differences x_i - x_j and distances."""
    xj0, xj1, xj2 = _load_xyz(xb, offs_j, in_j, DT)
    mj = tl.load(m_ptr + offs_j, mask=in_j, other=0.0).to(DT)
    d0 = xi0[:, None] - xj0[None, :]
    d1 = xi1[:, None] - xj1[None, :]
    d2 = xi2[:, None] - xj2[None, :]
    # the reference's epsilon: the self pair gets d = 1e-6 and a finite (zero) gradient, as there
    d = tl.sqrt(d0 * d0 + d1 * d1 + d2 * d2 + 1e-12)
    return mj, d0, d1, d2, d


@triton.jit
def _gauss_fwd_kernel(x_ptr, m_ptr, invn_ptr, nhi_ptr, mu_ptr, s_ptr, out_ptr, N, K,
                      BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, DT: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pi = tl.program_id(1)
    pk = tl.program_id(2)
    offs_i = pi * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_k = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    in_i = offs_i < N
    in_k = offs_k < K
    xb = x_ptr + b * N * 3
    xi0, xi1, xi2 = _load_xyz(xb, offs_i, in_i, DT)
    mi = tl.load(m_ptr + b * N + offs_i, mask=in_i, other=0.0).to(DT)
    invn = tl.load(invn_ptr + b).to(DT)
    mu = tl.load(mu_ptr + offs_k, mask=in_k, other=0.0).to(DT)
    s = tl.load(s_ptr + offs_k, mask=in_k, other=1.0).to(DT)
    inv_s = 1.0 / s
    # Rows and columns past the last real atom are padding: skip their tiles (zero output still gets stored).
    n_hi = tl.load(nhi_ptr + b)
    j_end = tl.where(pi * BLOCK_I < n_hi, n_hi, 0)
    acc = tl.zeros([BLOCK_I, BLOCK_K], dtype=DT)
    for j0 in range(0, j_end, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        in_j = offs_j < N
        mj, d0, d1, d2, d = _pair_tile(xb, m_ptr + b * N, xi0, xi1, xi2, offs_j, in_j, DT)
        z = (d[:, :, None] - mu[None, None, :]) * inv_s[None, None, :]
        psi = tl.exp(-0.5 * z * z) * mj[None, :, None]
        acc += tl.sum(psi, axis=1)
    out = acc * (inv_s * 0.3989422804014327)[None, :] * (mi * invn)[:, None]  # 1 / sqrt(2 pi) / s_k
    tl.store(out_ptr + b * N * K + offs_i[:, None] * K + offs_k[None, :], out,
             mask=in_i[:, None] & in_k[None, :])


@triton.jit
def _gauss_bwd_kernel(x_ptr, m_ptr, invn_ptr, nhi_ptr, mu_ptr, s_ptr, g_ptr, gx_ptr, gmu_ptr, gs_ptr, B, N, K,
                      NUM_I_BLOCKS, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                      DT: tl.constexpr):
    # Same (b, i-block, k-block) grid as the forward: one k-block per program keeps the live 3-D tiles few (a
    # k-loop inside held ~255 registers on sm_90). Every program writes its own partial sums -- x: row pk of a
    # [K-blocks, B, N, 3] buffer; mu, s: row (b, pi) of a [B * I-blocks, K] buffer -- which torch reduces after:
    # deterministic, no atomics, memory linear in N and K.
    b = tl.program_id(0).to(tl.int64)
    pi = tl.program_id(1)
    pk = tl.program_id(2)
    offs_i = pi * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_k = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    in_i = offs_i < N
    in_k = offs_k < K
    xb = x_ptr + b * N * 3
    gb = g_ptr + b * N * K
    xi0, xi1, xi2 = _load_xyz(xb, offs_i, in_i, DT)
    mi = tl.load(m_ptr + b * N + offs_i, mask=in_i, other=0.0).to(DT)
    invn = tl.load(invn_ptr + b).to(DT)
    mu = tl.load(mu_ptr + offs_k, mask=in_k, other=0.0).to(DT)
    s = tl.load(s_ptr + offs_k, mask=in_k, other=1.0).to(DT)
    inv_s = 1.0 / s
    coef = inv_s * 0.3989422804014327
    n_hi = tl.load(nhi_ptr + b)
    j_end = tl.where(pi * BLOCK_I < n_hi, n_hi, 0)
    # upstream gradient of row i already scaled by m_i / n_b (the pooling weight)
    gi = tl.load(gb + offs_i[:, None] * K + offs_k[None, :], mask=in_i[:, None] & in_k[None, :],
                 other=0.0).to(DT) * (mi * invn)[:, None]
    gx0 = tl.zeros([BLOCK_I], dtype=DT)
    gx1 = tl.zeros([BLOCK_I], dtype=DT)
    gx2 = tl.zeros([BLOCK_I], dtype=DT)
    gmu = tl.zeros([BLOCK_K], dtype=DT)
    gs = tl.zeros([BLOCK_K], dtype=DT)
    for j0 in range(0, j_end, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        in_j = offs_j < N
        mj, d0, d1, d2, d = _pair_tile(xb, m_ptr + b * N, xi0, xi1, xi2, offs_j, in_j, DT)
        gj = tl.load(gb + offs_j[:, None] * K + offs_k[None, :], mask=in_j[:, None] & in_k[None, :],
                     other=0.0).to(DT) * (mj * invn)[:, None]
        z = (d[:, :, None] - mu[None, None, :]) * inv_s[None, None, :]
        psi = tl.exp(-0.5 * z * z) * coef[None, None, :]
        # pair (i, j) feeds out_i (weight g_i m_j) and, as d_ji = d_ij, out_j (weight g_j m_i)
        wi = gi[:, None, :] * mj[None, :, None] * psi
        zs = z * inv_s[None, None, :]
        # d psi / d mu = psi z / s ; d psi / d s = psi (z^2 - 1) / s ; d psi / d d = -psi z / s
        gmu += tl.sum(tl.sum(wi * zs, axis=1), axis=0)
        gs += tl.sum(tl.sum(wi * (z * zs - inv_s[None, None, :]), axis=1), axis=0)
        c = -tl.sum((wi + gj[None, :, :] * mi[:, None, None] * psi) * zs, axis=2) / d
        gx0 += tl.sum(c * d0, axis=1)
        gx1 += tl.sum(c * d1, axis=1)
        gx2 += tl.sum(c * d2, axis=1)
    prow = (b * NUM_I_BLOCKS + pi) * K
    tl.store(gmu_ptr + prow + offs_k, gmu, mask=in_k)
    tl.store(gs_ptr + prow + offs_k, gs, mask=in_k)
    gxb = gx_ptr + (pk * B + b) * N * 3
    tl.store(gxb + offs_i * 3 + 0, gx0, mask=in_i)
    tl.store(gxb + offs_i * 3 + 1, gx1, mask=in_i)
    tl.store(gxb + offs_i * 3 + 2, gx2, mask=in_i)


def _prep(x: torch.Tensor, mask: torch.Tensor):
    """Per-molecule 1/n (n = real atom count, at least 1) and one past the last real atom index."""
    B, N, _ = x.shape
    cdt = compute_dtype(x)
    m = mask.to(cdt).contiguous()
    invn = (1.0 / m.sum(1).clamp_min(1.0)).contiguous()
    idx = torch.arange(1, N + 1, device=x.device, dtype=torch.int32)
    n_hi = (mask.to(torch.int32) * idx).amax(1).to(torch.int32).contiguous() if N > 0 else \
        torch.zeros(B, dtype=torch.int32, device=x.device)
    return m, invn, n_hi


class GaussianEmbeddingFn(torch.autograd.Function):
    """autograd wrapper: saves only x, mask, mu, s; the backward kernel recomputes every Gaussian."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        check_launchable(x, "gaussian_embedding")
        B, N, _ = x.shape
        K = mu.shape[0]
        cdt = compute_dtype(x)
        xc = x.to(cdt).contiguous()
        muc = mu.to(cdt).contiguous()
        sc = s.to(cdt).contiguous()
        m, invn, n_hi = _prep(xc, mask)
        out = new_empty(B, N, K, device=x.device, dtype=cdt)
        if B * N * K > 0:
            p = FWD_BLOCKS
            grid = (B, triton.cdiv(N, p["BLOCK_I"]), triton.cdiv(K, p["BLOCK_K"]))
            _gauss_fwd_kernel[grid](xc, m, invn, n_hi, muc, sc, out, N, K, BLOCK_I=p["BLOCK_I"],
                                    BLOCK_J=p["BLOCK_J"], BLOCK_K=p["BLOCK_K"], DT=tl_dtype(cdt),
                                    num_warps=p["num_warps"])
        ctx.save_for_backward(xc, m, invn, n_hi, muc, sc)
        ctx.dtypes = (x.dtype, mu.dtype, s.dtype)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        xc, m, invn, n_hi, muc, sc = ctx.saved_tensors
        B, N, _ = xc.shape
        K = muc.shape[0]
        cdt = xc.dtype
        p = BWD_BLOCKS
        n_ib = triton.cdiv(N, p["BLOCK_I"]) if N > 0 else 0
        n_kb = triton.cdiv(K, p["BLOCK_K"]) if K > 0 else 0
        gx_part = new_empty(n_kb, B, N, 3, device=xc.device, dtype=cdt)
        gmu_part = new_empty(B * n_ib, K, device=xc.device, dtype=cdt)
        gs_part = new_empty(B * n_ib, K, device=xc.device, dtype=cdt)
        if B * N * K > 0:
            gc = g.to(cdt).contiguous()
            _gauss_bwd_kernel[(B, n_ib, n_kb)](xc, m, invn, n_hi, muc, sc, gc, gx_part, gmu_part, gs_part, B, N, K,
                                               n_ib, BLOCK_I=p["BLOCK_I"], BLOCK_J=p["BLOCK_J"],
                                               BLOCK_K=p["BLOCK_K"], DT=tl_dtype(cdt), num_warps=p["num_warps"])
        gx = gx_part.sum(0)
        xdt, mudt, sdt = ctx.dtypes
        gmu = gmu_part.sum(0).to(mudt)
        gs = gs_part.sum(0).to(sdt)
        return gx.to(xdt), None, gmu, gs


def gaussian_embedding_triton(x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor,
                              sigma: torch.Tensor) -> torch.Tensor:
    """Fused version of ``gaussian_embedding_ref``: [B, N, 3], [B, N] bool, [K], [K] -> [B, N, K]."""
    if x.dim() != 3 or x.shape[-1] != 3:
        raise ValueError(f"gaussian_embedding: x must be [B, N, 3], got {tuple(x.shape)}")
    if mask.shape != x.shape[:2]:
        raise ValueError(f"gaussian_embedding: mask {tuple(mask.shape)} does not match x {tuple(x.shape)}")
    if mu.dim() != 1 or sigma.shape != mu.shape:
        raise ValueError(f"gaussian_embedding: mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} must be [K]")
    # s is formed by torch so autograd handles d|sigma|/dsigma exactly as the reference does.
    s = sigma.abs() + 0.01
    return GaussianEmbeddingFn.apply(x, mask, mu, s)

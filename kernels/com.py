"""Fused masked centre-of-mass projection and per-molecule rotation (padded and packed/varlen layouts).

y_i = R (x_i - mean of the real x) (R^T with ``transpose``), zero for padding. One program per molecule makes two
passes over its rows: the first sums the real positions, the second centres, rotates and writes. The backward of
x is the same operation on the upstream gradient with the transpose flipped (the projection is self-adjoint and
R's adjoint is R^T); the gradient of R is a per-molecule 3x3 sum from a second small kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_launchable, compute_dtype, new_empty, tl_dtype

# Rows per tile: a GEOM molecule (<= 181 atoms) fits one tile, so each pass is a single masked load. Padded
# batches use the next power of two of N instead (a QM9 molecule would leave 7/8 of a 256-row tile idle);
# packed batches do not know their largest molecule without a device sync, so they keep the full tile.
BLOCK_ROWS = 256


def _tile(N: int | None) -> tuple[int, int]:
    """(rows per tile, warps) for molecules of at most N rows (None: unknown, packed layout)."""
    block = BLOCK_ROWS if N is None else max(16, min(BLOCK_ROWS, triton.next_power_of_2(max(N, 1))))
    return block, max(1, min(4, block // 64))


@triton.jit
def _mol_rows(b, off_ptr, N, VARLEN: tl.constexpr):
    if VARLEN:
        start = tl.load(off_ptr + b).to(tl.int64)
        n_rows = (tl.load(off_ptr + b + 1) - tl.load(off_ptr + b)).to(tl.int32)
    else:
        start = b.to(tl.int64) * N
        n_rows = N
    return start, n_rows


@triton.jit
def _load_rows(x_ptr, m_ptr, rows, inr, HAS_MASK: tl.constexpr, DT: tl.constexpr):
    """Mask weights and the three coordinates of a tile of rows (zero outside the molecule)."""
    if HAS_MASK:
        m = tl.load(m_ptr + rows, mask=inr, other=0.0).to(DT)
    else:
        m = inr.to(DT)
    v0 = tl.load(x_ptr + rows * 3 + 0, mask=inr, other=0.0).to(DT)
    v1 = tl.load(x_ptr + rows * 3 + 1, mask=inr, other=0.0).to(DT)
    v2 = tl.load(x_ptr + rows * 3 + 2, mask=inr, other=0.0).to(DT)
    return m, v0, v1, v2


@triton.jit
def _centred_rows(x_ptr, m_ptr, rows, inr, c0, c1, c2, HAS_MASK: tl.constexpr, DT: tl.constexpr):
    """A tile of rows minus the molecule mean (c0, c1, c2), zero for padding and rows outside the molecule."""
    m, v0, v1, v2 = _load_rows(x_ptr, m_ptr, rows, inr, HAS_MASK, DT)
    return (v0 - c0) * m, (v1 - c1) * m, (v2 - c2) * m


@triton.jit
def _mol_mean(x_ptr, m_ptr, start, n_rows, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, DT: tl.constexpr):
    a0 = tl.zeros([BLOCK], dtype=DT)
    a1 = tl.zeros([BLOCK], dtype=DT)
    a2 = tl.zeros([BLOCK], dtype=DT)
    cnt = tl.zeros([BLOCK], dtype=DT)
    for r0 in range(0, n_rows, BLOCK):
        offs = r0 + tl.arange(0, BLOCK)
        inr = offs < n_rows
        m, v0, v1, v2 = _load_rows(x_ptr, m_ptr, start + offs, inr, HAS_MASK, DT)
        a0 += v0 * m
        a1 += v1 * m
        a2 += v2 * m
        cnt += m
    inv = 1.0 / tl.maximum(tl.sum(cnt, axis=0), 1.0)
    return tl.sum(a0, axis=0) * inv, tl.sum(a1, axis=0) * inv, tl.sum(a2, axis=0) * inv


@triton.jit
def _com_fwd_kernel(x_ptr, m_ptr, off_ptr, r_ptr, y_ptr, N, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
                    HAS_R: tl.constexpr, TRANSPOSE: tl.constexpr, BLOCK: tl.constexpr, DT: tl.constexpr):
    b = tl.program_id(0)
    start, n_rows = _mol_rows(b, off_ptr, N, VARLEN)
    c0, c1, c2 = _mol_mean(x_ptr, m_ptr, start, n_rows, HAS_MASK, BLOCK, DT)
    if HAS_R:
        rb = r_ptr + b.to(tl.int64) * 9
        # a[r][c] is the matrix actually applied: R, or R^T with TRANSPOSE (index swap at compile time)
        if TRANSPOSE:
            a00 = tl.load(rb + 0).to(DT)
            a01 = tl.load(rb + 3).to(DT)
            a02 = tl.load(rb + 6).to(DT)
            a10 = tl.load(rb + 1).to(DT)
            a11 = tl.load(rb + 4).to(DT)
            a12 = tl.load(rb + 7).to(DT)
            a20 = tl.load(rb + 2).to(DT)
            a21 = tl.load(rb + 5).to(DT)
            a22 = tl.load(rb + 8).to(DT)
        else:
            a00 = tl.load(rb + 0).to(DT)
            a01 = tl.load(rb + 1).to(DT)
            a02 = tl.load(rb + 2).to(DT)
            a10 = tl.load(rb + 3).to(DT)
            a11 = tl.load(rb + 4).to(DT)
            a12 = tl.load(rb + 5).to(DT)
            a20 = tl.load(rb + 6).to(DT)
            a21 = tl.load(rb + 7).to(DT)
            a22 = tl.load(rb + 8).to(DT)
    for r0 in range(0, n_rows, BLOCK):
        offs = r0 + tl.arange(0, BLOCK)
        inr = offs < n_rows
        rows = start + offs
        v0, v1, v2 = _centred_rows(x_ptr, m_ptr, rows, inr, c0, c1, c2, HAS_MASK, DT)
        if HAS_R:
            y0 = a00 * v0 + a01 * v1 + a02 * v2
            y1 = a10 * v0 + a11 * v1 + a12 * v2
            y2 = a20 * v0 + a21 * v1 + a22 * v2
        else:
            y0 = v0
            y1 = v1
            y2 = v2
        tl.store(y_ptr + rows * 3 + 0, y0, mask=inr)
        tl.store(y_ptr + rows * 3 + 1, y1, mask=inr)
        tl.store(y_ptr + rows * 3 + 2, y2, mask=inr)


@triton.jit
def _com_grad_r_kernel(x_ptr, m_ptr, off_ptr, g_ptr, gr_ptr, N, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
                       TRANSPOSE: tl.constexpr, BLOCK: tl.constexpr, DT: tl.constexpr):
    # y = A v with v the centred masked x: dL/dA = sum_i g_i v_i^T; with TRANSPOSE A = R^T so dL/dR is its transpose.
    b = tl.program_id(0)
    start, n_rows = _mol_rows(b, off_ptr, N, VARLEN)
    c0, c1, c2 = _mol_mean(x_ptr, m_ptr, start, n_rows, HAS_MASK, BLOCK, DT)
    s00 = tl.zeros([BLOCK], dtype=DT)
    s01 = tl.zeros([BLOCK], dtype=DT)
    s02 = tl.zeros([BLOCK], dtype=DT)
    s10 = tl.zeros([BLOCK], dtype=DT)
    s11 = tl.zeros([BLOCK], dtype=DT)
    s12 = tl.zeros([BLOCK], dtype=DT)
    s20 = tl.zeros([BLOCK], dtype=DT)
    s21 = tl.zeros([BLOCK], dtype=DT)
    s22 = tl.zeros([BLOCK], dtype=DT)
    for r0 in range(0, n_rows, BLOCK):
        offs = r0 + tl.arange(0, BLOCK)
        inr = offs < n_rows
        rows = start + offs
        v0, v1, v2 = _centred_rows(x_ptr, m_ptr, rows, inr, c0, c1, c2, HAS_MASK, DT)
        _, g0, g1, g2 = _load_rows(g_ptr, m_ptr, rows, inr, False, DT)
        s00 += g0 * v0
        s01 += g0 * v1
        s02 += g0 * v2
        s10 += g1 * v0
        s11 += g1 * v1
        s12 += g1 * v2
        s20 += g2 * v0
        s21 += g2 * v1
        s22 += g2 * v2
    ob = gr_ptr + b.to(tl.int64) * 9
    if TRANSPOSE:
        tl.store(ob + 0, tl.sum(s00, axis=0))
        tl.store(ob + 3, tl.sum(s01, axis=0))
        tl.store(ob + 6, tl.sum(s02, axis=0))
        tl.store(ob + 1, tl.sum(s10, axis=0))
        tl.store(ob + 4, tl.sum(s11, axis=0))
        tl.store(ob + 7, tl.sum(s12, axis=0))
        tl.store(ob + 2, tl.sum(s20, axis=0))
        tl.store(ob + 5, tl.sum(s21, axis=0))
        tl.store(ob + 8, tl.sum(s22, axis=0))
    else:
        tl.store(ob + 0, tl.sum(s00, axis=0))
        tl.store(ob + 1, tl.sum(s01, axis=0))
        tl.store(ob + 2, tl.sum(s02, axis=0))
        tl.store(ob + 3, tl.sum(s10, axis=0))
        tl.store(ob + 4, tl.sum(s11, axis=0))
        tl.store(ob + 5, tl.sum(s12, axis=0))
        tl.store(ob + 6, tl.sum(s20, axis=0))
        tl.store(ob + 7, tl.sum(s21, axis=0))
        tl.store(ob + 8, tl.sum(s22, axis=0))


def _launch_fwd(x: torch.Tensor, m: torch.Tensor | None, offsets: torch.Tensor | None, R: torch.Tensor | None,
                transpose: bool, n_mol: int, N: int) -> torch.Tensor:
    y = new_empty(*x.shape, device=x.device, dtype=x.dtype)
    if n_mol == 0 or x.numel() == 0:
        return y.zero_()
    dummy = x  # never dereferenced: the constexpr flags compile the corresponding loads out
    block, warps = _tile(N if offsets is None else None)
    _com_fwd_kernel[(n_mol,)](x, m if m is not None else dummy, offsets if offsets is not None else dummy,
                              R if R is not None else dummy, y, N, HAS_MASK=m is not None,
                              VARLEN=offsets is not None, HAS_R=R is not None, TRANSPOSE=bool(transpose),
                              BLOCK=block, DT=tl_dtype(x.dtype), num_warps=warps)
    return y


def _launch_grad_r(x, m, offsets, g, transpose, n_mol, N) -> torch.Tensor:
    gR = new_empty(n_mol, 3, 3, device=x.device, dtype=x.dtype)
    if n_mol == 0:
        return gR
    dummy = x
    block, warps = _tile(N if offsets is None else None)
    _com_grad_r_kernel[(n_mol,)](x, m if m is not None else dummy, offsets if offsets is not None else dummy,
                                 g, gR, N, HAS_MASK=m is not None, VARLEN=offsets is not None,
                                 TRANSPOSE=bool(transpose), BLOCK=block, DT=tl_dtype(x.dtype),
                                 num_warps=warps)
    return gR


class ComProjectRotateFn(torch.autograd.Function):
    """Shared by the padded (mask) and packed (offsets) layouts; exactly one of mask/offsets is given."""

    @staticmethod
    def forward(ctx, x, mask, offsets, R, transpose, n_mol, N):
        cdt = compute_dtype(x)
        xc = x.to(cdt).contiguous()
        m = mask.to(cdt).contiguous() if mask is not None else None
        Rc = R.to(cdt).contiguous() if R is not None else None
        y = _launch_fwd(xc, m, offsets, Rc, transpose, n_mol, N)
        ctx.save_for_backward(xc, m, offsets, Rc)
        ctx.meta = (transpose, n_mol, N, x.dtype, R.dtype if R is not None else None)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        xc, m, offsets, Rc = ctx.saved_tensors
        transpose, n_mol, N, xdt, rdt = ctx.meta
        gc = g.to(xc.dtype).contiguous()
        gx = gR = None
        if ctx.needs_input_grad[0]:
            gx = _launch_fwd(gc, m, offsets, Rc, not transpose, n_mol, N).to(xdt)
        if Rc is not None and ctx.needs_input_grad[3]:
            gR = _launch_grad_r(xc, m, offsets, gc, transpose, n_mol, N).to(rdt)
        return gx, None, None, gR, None, None, None


def _check_R(R: torch.Tensor | None, n_mol: int, op: str) -> None:
    if R is not None and R.shape != (n_mol, 3, 3):
        raise ValueError(f"{op}: R must be [{n_mol}, 3, 3], got {tuple(R.shape)}")


def com_project_rotate_triton(x: torch.Tensor, mask: torch.Tensor, R: torch.Tensor | None,
                              transpose: bool = False) -> torch.Tensor:
    """Fused ``com_project_rotate_ref`` for padded batches: x [B, N, 3], mask [B, N], R [B, 3, 3] or None."""
    check_launchable(x, "com_project_rotate")
    if x.dim() != 3 or x.shape[-1] != 3 or mask.shape != x.shape[:2]:
        raise ValueError(f"com_project_rotate: need x [B, N, 3] and mask [B, N], got {tuple(x.shape)} and "
                         f"{tuple(mask.shape)}")
    B, N, _ = x.shape
    _check_R(R, B, "com_project_rotate")
    return ComProjectRotateFn.apply(x, mask, None, R, transpose, B, N)


def com_project_rotate_varlen_triton(x: torch.Tensor, offsets: torch.Tensor, R: torch.Tensor | None,
                                     transpose: bool = False) -> torch.Tensor:
    """Fused ``com_project_rotate_varlen_ref``: x [total, 3], molecule b owns rows offsets[b]:offsets[b+1]."""
    check_launchable(x, "com_project_rotate_varlen")
    if x.dim() != 2 or x.shape[-1] != 3 or offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"com_project_rotate_varlen: need x [total, 3] and offsets [B + 1], got "
                         f"{tuple(x.shape)} and {tuple(offsets.shape)}")
    n_mol = offsets.numel() - 1
    _check_R(R, n_mol, "com_project_rotate_varlen")
    if offsets.device.type == "cpu":  # checking device-resident offsets would cost a sync on every call
        counts = offsets[1:] - offsets[:-1]
        if n_mol and (int(offsets[0]) < 0 or bool((counts < 0).any()) or int(offsets[-1]) > x.shape[0]):
            raise ValueError(f"com_project_rotate_varlen: offsets must be non-decreasing within [0, {x.shape[0]}], "
                             f"got {offsets.tolist()[:8]}{' ...' if offsets.numel() > 8 else ''}")
    offs = offsets.to(device=x.device, dtype=torch.int64).contiguous()
    return ComProjectRotateFn.apply(x, None, offs, R, transpose, n_mol, 0)

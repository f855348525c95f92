"""Plain PyTorch references of the geometric hot-path ops. These define the semantics the fused kernels match.

Positions are row vectors [B, N, 3]; a rotation R acts as x_i -> R x_i, i.e. ``X @ R^T``.
"""
from __future__ import annotations

import math

import torch

SQRT_2PI = math.sqrt(2.0 * math.pi)


def gaussian_embedding_ref(x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Pooled Gaussian pairwise-distance embedding [B, N, K] (SPEC §3.3, pooled before the linear map, D6).

    For a real atom i: (1/N_b) sum over real j of exp(-((d_ij - mu_k)/s_k)^2 / 2) / (sqrt(2 pi) s_k),
    s_k = |sigma_k| + 0.01; the self pair (d = 0) is included; padded rows are zero.
    This materialises the [B, N, N, K] block on purpose: it is the reference the fused kernel is checked against.
    """
    m = mask.to(x.dtype)
    diff = x.unsqueeze(2) - x.unsqueeze(1)  # [B, N, N, 3]
    # sqrt has an infinite gradient at 0 (the self pair); the epsilon keeps the gradient finite and is far
    # below float32 resolution of any real distance.
    d = torch.sqrt((diff * diff).sum(-1) + 1e-12)  # [B, N, N]
    s = sigma.abs() + 0.01
    z = (d.unsqueeze(-1) - mu) / s
    psi = torch.exp(-0.5 * z * z) / (SQRT_2PI * s)  # [B, N, N, K]
    pair = (m.unsqueeze(2) * m.unsqueeze(1)).unsqueeze(-1)
    n = m.sum(1).clamp_min(1.0).view(-1, 1, 1)
    return (psi * pair).sum(2) / n


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)


def com_project_rotate_ref(x: torch.Tensor, mask: torch.Tensor, R: torch.Tensor | None,
                           transpose: bool = False) -> torch.Tensor:
    """y_i = R (x_i - mean of real x) (or R^T (...) with ``transpose``); zero for padding. R: [B, 3, 3] or None."""
    m = mask.to(x.dtype).unsqueeze(-1)
    y = (x - masked_mean(x, mask)) * m
    if R is None:
        return y
    return y @ (R if transpose else R.transpose(1, 2))


def com_project_rotate_varlen_ref(x: torch.Tensor, offsets: torch.Tensor, R: torch.Tensor | None,
                                  transpose: bool = False) -> torch.Tensor:
    """Packed form: x [total, 3], molecule b owns rows offsets[b]:offsets[b+1]; R [B, 3, 3]."""
    counts = (offsets[1:] - offsets[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts)
    sums = torch.zeros(len(counts), 3, dtype=x.dtype, device=x.device).index_add_(0, seg, x)
    mean = sums / counts.clamp_min(1).to(x.dtype).unsqueeze(-1)
    y = x - mean[seg]
    if R is None:
        return y
    Rm = R[seg]
    return torch.einsum("nij,nj->ni", Rm.transpose(1, 2) if transpose else Rm, y)


def batched_qr_ref(M: torch.Tensor) -> torch.Tensor:
    """Orthogonal factor Q of each 3x3 M with signs such that the triangular factor has a positive diagonal.

    Computed in float64 (SPEC D14) and cast back. Gradients flow through torch.linalg.qr; the sign matrix is
    piecewise constant. Near-singular input: where a diagonal entry of R is exactly 0 its sign is taken as +1,
    so the output is always a member of O(3).
    """
    dtype = M.dtype
    Q, Rt = torch.linalg.qr(M.double())
    d = torch.diagonal(Rt, dim1=-2, dim2=-1)
    sign = torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d)).detach()
    return (Q * sign.unsqueeze(-2)).to(dtype)

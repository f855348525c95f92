"""Geometric hot-path ops with dispatch between fused Triton kernels and plain PyTorch references.

Public entry points (stable): ``gaussian_embedding``, ``com_project_rotate`` (and its packed form
``com_project_rotate_varlen``), ``batched_qr``. ``backend`` is "auto" (Triton for CUDA tensors, reference
elsewhere), "triton" or "torch"; the config switch is ``model.kernel_backend``. Imported as ``symdiff.kernels``.
See docs/kernels.md.
"""
from __future__ import annotations

import torch

from .reference import (batched_qr_ref, com_project_rotate_ref, com_project_rotate_varlen_ref,
                        gaussian_embedding_ref, masked_mean)

BACKENDS = ("auto", "triton", "torch")


def _use_triton(backend: str, t: torch.Tensor) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    return t.is_cuda


def gaussian_embedding(x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor,
                       backend: str = "auto") -> torch.Tensor:
    """[B, N, 3], [B, N] bool, [K], [K] -> [B, N, K] pooled Gaussian distance embedding (zero rows for padding)."""
    if _use_triton(backend, x):
        from .gaussian import gaussian_embedding_triton
        return gaussian_embedding_triton(x, mask, mu, sigma)
    return gaussian_embedding_ref(x, mask, mu, sigma)


def com_project_rotate(x: torch.Tensor, mask: torch.Tensor, R: torch.Tensor | None, backend: str = "auto",
                       transpose: bool = False) -> torch.Tensor:
    """y_i = R (x_i - mean of real x) (R^T with ``transpose``), zero for padding."""
    if _use_triton(backend, x):
        from .com import com_project_rotate_triton
        return com_project_rotate_triton(x, mask, R, transpose)
    return com_project_rotate_ref(x, mask, R, transpose)


def com_project_rotate_varlen(x: torch.Tensor, offsets: torch.Tensor, R: torch.Tensor | None,
                              backend: str = "auto", transpose: bool = False) -> torch.Tensor:
    """Packed form of ``com_project_rotate``: x [total, 3], molecule b owns rows offsets[b]:offsets[b+1]."""
    if _use_triton(backend, x):
        from .com import com_project_rotate_varlen_triton
        return com_project_rotate_varlen_triton(x, offsets, R, transpose)
    return com_project_rotate_varlen_ref(x, offsets, R, transpose)


def batched_qr(M: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Orthogonal factor of each 3x3 M (sign-fixed so the triangular factor has a positive diagonal).

    Near-singular M (a Gram-Schmidt column norm <= 1e-12 * max|M|): the fused kernel completes Q
    deterministically and keeps it orthogonal (see ``kernels/qr.py`` and docs/kernels.md).
    """
    if _use_triton(backend, M):
        from .qr import batched_qr_triton
        return batched_qr_triton(M)
    return batched_qr_ref(M)


__all__ = ["gaussian_embedding", "com_project_rotate", "com_project_rotate_varlen", "batched_qr", "masked_mean",
           "BACKENDS", "gaussian_embedding_ref", "com_project_rotate_ref", "com_project_rotate_varlen_ref",
           "batched_qr_ref"]

"""Helpers shared by the Triton kernels: launch checks and the compute dtype rule."""
from __future__ import annotations

import os

import torch


# Tests set this to fill every kernel-owned output with NaN before launch, so an element a kernel forgets to
# write shows up instead of silently keeping whatever the allocator handed back.
POISON_OUTPUTS = False


def new_empty(*shape: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    t = torch.empty(*shape, device=device, dtype=dtype)
    if POISON_OUTPUTS:
        t.fill_(float("nan"))
    return t


def check_launchable(t: torch.Tensor, op: str) -> None:
    """Fail with an actionable message instead of Triton's '0 active drivers' when no backend can run."""
    if t.is_cuda:
        return
    if os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
        raise RuntimeError(
            f"{op}: backend 'triton' on a {t.device.type} tensor needs the Triton interpreter; set "
            "TRITON_INTERPRET=1 before anything imports triton (or use backend='torch'/'auto')")


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 inputs are computed in float64 (gradcheck, references); everything else in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    import triton.language as tl
    return tl.float64 if dtype == torch.float64 else tl.float32

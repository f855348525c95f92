"""Dense layers on CPU through oneDNN instead of the BLAS that ``torch.nn.functional.linear`` calls.

Why: the CPU wheel of torch routes float32 GEMMs to MKL, and MKL takes its AVX2 path on AMD processors. On the
AMD EPYC (AVX-512) machines this project runs on, oneDNN's float32 matmul for the DiT's shapes is 2.0-2.4x faster
per core (`benchmarks/bench_linear.py`), and the dense layers are about 70% of a SymDiff training step. The result
is an IEEE float32 product like MKL's; only the summation order differs (agreement to ~1e-6 relative).

``linear(x, weight, bias, backend)``: backend "auto" uses oneDNN for float32 CPU tensors when torch was built with
it, "aten" always uses ``F.linear``. Anything else (CUDA, float64, bf16, autocast, empty inputs, DeepSpeed ZeRO-3
partitioned weights, whose gather/release hooks expect ``F.linear``) goes to ``F.linear`` as well.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

LINEAR_BACKENDS = ("auto", "onednn", "aten")


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _mm(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ w.T (+ bias) in oneDNN; a may be any 2-D or N-D strided view, w any 2-D view (transposes are free)."""
    return torch.ops.mkldnn._linear_pointwise(a, w, bias, "none", [], "")


# oneDNN builds (JIT-compiles) a matmul primitive per problem shape and caches it. The token count changes with
# every batch (QM9: ~900-1,400 atoms in a batch of 64), so without rounding nearly every call of a step would
# build new primitives (a GEMM with a new shape measured ~0.5 ms slower). Rows are padded with zeros to a multiple
# of ROW_BUCKET: a handful of shapes per layer, all cached after the first steps. Zero rows add nothing to any
# product (exact) and cost at most ROW_BUCKET - 1 rows of work. Measured gain on a whole SymDiff+ step: ~4%, at
# the edge of this machine's noise.
ROW_BUCKET = 64


def _pad_rows(a: torch.Tensor, rows: int) -> torch.Tensor:
    if a.shape[0] == rows:
        return a
    # zero only the added rows: filling the whole buffer first costs a second pass over large inputs (the EGNN's
    # edge layers have ~20,000 rows a QM9 batch)
    out = a.new_empty(rows, a.shape[1])
    out[:a.shape[0]] = a
    out[a.shape[0]:] = 0
    return out


class _OneDNNLinear(torch.autograd.Function):
    """y = x @ W^T + b for 2-D x [M, in], computed on rows padded to a multiple of ROW_BUCKET."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        m = x.shape[0]
        mp = -(-m // ROW_BUCKET) * ROW_BUCKET
        xp = _pad_rows(x, mp)
        ctx.save_for_backward(xp, weight)
        ctx.has_bias = bias is not None
        ctx.rows = m
        return _mm(xp, weight, bias)[:m]

    @staticmethod
    def backward(ctx, gy: torch.Tensor):  # type: ignore[override]
        xp, weight = ctx.saved_tensors
        m = ctx.rows
        gx = gw = gb = None
        gyp = _pad_rows(gy, xp.shape[0])
        if ctx.needs_input_grad[0]:
            gx = _mm(gyp, weight.t())[:m]  # gy @ W
        if ctx.needs_input_grad[1]:
            gw = _mm(gyp.t(), xp.t())  # gy^T @ x; the zero rows add nothing
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum(0)
        return gx, gw, gb


def use_onednn(x: torch.Tensor, weight: torch.Tensor, backend: str) -> bool:
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"unknown linear backend '{backend}' (choose from {', '.join(LINEAR_BACKENDS)})")
    if backend == "aten":
        return False
    ok = (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
          and x.numel() > 0 and x.dim() >= 2 and not torch.is_autocast_enabled("cpu")
          and not hasattr(weight, "ds_id") and onednn_available())
    if backend == "onednn" and not ok and x.device.type == "cpu" and not onednn_available():
        raise RuntimeError("linear backend 'onednn' asked for, but this torch build has no oneDNN linear op")
    return ok


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           backend: str = "auto") -> torch.Tensor:
    """x @ weight.T + bias, as ``F.linear``, through oneDNN where that is faster (see the module docstring)."""
    if use_onednn(x, weight, backend):
        y = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(torch.nn.Linear):
    """``nn.Linear`` (same parameters, init and state dict) whose product goes through ``linear`` above."""

    backend: str = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.backend)


def set_linear_backend(module: torch.nn.Module, backend: str) -> None:
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"unknown linear backend '{backend}' (choose from {', '.join(LINEAR_BACKENDS)})")
    for m in module.modules():
        if isinstance(m, Linear):
            m.backend = backend

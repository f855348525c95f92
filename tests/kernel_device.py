"""Run the kernel tests' fused ops on another device and dtype: ``pytest --kernel-device cuda --kernel-dtype bfloat16``.

The kernel tests build CPU tensors and call the Triton ops, which on CPU run under TRITON_INTERPRET. With
``--kernel-device`` every fused entry point is wrapped: its tensor arguments are moved to that device (floating
ones other than float64 cast to ``--kernel-dtype``), the real compiled kernel runs there, and the result comes back
to the caller's device and dtype through differentiable ``.to`` calls, so forward values, gradients and gradchecks
are all taken through the device kernels while the tests themselves stay as they are.

bfloat16 rounds the kernels' inputs (8 mantissa bits) and outputs. So that a test still compares like with like,
the references (``symdiff.kernels.*_ref``) then see their floating inputs rounded to bf16 precision too (outside
``torch.autograd.gradcheck``, whose finite differences need the exact inputs), and ``torch.testing.assert_close``
is given bf16's tolerances (rtol 1.6e-2 as torch's bf16 default; atol at least two bf16 steps of the largest
expected entry). Checks written as plain
comparisons keep their float32 thresholds: the suite reports which fail.
The GPU suite (benchmarks/gpu_suite.py) uses this; nothing in the package reads it.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch

# module -> names of the fused entry points the dispatchers in symdiff.kernels import at call time
ENTRY_POINTS = {"symdiff.kernels.gaussian": ("gaussian_embedding_triton",),
                "symdiff.kernels.com": ("com_project_rotate_triton", "com_project_rotate_varlen_triton"),
                "symdiff.kernels.qr": ("batched_qr_triton",)}
REFERENCES = ("gaussian_embedding_ref", "com_project_rotate_ref", "com_project_rotate_varlen_ref", "batched_qr_ref")
BF16_RTOL, BF16_ATOL, BF16_SCALED_ATOL = 1.6e-2, 1e-5, 2 ** -7
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _there(a: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if not isinstance(a, torch.Tensor):
        return a
    cast = a.is_floating_point() and a.dtype != torch.float64
    return a.to(device=device, dtype=dtype if cast else a.dtype)


def on_device(fn: Callable, device: torch.device, dtype: torch.dtype) -> Callable:
    """``fn`` computed on ``device`` in ``dtype``, its result returned where and as the first tensor argument was."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        home = next(a for a in args if isinstance(a, torch.Tensor))
        out = fn(*[_there(a, device, dtype) for a in args], **{k: _there(v, device, dtype) for k, v in kwargs.items()})
        back = home.dtype if home.is_floating_point() else out.dtype
        return out.to(device=home.device, dtype=back)
    run.__wrapped_for_device__ = (str(device), str(dtype))  # type: ignore[attr-defined]
    return run


def install(device: str, dtype_name: str, monkeypatch: Any = None) -> list[str]:
    """Wrap every fused entry point (and, for bf16, assert_close's tolerances). Returns the names wrapped."""
    import importlib

    dev, dtype = torch.device(device), DTYPES[dtype_name]
    setter = monkeypatch.setattr if monkeypatch is not None else setattr
    done = []
    for mod_name, names in ENTRY_POINTS.items():
        mod = importlib.import_module(mod_name)
        for name in names:
            setter(mod, name, on_device(getattr(mod, name), dev, dtype))
            done.append(f"{mod_name}.{name}")
    if dtype == torch.bfloat16:
        kernels = importlib.import_module("symdiff.kernels")
        for name in REFERENCES:
            setter(kernels, name, _on_bf16_inputs(getattr(kernels, name)))
        setter(torch.autograd, "gradcheck", _exact_inputs(torch.autograd.gradcheck))
        setter(torch.testing, "assert_close", _bf16_assert_close(torch.testing.assert_close))
    return done


_ROUNDING = [True]


def _on_bf16_inputs(ref: Callable) -> Callable:
    @functools.wraps(ref)
    def run(*args: Any, **kwargs: Any) -> Any:
        if _ROUNDING[0]:
            args = tuple(a.to(torch.bfloat16).to(a.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point()
                         else a for a in args)
        return ref(*args, **kwargs)
    return run


def _exact_inputs(gradcheck: Callable) -> Callable:
    @functools.wraps(gradcheck)
    def check(*args: Any, **kwargs: Any) -> Any:
        _ROUNDING[0] = False
        try:
            return gradcheck(*args, **kwargs)
        finally:
            _ROUNDING[0] = True
    return check


def _bf16_assert_close(inner: Callable) -> Callable:
    @functools.wraps(inner)
    def check(actual: Any, expected: Any, *args: Any, rtol: float | None = None, atol: float | None = None,
              **kwargs: Any) -> None:
        # bf16 errors scale with the operands, not with each element: centring or a sum that cancels leaves small
        # entries with the rounding of large ones, hence an absolute floor of two bf16 steps of the largest entry
        scale = float(torch.as_tensor(expected).detach().abs().max()) if torch.as_tensor(expected).numel() else 0.0
        return inner(actual, expected, *args, rtol=max(rtol or 0.0, BF16_RTOL),
                     atol=max(atol or 0.0, BF16_ATOL, BF16_SCALED_ATOL * scale), **kwargs)
    return check

"""`symdiff profile`: throughput of the fused kernels against the eager and torch.compile'd references.

For each kernel and shape it times the forward and forward+backward of three variants -- the eager PyTorch
reference, ``torch.compile`` of that reference, and the fused Triton op -- and reports the median and 20/80 %
quantiles, achieved GB/s and FLOP/s against ceilings measured on the same device in the same run (a large
device-to-device copy; a large fp32 matmul), speed-ups, and the peak memory one call allocates.

On a GPU the timer is ``triton.testing.do_bench`` and peak memory comes from the CUDA caching allocator. On CPU the
timer is ``torch.utils.benchmark`` and peak memory comes from the torch profiler's memory timeline; the fused
variant is skipped there because Triton only runs through TRITON_INTERPRET, a Python emulator whose timings say
nothing about the kernels. Byte and FLOP counts are analytic models of the fused algorithms (see
docs/kernels.md), applied to every variant so the rates compare the same useful work.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from symdiff.errors import UserError
from symdiff.outputs import add_overwrite_flag, check_output_file, write_text_atomic

KERNELS = ("gaussian", "com", "qr")
# name -> (batch B, atoms N). qm9 / geom are the training shapes (SPEC: QM9 <= 29 atoms, GEOM-Drugs <= 181);
# "stream" is a large batch for the memory-bound ops: at the training shapes they move well under 1 MB, a few
# microseconds at H100 bandwidth, so launch latency decides their time. The stream batch moves ~0.2-0.3 GB per
# call (QR per molecule moves 1/12 of what CoM does for 29 atoms, hence its larger B), enough to measure bandwidth.
SHAPES: dict[str, tuple[int, int]] = {"qm9": (256, 29), "geom": (64, 181), "stream": (262144, 29)}
STREAM_BATCH = {"com": 262144, "qr": 4194304}
DEFAULT_SHAPES = ("qm9", "geom", "stream")
MEMORY_BOUND = {"gaussian": False, "com": True, "qr": True}
TARGETS = {"speedup_vs_eager": 3.0, "speedup_vs_compiled": 1.5, "frac_copy_bw": 0.70}
CPU_TRITON_SKIP = ("Triton kernels need a GPU; on CPU they only run under TRITON_INTERPRET=1, a Python emulator "
                   "whose timings say nothing about the kernels")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="OUT", help="also write all numbers to this JSON file")
    add_overwrite_flag(p)
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma list of {', '.join(KERNELS)} (default all)")
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                   help="comma list of " + ", ".join(f"{k} (B={b}, N={n})" for k, (b, n) in SHAPES.items())
                   + "; the stream shape is only run for the memory-bound kernels")
    p.add_argument("--batch", type=int, help="override the batch size B of every shape")
    p.add_argument("--atoms", type=int, help="override the atom count N of every shape")
    p.add_argument("--num-gaussians", type=int, help="K for the Gaussian embedding (default: --config's, else 184)")
    p.add_argument("--config", help="a run config: its model.num_gaussians is the default K")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (it compiles for ~10 s "
                   "per kernel and shape on CPU)")
    p.add_argument("--max-ref-gb", type=float, default=1.0,
                   help="CPU only: shrink B so the reference's B*N*N*K intermediates stay under this (default 1.0)")
    p.add_argument("--min-run-time", type=float, default=0.2, help="CPU: seconds of timing per measurement")
    p.add_argument("--rep-ms", type=int, default=100, help="GPU: do_bench repetition time per measurement (ms)")


# --------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    kernel: str
    shape: str
    B: int
    N: int
    K: int
    inputs: list[torch.Tensor]  # differentiable inputs, in call order
    ref: Callable[..., torch.Tensor]
    fused: Callable[..., torch.Tensor]
    bytes: dict[str, float]  # mode -> bytes moved by the fused algorithm
    flops: dict[str, float]  # mode -> floating-point operations


def _make_case(kernel: str, shape: str, B: int, N: int, K: int, device: torch.device) -> Case:
    from symdiff import kernels as kx

    g = torch.Generator(device="cpu").manual_seed(0)
    f4 = 4.0

    def leaf(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=g) * scale).to(device).requires_grad_()

    if kernel == "gaussian":
        mask = torch.ones(B, N, dtype=torch.bool, device=device)
        x, mu, sigma = leaf(B, N, 3, scale=1.5), leaf(K), leaf(K)
        with torch.no_grad():
            mu.uniform_(0, 3)
            sigma.uniform_(0, 3)
        pairs = B * N * N
        nbk = B * N * K * f4
        from symdiff.kernels.gaussian import BWD_BLOCKS
        # the backward's partial sums: mu and s per i-block, x per k-block
        n_part = (B * math.ceil(N / BWD_BLOCKS["BLOCK_I"]) * K * 2
                  + math.ceil(K / BWD_BLOCKS["BLOCK_K"]) * B * N * 3) * f4
        return Case(kernel, shape, B, N, K, [x, mu, sigma],
                    lambda a, m, s: kx.gaussian_embedding_ref(a, mask, m, s),
                    lambda a, m, s: kx.gaussian_embedding(a, mask, m, s, backend="triton"),
                    # per pair: distance ~9 flops; per pair and kernel: 6 (sub, 2 mul, scale, exp, add) forward,
                    # 20 more in the backward (recompute, three weighted sums, chain rule)
                    {"fwd": B * N * 16 + 2 * K * f4 + nbk,
                     "fwd+bwd": 2 * (B * N * 16 + 2 * K * f4) + 2 * nbk + B * N * 12 + n_part},
                    {"fwd": pairs * (9 + 6 * K), "fwd+bwd": pairs * (18 + 26 * K)})
    if kernel == "com":
        mask = torch.ones(B, N, dtype=torch.bool, device=device)
        x = leaf(B, N, 3, scale=2.0)
        R = torch.linalg.qr(torch.randn(B, 3, 3, generator=g, dtype=torch.float64))[0].float().to(device)
        R.requires_grad_()
        rows = B * N
        fwd_bytes = rows * (12 + 4 + 12) + B * 36
        return Case(kernel, shape, B, N, 0, [x, R],
                    lambda a, r: kx.com_project_rotate_ref(a, mask, r),
                    lambda a, r: kx.com_project_rotate(a, mask, r, backend="triton"),
                    {"fwd": fwd_bytes, "fwd+bwd": fwd_bytes + 2 * (rows * 28 + B * 36)},
                    {"fwd": rows * 24, "fwd+bwd": rows * (24 + 24 + 24)})
    if kernel == "qr":
        M = leaf(B, 3, 3)
        return Case(kernel, shape, B, 0, 0, [M], kx.batched_qr_ref, lambda a: kx.batched_qr(a, backend="triton"),
                    {"fwd": B * 72, "fwd+bwd": B * 72 + B * 108}, {"fwd": B * 120, "fwd+bwd": B * 370})
    raise UserError(f"--kernels: unknown kernel '{kernel}' (choose from {', '.join(KERNELS)})")


# --------------------------------------------------------------------------------------------- timing


class _Bench:
    """Device-specific timer and peak-memory probe."""

    def __init__(self, device: torch.device, args: argparse.Namespace) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.args = args

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], Any]) -> dict[str, float]:
        """Median and 20/80 % quantiles in milliseconds."""
        if self.cuda:
            from triton.testing import do_bench
            med, lo, hi = do_bench(fn, warmup=25, rep=self.args.rep_ms, quantiles=[0.5, 0.2, 0.8])
            return {"median_ms": float(med), "p20_ms": float(lo), "p80_ms": float(hi)}
        from torch.utils import benchmark
        m = benchmark.Timer(stmt="fn()", globals={"fn": fn},
                            num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=self.args.min_run_time)
        ts = sorted(m.times)
        q = lambda p: ts[min(len(ts) - 1, int(round(p * (len(ts) - 1))))]  # noqa: E731
        return {"median_ms": m.median * 1e3, "p20_ms": q(0.2) * 1e3, "p80_ms": q(0.8) * 1e3}

    def peak_mb(self, fn: Callable[[], Any]) -> float | None:
        """Peak bytes allocated during one call, above what was live before it."""
        if self.cuda:
            self.sync()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            self.sync()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            fn()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "mem.json")
            with warnings.catch_warnings():
                # deprecated in favour of a CUDA-only snapshot API; on CPU it is the only timeline there is
                warnings.simplefilter("ignore", FutureWarning)
                prof.export_memory_timeline(path, device="cpu")
            with open(path) as fh:
                _, sizes = json.load(fh)
        return max((sum(s) for s in sizes), default=0) / 2**20

    def ceilings(self) -> dict[str, Any]:
        """Copy bandwidth (read + write bytes / s) and fp32 matmul FLOP/s measured here and now."""
        n_copy = (1 << 28) if self.cuda else (1 << 24)  # 1 GiB / 64 MiB of float32
        src = torch.randn(n_copy, device=self.device)
        dst = torch.empty_like(src)
        t_copy = self.time(lambda: dst.copy_(src))["median_ms"] * 1e-3
        del src, dst
        n_mm = 8192 if self.cuda else 1024
        a = torch.randn(n_mm, n_mm, device=self.device)
        b = torch.randn(n_mm, n_mm, device=self.device)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # the kernels run fp32 on CUDA cores, so compare to that
        try:
            t_mm = self.time(lambda: a @ b)["median_ms"] * 1e-3
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        return {"copy_GBps": 2 * n_copy * 4 / t_copy / 1e9, "copy_bytes": n_copy * 4,
                "matmul_fp32_TFLOPs": 2 * n_mm ** 3 / t_mm / 1e12, "matmul_n": n_mm}


def _fwd(f: Callable, inputs: list[torch.Tensor]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return f(*inputs)
    return run


def _fwd_bwd(f: Callable, inputs: list[torch.Tensor]) -> Callable[[], Any]:
    with torch.no_grad():
        out = f(*inputs)
    # randn of the shape, not randn_like: the latter follows the output's strides, which differ between variants
    gout = torch.randn(out.shape, dtype=out.dtype, device=out.device)

    def run() -> Any:
        out = f(*inputs)
        return torch.autograd.grad(out, inputs, gout)
    return run


def _measure(bench: _Bench, case: Case, f: Callable, mode: str,
             ceil: dict[str, Any]) -> dict[str, Any]:
    fn = _fwd(f, case.inputs) if mode == "fwd" else _fwd_bwd(f, case.inputs)
    t0 = time.perf_counter()
    fn()  # warm-up: compiles (Triton JIT, inductor) happen here, outside the timed region
    bench.sync()
    first_s = time.perf_counter() - t0
    res: dict[str, Any] = bench.time(fn)
    sec = res["median_ms"] * 1e-3
    res["GBps"] = case.bytes[mode] / sec / 1e9
    res["GFLOPs"] = case.flops[mode] / sec / 1e9
    res["frac_copy_bw"] = res["GBps"] / ceil["copy_GBps"]
    res["frac_matmul"] = res["GFLOPs"] / (ceil["matmul_fp32_TFLOPs"] * 1e3)
    try:
        res["peak_MB"] = bench.peak_mb(fn)
    except Exception as exc:  # the CPU memory timeline is a profiler feature; a failure must not lose the timings
        res["peak_MB"] = None
        res["peak_note"] = f"peak memory unavailable: {exc}"
    res["first_call_s"] = first_s
    return res


def _max_err(case: Case) -> float:
    with torch.no_grad():
        a = case.fused(*case.inputs).double()
        b = case.ref(*[t.double() for t in case.inputs])
    return float((a - b).abs().max())


# --------------------------------------------------------------------------------------------- driver


def _parse_list(text: str, allowed, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise UserError(f"--{what}: unknown {', '.join(bad) or '(empty)'} (choose from {', '.join(allowed)})")
    return items


def _resolve_k(args: argparse.Namespace) -> int:
    if args.num_gaussians is not None:
        if args.num_gaussians < 1:
            raise UserError(f"--num-gaussians must be >= 1, got {args.num_gaussians}")
        return args.num_gaussians
    if args.config:
        from symdiff.config import load_config
        return int(load_config(args.config).model.num_gaussians)
    return 184


def _cpu_batch(kernel: str, B: int, N: int, K: int, max_gb: float) -> int:
    """Largest B <= requested whose eager reference keeps its few B*N*N*K (or B*N) intermediates under max_gb."""
    per_mol = (6 * N * N * K * 4) if kernel == "gaussian" else (16 * max(N, 3) * 3 * 4)
    return max(1, min(B, int(max_gb * 1e9 // per_mol)))


def _device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is visible to torch")
        return torch.device("cuda")
    return torch.device("cpu")


def run(args: argparse.Namespace) -> int:
    if args.json:  # before minutes of timing, not after
        check_output_file(args.json, "--json", args.overwrite)
    kernels = _parse_list(args.kernels, KERNELS, "kernels")
    shapes = _parse_list(args.shapes, tuple(SHAPES), "shapes")
    for name in ("batch", "atoms"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name} must be >= 1, got {v}")
    K = _resolve_k(args)
    device = _device(args.device)
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise UserError("TRITON_INTERPRET is set: the fused kernels would run in the Python emulator, not on the "
                        "GPU; unset it to profile")
    bench = _Bench(device, args)
    notes: list[str] = []
    if device.type == "cpu":
        notes.append(f"device is CPU: fused Triton variant skipped ({CPU_TRITON_SKIP})")
        if torch.cuda.is_available():
            notes.append("a GPU is present; run with --device auto or cuda for the fused numbers")
    ceil = bench.ceilings()
    rows: list[dict[str, Any]] = []
    for kernel in kernels:
        for shape in shapes:
            if shape == "stream" and not MEMORY_BOUND[kernel]:
                continue
            B, N = SHAPES[shape]
            if shape == "stream":
                B = STREAM_BATCH[kernel]
            B = args.batch or B
            N = args.atoms or N
            if device.type == "cpu":
                Bc = _cpu_batch(kernel, B, N, K, args.max_ref_gb)
                if Bc < B:
                    notes.append(f"{kernel}/{shape}: B reduced {B} -> {Bc} on CPU to keep the reference under "
                                 f"{args.max_ref_gb} GB (--max-ref-gb)")
                    B = Bc
            case = _make_case(kernel, shape, B, N, K, device)
            compiled = None
            if not args.no_compile:
                import torch._dynamo as dynamo
                dynamo.reset()  # a fresh compile per case: no recompile limits, no cross-shape guards
                compiled = torch.compile(case.ref, dynamic=False)
            err = _max_err(case) if device.type == "cuda" else None
            for mode in ("fwd", "fwd+bwd"):
                variants: dict[str, Any] = {"eager": _measure(bench, case, case.ref, mode, ceil)}
                variants["compiled"] = (_measure(bench, case, compiled, mode, ceil) if compiled
                                        else {"skipped": "--no-compile"})
                variants["triton"] = (_measure(bench, case, case.fused, mode, ceil)
                                      if device.type == "cuda" else {"skipped": CPU_TRITON_SKIP})
                row = {"kernel": kernel, "shape": shape, "B": B, "N": N if kernel != "qr" else None,
                       "K": K if kernel == "gaussian" else None,
                       "mode": mode, "bytes": case.bytes[mode], "flops": case.flops[mode],
                       "memory_bound": MEMORY_BOUND[kernel], "variants": variants}
                _add_comparisons(row, err)
                rows.append(row)
                print(_format_rows([row], header=not rows[:-1]), flush=True)
    report = {"device": _device_name(device), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "host": socket.gethostname(), "platform": platform.platform(), "torch": torch.__version__,
              "triton": _triton_version(), "num_threads": torch.get_num_threads(), "ceilings": ceil,
              "targets": TARGETS, "notes": notes, "results": rows}
    print(f"\nceilings on {report['device']}: copy {ceil['copy_GBps']:.1f} GB/s, fp32 matmul "
          f"{ceil['matmul_fp32_TFLOPs']:.2f} TFLOP/s")
    for n in notes:
        print("note:", n)
    if args.json:
        _write_json(Path(args.json), report)
        print(f"wrote {args.json}")
    return 0


def _add_comparisons(row: dict[str, Any], err: float | None) -> None:
    v = row["variants"]
    if "median_ms" in v["compiled"]:
        v["compiled"]["speedup_vs_eager"] = v["eager"]["median_ms"] / v["compiled"]["median_ms"]
    tri = v["triton"]
    if "median_ms" not in tri:
        return
    tri["max_abs_err_vs_ref_fwd"] = err
    tri["speedup_vs_eager"] = v["eager"]["median_ms"] / tri["median_ms"]
    if "median_ms" in v["compiled"]:
        tri["speedup_vs_compiled"] = v["compiled"]["median_ms"] / tri["median_ms"]
    met = {"speedup_vs_eager": tri["speedup_vs_eager"] >= TARGETS["speedup_vs_eager"]}
    if "speedup_vs_compiled" in tri:
        met["speedup_vs_compiled"] = tri["speedup_vs_compiled"] >= TARGETS["speedup_vs_compiled"]
    if row["memory_bound"]:
        met["frac_copy_bw"] = tri["frac_copy_bw"] >= TARGETS["frac_copy_bw"]
    tri["targets_met"] = met


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _format_rows(rows: list[dict[str, Any]], header: bool) -> str:
    cols = f"{'kernel':<9}{'shape':<7}{'B':>6}{'N':>5}{'mode':>9} {'variant':<9}{'median ms':>11} {'p20-p80 ms':<19}" \
           f"{'GB/s':>9}{'%copy':>7}{'GFLOP/s':>10}{'%mm':>6}{'peak MB':>9}{'x eager':>8}{'x comp':>7}"
    lines = [cols, "-" * len(cols)] if header else []
    for r in rows:
        for name, m in r["variants"].items():
            lead = f"{r['kernel']:<9}{r['shape']:<7}{r['B']:>6}{r['N'] or '-':>5}{r['mode']:>9} {name:<9}"
            if "median_ms" not in m:
                lines.append(lead + f"skipped: {m['skipped'][:70]}")
                continue
            spread = f"{m['p20_ms']:.4g}-{m['p80_ms']:.4g}"
            lines.append(lead + f"{m['median_ms']:>11.4g} {spread:<18}"
                         f"{m['GBps']:>9.2f}{100 * m['frac_copy_bw']:>6.1f}%{m['GFLOPs']:>10.1f}"
                         f"{100 * m['frac_matmul']:>5.1f}%{_fmt(m.get('peak_MB'), '9.3f'):>9}"
                         f"{_fmt(m.get('speedup_vs_eager'), '8.2f'):>8}{_fmt(m.get('speedup_vs_compiled'), '7.2f'):>7}")
    return "\n".join(lines)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _triton_version() -> str | None:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def _write_json(path: Path, report: dict[str, Any]) -> None:
    """Temp file + rename: an interrupted run never leaves a half-written JSON over a good one."""
    write_text_atomic(path, json.dumps(report, indent=1) + "\n", "--json")

"""Float32 dense layers on this CPU: torch's BLAS (F.linear -> MKL) against oneDNN (symdiff.kernels.linear).

Times forward, input-gradient and weight-gradient products at the shapes of a SymDiff+ / SymDiff+++ training step
on a real QM9 batch of 64 (about 1,150 atom tokens), median of repeats, process CPU time and wall time, and the
largest relative difference of the two results (both are IEEE float32; only the summation order differs).

Usage: .venv/bin/python benchmarks/bench_linear.py [--threads 1 2] [--repeats 30] [--out results/linear_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# OMP_WAIT_POLICY is left to the runtime's default: speed is measured as a user runs it (bench_model_speed.py).
import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

TOKENS = 1152  # 64 QM9 molecules x 18 atoms
# (name, in, out): SymDiff+ eps DiT (H=294), gamma DiT (m=128), SymDiff+++ (H=384)
SHAPES = [("plus.qkv", 294, 882), ("plus.fc1", 294, 1176), ("plus.fc2", 588, 294), ("plus.proj", 294, 294),
          ("gamma.fc1", 128, 512), ("gamma.qkv", 128, 384), ("ppp.fc1", 384, 1536), ("ppp.fc2", 768, 384)]


def timed(fn, repeats: int) -> tuple[float, float]:
    for _ in range(3):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        c, t = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return float(np.median(walls)), float(np.median(cpus))


def main() -> int:
    from _machine import machine

    from symdiff.kernels.linear import _mm, onednn_available

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "linear_cpu.json"))
    args = ap.parse_args()
    if not onednn_available():
        print("this torch build has no oneDNN linear op", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(0)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, k, n in SHAPES:
            x, w = torch.randn(TOKENS, k, generator=g), torch.randn(n, k, generator=g)
            gy = torch.randn(TOKENS, n, generator=g)
            flops = 2.0 * TOKENS * k * n
            for op, aten, ours in (("forward", lambda: F.linear(x, w), lambda: _mm(x, w)),
                                   ("grad_input", lambda: gy @ w, lambda: _mm(gy, w.t())),
                                   ("grad_weight", lambda: gy.t() @ x, lambda: _mm(gy.t(), x.t()))):
                ref, got = aten(), ours()
                rel = float((got - ref).abs().max() / ref.abs().max())
                wa, ca = timed(aten, args.repeats)
                wo, co = timed(ours, args.repeats)
                row = {"threads": threads, "layer": name, "in": k, "out": n, "op": op,
                       "aten_ms": wa * 1e3, "onednn_ms": wo * 1e3, "aten_gflops_cpu": flops / ca / 1e9,
                       "onednn_gflops_cpu": flops / co / 1e9, "speedup_wall": wa / wo, "speedup_cpu": ca / co,
                       "max_rel_diff": rel}
                rows.append(row)
                print(f"{threads} thr {name:10s} {op:11s} aten {wa * 1e3:6.2f} ms  onednn {wo * 1e3:6.2f} ms  "
                      f"x{wa / wo:4.2f} (cpu x{ca / co:4.2f})  rel diff {rel:.1e}", flush=True)
    summary = {str(t): {"median_speedup_wall": float(np.median([r["speedup_wall"] for r in rows if r["threads"] == t])),
                        "median_speedup_cpu": float(np.median([r["speedup_cpu"] for r in rows if r["threads"] == t]))}
               for t in args.threads}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine(), "tokens": TOKENS, "load_average": list(os.getloadavg()),
                               "summary": summary, "rows": rows}, indent=2) + "\n")
    os.replace(tmp, out)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

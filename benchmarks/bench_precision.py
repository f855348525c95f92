"""bf16 against float32 training speed on this CPU, measured through `symdiff train` in one run.

Both precisions train the same config on the same shards with DeepSpeed ZeRO-1 on one process (bf16 keeps fp32
master weights only under ZeRO, so fp32 runs at the same stage for a like-for-like step). Passes alternate the
order; each pass reads it/s and molecules/s from the run's metrics.jsonl (train.log_every=1) after dropping the
first ``--warmup`` steps, and the figures are medians over passes of each run's median. The diffusion state is
float32 in both (SPEC §2.6): bf16 changes only the network body's arithmetic.

Usage: .venv/bin/python benchmarks/bench_precision.py [--config configs/qm9_tiny.yaml] [--passes 3] [--steps 120]
       [--warmup 20] [--threads 2] [--data DIR]   (default data: the bundled QM9 subset, built if needed)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def run_once(config: str, data: str, precision: str, steps: int, threads: int, run_dir: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "symdiff.cli", "train", "--config", config, "--run-dir", str(run_dir),
           f"data.root={data}", f"train.max_steps={steps}", f"train.precision={precision}", "train.zero_stage=1",
           "train.log_every=1", f"train.ckpt_every={steps}"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"symdiff train ({precision}) failed:\n{res.stderr[-3000:]}")
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "qm9_tiny.yaml"))
    ap.add_argument("--data", default=None)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="result stem in benchmarks/results (default bench_precision_cpu)")
    args = ap.parse_args()

    from _machine import machine, save

    from symdiff.data.bundled import ensure_bundled_shards

    mach = machine()
    data = args.data or str(ensure_bundled_shards())
    per_pass: dict[str, list[dict]] = {"fp32": [], "bf16": []}
    with tempfile.TemporaryDirectory() as tmp:
        for p in range(args.passes):
            order = ("fp32", "bf16") if p % 2 == 0 else ("bf16", "fp32")
            for prec in order:
                rows = run_once(args.config, data, prec, args.steps, args.threads, Path(tmp) / f"{prec}_{p}")
                timed = rows[args.warmup:]
                per_pass[prec].append({
                    "it_per_s": statistics.median(r["it_per_s"] for r in timed),
                    "molecules_per_s": statistics.median(r["molecules_per_s"] for r in timed),
                    "final_loss": rows[-1]["loss"], "load_average_1min": round(os.getloadavg()[0], 2)})
                print(f"pass {p} {prec}: {per_pass[prec][-1]}", flush=True)
    summary = {prec: {k: statistics.median(r[k] for r in runs) for k in ("it_per_s", "molecules_per_s")}
               for prec, runs in per_pass.items()}
    ratio = summary["bf16"]["it_per_s"] / summary["fp32"]["it_per_s"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    res = {"machine": mach, "commit": commit, "config": os.path.relpath(args.config, REPO), "data": data,
           "passes": args.passes, "steps": args.steps, "warmup_dropped": args.warmup, "threads": args.threads,
           "zero_stage": 1, "per_pass": per_pass, "median": summary, "bf16_over_fp32_it_per_s": ratio}
    table = ["| precision | it/s | molecules/s |", "|---|---|---|"]
    table += [f"| {prec} | {s['it_per_s']:.2f} | {s['molecules_per_s']:.1f} |" for prec, s in summary.items()]
    table.append(f"\nbf16 / fp32 (it/s): {ratio:.2f}x")
    save(res, args.out or "bench_precision_cpu", "bf16 against float32 training on the CPU (symdiff train)",
         f"`symdiff train` of {res['config']}, ZeRO-1, one process, {args.threads} threads, {args.steps} steps per "
         f"run with the first {args.warmup} dropped, {args.passes} alternating passes, medians.", table)
    print("\n".join(table))


if __name__ == "__main__":
    main()

"""Cost of the ODE likelihood of vpsde and flow, measured through the product (`symdiff eval --nll`'s function).

Trains configs/qm9_tiny_vpsde.yaml and configs/qm9_tiny_flow.yaml for ``--train-steps`` steps with `symdiff train`
(a subprocess; an existing run is reused), then scores the first ``--molecules`` molecules of the bundled QM9 test
split with :func:`symdiff.eval.nll.run_split_nll` (what `symdiff eval --nll` calls), ``--repeats`` times for each
solver setting, one batch of all the molecules. Records the median seconds per molecule, the field evaluations per
batch (each one forward pass and one vector-Jacobian product per probe), the NLLs, the machine load and the commit.

Usage:
  .venv/bin/python benchmarks/bench_ode_nll.py [--run-root runs/bench_ode_nll] [--train-steps 300]
      [--molecules 8] [--repeats 3] [--out benchmarks/results/ode_nll_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

SETTINGS = {"dopri5_tol1e-5": {}, "rk4_20": {"solver": "rk4", "steps": 20}}


def train(process: str, run: Path, steps: int) -> None:
    if (run / "config.yaml").is_file() and any(run.glob("checkpoints/*")):
        return
    cmd = [sys.executable, "-m", "symdiff.cli", "train", "--config", str(REPO / "configs" / f"qm9_tiny_{process}.yaml"),
           "--run-dir", str(run), "--resume", "never", f"train.max_steps={steps}", f"train.ckpt_every={steps}"]
    subprocess.run(cmd, check=True, cwd=REPO)


def main() -> int:
    from _machine import git_commit, machine
    from symdiff.eval.nll import run_split_nll

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-root", default=str(REPO / "runs" / "bench_ode_nll"))
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--molecules", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ode_nll_cpu.json"))
    args = ap.parse_args()
    res: dict = {"machine": machine(), "commit": git_commit(), "train_steps": args.train_steps,
                 "molecules": args.molecules, "repeats": args.repeats,
                 "data_root": "bundled:qm9 (the run config's)", "split": "test",
                 "torch_threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None, "cells": {}}
    for process in ("vpsde", "flow"):
        run = Path(args.run_root) / process
        train(process, run, args.train_steps)
        for name, ode in SETTINGS.items():
            reps = [run_split_nll(str(run), None, "test", batch_size=args.molecules, seed=r, ode=ode,
                                  max_molecules=args.molecules) for r in range(args.repeats)]
            secs = [r["seconds"] / r["n_molecules"] for r in reps]
            res["cells"][f"{process}_{name}"] = {
                "process": process, "likelihood": reps[0]["likelihood"],
                "seconds_per_molecule_median": round(statistics.median(secs), 4),
                "seconds_per_molecule": [round(s, 4) for s in secs],
                "field_evaluations_per_batch": [r["ode_evaluations_per_batch"] for r in reps],
                "nll": [round(r["nll"], 3) for r in reps], "load_average_1min": round(os.getloadavg()[0], 2)}
            print(name, process, res["cells"][f"{process}_{name}"], flush=True)
    res["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

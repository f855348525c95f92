"""Memorisation check of the whole pipeline: can the product reproduce 64 real QM9 molecules it trained on?

A diffusion model that cannot memorise 64 molecules has a defect at low noise (issue 18). Everything goes through
the product: 64 molecules of the EDM training split of ``../shared/data/qm9/qm9.npz`` (plus a few valid/test ones,
which the trainer never reads) are written in the qm9.npz layout and built into shards by `symdiff data build`;
`symdiff train` trains on them (DeepSpeed, ShardLoader, EMA, checkpoints) until the loss plateaus or the CPU budget
is spent (user + system time of the trainer's process tree, polled; SIGTERM then checkpoints and stops it, as a
preemption does); `symdiff sample` draws molecules from the EMA weights (sampler and steps recorded). The score is
the share of samples that are stable (EDM rules) *and* whose canonical SMILES (RDKit, the EDM protocol's) is one of
the training molecules' SMILES, computed the same way.

Plateau: the mean logged loss of the last ``--window`` steps improved by less than ``--plateau-rel`` on the
window before it (checked after ``--min-steps``).

Usage:
  .venv/bin/python benchmarks/bench_memorise.py --work runs/memorise [--cpu-budget-min 30] [--n-samples 200]
      [--steps 1000] [--sampler ancestral] [--threads 2] [--out benchmarks/results/memorise_qm9_64.json]
      [key.sub=value ...]    (overrides for `symdiff train`, e.g. model.time_input=log_snr)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

GOAL = ">= 90% of samples stable and in the training set within 30 CPU minutes of training"


def subset_npz(src: Path, out: Path, n_train: int, seed: int) -> list[int]:
    """Write ``n_train`` EDM-train molecules (and 8 valid, 8 test) of ``src`` in the qm9.npz layout; their rows."""
    import numpy as np

    d = np.load(src)
    split = d["split_edm"]
    rng = np.random.default_rng(seed)
    rows = [np.sort(rng.choice(np.flatnonzero(split == s), k, replace=False)) for s, k in ((0, n_train), (1, 8),
                                                                                           (2, 8))]
    idx = np.concatenate(rows)
    off = d["offsets"]
    atoms = np.concatenate([np.arange(off[i], off[i + 1]) for i in idx])
    counts = off[idx + 1] - off[idx]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.npz")
    np.savez(tmp, mol_id=d["mol_id"][idx], offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
             atomic_numbers=d["atomic_numbers"][atoms], positions=d["positions"][atoms], split_edm=split[idx])
    os.replace(tmp, out)
    return [int(i) for i in rows[0]]


def tree_cpu_seconds(proc: Any) -> float:
    """User + system CPU seconds of a psutil process and its children (DeepSpeed may spawn workers)."""
    import psutil

    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def logged_losses(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:  # a line being written
            continue
        if "loss" in r and "step" in r:
            rows.append((int(r["step"]), float(r["loss"])))
    return rows


def plateaued(rows: list[tuple[int, float]], window: int, rel: float, min_steps: int) -> bool:
    if not rows or rows[-1][0] < max(min_steps, 2 * window):
        return False
    last = rows[-1][0]
    recent = [v for s, v in rows if s > last - window]
    before = [v for s, v in rows if last - 2 * window < s <= last - window]
    if not recent or not before:
        return False
    a, b = sum(recent) / len(recent), sum(before) / len(before)
    return (b - a) < rel * b


def run(cmd: list[str], env: dict[str, str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)


def train(args: argparse.Namespace, data: Path, run_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    import psutil

    from symdiff.train.launch import EXIT_REQUEUE

    cmd = [sys.executable, "-m", "symdiff.cli", "train", "--config", str(args.config), "--run-dir", str(run_dir),
           "--resume", "never", f"data.root={data}", f"train.max_steps={args.max_steps}",
           "data.batch_size=64", f"train.ckpt_every={args.ckpt_every}", "train.eval_every=0", *args.overrides]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    ps = psutil.Process(proc.pid)
    cpu, why = 0.0, "max_steps"
    while proc.poll() is None:
        time.sleep(args.poll_s)
        cpu = max(cpu, tree_cpu_seconds(ps))
        if cpu >= args.cpu_budget_min * 60:
            why = "cpu_budget"
        elif plateaued(logged_losses(run_dir), args.window, args.plateau_rel, args.min_steps):
            why = "plateau"
        else:
            continue
        proc.send_signal(signal.SIGTERM)  # the trainer checkpoints, then exits 75 as on a preemption
        break
    rc = proc.wait()
    if rc not in (0, EXIT_REQUEUE):
        raise SystemExit(f"symdiff train exited with code {rc}")
    rows = logged_losses(run_dir)
    return {"train_command": cmd[1:], "stopped_by": why, "train_wall_s": time.perf_counter() - t0,
            "train_cpu_s": cpu, "train_cpu_min": cpu / 60.0, "steps": rows[-1][0] if rows else 0,
            "loss_curve": [{"step": s, "loss": v} for s, v in rows]}


def score(samples: Path, train_smiles: set[str]) -> dict[str, Any]:
    import numpy as np

    from symdiff.eval.metrics import evaluate_edm_protocol
    from symdiff.io.molfiles import read_molecules

    res = evaluate_edm_protocol(read_molecules(samples), "qm9", train_smiles=train_smiles)
    det = res.pop("_details")
    in_train = np.array([s is not None and s in train_smiles for s in det.smiles])
    hits = sorted({s for s, ok in zip(det.smiles, det.mol_stable & in_train) if ok})
    return {"stable_and_in_training_set": float((det.mol_stable & in_train).mean()),
            "in_training_set": float(in_train.mean()), "atom_stability": res["atom_stability"],
            "mol_stability": res["mol_stability"], "validity": res["validity"], "uniqueness": res["uniqueness"],
            "distinct_training_molecules_reproduced": len(hits)}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="work directory (must not exist): data, run, samples")
    ap.add_argument("--config", default=str(REPO / "configs" / "qm9_tiny.yaml"))
    ap.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "qm9" / "qm9.npz"))
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-budget-min", type=float, default=30.0)
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--ckpt-every", type=int, default=1000)
    ap.add_argument("--window", type=int, default=1000)
    ap.add_argument("--plateau-rel", type=float, default=0.02)
    ap.add_argument("--min-steps", type=int, default=4000)
    ap.add_argument("--poll-s", type=float, default=10.0)
    ap.add_argument("--n-samples", type=int, default=200)
    ap.add_argument("--steps", type=int, default=1000, help="sampling steps")
    ap.add_argument("--sampler", default="ancestral")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "memorise_qm9_64.json"))
    ap.add_argument("overrides", nargs="*", help="config overrides for symdiff train (key.sub=value)")
    args = ap.parse_args(argv)

    import numpy as np
    import psutil

    from _machine import git_commit, machine
    from bench_model_learning_curve import write_json

    from symdiff.data.molecules import MoleculeSet
    from symdiff.eval.metrics import evaluate_edm_protocol

    work = Path(args.work)
    if work.exists():
        raise SystemExit(f"--work {work}: exists; the check starts from scratch in a new directory")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    result: dict[str, Any] = {"machine": machine(), "git_commit": git_commit(), "goal": GOAL,
                              "config": str(args.config), "overrides": args.overrides, "n_train": args.n_train,
                              "threads": args.threads}
    src = work / "source" / "qm9_subset.npz"
    rows = subset_npz(Path(args.source), src, args.n_train, args.seed)
    data = work / "data"
    run([sys.executable, "-m", "symdiff.cli", "data", "build", "--dataset", "qm9", "--source", str(src),
         "--out", str(data)], env)
    d = np.load(args.source)
    train_mols = MoleculeSet.from_lists(
        [d["atomic_numbers"][d["offsets"][i]:d["offsets"][i + 1]] for i in rows],
        [d["positions"][d["offsets"][i]:d["offsets"][i + 1]] for i in rows], ids=[int(d["mol_id"][i]) for i in rows])
    ref = evaluate_edm_protocol(train_mols, "qm9")
    train_smiles = {s for s in ref["_details"].smiles if s is not None}
    result.update({"qm9_ids": [int(d["mol_id"][i]) for i in rows], "training_set_distinct_smiles": len(train_smiles),
                   "training_set_mol_stability": ref["mol_stability"]})
    run_dir = work / "run"
    result.update(train(args, data, run_dir, env))
    result["load_average_after_training"] = list(os.getloadavg())
    write_json(Path(args.out), result)
    samples = work / "samples.sdf"
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "symdiff.cli", "sample", "--run", str(run_dir), "--n", str(args.n_samples),
           "--steps", str(args.steps), "--sampler", args.sampler, "--seed", "0", "--no-progress",
           "--out", str(samples)]
    print("+", " ".join(cmd), flush=True)
    p = psutil.Popen(cmd, env=env)
    cpu = 0.0
    while p.poll() is None:
        cpu = max(cpu, tree_cpu_seconds(p))
        time.sleep(1.0)
    if p.returncode != 0:
        raise SystemExit(f"symdiff sample exited with code {p.returncode}")
    result.update({"sampler": args.sampler, "sampling_steps": args.steps, "n_samples": args.n_samples,
                   "weights": "ema", "sample_wall_s": time.perf_counter() - t0, "sample_cpu_s": cpu})
    result.update(score(samples, train_smiles))
    result["goal_met"] = bool(result["stable_and_in_training_set"] >= 0.9 and result["train_cpu_min"] <= 30.0)
    result["load_average_end"] = list(os.getloadavg())
    write_json(Path(args.out), result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("loss_curve", "qm9_ids")}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

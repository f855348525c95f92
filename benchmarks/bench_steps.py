"""Sample quality against sampling steps for the three processes (vdm, vpsde, flow), measured through the product.

One network (the sizes of configs/qm9_tiny.yaml), one training budget (the same ``train.max_steps`` and batch) for
each process, trained on real QM9 by `symdiff train` in a subprocess, one process after another. Then every
sampler of each process at every step count: `symdiff sample` draws the molecules (wall-clock timed: seconds per
molecule) and `symdiff eval` scores them (EDM protocol: atom and molecule stability, validity, uniqueness).

Cells run in priority order: vdm ancestral at the largest step count and every cell at 100 steps first, with
``--samples`` molecules; the others after, with ``--samples-reduced`` (``--samples-reduced-long`` at the largest
step count, the costliest cells). The JSON is rewritten after every training and every cell, so a run cut off keeps
what it has; run the command again with the same ``--run-root`` and ``--out`` to go on where it stopped (finished
trainings and cells are kept, not redone). The markdown table and the PNG plot are made from the JSON each time.

Usage:
  .venv/bin/python benchmarks/bench_steps.py [--run-root runs/bench_steps] [--data-root DIR] [--train-steps 1000]
      [--steps 1000,250,100,50,20] [--samples 1000] [--samples-reduced 100] [--samples-reduced-long 50]
      [--processes vdm,vpsde,flow] [--train-only] [--out FILE.json] [key.sub=value ...]

Without ``--data-root`` the full QM9 shards are built once with `symdiff data build` from
../shared/data/qm9/qm9.npz into <run root>/qm9_shards. ``key=value`` overrides go to every training.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

CONFIGS = {"vdm": "qm9_tiny.yaml", "vpsde": "qm9_tiny_vpsde.yaml", "flow": "qm9_tiny_flow.yaml"}
QM9_NPZ = REPO.parent / "shared" / "data" / "qm9" / "qm9.npz"
METRICS = ("atom_stability", "mol_stability", "validity", "uniqueness")
GOALS = {"vdm_100_steps": "at 100 steps the best vdm sampler loses at most 1 point of atom stability against "
                          "1,000-step ancestral on the same model",
         "flow_heun_100_steps": "flow with Heun at 100 steps at least matches the vdm 1,000-step (ancestral) atom "
                                "stability at the same training budget"}
# The trainer's own log line of the sampler: "... in 12.3 s (0.123 s/molecule, 100 steps (heun), cpu)"
SAMPLE_LINE = re.compile(r"in ([0-9.]+) s \(([0-9.]+) s/molecule, (\d+) steps \((\w+)\)")


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def git_commit() -> str:
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def run_cli(args: list[str], threads: int) -> tuple[float, str]:
    """`python -m symdiff.cli ARGS` in a subprocess: (wall seconds, stderr+stdout); a failure stops the benchmark."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "symdiff.cli", *args]
    print("+", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"symdiff {args[0]} exited with code {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return wall, proc.stdout + proc.stderr


def data_root(args: argparse.Namespace, run_root: Path) -> Path:
    if args.data_root:
        return Path(args.data_root)
    out = run_root / "qm9_shards"
    if not (out / "manifest.json").is_file():
        run_cli(["data", "build", "--dataset", "qm9", "--source", str(QM9_NPZ), "--out", str(out)], args.threads)
    return out


def train(process: str, args: argparse.Namespace, run_dir: Path, data: Path) -> dict[str, Any]:
    overrides = [f"data.root={data}", f"train.max_steps={args.train_steps}", f"train.ckpt_every={args.train_steps}",
                 f"train.ema_decay={args.ema_decay}", "train.log_every=50", *args.overrides]
    load0 = list(os.getloadavg())
    cmd = ["train", "--config", str(REPO / "configs" / CONFIGS[process]), "--run-dir", str(run_dir),
           "--resume", "never", *overrides]
    wall, _ = run_cli(cmd, args.threads)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((run_dir / "config.yaml").read_text())))
    return {"command": ["symdiff", *cmd], "train_wall_s": round(wall, 1), "max_steps": int(cfg["train"]["max_steps"]),
            "batch_size": int(cfg["data"]["batch_size"]), "steps_logged": rows[-1]["step"],
            "it_per_s_median": round(statistics.median(r["it_per_s"] for r in rows), 3),
            "loss_last_logged": rows[-1]["loss"], "load_average_start": load0,
            "load_average_end": list(os.getloadavg()), "config": cfg}


def plan(processes: list[str], steps: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (process, sampler, steps) cell with its sample count, the priority cells first."""
    from symdiff.config import PROCESS_SAMPLERS

    top = max(steps)
    cells = []
    for p in processes:
        for s in (x for x in PROCESS_SAMPLERS[p] if not args.samplers or x in args.samplers):
            for k in steps:
                prio = k == 100 or (p == "vdm" and s == "ancestral" and k == top)
                n = args.samples if prio else (args.samples_reduced_long if k == top else args.samples_reduced)
                cells.append({"process": p, "sampler": s, "steps": k, "n_samples": n, "priority": prio})
    # priority cells, then the cheap ones before the costly ones so that a cut-off run loses the fewest
    return sorted(cells, key=lambda c: (not c["priority"], c["steps"] * c["n_samples"]))


def run_cell(cell: dict[str, Any], run_dir: Path, cell_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    stem = cell_dir / f"{cell['process']}_{cell['sampler']}_{cell['steps']}"
    samples, scores = stem.with_suffix(".npz"), stem.with_suffix(".json")
    load0 = list(os.getloadavg())
    sample_cmd = ["sample", "--run", str(run_dir), "--n", str(cell["n_samples"]), "--batch-size",
                  str(args.batch_size), "--steps", str(cell["steps"]), "--sampler", cell["sampler"], "--seed",
                  str(args.seed), "--out", str(samples), "--overwrite", "--no-progress"]
    wall, log = run_cli(sample_cmd, args.threads)
    m = SAMPLE_LINE.search(log)
    if not m or int(m.group(3)) != cell["steps"] or m.group(4) != cell["sampler"]:
        raise SystemExit(f"symdiff sample did not report {cell['steps']} {cell['sampler']} steps: {log[-500:]}")
    eval_cmd = ["eval", "--samples", str(samples), "--dataset", "qm9", "--json", str(scores), "--overwrite",
                "--no-novelty"]
    eval_wall, _ = run_cli(eval_cmd, args.threads)
    ev = json.loads(scores.read_text())
    if ev["n_molecules"] != cell["n_samples"]:
        raise SystemExit(f"{scores}: {ev['n_molecules']} molecules scored, {cell['n_samples']} sampled")
    return {**cell, **{k: ev[k] for k in METRICS}, "n_valid": ev["n_valid"], "n_unique": ev["n_unique"],
            # the sampler's own timing (model load excluded) and the whole command's wall clock
            "sample_s": float(m.group(1)), "s_per_molecule": float(m.group(2)), "sample_command_wall_s": round(wall, 1),
            "eval_wall_s": round(eval_wall, 1), "samples_file": str(samples), "eval_json": str(scores),
            "sample_command": ["symdiff", *sample_cmd], "eval_command": ["symdiff", *eval_cmd],
            "load_average_start": load0, "load_average_end": list(os.getloadavg())}


def atom_stability_se(cell: dict[str, Any], n_boot: int = 1000, seed: int = 0) -> float:
    """Bootstrap standard error of a cell's atom stability, resampling whole molecules (their atoms are correlated).

    The cell's sample file is scored again with the EDM metrics `symdiff eval` uses; its atom stability must be the
    cell's, so the error belongs to the recorded figure.
    """
    import numpy as np

    from symdiff.eval.metrics import evaluate_edm_protocol
    from symdiff.io import read_molecules

    mols = read_molecules(cell["samples_file"])
    ev = evaluate_edm_protocol(mols, "qm9")
    if ev["atom_stability"] != cell["atom_stability"]:
        raise SystemExit(f"{cell['samples_file']}: atom stability {ev['atom_stability']} here, "
                         f"{cell['atom_stability']} from symdiff eval")
    n_atoms = np.diff(np.asarray(mols.offsets))
    owner = np.repeat(np.arange(len(n_atoms)), n_atoms)
    stable = np.bincount(owner, weights=ev["_details"].atom_stable, minlength=len(n_atoms))
    pick = np.random.default_rng(seed).integers(0, len(n_atoms), (n_boot, len(n_atoms)))
    return float((stable[pick].sum(1) / n_atoms[pick].sum(1)).std(ddof=1))


def cell_of(res: dict, process: str, sampler: str, steps: int) -> Optional[dict]:
    return next((c for c in res["cells"] if (c["process"], c["sampler"], c["steps"]) == (process, sampler, steps)),
                None)


def goals(res: dict) -> dict[str, Any]:
    """The issue's two goals from the cells measured so far; None where a cell they need is missing."""
    ref = cell_of(res, "vdm", "ancestral", max(res["steps_grid"]))
    out: dict[str, Any] = {}
    vdm100 = [c for c in res["cells"] if c["process"] == "vdm" and c["steps"] == 100]
    if ref and vdm100:
        best = max(vdm100, key=lambda c: c["atom_stability"])
        loss = 100 * (ref["atom_stability"] - best["atom_stability"])
        out["vdm_100_steps"] = {"goal": GOALS["vdm_100_steps"], "best_sampler": best["sampler"],
                                "atom_stability_100": best["atom_stability"], "atom_stability_ancestral_1000":
                                ref["atom_stability"], "points_lost": round(loss, 2), "met": loss <= 1.0}
        if "atom_stability_se" in best and "atom_stability_se" in ref:  # independent samples: errors add in squares
            se = 100 * (best["atom_stability_se"] ** 2 + ref["atom_stability_se"] ** 2) ** 0.5
            out["vdm_100_steps"]["points_lost_se"] = round(se, 2)
    fh = cell_of(res, "flow", "heun", 100)
    if ref and fh:
        out["flow_heun_100_steps"] = {"goal": GOALS["flow_heun_100_steps"], "atom_stability_flow_heun_100":
                                      fh["atom_stability"], "atom_stability_vdm_ancestral_1000":
                                      ref["atom_stability"], "met": fh["atom_stability"] >= ref["atom_stability"]}
    return out


def pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}"  # uniqueness is undefined when no molecule is valid


def table(res: dict) -> list[str]:
    rows = ["| process | sampler | steps | molecules | atom stab. % | s.e. | mol. stab. % | validity % | uniqueness % | "
            "s/molecule |", "|---|---|---|---|---|---|---|---|---|---|"]
    order = {p: i for i, p in enumerate(CONFIGS)}
    for c in sorted(res["cells"], key=lambda c: (order[c["process"]], c["sampler"], -c["steps"])):
        rows.append(f"| {c['process']} | {c['sampler']} | {c['steps']} | {c['n_samples']} | "
                    f"{pct(c['atom_stability'])} | {pct(c.get('atom_stability_se'))} | {pct(c['mol_stability'])} | "
                    f"{pct(c['validity'])} | "
                    f"{pct(c['uniqueness'])} | {c['s_per_molecule']:.3f} |")
    return rows


def plot(res: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key in sorted({(c["process"], c["sampler"]) for c in res["cells"]}):
        pts = sorted((c["steps"], 100 * c["atom_stability"], 100 * c.get("atom_stability_se", 0.0))
                     for c in res["cells"] if (c["process"], c["sampler"]) == key)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=2,
                    label=f"{key[0]} {key[1]}")
    ax.set_xscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("atom stability (%)")
    ax.set_title(f"qm9_tiny, {res['train_steps']} training steps per process\n(bars: 1 s.e.; molecules per cell "
                 "differ, see the table)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)


def save(res: dict, out: Path) -> None:
    res["goals"] = goals(res)
    res["load_average_end"] = list(os.getloadavg())
    write_json(out, res)
    md = [f"# Sample quality against sampling steps ({out.name})", "",
          f"Commit {res['commit']}, {res['machine']['date_utc']} UTC, {res['machine']['cpu']}, "
          f"{res['machine']['cores']} cores shared with other jobs (load average "
          f"{res['machine']['load_average_1_5_15min']} at the start). Each process trained {res['train_steps']} "
          f"steps; s/molecule is `symdiff sample`'s own timing.", "", *table(res), ""]
    for g in res["goals"].values():
        md.append(f"- {g['goal']}: {'met' if g['met'] else 'not met'}.")
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(md) + "\n")
    os.replace(tmp, out.with_suffix(".md"))
    if res["cells"]:
        plot(res, out.with_suffix(".png"))


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-root", default=str(REPO / "runs" / "bench_steps"))
    ap.add_argument("--data-root", default=None, help="QM9 shard directory (default: build full QM9 into the run root)")
    ap.add_argument("--train-steps", type=int, default=1000)
    ap.add_argument("--ema-decay", type=float, default=0.99,
                    help="train.ema_decay: a short run needs a short EMA horizon (the EMA has no warm-up)")
    ap.add_argument("--steps", default="1000,250,100,50,20")
    ap.add_argument("--samples", type=int, default=1000, help="molecules per priority cell")
    ap.add_argument("--samples-reduced", type=int, default=100, help="molecules per other cell")
    ap.add_argument("--samples-reduced-long", type=int, default=50, help="molecules per other cell at the top steps")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--processes", default=",".join(CONFIGS))
    ap.add_argument("--samplers", default=None, help="only these samplers (comma-separated; default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "steps_qm9_tiny.json"))
    ap.add_argument("overrides", nargs="*", help="config overrides key.sub=value for every training")
    return ap.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    from _machine import machine

    from symdiff.errors import UserError

    processes = [p.strip() for p in args.processes.split(",")]
    args.samplers = args.samplers.split(",") if args.samplers else None
    steps = [int(k) for k in args.steps.split(",")]
    run_root, out = Path(args.run_root), Path(args.out)
    run_root.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    if res and (res.get("run_root") != str(run_root) or res.get("train_steps") != args.train_steps):
        raise UserError(f"{out}: made from another run root or training budget; pass another --out")
    data = data_root(args, run_root)
    res.setdefault("machine", machine())
    res.setdefault("commit", git_commit())
    res.setdefault("invocations", []).append({"commit": git_commit(), "machine": machine()})
    res.update({"run_root": str(run_root), "data_root": str(data), "train_steps": args.train_steps,
                "steps_grid": steps, "sample_batch_size": args.batch_size, "seed": args.seed,
                "samples_plan": {"priority": args.samples, "reduced": args.samples_reduced,
                                 "reduced_at_top_steps": args.samples_reduced_long,
                                 "priority_cells": "vdm ancestral at the top step count and every 100-step cell"},
                "training_order": "one process after another, each with OMP_NUM_THREADS=%d" % args.threads})
    res.setdefault("train", {})
    res.setdefault("cells", [])
    for p in processes:
        if p not in res["train"]:
            res["train"][p] = train(p, args, run_root / p, data)
            save(res, out)
    if args.train_only:
        return 0
    cell_dir = run_root / "cells"
    cell_dir.mkdir(exist_ok=True)
    for cell in plan(processes, steps, args):
        done = cell_of(res, cell["process"], cell["sampler"], cell["steps"])
        if done and done["n_samples"] >= cell["n_samples"]:  # a larger sample from an earlier plan is kept
            continue
        if done:
            res["cells"].remove(done)
        res["cells"].append(run_cell(cell, run_root / cell["process"], cell_dir, args))
        save(res, out)
        print(json.dumps({k: res["cells"][-1][k] for k in ("process", "sampler", "steps", "n_samples",
                                                           "atom_stability", "s_per_molecule")}), flush=True)
    for cell in res["cells"]:  # after all sampling, so that it takes no CPU from a timed cell
        if "atom_stability_se" not in cell:
            cell["atom_stability_se"] = atom_stability_se(cell)
            save(res, out)
    save(res, out)
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    from symdiff.errors import UserError

    # a time limit's SIGTERM raises SystemExit here, and subprocess.run then kills the running `symdiff` command
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"bench_steps: error: {exc}", file=sys.stderr)
        sys.exit(1)

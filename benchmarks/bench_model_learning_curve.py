"""Learning curve of the product: `symdiff train` on a config, then EDM metrics of every saved EMA checkpoint.

The benchmark measures what a user runs. Training is `python -m symdiff.cli train` as a subprocess (DeepSpeed, the
ShardLoader on ``data.root``, EMA, checkpoints every ``train.ckpt_every`` steps, all kept). After training, each
checkpoint is loaded as `symdiff sample --run` loads it (``load_for_inference``, EMA weights). Molecules are drawn
with ``sample_molecules`` (the ancestral sampler on ``sample.steps`` steps; fewer than ``diffusion.timesteps``
strides the grid) and scored with the EDM protocol of ``symdiff.eval.metrics``. Scoring happens after training so
that it does not take CPU from the measured run. The JSON records the sampler and its steps, the training command,
the resolved config and the trainer's own loss log (metrics.jsonl); it is rewritten after every scored checkpoint,
so a cut-off run keeps its curve so far.

Every ``key=value`` override goes through the config schema (an unknown key is an error) and to `symdiff train`,
so ``train.*``, ``data.*`` and ``model.*`` are honoured by the trainer itself. ``sample.*`` sets the evaluation.
The keys the benchmark manages itself (``train.keep_last``; ``train.ckpt_every``, ``sample.n_samples`` and
``sample.steps`` when the matching flag is given) are refused as overrides where they would conflict.

Usage:
  .venv/bin/python benchmarks/bench_model_learning_curve.py --config configs/qm9_tiny.yaml --run-dir runs/lc/symdiff
      [--kind dit|dit_aug|symdiff_haar|symdiff] [--eval-every 5000] [--eval-samples 1000] [--eval-steps 1000]
      [--budget-min 120] [--threads 2] [--nproc N] [--out FILE.json] [key.sub=value ...]
  .venv/bin/python benchmarks/bench_model_learning_curve.py --rescore runs/lc/symdiff [--eval-steps 1000]
      [sample.key=value ...]      (score the checkpoints of an existing run again, e.g. with the full sampler)

``--budget-min`` stops training after that much wall-clock time the way a cluster preempts it (SIGTERM: the
trainer checkpoints and exits). The default data is the config's ``data.root`` (``bundled:qm9`` for qm9_tiny);
for the full QM9 training split build its shards and pass ``data.root=DIR``.

The learning_curve_qm9_tiny_*.json files in benchmarks/results/ dated 2026-11-25/26 were made by this script's
earlier version, a separate training loop (random batches from ../shared/data/qm9/qm9.npz, no DeepSpeed); they are
kept as recorded and are not comparable step for step with runs of this version.
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

GOAL = "atom stability >= 90% and molecule stability >= 40% within 2 hours of CPU training"


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _key(item: str) -> str:
    return item.split("=", 1)[0].strip()


def managed_overrides(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """The user's overrides plus the benchmark's own; a user value for a key the benchmark sets is refused."""
    from symdiff.errors import UserError

    ours = {"train.keep_last": "0"}  # every checkpoint is scored, so none may be pruned
    flags = {"model.kind": ("--kind", args.kind), "train.ckpt_every": ("--eval-every", args.eval_every),
             "sample.n_samples": ("--eval-samples", args.eval_samples),
             "sample.steps": ("--eval-steps", args.eval_steps)}
    for key, (flag, value) in flags.items():
        if value is not None:
            ours[key] = str(value)
    given = {_key(o) for o in overrides}
    for key in sorted(given & set(ours)):
        flag = flags.get(key, (None,))[0]
        why = f"use {flag} instead" if flag else "the benchmark keeps every checkpoint to score it"
        raise UserError(f"override '{key}': set by the benchmark ({why})")
    return [*overrides, *(f"{k}={v}" for k, v in ours.items())]


def train(args: argparse.Namespace, overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """`symdiff train` in a subprocess; with a budget, SIGTERM when it is spent (the trainer checkpoints and exits)."""
    from symdiff.train.launch import EXIT_REQUEUE

    cmd = [sys.executable, "-m", "symdiff.cli", "train", "--config", str(args.config), "--run-dir", str(run_dir),
           "--resume", "never", *(["--nproc", str(args.nproc)] if args.nproc else []), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    stopped = False
    try:
        rc = proc.wait(timeout=args.budget_min * 60 if args.budget_min else None)
    except subprocess.TimeoutExpired:
        stopped = True
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0 and not (stopped and rc == EXIT_REQUEUE):
        raise SystemExit(f"symdiff train exited with code {rc}")
    return {"command": cmd[1:], "train_wall_s": wall, "stopped_by_budget": stopped, "exit_code": rc}


def loss_curve(run_dir: Path) -> list[dict[str, Any]]:
    """The trainer's own log (metrics.jsonl): step, loss, throughput and wall time."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keep = ("step", "loss", "grad_norm", "it_per_s", "molecules_per_s", "time")
    return [{k: r.get(k) for k in keep} for r in rows]


def score(ckpt: Path, n: int, steps: int, batch_size: int, seed: int, dataset: str) -> dict[str, Any]:
    from symdiff.eval.metrics import evaluate_edm_protocol
    from symdiff.sampling import sample_molecules
    from symdiff.train.checkpoint import load_for_inference

    t = time.perf_counter()
    _, model = load_for_inference(ckpt, use_ema=True)
    mols = sample_molecules(model, n, batch_size=batch_size, steps=steps, seed=seed, progress=False)
    res = evaluate_edm_protocol(mols, dataset)
    return {"atom_stability": res["atom_stability"], "mol_stability": res["mol_stability"],
            "validity": res["validity"], "uniqueness": res.get("uniqueness"), "n_samples": n,
            "sampler": "ancestral", "sampling_steps": steps, "timesteps": int(model.timesteps),
            "weights": "ema", "eval_seconds": time.perf_counter() - t}


def score_run(run_dir: Path, cfg: Any, result: dict[str, Any], out: Path) -> None:
    from symdiff.train.checkpoint import complete_checkpoints

    s = cfg.sample
    ckpts = complete_checkpoints(run_dir / "checkpoints")
    if not ckpts:
        raise SystemExit(f"{run_dir}: no complete checkpoint to score")
    for step, path in ckpts:
        ev = score(path, int(s.n_samples), int(s.steps), int(s.batch_size), int(s.seed) + step,
                   str(cfg.data.dataset))
        ev.update({"step": step, "checkpoint": str(path), "load_average": list(os.getloadavg())})
        result["evals"].append(ev)
        print(json.dumps(ev), flush=True)
        write_json(out, result)


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "qm9_tiny.yaml"))
    ap.add_argument("--run-dir", default=None, help="run directory for `symdiff train` (must not exist yet); "
                    "default runs/lc/<config name>_<kind>")
    ap.add_argument("--kind", default=None, help="model.kind")
    ap.add_argument("--eval-every", type=int, default=None, help="train.ckpt_every: score a checkpoint every N steps")
    ap.add_argument("--eval-samples", type=int, default=None, help="sample.n_samples per scored checkpoint")
    ap.add_argument("--eval-steps", type=int, default=None, help="sample.steps of the ancestral sampler")
    ap.add_argument("--budget-min", type=float, default=None, help="stop training after this wall-clock time")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of training and torch threads of scoring")
    ap.add_argument("--nproc", type=int, default=0, help="`symdiff train --nproc`")
    ap.add_argument("--out", default=None, help="result JSON (default: <run dir>/learning_curve.json)")
    ap.add_argument("--rescore", default=None, metavar="RUN_DIR",
                    help="no training: score the checkpoints of this run again (only sample.* overrides)")
    ap.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return ap.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    import torch

    from _machine import machine

    from symdiff.config import load_config, to_dict
    from symdiff.errors import UserError
    from symdiff.models import build_model, count_params

    torch.set_num_threads(args.threads)
    if args.rescore:
        run_dir = Path(args.rescore)
        if args.kind or args.eval_every or args.budget_min or args.nproc:
            raise UserError("--rescore scores a finished run: --kind/--eval-every/--budget-min/--nproc do not apply")
        bad = [o for o in args.overrides if not _key(o).startswith("sample.")]
        if bad:
            raise UserError(f"--rescore: override '{bad[0]}' would not change the trained checkpoints "
                            "(only sample.* applies)")
        extra = [f"sample.n_samples={args.eval_samples}"] if args.eval_samples else []
        extra += [f"sample.steps={args.eval_steps}"] if args.eval_steps else []
        cfg = load_config(run_dir / "config.yaml", [*args.overrides, *extra])
        run: dict[str, Any] = {"rescore_of": str(run_dir)}
    else:
        overrides = managed_overrides(args, list(args.overrides))
        cfg = load_config(args.config, overrides)  # the schema refuses unknown keys and bad values before training
        run_dir = Path(args.run_dir or REPO / "runs" / "lc" / f"{cfg.name}_{cfg.model.kind}")
        if run_dir.exists():
            raise UserError(f"--run-dir {run_dir}: exists; a learning curve starts from step 0 in a new directory "
                            "(--rescore scores an existing run)")
        run = {}
    out = Path(args.out) if args.out else run_dir / "learning_curve.json"
    result: dict[str, Any] = {
        "machine": machine(), "config": to_dict(cfg), "kind": str(cfg.model.kind),
        "params": count_params(build_model(cfg)), "run_dir": str(run_dir), "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "budget_min": args.budget_min, "goal": GOAL,
        **run, "loss_curve": [], "evals": []}
    if not args.rescore:
        result.update(train(args, overrides, run_dir))
    result["loss_curve"] = loss_curve(run_dir)
    write_json(out, result)
    score_run(run_dir, cfg, result, out)
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    from symdiff.errors import UserError

    try:
        sys.exit(main())
    except UserError as exc:
        print(f"bench_model_learning_curve: error: {exc}", file=sys.stderr)
        sys.exit(1)

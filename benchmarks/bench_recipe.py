"""Issue 18's cheap screen of the recipe options: each one alone against the paper's recipe, at equal steps.

Every variant trains `configs/qm9_tiny.yaml` through `symdiff train` (DeepSpeed, the ShardLoader, EMA) for the same
``--steps`` at the same seeds, so the variants see identical batches; only the option differs. Each run is then
scored by `benchmarks/diag_partial_denoise.py` on its EMA weights: 200 real QM9 training molecules noised to t0 = 50
and 100 and denoised back by the model's own ancestral steps, the EDM protocol on the result. That is the low-noise
precision the 2-hour plateau lacks (docs/training.md), at a cost of seconds instead of the minutes of 1,000 fresh
samples. The table holds mean ± std over seeds, with each variant's training wall time (equal steps are not equal
time: self-conditioning pays a second forward pass on half the batches).

``model.self_condition`` is not screened here: the partial denoise calls ``reverse_step`` alone, which gives a
self-conditioned model no x-hat (docs/training.md), so the score would not be its own.

Usage: .venv/bin/python benchmarks/bench_recipe.py [--variants baseline t_int ...] [--seeds 0] [--steps 2000]
       [--t0 50 100] [--n 200] [--data-root DIR] [--set KEY=VALUE ...] [--out-stem recipe_screen_DATE]
       (writes benchmarks/results/STEM.json and .md, rewritten after every run)
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_quality import train_run  # noqa: E402  the same training command as the ablation

# One option per variant, each the alternative named in docs/training.md's recipe table.
VARIANTS = {
    "baseline": [],
    "t_int": ["model.time_input=t_int"],
    "log_snr": ["model.time_input=log_snr"],
    "low_noise": ["diffusion.t_sampling=low_noise"],
    "snr_clamped": ["diffusion.loss_weight=snr_clamped"],
    "cosine": ["train.lr_schedule=cosine", "train.warmup_steps=100"],
    "adamw": ["train.amsgrad=false"],
    # beyond one option at a time: two and four times qm9_tiny's learning rate of 5e-4 (with a warm-up for the first
    # steps), and the two options that screened slightly ahead at seed 0, together
    "lr_2x": ["train.lr=1e-3", "train.warmup_steps=100"],
    "lr_4x": ["train.lr=2e-3", "train.warmup_steps=100"],
    "snr_clamped_low_noise": ["diffusion.loss_weight=snr_clamped", "diffusion.t_sampling=low_noise"],
}


def run_one(variant: str, seed: int, args, work: Path) -> dict:
    run = work / f"{variant}_seed{seed}"
    wall = train_run(REPO / "configs" / "qm9_tiny.yaml", VARIANTS[variant], run, seed, args, log_every=20)
    out = run / "partial_denoise.json"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "diag_partial_denoise.py"), str(run), "--t0",
                          *map(str, args.t0), "--n", str(args.n), "--seed", str(seed), "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"partial denoise of {run} failed:\n{(res.stdout + res.stderr)[-3000:]}")
    rows = json.loads(out.read_text())["rows"]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    tail = losses[-max(1, len(losses) // 5):]  # the last fifth of the logged losses: steadier than the last one
    return {"variant": variant, "seed": seed, "overrides": VARIANTS[variant], "train_wall_s": round(wall, 1),
            "loss_last_fifth": statistics.fmean(tail), "partial_denoise": rows}


def summarise(runs: list[dict], t0s: list[int]) -> dict:
    out = {}
    for v in dict.fromkeys(r["variant"] for r in runs):
        rows = [r for r in runs if r["variant"] == v]
        cell = {"n_seeds": len(rows), "train_wall_s": statistics.median(r["train_wall_s"] for r in rows),
                "loss_last_fifth": statistics.fmean(r["loss_last_fifth"] for r in rows)}
        for t0 in t0s:
            for m in ("atom_stability", "mol_stability"):
                vals = [next(p[m] for p in r["partial_denoise"] if p["t0"] == t0) for r in rows]
                cell[f"{m}_t{t0}"] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals)}
        out[v] = cell
    return out


def table(summary: dict, t0s: list[int]) -> list[str]:
    head = "| variant | train s | loss (last fifth) | " + " | ".join(
        f"atom / mol stab. % from t0 = {t0}" for t0 in t0s) + " |"
    lines = [head, "|---|---|---|" + "---|" * len(t0s)]
    for v, c in summary.items():
        cells = [f"{100 * c[f'atom_stability_t{t0}']['mean']:.1f} / {100 * c[f'mol_stability_t{t0}']['mean']:.1f}"
                 + (f" (± {100 * c[f'mol_stability_t{t0}']['std']:.1f})" if c["n_seeds"] > 1 else "")
                 for t0 in t0s]
        lines.append(f"| {v} | {c['train_wall_s']:.0f} | {c['loss_last_fifth']:.4f} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--t0", nargs="+", type=int, default=[50, 100])
    ap.add_argument("--n", type=int, default=200, help="training molecules denoised per t0")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    ap.add_argument("--out-stem", default=None)
    args = ap.parse_args()
    from _machine import git_commit, machine, save

    commit = git_commit()
    stem = args.out_stem or f"recipe_screen_{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}"
    res = {"benchmark": "bench_recipe", "commit": commit, "machine": machine(), "steps": args.steps,
           "seeds": args.seeds, "t0": args.t0, "n_molecules": args.n, "overrides": args.set,
           "data": args.data_root or "bundled QM9 subset", "runs": []}
    method = (f"`symdiff train` configs/qm9_tiny.yaml for {args.steps} steps per variant and seed (seeds "
              f"{args.seeds}; common overrides {' '.join(args.set) or 'none'}), then diag_partial_denoise.py on the "
              f"EMA weights ({args.n} training molecules per t0). Commit {commit}.")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for v in args.variants:
                res["runs"].append(run_one(v, seed, args, Path(tmp)))
                res["summary"] = summarise(res["runs"], args.t0)
                save(res, stem, "Recipe options screened by partial denoising, equal steps", method,
                     table(res["summary"], args.t0))
                print(table(res["summary"], args.t0)[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

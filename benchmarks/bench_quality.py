"""The paper's ablation at a budget that fits this machine: every kind, several seeds, the same fixed steps.

For each (kind, seed) the product runs as a user would: `symdiff train` (a fixed ``--steps``, DeepSpeed, real QM9
shards), `symdiff sample --run` (EMA weights), `symdiff eval --samples` (EDM metrics: atom and molecule stability,
validity, uniqueness) and `symdiff eval --nll` (the test NLL of the paper's bound). The kinds share qm9_tiny's
widths; ``egnn`` runs configs/qm9_tiny_egnn.yaml (EDM's EGNN at nf 64 x 4). The table holds mean ± std over seeds
(population std over the seeds' values); the PNG shows each kind's training loss (mean over seeds) by step, from
the runs' own metrics.jsonl.

The default data is the bundled real QM9 subset (6,000 training, 1,500 test molecules); ``--data-root DIR`` takes
shards of the full set (`symdiff data build --dataset qm9 --source ../shared/data/qm9/qm9.npz --out DIR`).

Usage: .venv/bin/python benchmarks/bench_quality.py [--kinds dit dit_aug symdiff_haar symdiff egnn]
       [--seeds 0 1 2] [--steps 2000] [--samples 200] [--sample-steps 250] [--data-root DIR]
       [--nll-molecules 1000] [--set KEY=VALUE ...]
       [--out-stem quality_qm9_tiny_DATE]      (writes benchmarks/results/STEM.json, .md and .png)
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
KINDS = ("dit", "dit_aug", "symdiff_haar", "symdiff", "egnn")
# Issue 14's comparison: the same qm9_tiny network (kind symdiff) on each quotient-space target. "standard" is the
# symdiff variant itself; exact enumeration is left out: QM9 molecules reach 29 atoms and exact stops at 8.
TARGETS = {"mcmc_64": ["diffusion.target=mcmc", "diffusion.mcmc_steps=64", "diffusion.mcmc_burn_in=16"],
           "mcmc_256": ["diffusion.target=mcmc", "diffusion.mcmc_steps=256", "diffusion.mcmc_burn_in=64"],
           "hungarian": ["diffusion.target=hungarian"]}
VARIANTS = (*KINDS, *TARGETS)
METRICS = ("nll", "atom_stability", "mol_stability", "validity", "uniqueness")


def config_of(variant: str) -> tuple[Path, list[str]]:
    if variant == "egnn":
        return REPO / "configs" / "qm9_tiny_egnn.yaml", []
    if variant in TARGETS:
        return REPO / "configs" / "qm9_tiny.yaml", ["model.kind=symdiff", *TARGETS[variant]]
    return REPO / "configs" / "qm9_tiny.yaml", [f"model.kind={variant}"]


def symdiff(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "symdiff.cli", *args], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    if res.returncode != 0:
        raise RuntimeError(f"symdiff {args[0]} failed:\n{(res.stdout + res.stderr)[-3000:]}")
    return res.stdout + res.stderr


def train_run(config: Path, overrides: list[str], run: Path, seed: int, args, log_every: int) -> float:
    """`symdiff train` of one variant for ``args.steps`` from scratch, one checkpoint at the end; its wall seconds.
    ``args`` brings ``steps``, ``data_root`` and ``set`` (the overrides common to every run); bench_recipe uses it
    too."""
    data = [f"data.root={args.data_root}"] if args.data_root else []
    t0 = time.perf_counter()
    symdiff("train", "--config", str(config), "--run-dir", str(run), "--resume", "never", *overrides, *data, *args.set,
            f"train.seed={seed}", f"train.max_steps={args.steps}", f"train.ckpt_every={args.steps}",
            f"train.log_every={log_every}", "train.eval_every=0")
    return time.perf_counter() - t0


def run_one(kind: str, seed: int, args, work: Path) -> dict:
    config, overrides = config_of(kind)
    run = work / f"{kind}_seed{seed}"
    train_wall_s = train_run(config, overrides, run, seed, args, log_every=10)
    sdf, scores, nll = run / "samples.sdf", run / "metrics_edm.json", run / "nll.json"
    symdiff("sample", "--run", str(run), "--n", str(args.samples), "--steps", str(args.sample_steps), "--seed",
            str(seed), "--out", str(sdf), "--no-progress")
    root = args.data_root or "bundled:qm9"
    symdiff("eval", "--samples", str(sdf), "--dataset", "qm9", "--data-root", root, "--json", str(scores))
    symdiff("eval", "--nll", str(run), "--dataset", "qm9", "--seed", str(seed), "--json", str(nll),
            "--max-molecules", str(args.nll_molecules), *(
        ["--data-root", args.data_root] if args.data_root else []))
    s, n = json.loads(scores.read_text()), json.loads(nll.read_text())
    loss = [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    return {"kind": kind, "seed": seed, "nll": n["nll"], **{k: s[k] for k in METRICS[1:]},
            "train_wall_s": round(train_wall_s, 1), "loss_curve": loss}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for kind in dict.fromkeys(r["kind"] for r in runs):
        rows = [r for r in runs if r["kind"] == kind]
        out[kind] = {m: {"mean": statistics.fmean(r[m] for r in rows), "std": statistics.pstdev([r[m] for r in rows]),
                         "n_seeds": len(rows)} for m in METRICS}
    return out


def table(summary: dict) -> list[str]:
    lines = ["| kind | NLL | atom stability % | mol stability % | validity % | uniqueness % |",
             "|---|---|---|---|---|---|"]
    for kind, s in summary.items():
        cells = [f"{s['nll']['mean']:.2f} ± {s['nll']['std']:.2f}"]
        cells += [f"{100 * s[m]['mean']:.1f} ± {100 * s[m]['std']:.1f}" for m in METRICS[1:]]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind in dict.fromkeys(r["kind"] for r in runs):
        curves = [dict(r["loss_curve"]) for r in runs if r["kind"] == kind]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        ax.plot(steps, [statistics.fmean(c[s] for c in curves) for s in steps], label=kind)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


PROTOCOL = ("steps", "overrides", "nll_molecules", "samples", "sample_steps", "data")


def merge(files: list[Path], stem: str, save, results: Path = REPO / "benchmarks" / "results") -> int:
    """One table from benchmark runs split over processes (e.g. one per core), refused when their protocols differ
    or when two files hold the same (variant, seed): pooling must not count a run twice."""
    parts = [json.loads(f.read_text()) for f in files]
    seen: dict[tuple[str, int], Path] = {}
    for f, part in zip(files, parts):
        differ = [k for k in PROTOCOL if part.get(k) != parts[0].get(k)]
        if differ:
            raise SystemExit(f"{f}: protocol differs from {files[0]} in {', '.join(differ)}")
        for r in part["runs"]:
            if (r["kind"], r["seed"]) in seen:
                raise SystemExit(f"{f}: {r['kind']} seed {r['seed']} is also in {seen[r['kind'], r['seed']]}")
            seen[r["kind"], r["seed"]] = f
    res = {**{k: parts[0][k] for k in ("benchmark", *PROTOCOL)}, "merged_from": [f.name for f in files],
           "parts": [{"file": f.name, "commit": p["commit"], "machine": p["machine"],
                      "load_average_end": p.get("load_average_end")} for f, p in zip(files, parts)],
           "machine": parts[0]["machine"], "commit": parts[0]["commit"],
           "runs": [r for p in parts for r in p["runs"]]}
    res["seeds"] = sorted({r["seed"] for r in res["runs"]})
    res["summary"] = summarise(res["runs"])
    png = results / f"{stem}.png"
    plot(res["runs"], png)
    method = (f"Pooled from {', '.join(res['merged_from'])} (runs split over processes); each: `symdiff train` for "
              f"{res['steps']} steps (overrides {' '.join(res['overrides']) or 'none'}), `symdiff sample` "
              f"({res['samples']} molecules, {res['sample_steps']} steps), `symdiff eval`, `symdiff eval --nll` "
              f"({res['nll_molecules']} test molecules); mean ± std over seeds. Loss curves: {png.name}.")
    save(res, stem, "Ablation at a CPU budget: every variant, same steps", method, table(res["summary"]))
    print("\n".join(table(res["summary"])))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=VARIANTS,
                    help="model kinds, or quotient targets of the symdiff kind: " + ", ".join(TARGETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--sample-steps", type=int, default=250)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--nll-molecules", type=int, default=1000, help="test molecules in the NLL")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for every training run (e.g. train.ema_decay=0.99)")
    ap.add_argument("--out-stem", default=None)
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="run nothing: pool the runs of these result files (same protocol) into --out-stem")
    args = ap.parse_args()
    from _machine import git_commit, machine, save

    if args.merge:
        return merge([Path(f) for f in args.merge], args.out_stem or "quality_merged", save)

    commit, date = git_commit(), dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    stem = args.out_stem or f"quality_qm9_tiny_{date}"
    res = {"benchmark": "bench_quality", "commit": commit, "machine": machine(), "steps": args.steps,
           "seeds": args.seeds, "overrides": args.set,
           "nll_molecules": args.nll_molecules, "samples": args.samples, "sample_steps": args.sample_steps,
           "data": args.data_root or "bundled QM9 subset (6,000 train / 1,500 test)", "runs": []}
    png = REPO / "benchmarks" / "results" / f"{stem}.png"
    method = (f"`symdiff train` for {args.steps} steps per variant and seed ({len(args.seeds)} seeds; overrides "
              f"{' '.join(args.set) or 'none'}), then `symdiff sample` ({args.samples} molecules, "
              f"{args.sample_steps} steps), `symdiff eval` and `symdiff eval --nll` ({args.nll_molecules} test "
              f"molecules); mean ± std over seeds. Loss curves: {png.name}. Commit {commit}.")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:  # seeds outermost: a cut-off run still covers every kind
            for kind in args.kinds:
                r = run_one(kind, seed, args, Path(tmp))
                res["runs"].append(r)
                print(f"{kind:13s} seed {seed}: NLL {r['nll']:.2f}, atom {100 * r['atom_stability']:.1f}%, "
                      f"mol {100 * r['mol_stability']:.1f}%", flush=True)
                # saved after every run, so that a benchmark cut off by its time limit keeps what it measured
                res["summary"] = summarise(res["runs"])
                plot(res["runs"], png)
                save(res, stem, "Ablation at a CPU budget: every variant, same steps", method, table(res["summary"]))
    print("\n".join(table(res["summary"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The quotient-space target (issue 14, docs/quotient.md): its variance against t per estimator, and its cost in a
training step.

1. Variance against t, on real QM9 molecules of the bundled subset (normalised as the vdm process sees them), at
   vdm times t_int = 1 .. 1000. Per estimator (standard eps, mcmc at two chain lengths, hungarian, and exact on the
   subset's molecules of <= 8 atoms), the target's second moment per real component E|T|^2 / (n (3 + d)): the
   standard target's is about 1 (the CoM-free positions lose 3 per molecule), and the Rao-Blackwellised one's is
   lower by the part that labelling noise adds. On the small molecules also the estimators' error against exact, E|T - T_exact|^2 per component.
2. Cost: `symdiff train` runs (the product, DeepSpeed, one process) with diffusion.target = standard, mcmc and
   hungarian in one benchmark run, on bundled QM9 (qm9_tiny) and on the real GEOM-Drugs sample (geom_symdiff_s
   widths), interleaved repeats; median step times from the runs' metrics.jsonl after warm-up, the median over
   repeats; the estimator's share of a step is 1 - t_standard / t_target. Beside it, permutation_target alone
   timed in this process at the same batch shapes and at N = 181 (GEOM's largest molecule, by tiling real GEOM
   conformers), medians of repeats.

Usage: .venv/bin/python benchmarks/bench_quotient.py [--molecules 64] [--draws 4] [--steps 16] [--warmup 4]
       [--repeats 3]
       [--out STEM]   (writes benchmarks/results/STEM.json and STEM.md)
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
GEOM_SAMPLE = REPO.parent / "shared" / "data" / "geom_drugs" / "geom_drugs_sample_10mols.npz"
T_GRID = (1, 10, 50, 100, 250, 500, 750, 1000)
ESTIMATORS = {"standard": ("standard", {}), "mcmc_64": ("mcmc", {"steps": 64, "burn_in": 16, "samples": 8}),
              "mcmc_256": ("mcmc", {"steps": 256, "burn_in": 64, "samples": 8}), "hungarian": ("hungarian", {})}


def _git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()


def _features(shards: Path, split: str, n_mol: int, max_atoms: int | None = None):
    """(model, xh, mask) of the first ``n_mol`` molecules of ``split`` (at most ``max_atoms`` atoms each)."""
    import torch

    from symdiff.config import load_config
    from symdiff.data.loader import ShardLoader
    from symdiff.models import build_model

    cfg = load_config(REPO / "configs" / "qm9_tiny.yaml", [f"data.root={shards}"])
    model = build_model(cfg).double()
    xs, hs, ms = [], [], []
    for batch in ShardLoader(shards, split, batch_size=500, shuffle=False):
        f = model.features(batch)
        keep = torch.ones(f.mask.shape[0], dtype=torch.bool) if max_atoms is None else f.mask.sum(1) <= max_atoms
        xs += list(f.x[keep])
        hs += list(f.h[keep])
        ms += list(f.mask[keep])
        if len(ms) >= n_mol:
            break
    n = int(max(int(m.sum()) for m in ms[:n_mol]))
    xh = torch.stack([torch.cat([x, h], -1)[:n] for x, h in zip(xs[:n_mol], hs[:n_mol])])
    mask = torch.stack([m[:n] for m in ms[:n_mol]])
    return model, xh, mask


def variance_vs_t(shards: Path, n_mol: int, draws: int, seed: int = 0) -> dict:
    import torch

    from symdiff.diffusion import edm, permutation_target

    out = {}
    for label, split, limit in (("qm9_test_molecules", "test", None), ("qm9_small_molecules", "train", 8)):
        model, xh, mask = _features(shards, split, n_mol if limit is None else 1000, limit)
        sched = model.process.schedule
        B = mask.shape[0]
        comps = (mask.sum(1) * xh.shape[-1]).double()
        names = dict(ESTIMATORS, **({"exact": ("exact", {})} if limit is not None else {}))
        rows = []
        g = torch.Generator().manual_seed(seed)
        for t_int in T_GRID:
            gam = sched.gamma(torch.full((B,), t_int, dtype=torch.long))
            a, s = sched.alpha(gam), sched.sigma(gam)
            second = {k: [] for k in names}
            err = {k: [] for k in names}
            for _ in range(draws):
                eps = edm.sample_noise(mask, xh.shape[-1] - 3, xh.dtype, "torch", g)
                z = a.view(-1, 1, 1) * xh + s.view(-1, 1, 1) * eps
                targets = {k: eps if est == "standard" else permutation_target(z, xh, mask, a, s, est, g, **o)
                           for k, (est, o) in names.items()}
                for k, tgt in targets.items():
                    second[k].append(float(((tgt ** 2).sum((1, 2)) / comps).mean()))
                    if "exact" in targets:
                        err[k].append(float((((tgt - targets["exact"]) ** 2).sum((1, 2)) / comps).mean()))
            row = {"t_int": t_int, "alpha": float(a[0]), "sigma": float(s[0]),
                   "second_moment_per_component": {k: statistics.fmean(v) for k, v in second.items()}}
            # Same draws on both sides: the ratio to the standard target's second moment.
            row["ratio_to_standard"] = {k: v / row["second_moment_per_component"]["standard"]
                                        for k, v in row["second_moment_per_component"].items()}
            if limit is not None:
                row["error_vs_exact_per_component"] = {k: statistics.fmean(v) for k, v in err.items()}
            rows.append(row)
            print(f"{label} t={t_int:5d} " + " ".join(f"{k}={v:.4f}" for k, v in
                                                      row["second_moment_per_component"].items()), flush=True)
        out[label] = {"molecules": B, "atoms_min_max": [int(mask.sum(1).min()), int(mask.sum(1).max())],
                      "draws_per_t": draws, "rows": rows}
    return out


def estimator_time(xh, mask, repeats: int = 5) -> dict:
    """Median seconds of permutation_target per estimator at these shapes (t_int = 500), in this process."""
    import torch

    from symdiff.diffusion import permutation_target

    B = mask.shape[0]
    a = torch.full((B,), 0.7, dtype=xh.dtype)
    s = torch.sqrt(1 - a * a)
    g = torch.Generator().manual_seed(0)
    z = a.view(-1, 1, 1) * xh + s.view(-1, 1, 1) * torch.randn(xh.shape, dtype=xh.dtype, generator=g) * mask[..., None]
    out = {}
    for k, (est, o) in ESTIMATORS.items():
        if est == "standard":
            continue
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            permutation_target(z, xh, mask, a, s, est, g, **o)
            times.append(time.perf_counter() - t0)
        out[k] = statistics.median(times)
    return out


def train_case(config: str, shards: Path, work: Path, target: str, extra: list[str], steps: int, warmup: int) -> dict:
    run_dir = work / f"{config}_{target}"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "symdiff.cli", "train", "--config", str(REPO / "configs" / f"{config}.yaml"),
           "--run-dir", str(run_dir), f"data.root={shards}", f"train.max_steps={steps}", "train.log_every=1",
           f"train.ckpt_every={10 * steps}", *extra]
    if target.startswith("mcmc"):
        o = ESTIMATORS[target][1]
        cmd += ["diffusion.target=mcmc", f"diffusion.mcmc_steps={o['steps']}", f"diffusion.mcmc_burn_in={o['burn_in']}",
                f"diffusion.mcmc_samples={o['samples']}"]
    elif target != "standard":
        cmd += [f"diffusion.target={target}"]
    cmd += ["--resume", "never"]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{config} {target} failed:\n{res.stderr[-3000:]}")
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    per_step = [b["time"] - a["time"] for a, b in zip(rows[warmup - 1:], rows[warmup:])]
    return {"config": config, "target": target, "steps_timed": len(per_step),
            "median_step_s": statistics.median(per_step), "final_loss": rows[-1]["loss"]}


def geom_shards(work: Path) -> Path:
    out = work / "geom"
    res = subprocess.run([sys.executable, "-m", "symdiff.cli", "data", "build", "--dataset", "geom", "--source",
                          str(GEOM_SAMPLE), "--out", str(out), "--split-smiles", "none"], capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise RuntimeError(f"GEOM shard build failed:\n{res.stderr[-3000:]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--molecules", type=int, default=64)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved `symdiff train` runs per target")
    ap.add_argument("--qm9-batch", type=int, default=64)
    ap.add_argument("--geom-batch", type=int, default=16)
    ap.add_argument("--skip-train", action="store_true", help="only the variance and the in-process timings")
    ap.add_argument("--out", default=None, help="file stem in benchmarks/results/ (default quotient_cpu_DATE)")
    args = ap.parse_args()

    import numpy as np
    import torch

    from _machine import machine, save
    from symdiff.data.bundled import ensure_bundled_shards

    m0 = machine()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = ensure_bundled_shards()  # the cache entry of bundled:qm9
        variance = variance_vs_t(shards, args.molecules, args.draws)
        timing = {}
        _, xh, mask = _features(shards, "test", args.qm9_batch)
        timing["qm9_batch"] = {"batch": args.qm9_batch, "n_max": int(mask.shape[1]),
                               "seconds": estimator_time(xh.float(), mask)}
        # N = 181: real GEOM conformers laid side by side (10 A apart) until 181 atoms, a batch of geom_batch.
        d = np.load(GEOM_SAMPLE)
        offs, pos = d["conf_offsets"], d["positions"]
        atoms, shift = [], 0.0
        for c in range(len(offs) - 1):
            atoms.append(pos[offs[c]:offs[c + 1]] + np.array([shift, 0.0, 0.0]))
            shift += 10.0
            if sum(len(a) for a in atoms) >= 181:
                break
        p = torch.as_tensor(np.concatenate(atoms)[:181], dtype=torch.float32)
        p -= p.mean(0)
        g = torch.Generator().manual_seed(0)
        feats = torch.nn.functional.one_hot(torch.randint(0, 16, (181,), generator=g), 16).float() / 4.0
        big = torch.cat([p, feats], -1).expand(args.geom_batch, 181, 19).contiguous()
        timing["n181"] = {"batch": args.geom_batch, "n_max": 181,
                          "seconds": estimator_time(big, torch.ones(args.geom_batch, 181, dtype=torch.bool))}
        print(json.dumps(timing), flush=True)
        train = []
        if not args.skip_train:
            gshards = geom_shards(work)
            for config, sh, extra in (("qm9_tiny", shards, [f"data.batch_size={args.qm9_batch}"]),
                                      ("geom_symdiff_s", gshards, [f"data.batch_size={args.geom_batch}",
                                                                   "data.train_split=train"])):
                # Interleaved repeats (standard, mcmc, hungarian, standard, ...): a load change on the shared machine
                # hits every target alike; the medians of the runs' median step times are compared.
                runs: dict[str, list[dict]] = {t: [] for t in ("standard", "mcmc_64", "hungarian")}
                for rep in range(args.repeats):
                    for target in runs:
                        r = train_case(config, sh, work / f"r{rep}", target, extra, args.steps, args.warmup)
                        runs[target].append(r)
                        print(json.dumps(r), flush=True)
                base = statistics.median(r["median_step_s"] for r in runs["standard"])
                for target, rs in runs.items():
                    step = statistics.median(r["median_step_s"] for r in rs)
                    train.append({"config": config, "target": target, "repeats": len(rs), "median_step_s": step,
                                  "per_run_median_step_s": [r["median_step_s"] for r in rs],
                                  "final_loss": [r["final_loss"] for r in rs],
                                  "estimator_share": None if target == "standard" else 1.0 - base / step})
    res = {"benchmark": "bench_quotient", "git_commit": _git_commit(), "device": "cpu", "machine": m0,
           "note": "a shared 2-core machine with other agents' jobs running: times are upper bounds",
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1"), "estimators": ESTIMATORS,
           "variance": variance, "estimator_seconds_in_process": timing, "train_steps": train}
    stem = args.out or f"quotient_cpu_{dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d')}"
    save(res, stem, "The quotient-space target: variance against t and cost (bench_quotient.py)",
         "Second moment of each target per real component, as a ratio to the standard target's on the same draws; "
         "train steps are medians of `symdiff train` step times.", _table(res))
    print(f"wrote benchmarks/results/{stem}.json")


def _table(res: dict) -> list[str]:
    rows = res["variance"]["qm9_test_molecules"]["rows"]
    names = list(rows[0]["ratio_to_standard"])
    out = ["| t_int | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    out += [f"| {r['t_int']} | " + " | ".join(f"{r['ratio_to_standard'][k]:.3f}" for k in names) + " |" for r in rows]
    out += ["", "| config | target | median step s | estimator share |", "|---|---|---|---|"]
    out += [f"| {r['config']} | {r['target']} | {r['median_step_s']:.3f} | "
            + ("-" if r["estimator_share"] is None else f"{100 * r['estimator_share']:.0f}%") + " |"
            for r in res["train_steps"]]
    return out


if __name__ == "__main__":
    main()

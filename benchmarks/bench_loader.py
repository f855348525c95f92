#!/usr/bin/env python
"""Loader throughput (molecules/s per process) and padding fraction on QM9 (full train split) and on the
GEOM-Drugs-LIKE synthetic set (RDKit conformers of real GEOM SMILES; not GEOM-Drugs).

    .venv/bin/python benchmarks/bench_loader.py [--shared ../shared/data] [--work /tmp/symdiff_bench_loader]
Writes benchmarks/results/data_loader.json and .md. Target: >= 30,000 QM9 molecules/s per process.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine, save  # noqa: E402

from symdiff.data.build import build  # noqa: E402
from symdiff.data.geom_like import make_geom_like  # noqa: E402
from symdiff.data.loader import ShardLoader  # noqa: E402
from symdiff.data.shards import MANIFEST  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def measure(root: Path, split: str, repeats: int, **kw) -> dict:
    rates, pads, n_batches = [], [], 0
    for rep in range(repeats + 1):  # the first pass warms the page cache and is not counted
        loader = ShardLoader(root, split, seed=rep, **kw)
        n = 0
        t = time.perf_counter()
        for b in loader:
            n += len(b)
        dt = time.perf_counter() - t
        if rep:
            rates.append(n / dt)
            pads.append(loader.padding_fraction)
            n_batches = loader.stats["batches"]
    rates.sort()
    return {"molecules_per_s_median": round(rates[len(rates) // 2]), "molecules_per_s_all": [round(r) for r in rates],
            "padding_fraction": round(float(sum(pads) / len(pads)), 4), "batches_per_epoch_this_rank": n_batches,
            "molecules_this_rank": n}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--work", type=Path, default=Path("/tmp/symdiff_bench_loader"))
    p.add_argument("--geom-like-molecules", type=int, default=2000)
    p.add_argument("--geom-like", type=Path, default=None, help="an existing GEOM-like .npz to use")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    qm9 = a.work / "qm9"
    if not (qm9 / MANIFEST).is_file():
        build("qm9", a.shared / "qm9" / "qm9.npz", qm9)
    gl_npz = a.geom_like or a.work / "geom_like.npz"
    if not gl_npz.is_file():
        make_geom_like([a.shared / "geom_drugs" / f"midi_split_smiles_{s}.txt.gz" for s in ("train", "val", "test")],
                       gl_npz, n_molecules=a.geom_like_molecules, conformers=5, workers=2)
    gl = a.work / "geom_like"
    if not (gl / MANIFEST).is_file():
        build("geom", gl_npz, gl, shard_size=5000, split_smiles="none")

    cases = [
        ("QM9 train", qm9, dict(batch_size=64)),
        ("QM9 train", qm9, dict(batch_size=256)),
        ("QM9 train", qm9, dict(batch_size=0, max_atoms_per_batch=64 * 18)),
        ("QM9 train", qm9, dict(batch_size=0, max_atoms_per_batch=256 * 18)),
        ("QM9 train", qm9, dict(batch_size=256, rank=0, world_size=2)),
        ("QM9 train", qm9, dict(batch_size=256, rank=1, world_size=2)),
        ("GEOM-like (synthetic) train", gl, dict(batch_size=64)),
        ("GEOM-like (synthetic) train", gl, dict(batch_size=0, max_atoms_per_batch=64 * 45)),
        ("GEOM-like (synthetic) train", gl, dict(batch_size=0, max_atoms_per_batch=64 * 45, rank=0, world_size=2)),
    ]
    res = {"machine": machine(), "results": []}
    for name, root, kw in cases:
        r = {"data": name, **kw, **measure(root, "train", a.repeats, **kw)}
        res["results"].append(r)
        print(r, flush=True)
    table = ["| data | batching | rank/world | molecules/s | padding fraction |", "|---|---|---|---|---|"]
    for r in res["results"]:
        how = (f"token budget {r['max_atoms_per_batch']} atoms" if r.get("max_atoms_per_batch")
               else f"{r['batch_size']} molecules")
        table.append(f"| {r['data']} | {how} (global) | {r.get('rank', 0)}/{r.get('world_size', 1)} | "
                     f"{r['molecules_per_s_median']:,} | {r['padding_fraction']:.3f} |")
    table += ["", "Target: >= 30,000 QM9 molecules/s per process."]
    save(res, "data_loader", "Loader throughput (one process, OMP_NUM_THREADS=1)",
         f"`benchmarks/bench_loader.py`. One epoch of the train split per measurement, median of {a.repeats} after "
         "one warm-up epoch; molecules/s counts the molecules this process yields (as padded torch Batches). "
         "GEOM-like = real GEOM SMILES with RDKit conformers (synthetic, not GEOM-Drugs).", table)


if __name__ == "__main__":
    main()

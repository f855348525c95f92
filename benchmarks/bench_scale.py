#!/usr/bin/env python
"""The loader at GEOM-Drugs scale: ranks of a large job simulated one at a time on this machine.

    .venv/bin/python benchmarks/bench_scale.py --root /work/scale/geom_7m_shards [--worlds 1 8 64 512]
        [--baseline ../main] [--budget-s 40] [--repeats 3]
    .venv/bin/python benchmarks/bench_scale.py --make-synthetic 7000000 --out DIR   (random-coordinate shards)

Every measurement is one rank (rank r of W) of the product's ShardLoader in a fresh process, so that its start-up,
peak RSS and read bytes are its own. Bytes are the process's ``rchar`` delta from /proc/self/io: every byte that
read()/pread() returned, whether from disk or from the page cache (HDF5 metadata included). A rank iterates its
epoch until the end or ``--budget-s`` seconds; where it stops early, bytes and molecules per epoch are projected
linearly from the share of the epoch's global batches it went through (the windows are alike in expectation, and
a rank's bytes grow with the batches it has consumed). ``--baseline DIR`` runs a checkout of the previous loader
(main) the same way in the same run. Writes benchmarks/results/<stem>.json (default scale_geom).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

# The paper's GEOM-Drugs training rate (SPEC: SymDiff+++, 7.72 it/s at a global batch of 256 molecules).
PAPER_IT_S, PAPER_BATCH, H100S = 7.72, 256, 64
GOALS = {"bytes_1_over_w_within": 0.10, "rss_mb_max_at_512": 1024, "startup_s_max": 10.0,
         "molecules_per_s_min": 50_000}


def _proc(field: str, path: str) -> int:
    for line in open(path):
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _io() -> tuple[int, int]:
    return _proc("rchar:", "/proc/self/io"), _proc("read_bytes:", "/proc/self/io")


def child(spec: dict) -> dict:
    """One rank: start-up, a (part of an) epoch, a mid-epoch resume. Runs in its own process."""
    import numpy as np  # noqa: F401  (imports before the RSS baseline)
    import torch  # noqa: F401

    from symdiff.data.loader import ShardLoader

    _warm_up(ShardLoader)
    rss_imports = _proc("VmRSS:", "/proc/self/status") / 1024
    kw = dict(spec["loader"], rank=spec["rank"], world_size=spec["world"])
    io0 = _io()
    t0 = time.perf_counter()
    lo = ShardLoader(spec["root"], spec["split"], **kw)
    n_batches = len(lo)  # plans the epoch from sizes alone
    io1 = _io()  # start-up reads (offsets, ids, HDF5 metadata) end here; the epoch's reads start
    it = iter(lo)
    first = next(it)
    startup = time.perf_counter() - t0
    mols, done = len(first), 1
    t1 = time.perf_counter()
    while done < n_batches and time.perf_counter() - t1 < spec["budget_s"]:
        mols += len(next(it))
        done += 1
    dt = time.perf_counter() - t1
    io2 = _io()
    frac = done / n_batches
    # Resume in the middle of the epoch's second half: a new loader, the saved state, the first batch.
    state = {"epoch": 0, "next_batch": n_batches // 2 + 1}
    t2 = time.perf_counter()
    lo2 = ShardLoader(spec["root"], spec["split"], **kw)
    lo2.load_state_dict(state)
    next(iter(lo2))
    resume = time.perf_counter() - t2
    return {"world_size": spec["world"], "rank": spec["rank"], "startup_s": round(startup, 3),
            "startup_bytes": io1[0] - io0[0], "rss_mb": round(_proc("VmHWM:", "/proc/self/status") / 1024, 1),
            "rss_after_imports_mb": round(rss_imports, 1),
            "bytes_read_measured": io2[0] - io1[0], "disk_bytes_measured": io2[1] - io1[1],
            "fraction_of_epoch": round(frac, 5), "batches_per_epoch": n_batches,
            "bytes_read_per_epoch": round((io2[0] - io1[0]) / frac),
            "molecules_per_epoch": round(mols / frac),
            "molecules_per_s": round((mols - len(first)) / dt) if done > 1 else None,
            "global_batches_per_s": round((done - 1) / dt, 1) if done > 1 else None,
            "molecules_per_batch": round(mols / done, 1),
            "padding_fraction": round(lo.padding_fraction, 4), "resume_s": round(resume, 3),
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def _warm_up(loader_cls) -> None:
    """One epoch over a tiny set first: the modules that numpy and torch import lazily on first use are read
    from disk then (~0.4 MB of .pyc measured), not counted as shard bytes of the measured rank."""
    import tempfile

    import numpy as np

    from symdiff.data.molecules import MoleculeSet
    from symdiff.data.shards import write_dataset

    with tempfile.TemporaryDirectory() as d:
        mols = MoleculeSet.from_lists([np.full(5, 6, np.int8)] * 40, [np.zeros((5, 3), np.float32)] * 40)
        write_dataset(Path(d) / "w", "geom", {"train": mols}, shard_size=10)
        for kw in (dict(batch_size=8), dict(batch_size=0, max_atoms_per_batch=60)):
            for b in loader_cls(Path(d) / "w", "train", rank=1, world_size=2, chunk_size=4, window_chunks=2, **kw):
                b.padding_fraction
            lo = loader_cls(Path(d) / "w", "train", rank=1, world_size=2, chunk_size=4, window_chunks=2, **kw)
            lo.load_state_dict({"epoch": 0, "next_batch": 2})
            next(iter(lo))


def run_child(src: Path, spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)], env=env,
                         capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"bench_scale child failed ({spec['world']}/{spec['rank']}, {src}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def median_row(rows: list[dict]) -> dict:
    keys = ("startup_s", "rss_mb", "bytes_read_per_epoch", "molecules_per_s", "padding_fraction", "resume_s",
            "global_batches_per_s", "molecules_per_batch", "rss_after_imports_mb")
    out = {"world_size": rows[0]["world_size"]}
    for k in keys:
        vals = [r[k] for r in rows if r[k] is not None]
        out[k] = statistics.median(vals) if vals else None
    out["fraction_of_epoch_measured"] = statistics.median(r["fraction_of_epoch"] for r in rows)
    out["startup_bytes"] = statistics.median(r["startup_bytes"] for r in rows)
    out["ranks_measured"] = sorted({r["rank"] for r in rows})
    out["bytes_read_per_epoch_max_over_ranks"] = max(r["bytes_read_per_epoch"] for r in rows)
    out["runs"] = rows
    return out


def sweep(src: Path, root: Path, split: str, worlds: list[int], loader: dict, budget_s: float, repeats: int,
          label: str) -> list[dict]:
    rows = []
    for w in worlds:
        runs = []
        for rep in range(repeats):
            rank = [0, w - 1, w // 2][rep % 3] if w > 1 else 0  # different ranks of the same job
            r = run_child(src, {"root": str(root), "split": split, "world": w, "rank": rank, "loader": loader,
                                "budget_s": budget_s})
            print(f"{label} W={w} rank={rank}: {json.dumps(r)}", file=sys.stderr, flush=True)
            runs.append(r)
        rows.append(median_row(runs))
    return rows


def goals(rows: list[dict]) -> dict:
    by = {r["world_size"]: r for r in rows}
    w0 = min(by)
    ratios = {w: by[w]["bytes_read_per_epoch"] * w / (by[w0]["bytes_read_per_epoch"] * w0) for w in by}
    g = {"bytes_per_rank_times_w_over_w1": {str(w): round(v, 4) for w, v in ratios.items()}}
    g["bytes_fall_as_1_over_w_within_10pct"] = all(abs(v - 1) <= GOALS["bytes_1_over_w_within"]
                                                   for v in ratios.values())
    # The median rank against the heaviest one measured: rank 0 takes the largest molecule of every W with a token
    # budget (size-sorted round robin), so it reads (and computes) more than the mean at large W.
    worst = {w: by[w]["bytes_read_per_epoch_max_over_ranks"] * w / (by[w0]["bytes_read_per_epoch"] * w0) for w in by}
    g["max_over_measured_ranks_times_w_over_w1"] = {str(w): round(v, 4) for w, v in worst.items()}
    g["max_rank_within_10pct"] = all(abs(v - 1) <= GOALS["bytes_1_over_w_within"] for v in worst.values())
    big = by[max(by)]
    g["rss_under_1gb_at_w%d" % max(by)] = big["rss_mb"] < GOALS["rss_mb_max_at_512"]
    g["startup_under_10s_all_w"] = all(r["startup_s"] < GOALS["startup_s_max"] for r in rows)
    rates = [r["molecules_per_s"] for r in rows if r["molecules_per_s"]]
    g["at_least_50k_molecules_per_s_all_w"] = bool(rates) and min(rates) >= GOALS["molecules_per_s_min"]
    return g


def projection(rows: list[dict], n_molecules: int) -> dict:
    """Per-epoch I/O of a 64-GPU job at the paper's GEOM rate, from the measured bytes per rank at W = 64."""
    by = {r["world_size"]: r for r in rows}
    w = H100S if H100S in by else max(by)
    per_rank = by[w]["bytes_read_per_epoch"] * w / H100S
    epoch_s = n_molecules / (PAPER_IT_S * PAPER_BATCH)
    return {"gpus": H100S, "it_per_s": PAPER_IT_S, "global_batch": PAPER_BATCH, "from_world_size": w,
            "epoch_hours": round(epoch_s / 3600, 2), "bytes_per_rank_per_epoch": round(per_rank),
            "bytes_all_ranks_per_epoch": round(per_rank * H100S),
            "mb_per_s_per_rank": round(per_rank / epoch_s / 1e6, 4),
            "mb_per_s_all_ranks": round(per_rank * H100S / epoch_s / 1e6, 3)}


def _layout(shard: Path) -> dict:
    """How the first shard stores its arrays: HDF5 reads whole chunks, so chunked or compressed arrays read more."""
    import h5py

    with h5py.File(shard, "r") as f:
        return {k: {"chunks": f[k].chunks, "compression": f[k].compression, "dtype": str(f[k].dtype)} for k in f}


def make_synthetic(n: int, out: Path, shard_size: int, seed: int = 0) -> None:
    """Random-coordinate molecules with GEOM-Drugs' size histogram (SPEC Appendix A), written as shards."""
    import numpy as np

    from symdiff.data.molecules import MoleculeSet
    from symdiff.data.shards import make_manifest, publish, temp_dir_for, write_manifest, write_shard

    spec = ROOT.parent / "shared" / "SPEC.md"
    text = spec.read_text().split("## Appendix A.", 1)[1].splitlines()[2]
    hist = {int(k): int(v) for k, v in (p.split(":") for p in text.split())}
    sizes_v, counts = np.array(list(hist)), np.array(list(hist.values()), dtype=float)
    rng = np.random.default_rng(seed)
    tmp = temp_dir_for(out)
    entries = []
    for k, start in enumerate(range(0, n, shard_size)):
        m = min(shard_size, n - start)
        sizes = rng.choice(sizes_v, m, p=counts / counts.sum())
        off = np.zeros(m + 1, np.int64)
        np.cumsum(sizes, out=off[1:])
        z = rng.choice(np.array([1, 6, 7, 8, 9, 16, 17], np.int8), int(off[-1]), p=[.48, .35, .06, .07, .01, .02, .01])
        mols = MoleculeSet(z, rng.normal(0, 3, (int(off[-1]), 3)).astype(np.float32), off,
                           np.arange(start, start + m, dtype=np.int64))
        rel = f"train/train-{k:05d}.h5"
        entries.append({"path": rel, **write_shard(tmp / rel, mols, dataset="geom", split="train")})
    man = make_manifest("geom", {"train": entries}, extra={"synthetic": True, "source": "bench_scale random "
                                                           "coordinates, GEOM-Drugs size histogram (SPEC App. A)"})
    write_manifest(tmp, man)
    publish(tmp, out, overwrite=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path)
    p.add_argument("--split", default="train")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 8, 64, 512])
    p.add_argument("--baseline", type=Path, default=None, help="checkout of the previous loader (e.g. ../main)")
    p.add_argument("--baseline-worlds", type=int, nargs="+", default=None)
    p.add_argument("--budget-s", type=float, default=40.0, help="seconds of epoch per measurement, at most")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline-repeats", type=int, default=2)
    p.add_argument("--max-atoms-per-batch", type=int, default=180_224,
                   help="global token budget (default: 512 ranks x 8 molecules x 44 atoms)")
    p.add_argument("--stem", default="scale_geom")
    p.add_argument("--make-synthetic", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--out", type=Path)
    p.add_argument("--note", default="")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    if a.make_synthetic:
        make_synthetic(a.make_synthetic, a.out, a.shard_size)
        return 0
    from _machine import git_commit, machine

    man = json.loads((a.root / "manifest.json").read_text())
    split = man["splits"][a.split]
    loader = {"batch_size": 0, "max_atoms_per_batch": a.max_atoms_per_batch, "n_buckets": 8, "seed": 0,
              "chunk_size": 256, "window_chunks": 64}
    res = {"benchmark": "bench_scale", "machine": machine(), "commit": git_commit(),
           "load_average_start": [round(v, 2) for v in os.getloadavg()],
           "method": __doc__.split("\n\n", 2)[2].strip(), "loader": loader, "budget_s": a.budget_s,
           "repeats": a.repeats, "note": a.note,
           "build": {"root": str(a.root), "synthetic": bool(man.get("synthetic", True)),
                     "marked_synthetic_in_manifest": man.get("synthetic"), "source": man.get("source"),
                     "dataset": man["dataset"], "split": a.split, "n_molecules": split["n_molecules"],
                     "n_atoms": split["n_atoms"], "n_shards": len(split["shards"]), "max_atoms": man["max_atoms"],
                     "bytes_on_disk": sum((a.root / s["path"]).stat().st_size for s in split["shards"])},
           "goals": GOALS}
    res["build"]["layout"] = _layout(a.root / split["shards"][0]["path"])
    res["build"]["manifest_extra"] = {k: v for k, v in man.items() if k not in ("splits", "n_atoms_histogram",
                                                                              "atom_types", "atom_symbols")}
    res["ranks"] = sweep(ROOT, a.root, a.split, a.worlds, loader, a.budget_s, a.repeats, "new")
    res["goals_result"] = goals(res["ranks"])
    res["projection_64_h100"] = projection(res["ranks"], split["n_molecules"])
    if a.baseline:
        res["baseline"] = {"src": str(a.baseline.resolve()), "commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=a.baseline, capture_output=True, text=True).stdout.strip()}
        res["baseline"]["ranks"] = sweep(a.baseline, a.root, a.split, a.baseline_worlds or a.worlds, loader,
                                         a.budget_s, a.baseline_repeats, "baseline")
        res["baseline"]["projection_64_h100"] = projection(res["baseline"]["ranks"], split["n_molecules"])
    res["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    out = HERE / "results" / f"{a.stem}.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: res[k] for k in ("goals_result", "projection_64_h100")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

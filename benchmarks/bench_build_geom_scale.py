#!/usr/bin/env python
"""`symdiff data build --dataset geom` at GEOM-Drugs scale, from the synthetic full-size drugs_crude.msgpack
(tools/make_geom_scale.py): peak RSS per rank at two source sizes, conformers/s per rank serial and at 2 ranks,
and the projected wall time for K ranks.

Each build is one subprocess of the product (serial, or under `mpirun -n R`); its manifest records every rank's
peak RSS (getrusage) and CPU seconds. Runs are appended to a JSONL log, so long builds can be taken one at a time:

    .venv/bin/python benchmarks/bench_build_geom_scale.py run --source /work/scale/geom_7m/drugs_crude.msgpack \
        --ranks 2 --out /work/scale/geom_7m_shards --keep
    .venv/bin/python benchmarks/bench_build_geom_scale.py report --generation /work/scale/logs/gen_7m.json ...
Writes benchmarks/results/build_geom_scale.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import git_commit, machine  # noqa: E402

from symdiff.data.shards import read_manifest  # noqa: E402

SYMDIFF = str(Path(sys.executable).with_name("symdiff"))
RESULTS = Path(__file__).resolve().parent / "results"
PROJECT_K = (8, 64, 512)


def build_once(source: Path, out: Path, ranks: int) -> dict:
    cmd = [SYMDIFF, "data", "build", "--dataset", "geom", "--source", str(source), "--out", str(out)]
    if ranks > 1:
        cmd = ["mpirun", "--allow-run-as-root", "-n", str(ranks), *cmd, "--mpi"]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    commit = git_commit()  # before: the checkout may move on while a long build runs
    load0, t0 = os.getloadavg(), time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    man = read_manifest(out)
    b = man["build"]
    return {"source": str(source), "source_bytes": source.stat().st_size, "ranks": ranks, "wall_s": round(wall, 1),
            "build_s": b["seconds"], "conformers": sum(s["n_molecules"] for s in man["splits"].values()),
            "atoms": sum(s["n_atoms"] for s in man["splits"].values()), "synthetic": man.get("synthetic"),
            "rank_peak_rss_mb": b.get("rank_peak_rss_mb"), "rank_cpu_s": b["rank_cpu_seconds"],
            "load_before": [round(v, 2) for v in load0], "load_after": [round(v, 2) for v in os.getloadavg()],
            "commit": commit, "date_utc": machine()["date_utc"]}


def cmd_run(a: argparse.Namespace) -> None:
    a.log.parent.mkdir(parents=True, exist_ok=True)
    for k in range(a.repeats):
        out = a.out if a.keep and k == a.repeats - 1 else a.out.with_name(f"{a.out.name}.bench-{k}")
        rec = build_once(a.source, out, a.ranks)
        with open(a.log, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)
        if out != a.out or not a.keep:
            shutil.rmtree(out, ignore_errors=True)


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def cmd_report(a: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in a.log.read_text().splitlines() if line.strip()]
    gen = {name: json.loads(Path(p).read_text()) for name, p in (kv.split("=", 1) for kv in a.generation)}
    groups: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["source_bytes"], r["ranks"]), []).append(r)
    cases = []
    for (size, ranks), rs in sorted(groups.items()):
        n = rs[0]["conformers"]
        wall = _median(rs, "wall_s")
        cpu = statistics.median(sum(r["rank_cpu_s"]) for r in rs)
        cases.append({
            "source": rs[0]["source"], "source_gb": round(size / 1e9, 2), "ranks": ranks, "runs": len(rs),
            "conformers": n, "wall_s_median": wall, "wall_s_all": [r["wall_s"] for r in rs],
            "peak_rss_mb_per_rank_max": max(max(r["rank_peak_rss_mb"]) for r in rs),
            "peak_rss_mb_per_rank_all": [r["rank_peak_rss_mb"] for r in rs],
            # wall clock on a shared machine: a lower bound of what an idle core does
            "conformers_per_s_per_rank_wall": round(n / wall / ranks),
            # CPU seconds of the ranks (imports and start-up included): what one core does when it gets the core
            "conformers_per_cpu_s_per_rank": round(n / cpu),
            "load_before": [r["load_before"] for r in rs], "commit": sorted({r["commit"] for r in rs})})
    res = {"machine": machine(), "commit": git_commit(), "generation": gen, "cases": cases}
    shared = []
    if a.shared_build:  # the kept build other benchmarks read, and runs of the same (earlier) code, recorded apart
        shared = [json.loads(line) for line in a.shared_build.read_text().splitlines() if line.strip()]
        res["shared_build"] = shared
        by: dict[int, dict[int, float]] = {}
        for r in shared:
            by.setdefault(r["ranks"], {})[r["source_bytes"]] = max(r["rank_peak_rss_mb"])
        res["shared_build_rss_full_over_small"] = {str(k): round(v[max(v)] / v[min(v)], 3)
                                                   for k, v in by.items() if len(v) > 1}
    full = max(cases, key=lambda c: (c["source_gb"], -c["ranks"]))
    # The streaming claim: per-rank peak RSS at full size over that at the smallest size, for each rank count.
    res["rss_full_over_small"] = {}
    for ranks in sorted({c["ranks"] for c in cases}):
        rs = [c for c in cases if c["ranks"] == ranks]
        if len(rs) > 1:
            lo, hi = min(rs, key=lambda c: c["source_gb"]), max(rs, key=lambda c: c["source_gb"])
            res["rss_full_over_small"][str(ranks)] = round(hi["peak_rss_mb_per_rank_max"]
                                                           / lo["peak_rss_mb_per_rank_max"], 3)
    # Projection for K ranks on idle cores: every rank parses 1/K of the conformers at the measured rate per
    # CPU-second, after what does not shrink with K: process start-up (CPU seconds of building a 10-molecule file)
    # and rank 0's pass that finds the objects' byte ranges (CPU seconds on --scan-source, scaled by file size).
    # CPU seconds, not wall: on this shared machine a process got as little as a tenth of a core.
    tiny = [build_once(a.startup_source, a.startup_source.parent / f"startup-{k}", 1) for k in range(3)]
    for k in range(3):
        shutil.rmtree(a.startup_source.parent / f"startup-{k}", ignore_errors=True)
    startup = statistics.median(r["rank_cpu_s"][0] for r in tiny)
    from symdiff.data.geom import open_geom_source
    t0, c0 = time.perf_counter(), time.process_time()
    n_scan = len(open_geom_source(a.scan_source, shard_size=1, trust_pickle=False, split_smiles="none",
                                  split_seed=0, permutation=None, conformers=30).object_bounds()) - 1
    scan_wall, scan_cpu = time.perf_counter() - t0, time.process_time() - c0
    # The full-size conformer count from the largest build recorded (a shared build counts); the rate per
    # CPU-second from the largest multi-rank case of this code (it does not depend on the source size).
    biggest = max([{"source": c["source"], "conformers": c["conformers"]} for c in cases] + shared,
                  key=lambda r: Path(r["source"]).stat().st_size)
    full_bytes = Path(biggest["source"]).stat().st_size
    scan_full = scan_cpu * full_bytes / a.scan_source.stat().st_size
    # the generator's own count where given, else the scanned file's objects scaled by size
    n_obj = gen.get("full", {}).get("objects") or round(n_scan * full_bytes / a.scan_source.stat().st_size)
    mpi = sorted((c for c in cases if c["ranks"] > 1), key=lambda c: -c["source_gb"])
    rate = (mpi or [full])[0]["conformers_per_cpu_s_per_rank"]
    full = biggest
    res["projection"] = {
        "source": biggest["source"], "conformers": full["conformers"], "rate_conformers_per_s_per_rank": rate,
        "startup_cpu_s": round(startup, 2),
        "index_scan": {"source": str(a.scan_source), "objects": n_scan, "wall_s": round(scan_wall, 1),
                       "cpu_s": round(scan_cpu, 1), "cpu_s_scaled_to_full": round(scan_full, 1)},
        "objects_full": n_obj,
        "method": "startup_cpu_s + index_scan.cpu_s_scaled_to_full + conformers / (min(K, objects_full) * rate); "
                  "rate = conformers per CPU-second per rank of the largest multi-rank build of this code (one "
                  "msgpack object is the unit of work, so at most objects_full ranks have work)",
        "wall_s": {str(k): round(startup + scan_full + full["conformers"] / (min(k, n_obj) * rate), 1)
                   for k in PROJECT_K}}
    res["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "build_geom_scale.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="build (repeats times) and append the measurements to --log")
    r.add_argument("--source", type=Path, required=True)
    r.add_argument("--ranks", type=int, default=1)
    r.add_argument("--repeats", type=int, default=1)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--keep", action="store_true", help="keep the last build at --out (the others are removed)")
    r.add_argument("--log", type=Path, default=Path("/work/scale/logs/build_runs.jsonl"))
    s = sub.add_parser("report", help="medians of the logged runs -> benchmarks/results/build_geom_scale.json")
    s.add_argument("--log", type=Path, default=Path("/work/scale/logs/build_runs.jsonl"))
    s.add_argument("--generation", nargs="*", default=[], help="NAME=stats.json of tools/make_geom_scale.py")
    s.add_argument("--shared-build", type=Path, default=None, help="JSONL of the kept build, reported apart")
    s.add_argument("--startup-source", type=Path, required=True, help="a tiny msgpack: the per-run fixed cost")
    s.add_argument("--scan-source", type=Path, required=True, help="msgpack to time the object-index pass on")
    a = p.parse_args()
    cmd_run(a) if a.cmd == "run" else cmd_report(a)


if __name__ == "__main__":
    main()

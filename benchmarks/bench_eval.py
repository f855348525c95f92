#!/usr/bin/env python
"""Speed of the evaluation: 10,000 real QM9 molecules through the whole EDM protocol on one core.

    .venv/bin/python benchmarks/bench_eval.py [--n 10000] [--loop-sample 300]

Measures (a) `symdiff eval --samples FILE.sdf --dataset qm9 --json OUT` as a subprocess pinned to one core
(reading the SDF, bonds, stability, RDKit validity, uniqueness, novelty against the cached training SMILES);
(b) the in-process stages; (c) a plain per-pair Python loop of the same rule (the reference code's structure) on a
sample, extrapolated, for comparison; (d) the GEOM-Drugs sample under both protocols. Wall and CPU seconds are
both recorded: the machine is shared, so wall time includes waiting for a core.
Writes benchmarks/results/eval_speed.json and .md. Target: (a) under 15 s.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_cli(args: list[str]) -> tuple[float, float, dict]:
    out = Path(tempfile.mkdtemp()) / "m.json"
    cmd = [str(ROOT / ".venv" / "bin" / "symdiff"), "eval", *args, "--json", str(out)]
    if Path("/usr/bin/taskset").exists():
        cmd = ["taskset", "-c", "0", *cmd]
    c0, t0 = _child_cpu(), time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - t0, _child_cpu() - c0, json.loads(out.read_text())


def loop_reference(mols, symbols) -> float:
    """Seconds for the per-pair loop of the reference code's structure (stability only) on ``mols``."""
    from symdiff.eval.tables import threshold_tables

    thr = threshold_tables(symbols)
    idx = {1: 0, 6: 1, 7: 2, 8: 3, 9: 4}
    t0 = time.perf_counter()
    for m in range(len(mols)):
        z, x = mols.molecule(m)
        val = [0] * len(z)
        for i in range(len(z)):
            for j in range(i + 1, len(z)):
                d = float(np.sqrt(np.sum((x[i] - x[j]) ** 2))) * 100
                a, b = idx[int(z[i])], idx[int(z[j])]
                o = 0
                if d < thr[0, a, b]:
                    o = 1
                    if d < thr[1, a, b]:
                        o = 2
                        if d < thr[2, a, b]:
                            o = 3
                val[i] += o
                val[j] += o
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--loop-sample", type=int, default=300)
    args = ap.parse_args()

    from symdiff.eval import metrics, reference
    from symdiff.io.molfiles import read_records, write_sdf

    work = Path(tempfile.mkdtemp(prefix="symdiff_bench_eval_"))
    test = reference.load_qm9_split("test").mols
    pick = np.sort(np.random.default_rng(0).choice(len(test), size=args.n, replace=False))
    mols = test.select(pick)
    sdf = work / "qm9_10k.sdf"
    write_sdf(sdf, mols)

    # the novelty reference (100,000 training molecules through the same rules) is built once and cached;
    # time a cold build into a scratch cache, then make sure the real cache exists before timing the CLI
    os.environ["SYMDIFF_CACHE_DIR"] = str(work / "cache")
    t0 = time.perf_counter()
    reference.edm_train_smiles("qm9")
    cache_cold = time.perf_counter() - t0
    del os.environ["SYMDIFF_CACHE_DIR"]
    reference.edm_train_smiles("qm9")

    cli_runs = [run_cli(["--samples", str(sdf), "--dataset", "qm9"]) for _ in range(3)]
    best = min(cli_runs, key=lambda r: r[0])

    # in-process stages
    c0, t0 = time.process_time(), time.perf_counter()
    rec = read_records(sdf)
    t_read = (time.perf_counter() - t0, time.process_time() - c0)
    c0, t0 = time.process_time(), time.perf_counter()
    include, reasons = metrics.screen(rec.mols, "qm9")
    from symdiff.eval.edm import detect_bonds

    detect_bonds(rec.mols.atomic_numbers, rec.mols.positions, rec.mols.offsets, metrics.DATASET_SYMBOLS["qm9"],
                 include)
    t_bonds = (time.perf_counter() - t0, time.process_time() - c0)
    train = reference.edm_train_smiles("qm9")
    c0, t0 = time.process_time(), time.perf_counter()
    res = metrics.evaluate_edm_protocol(rec.mols, "qm9", train, include, reasons)
    t_all = (time.perf_counter() - t0, time.process_time() - c0)

    loop_s = loop_reference(mols.select(np.arange(args.loop_sample)), metrics.DATASET_SYMBOLS["qm9"])
    loop_extrapolated = loop_s * args.n / args.loop_sample

    geom_wall, geom_cpu, geom = run_cli(["--reference-split", "sample", "--dataset", "geom", "--no-novelty"])

    result = {
        "machine": machine(),
        "load_average_at_start": os.getloadavg(),
        "n_molecules": args.n,
        "cli_qm9_wall_s": [round(r[0], 3) for r in cli_runs],
        "cli_qm9_cpu_s": [round(r[1], 3) for r in cli_runs],
        "cli_qm9_best_wall_s": round(best[0], 3),
        "target_s": 15.0,
        "metrics": metrics.public(best[2]),
        "in_process": {
            "read_sdf_wall_s": round(t_read[0], 3), "read_sdf_cpu_s": round(t_read[1], 3),
            "bonds_and_stability_wall_s": round(t_bonds[0], 3), "bonds_and_stability_cpu_s": round(t_bonds[1], 3),
            "edm_protocol_total_wall_s": round(t_all[0], 3), "edm_protocol_total_cpu_s": round(t_all[1], 3),
        },
        "per_pair_loop_stability_only": {"molecules": args.loop_sample, "seconds": round(loop_s, 3),
                                         "extrapolated_to_n_s": round(loop_extrapolated, 1)},
        "novelty_cache_cold_build_s": round(cache_cold, 2),
        "geom_sample_both_protocols": {"wall_s": round(geom_wall, 3), "cpu_s": round(geom_cpu, 3),
                                       "edm": {k: geom["side_by_side"]["edm"][k] for k in
                                               ("atom_stability", "mol_stability", "validity", "uniqueness")},
                                       "revised": {k: geom["side_by_side"]["revised"][k] for k in
                                                   ("atom_stability", "mol_stability", "validity", "connected",
                                                    "uniqueness")}},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "eval_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    md = [f"# Evaluation speed ({m['date_utc']} UTC, {m['cpu']}, {m['cores']} cores, shared machine)", "",
          f"`symdiff eval --samples qm9_10k.sdf --dataset qm9 --json OUT` on {args.n:,} real QM9 test molecules,"
          f" pinned to one core (`taskset -c 0`), 3 runs:", "",
          f"- wall: {', '.join(f'{v:.2f}' for v in result['cli_qm9_wall_s'])} s (target < 15 s)",
          f"- CPU: {', '.join(f'{v:.2f}' for v in result['cli_qm9_cpu_s'])} s", "",
          "In-process stages (wall / CPU s): read SDF "
          f"{t_read[0]:.2f} / {t_read[1]:.2f}; bonds + stability {t_bonds[0]:.2f} / {t_bonds[1]:.2f}; whole EDM "
          f"protocol incl. RDKit validity, uniqueness, novelty {t_all[0]:.2f} / {t_all[1]:.2f}.", "",
          f"A per-pair Python loop of the same bond rule (stability only, the reference code's structure) takes "
          f"{loop_s:.2f} s for {args.loop_sample} molecules, i.e. about {loop_extrapolated:.0f} s for {args.n:,}.",
          "",
          f"One-off cold build of the QM9 novelty cache (100,000 training molecules): {cache_cold:.1f} s wall.", "",
          f"GEOM-Drugs sample (503 conformers), both protocols: {geom_wall:.2f} s wall, {geom_cpu:.2f} s CPU.",
          "", f"Load average at start: {', '.join(f'{v:.2f}' for v in result['load_average_at_start'])} "
          "(other work was running on the 2 cores).", ""]
    (OUT / "eval_speed.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

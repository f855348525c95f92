#!/usr/bin/env python
"""Shard build throughput for the full QM9 (130,831 molecules): serial and `mpirun -n 2`, from qm9.npz and from
the raw xyz format (written here from qm9.npz with its real properties, Mulliken charges, SMILES and InChI;
frequencies are zeros). Also checks that the raw-format build holds the same molecules in the same order.

    .venv/bin/python benchmarks/bench_build.py [--shared ../shared/data] [--work /tmp/bench_build] [--tar]
Writes benchmarks/results/data_build.json and .md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine, save  # noqa: E402

from symdiff.data.qm9 import format_xyz  # noqa: E402
from symdiff.data.shards import read_manifest, read_split, verify  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SYMDIFF = str(Path(sys.executable).with_name("symdiff"))


CPU: dict[str, list] = {}


def run(cmd: list[str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    out = Path(cmd[cmd.index("--out") + 1])
    CPU[str(out)] = read_manifest(out)["build"]["rank_cpu_seconds"]
    return time.perf_counter() - t


def build_cmd(source: Path, out: Path, mpi: int = 0) -> list[str]:
    cmd = [SYMDIFF, "data", "build", "--dataset", "qm9", "--source", str(source), "--out", str(out), "--overwrite"]
    if mpi:
        return ["mpirun", "--allow-run-as-root", "-n", str(mpi), *cmd, "--mpi"]
    return cmd


def write_xyz_dir(npz: Path, d: Path) -> float:
    t = time.perf_counter()
    q = np.load(npz)
    off, ids = q["offsets"], q["mol_id"]
    z, x, mull, props = q["atomic_numbers"], q["positions"], q["mulliken_charges"], q["properties"]
    smi, inchi = q["smiles_gdb"], q["inchi"]
    d.mkdir(parents=True, exist_ok=True)
    for i in range(len(ids)):
        a, b = off[i], off[i + 1]
        (d / f"dsgdb9nsd_{int(ids[i]):06d}.xyz").write_text(
            format_xyz(int(ids[i]), z[a:b], x[a:b], properties=props[i], mulliken=mull[a:b], smiles=str(smi[i]),
                       inchi=str(inchi[i])))
    return time.perf_counter() - t


def same_molecules(a: Path, b: Path) -> bool:
    for split in ("train", "valid", "test"):
        x, y = read_split(a, split), read_split(b, split)
        if not (np.array_equal(x.mol_ids, y.mol_ids) and np.array_equal(x.offsets, y.offsets)
                and np.array_equal(x.atomic_numbers, y.atomic_numbers) and np.array_equal(x.positions, y.positions)):
            return False
    return True


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--work", type=Path, default=Path("/tmp/symdiff_bench_build"))
    p.add_argument("--tar", action="store_true", help="also build from a dsgdb9nsd.xyz.tar.bz2 made here")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    npz = a.shared / "qm9" / "qm9.npz"
    a.work.mkdir(parents=True, exist_ok=True)
    n = 130_831
    res: dict = {"machine": machine(), "n_molecules": n, "results": []}

    def rec(name: str, secs: list[float], out: Path, **extra) -> None:
        best = min(secs)
        res["results"].append({"case": name, "seconds_best": round(best, 3), "seconds_all": [round(s, 3) for s in secs],
                               "molecules_per_s": round(n / best), "rank_cpu_seconds_last": CPU[str(out)], **extra})
        print(res["results"][-1], flush=True)

    for ranks in (0, 2):
        secs = [run(build_cmd(npz, a.work / f"npz{ranks}", ranks)) for _ in range(a.repeats)]
        rec(f"qm9.npz -> shards, {'serial' if not ranks else f'mpirun -n {ranks}'}", secs, a.work / f"npz{ranks}",
            ranks=max(1, ranks))
    verify(a.work / "npz0")
    res["npz_serial_equals_mpi"] = read_manifest(a.work / "npz0")["splits"] == read_manifest(a.work / "npz2")["splits"]

    xyz = a.work / "xyz"
    if not (xyz / "dsgdb9nsd_133885.xyz").is_file():
        res["write_xyz_seconds"] = round(write_xyz_dir(npz, xyz), 1)
    for ranks in (0, 2):
        secs = [run(build_cmd(xyz, a.work / f"xyz{ranks}", ranks)) for _ in range(max(1, a.repeats - 1))]
        rec(f"raw xyz directory -> shards, {'serial' if not ranks else f'mpirun -n {ranks}'}", secs,
            a.work / f"xyz{ranks}", ranks=max(1, ranks))
    res["xyz_dir_same_molecules_as_npz"] = same_molecules(a.work / "npz0", a.work / "xyz0")
    res["xyz_serial_equals_mpi"] = read_manifest(a.work / "xyz0")["splits"] == read_manifest(a.work / "xyz2")["splits"]
    res["xyz_counts"] = {k: v["n_molecules"] for k, v in read_manifest(a.work / "xyz0")["splits"].items()}

    if a.tar:
        tar = a.work / "dsgdb9nsd.xyz.tar.bz2"
        if not tar.is_file():
            t = time.perf_counter()
            with tarfile.open(tar, "w:bz2") as tf:
                for f in sorted(xyz.iterdir()):
                    tf.add(f, arcname=f.name)
            res["write_tar_seconds"] = round(time.perf_counter() - t, 1)
        for ranks in (0, 2):
            rec(f"raw xyz .tar.bz2 -> shards, {'serial' if not ranks else f'mpirun -n {ranks}'}",
                [run(build_cmd(tar, a.work / f"tar{ranks}", ranks))], a.work / f"tar{ranks}", ranks=max(1, ranks))
        res["tar_same_molecules_as_npz"] = same_molecules(a.work / "npz0", a.work / "tar0")

    table = ["| case | ranks | wall seconds | molecules/s | CPU seconds per rank (process, imports included) |",
             "|---|---|---|---|---|"]
    for r in res["results"]:
        table.append(f"| {r['case']} | {r['ranks']} | {r['seconds_best']} | {r['molecules_per_s']:,} | "
                     f"{r['rank_cpu_seconds_last']} |")
    table += ["", f"- serial and 2-rank builds from qm9.npz identical (shard sha256): {res['npz_serial_equals_mpi']}",
              f"- raw xyz build counts {res['xyz_counts']}; same molecules/order/coordinates as the npz build: "
              f"{res['xyz_dir_same_molecules_as_npz']}; serial == 2 ranks: {res['xyz_serial_equals_mpi']}"]
    if a.tar:
        table.append(f"- .tar.bz2 build same molecules as npz: {res['tar_same_molecules_as_npz']}")
    save(res, "data_build", "Shard build throughput, full QM9 (130,831 molecules)",
         "`benchmarks/bench_build.py`. Best of the repeats, wall clock of the whole command (process start, imports "
         "and MPI start-up included).", table)
    shutil.rmtree(a.work / "npz2", ignore_errors=True)


if __name__ == "__main__":
    main()

"""MPI build under a real `mpirun -n 2`: disjoint shards per rank, same molecules and order as the serial build."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest

from symdiff.data.build import build
from symdiff.data.bundled import geom_sample_path, subset_path
from symdiff.data.shards import read_manifest, read_split, verify

MPIRUN = shutil.which("mpirun")
pytestmark = pytest.mark.skipif(MPIRUN is None, reason="mpirun (Open MPI) not installed")
SYMDIFF = str(Path(sys.executable).with_name("symdiff"))


def _mpirun(args: list[str], n: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMPI_MCA_rmaps_base_oversubscribe="1", OMP_NUM_THREADS="1")
    return subprocess.run([MPIRUN, "--allow-run-as-root", "-n", str(n), SYMDIFF, "data", "build", *args, "--mpi"],
                          capture_output=True, text=True, env=env, timeout=300)


def _assert_same(a: Path, b: Path) -> None:
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma["splits"] == mb["splits"]  # same shard files (sha256), same order
    assert ma["n_atoms_histogram"] == mb["n_atoms_histogram"]
    assert mb["build"]["ranks"] == 2 and ma["build"]["ranks"] == 1
    for split in ma["splits"]:
        x, y = read_split(a, split), read_split(b, split)
        assert np.array_equal(x.mol_ids, y.mol_ids) and np.array_equal(x.positions, y.positions)
    verify(b)


def test_mpi_build_of_qm9_npz_equals_serial(tmp_path):
    build("qm9", subset_path(), tmp_path / "serial", shard_size=700)
    r = _mpirun(["--dataset", "qm9", "--source", str(subset_path()), "--out", str(tmp_path / "mpi"),
                 "--shard-size", "700"])
    assert r.returncode == 0, r.stderr
    _assert_same(tmp_path / "serial", tmp_path / "mpi")
    # both ranks wrote shards: rank r owns the parts k with k % 2 == r
    keys = {int(s["path"].split("-")[1]) % 2 for sp in read_manifest(tmp_path / "mpi")["splits"].values()
            for s in sp["shards"]}
    assert keys == {0, 1}


def test_mpi_build_of_geom_msgpack_equals_serial(tmp_path):
    g = np.load(geom_sample_path())
    rng = np.random.default_rng(3)
    path = tmp_path / "drugs_crude.msgpack"
    off = g["conf_offsets"]
    with open(path, "wb") as f:
        for m, smi in enumerate(g["mol_key"]):  # one msgpack object per molecule: 3 parts over 2 ranks
            confs = [{"xyz": np.column_stack([g["atomic_numbers"][off[c]:off[c + 1]],
                                              g["positions"][off[c]:off[c + 1]]]).tolist(),
                      "totalenergy": float(rng.normal())} for c in np.flatnonzero(g["conf_mol_index"] == m)]
            f.write(msgpack.packb({str(smi).replace("_", "/"): {"conformers": confs}}))
    args = ["--dataset", "geom", "--source", str(path), "--shard-size", "4", "--conformers", "5",
            "--split-smiles", "none"]
    from symdiff.cli import main
    assert main(["data", "build", *args, "--out", str(tmp_path / "serial")]) == 0
    r = _mpirun([*args, "--out", str(tmp_path / "mpi")])
    assert r.returncode == 0, r.stderr
    _assert_same(tmp_path / "serial", tmp_path / "mpi")
    assert sum(s["n_molecules"] for s in read_manifest(tmp_path / "mpi")["splits"].values()) == 15


def test_mpi_build_error_on_one_rank_fails_cleanly(tmp_path):
    # a part owned by rank 1 holds a molecule with a NaN coordinate: every rank must stop, nothing published
    z = dict(np.load(subset_path()))
    z["positions"] = z["positions"].copy()
    rows = np.flatnonzero(z["split_edm"] == 0)
    bad_row = rows[750]  # train part 1 (shard size 700) -> rank 1
    z["positions"][z["offsets"][bad_row], 0] = np.nan
    src = tmp_path / "bad.npz"
    np.savez(src, **z)
    r = _mpirun(["--dataset", "qm9", "--source", str(src), "--out", str(tmp_path / "out"), "--shard-size", "700"])
    assert r.returncode == 1
    assert f"molecule id {int(z['mol_id'][bad_row])}" in r.stderr and "non-finite" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]


def test_mpi_build_of_full_qm9_equals_serial(shared_data, tmp_path):
    src = shared_data / "qm9" / "qm9.npz"
    build("qm9", src, tmp_path / "serial")
    r = _mpirun(["--dataset", "qm9", "--source", str(src), "--out", str(tmp_path / "mpi")])
    assert r.returncode == 0, r.stderr
    man = read_manifest(tmp_path / "mpi")
    assert {k: v["n_molecules"] for k, v in man["splits"].items()} == \
        {"train": 100_000, "valid": 17_748, "test": 13_083}
    _assert_same(tmp_path / "serial", tmp_path / "mpi")

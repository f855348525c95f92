"""The GEOM-scale synthetic msgpack: its bytes are GEOM's format, it round-trips through `symdiff data build`, the
lowest-energy conformers are the ones kept, and it is marked synthetic in the file and in every built manifest."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest

from symdiff.data import geom
from symdiff.data.build import build
from symdiff.data.geom_scale import make_geom_scale, pack_conformers
from symdiff.data.shards import read_manifest, read_split

SMILES = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "C[N+](C)(C)C", "OC(=O)C(N)Cc1ccccc1", "ClC(Cl)Cl",
          "CC(C)Cc1ccc(C(C)C(=O)O)cc1", "N#Cc1ccccc1", "O=S(=O)(N)c1ccccc1", "C1CCNCC1", "[Na+]", "not a smiles"]


def _make(path: Path, **kw) -> dict:
    kw = {"molecules_per_object": 4, "min_conformers": 2, "max_conformers": 5, **kw}
    return make_geom_scale(SMILES, path, **kw)


def _objects(path: Path) -> list[dict]:
    with open(path, "rb") as f:
        return list(msgpack.Unpacker(f, raw=False, strict_map_key=False))


def test_packed_conformers_are_the_bytes_msgpack_writes() -> None:
    rng = np.random.default_rng(0)
    z, xs, e = np.array([6, 1, 8, 35], np.uint8), rng.normal(size=(3, 4, 3)), rng.normal(size=3)
    ref = msgpack.packb([{"xyz": [[int(z[i]), *map(float, xs[c, i])] for i in range(4)], "totalenergy": float(e[c])}
                         for c in range(3)])
    assert pack_conformers(msgpack.Packer(), z, xs, e) == ref


def test_file_is_geom_format_marked_synthetic_and_independent_of_workers(tmp_path: Path) -> None:
    stats = _make(tmp_path / "a.msgpack")
    _make(tmp_path / "b.msgpack", workers=2)
    assert (tmp_path / "a.msgpack").read_bytes() == (tmp_path / "b.msgpack").read_bytes()
    objs = _objects(tmp_path / "a.msgpack")
    # "[Na+]" (Na is not in the GEOM alphabet) and the unparsable SMILES are left out and counted
    assert stats["skipped_smiles"] == 2 and stats["molecules"] == 10 and len(objs) == 3
    assert [len(o) for o in objs] == [4, 4, 2]
    for obj in objs:
        for smiles, info in obj.items():
            assert info["synthetic"] is True and "not GEOM-Drugs" in info["synthetic_method"]
            confs = info["conformers"]
            assert 2 <= len(confs) <= 5 and info["totalconfs"] == len(confs)
            xyz = np.array([c["xyz"] for c in confs])
            assert xyz.shape[2] == 4 and np.all(xyz[:, :, 0] == xyz[0, :, 0])  # one molecule, jittered copies
    assert stats["conformers"] == sum(len(i["conformers"]) for o in objs for i in o.values())
    assert not list(tmp_path.glob(".*tmp"))  # written under a temporary name, then renamed


def test_build_keeps_the_lowest_energy_conformers_and_says_synthetic(tmp_path: Path) -> None:
    src = tmp_path / "drugs_crude.msgpack"
    _make(src)
    man = build("geom", src, tmp_path / "out", conformers=3, split_smiles="none")
    assert man["synthetic"] is True and man["source_format"] == "geom-msgpack"
    objs = _objects(src)
    expect = {}
    for i, obj in enumerate(objs):
        k = 0
        for info in obj.values():
            confs = info["conformers"]
            for j in np.argsort([c["totalenergy"] for c in confs], kind="stable")[:3]:
                expect[i * geom.PART_STRIDE + k] = np.array(confs[j]["xyz"])[:, 1:].astype(np.float32)
                k += 1
    got = {}
    for split in man["splits"]:
        s = read_split(tmp_path / "out", split)
        for m in range(len(s)):
            got[int(s.mol_ids[m])] = s.positions[s.offsets[m]:s.offsets[m + 1]]
    assert sorted(got) == sorted(expect)
    assert all(np.array_equal(got[k], expect[k]) for k in expect)


def test_one_conversion_per_molecule_builds_what_one_per_conformer_builds(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "drugs_crude.msgpack"
    _make(src)
    build("geom", src, tmp_path / "fast", split_smiles="none")
    monkeypatch.setattr(geom, "_conformer_block", lambda confs, keep: None)
    build("geom", src, tmp_path / "slow", split_smiles="none")
    assert read_manifest(tmp_path / "fast")["splits"] == read_manifest(tmp_path / "slow")["splits"]


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun (Open MPI) not installed")
def test_mpi_manifest_is_synthetic_when_only_another_rank_read_synthetic_molecules(tmp_path: Path) -> None:
    src = tmp_path / "drugs_crude.msgpack"
    _make(src)
    objs = _objects(src)
    for obj in objs[0::2]:  # rank 0 reads objects 0, 2: make them look real, so only rank 1 sees "synthetic"
        for info in obj.values():
            del info["synthetic"]
    src.write_bytes(b"".join(msgpack.packb(o) for o in objs))
    env = dict(os.environ, OMPI_MCA_rmaps_base_oversubscribe="1", OMP_NUM_THREADS="1")
    r = subprocess.run(["mpirun", "--allow-run-as-root", "-n", "2", sys.executable, "-m", "symdiff.cli", "data",
                        "build", "--dataset", "geom", "--source", str(src), "--out", str(tmp_path / "mpi"),
                        "--split-smiles", "none", "--mpi"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    man = read_manifest(tmp_path / "mpi")
    assert man["synthetic"] is True and man["build"]["ranks"] == 2 and len(man["build"]["rank_peak_rss_mb"]) == 2
    assert "SYNTHETIC" in r.stdout


class _OneRankOfTwo:
    """The communicator as rank 1 of 2 sees it: rank 0's broadcast of the object index arrives."""

    def __init__(self, bounds: list[int]) -> None:
        self.bounds = bounds

    def Ibarrier(self):  # noqa: N802 (mpi4py's name)
        return type("Done", (), {"Test": lambda self: True})()

    def bcast(self, obj, root=0):
        return self.bounds, None


def test_with_the_object_index_a_rank_reads_only_its_own_objects(tmp_path: Path) -> None:
    src = tmp_path / "drugs_crude.msgpack"
    _make(src)
    reader = geom.open_geom_source(src, shard_size=100, trust_pickle=False, split_smiles="none", split_seed=0,
                                   permutation=None, conformers=30)
    bounds = reader.object_bounds()
    assert len(bounds) == 4 and bounds[-1] == src.stat().st_size
    data = bytearray(src.read_bytes())  # objects 0 and 2 belong to rank 0: garble them in place
    for i in (0, 2):
        data[bounds[i]:bounds[i + 1]] = b"\xc1" * (bounds[i + 1] - bounds[i])
    src.write_bytes(bytes(data))
    reader.comm = _OneRankOfTwo(bounds)
    parts = list(reader.iter_parts(1, 2))
    assert [k for k, _ in parts] == [1] and sum(len(m) for m in parts[0][1].values()) > 0
    reader.comm = None  # skipping them instead means reading (and choking on) rank 0's bytes
    with pytest.raises(geom.DataError, match="object 0"):
        list(reader.iter_parts(1, 2))


class _RankZeroOfTwo:
    """The communicator as rank 0 of 2 sees it: what it broadcasts is what every rank gets."""

    def __init__(self) -> None:
        self.sent: list = []

    def Ibarrier(self):  # noqa: N802 (mpi4py's name)
        return type("Done", (), {"Test": lambda self: True})()

    def bcast(self, obj, root=0):
        self.sent.append(obj)
        return obj


def test_rank_zero_that_cannot_read_the_file_still_broadcasts_so_no_rank_waits(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "drugs_crude.msgpack"
    _make(src)
    reader = geom.open_geom_source(src, shard_size=100, trust_pickle=False, split_smiles="none", split_seed=0,
                                   permutation=None, conformers=30)

    def unreadable() -> list[int]:
        raise PermissionError(13, "Permission denied", str(src))

    monkeypatch.setattr(reader, "object_bounds", unreadable)
    reader.comm = comm = _RankZeroOfTwo()
    with pytest.raises(geom.DataError, match="cannot read: Permission denied"):
        list(reader.iter_parts(0, 2))
    assert len(comm.sent) == 1 and comm.sent[0][0] is None and str(src) in comm.sent[0][1]


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun (Open MPI) not installed")
def test_mpi_build_of_a_truncated_file_is_one_line_on_every_rank(tmp_path: Path) -> None:
    src = tmp_path / "drugs_crude.msgpack"
    _make(src)
    src.write_bytes(src.read_bytes()[:-100])
    env = dict(os.environ, OMPI_MCA_rmaps_base_oversubscribe="1", OMP_NUM_THREADS="1")
    r = subprocess.run(["mpirun", "--allow-run-as-root", "-n", "2", sys.executable, "-m", "symdiff.cli", "data",
                        "build", "--dataset", "geom", "--source", str(src), "--out", str(tmp_path / "mpi"),
                        "--split-smiles", "none", "--mpi"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"{src}: truncated: the file ends inside msgpack object 2" in r.stderr
    assert not (tmp_path / "mpi").exists()

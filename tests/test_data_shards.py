"""Shard writer/reader, manifest, verify, bad-input errors and atomic builds (npz sources, bundled subset)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from symdiff.cli import main as cli_main
from symdiff.data.build import build
from symdiff.data.bundled import ensure_bundled_shards, subset_path
from symdiff.data.molecules import MoleculeSet
from symdiff.data.shards import read_manifest, read_split, verify, write_dataset
from symdiff.errors import DataError


@pytest.fixture(scope="module")
def subset():
    return np.load(subset_path())


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    return ensure_bundled_shards(tmp_path_factory.mktemp("b") / "qm9")


def _subset_split(z, s: int) -> MoleculeSet:
    rows = np.flatnonzero(z["split_edm"] == s)
    full = MoleculeSet(z["atomic_numbers"], z["positions"], z["offsets"], z["mol_id"].astype(np.int64),
                       z["formal_charges"])
    return full.select(rows)


def test_bundled_subset_builds_verifies_and_round_trips(bundled, subset):
    man = read_manifest(bundled)
    assert man["dataset"] == "qm9" and man["atom_types"] == [1, 6, 7, 8, 9]
    assert {k: v["n_molecules"] for k, v in man["splits"].items()} == {"train": 6000, "valid": 1500, "test": 1500}
    assert man["has_formal_charges"] is True
    assert verify(bundled)["splits"]["train"]["n_molecules"] == 6000
    for s, name in enumerate(("train", "valid", "test")):
        got, want = read_split(bundled, name), _subset_split(subset, s)
        assert np.array_equal(got.mol_ids, want.mol_ids)
        assert np.array_equal(got.offsets, want.offsets)
        assert np.array_equal(got.atomic_numbers, want.atomic_numbers)
        assert np.array_equal(got.positions, want.positions)
        assert np.array_equal(got.formal_charges, want.formal_charges)
        hist = man["n_atoms_histogram"][name]
        assert sum(hist.values()) == len(want)
        assert hist == {str(k): int(v) for k, v in zip(*np.unique(want.n_atoms, return_counts=True))}
    assert man["max_atoms"] == int(np.diff(subset["offsets"]).max())
    # Every molecule of the bundled subset is a real QM9 molecule of the split the manifest says.
    assert subset["mol_id"].min() >= 1 and subset["mol_id"].max() <= 133_885


def test_ensure_bundled_is_idempotent(bundled):
    before = (bundled / "manifest.json").stat().st_mtime_ns
    assert ensure_bundled_shards(bundled) == bundled
    assert (bundled / "manifest.json").stat().st_mtime_ns == before


def _copy(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_flipped_byte_fails_verify_naming_the_shard(bundled, tmp_path, capsys):
    d = _copy(bundled, tmp_path / "d")
    shard = d / read_manifest(d)["splits"]["valid"]["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert cli_main(["data", "verify", str(d)]) == 1
    err = capsys.readouterr().err
    assert str(shard) in err and "checksum" in err
    assert cli_main(["data", "verify", str(bundled)]) == 0


def test_truncated_shard_and_bad_manifest_are_named(bundled, tmp_path):
    d = _copy(bundled, tmp_path / "t")
    man = read_manifest(d)
    shard = d / man["splits"]["test"]["shards"][0]["path"]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(DataError, match=str(shard)):
        verify(d)
    # a manifest whose counts do not match its shards (checksums still fine)
    d2 = _copy(bundled, tmp_path / "m")
    man = read_manifest(d2)
    man["splits"]["valid"]["n_molecules"] += 1
    (d2 / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataError, match="valid"):
        verify(d2)
    # a shard whose content is consistent with its checksum but not with the manifest entry
    d3 = _copy(bundled, tmp_path / "n")
    man = read_manifest(d3)
    man["splits"]["test"]["shards"][0]["n_molecules"] -= 5
    (d3 / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataError, match="test-"):
        verify(d3)
    # a missing shard
    d4 = _copy(bundled, tmp_path / "x")
    (d4 / read_manifest(d4)["splits"]["train"]["shards"][1]["path"]).unlink()
    with pytest.raises(DataError, match="missing"):
        verify(d4)


def _npz_with(tmp_path: Path, subset, edit) -> Path:
    """A copy of the first 300 bundled molecules in the qm9.npz layout, with ``edit`` applied."""
    arrays = {k: subset[k] for k in ("mol_id", "offsets", "atomic_numbers", "positions", "split_edm",
                                     "formal_charges")}
    n = 300
    a = int(arrays["offsets"][n])
    arrays = {"mol_id": arrays["mol_id"][:n], "offsets": arrays["offsets"][:n + 1],
              "atomic_numbers": arrays["atomic_numbers"][:a].copy(), "positions": arrays["positions"][:a].copy(),
              "split_edm": arrays["split_edm"][:n], "formal_charges": arrays["formal_charges"][:a]}
    edit(arrays)
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    return p


def _atom_of(arrays, mol: int, k: int = 0) -> int:
    return int(arrays["offsets"][mol]) + k


@pytest.mark.parametrize("what,edit,pattern", [
    ("nan", lambda a: a["positions"].__setitem__((_atom_of(a, 10), 1), np.nan), "non-finite"),
    ("inf", lambda a: a["positions"].__setitem__((_atom_of(a, 12), 0), np.inf), "non-finite"),
    ("element", lambda a: a["atomic_numbers"].__setitem__(_atom_of(a, 20, 1), 16), r"Z=\[16\] not in the qm9"),
])
def test_bad_molecules_are_named_or_skipped(tmp_path, subset, what, edit, pattern):
    src = _npz_with(tmp_path, subset, edit)
    bad_mol = {"nan": 10, "inf": 12, "element": 20}[what]
    bad_id = int(subset["mol_id"][bad_mol])
    with pytest.raises(DataError, match=rf"molecule id {bad_id}: .*{pattern}"):
        build("qm9", src, tmp_path / "out", shard_size=100)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.npz"]  # no half-written temp directory left behind
    man = build("qm9", src, tmp_path / "out", shard_size=100, skip_invalid=True)
    assert man["skipped"]["total"] == 1 and man["skipped"]["examples"]
    ids = np.concatenate([read_split(tmp_path / "out", s).mol_ids for s in man["splits"]])
    assert bad_id not in ids and len(ids) == 299


def test_empty_and_oversized_molecules(tmp_path):
    rng = np.random.default_rng(0)
    zs = [np.array([6, 1, 1, 1, 1]), np.zeros(0, np.int64), np.array([6] * 10 + [1] * 22), np.array([8, 1, 1])]
    xs = [rng.normal(size=(len(z), 3)) for z in zs]
    mols = MoleculeSet.from_lists(zs, xs, [101, 102, 103, 104])
    from symdiff.data.elements import QM9
    from symdiff.data.shards import Skipped, check_molecules
    with pytest.raises(DataError, match="molecule id 102: empty"):
        check_molecules(mols, QM9, skip_invalid=False, source="x")
    sk = Skipped()
    kept = check_molecules(mols, QM9, skip_invalid=True, source="x", skipped=sk)
    assert kept.mol_ids.tolist() == [101, 104]
    assert sk.counts["too many atoms"] == 1 and sk.examples["too many atoms"] == [103]
    assert sk.total == 2


def test_existing_output_is_never_overwritten_without_asking(bundled, tmp_path, subset):
    out = _copy(bundled, tmp_path / "keep")
    before = (out / "manifest.json").read_text()
    with pytest.raises(DataError, match="already exists"):
        build("qm9", subset_path(), out, shard_size=500)
    assert (out / "manifest.json").read_text() == before
    man = build("qm9", subset_path(), out, shard_size=500, overwrite=True)
    assert len(man["splits"]["train"]["shards"]) == 12 and verify(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch, subset):
    import symdiff.data.build as b

    calls = {"n": 0}
    real = b.write_shard

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(b, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        build("qm9", subset_path(), tmp_path / "out", shard_size=500)
    assert list(tmp_path.iterdir()) == []


def test_write_dataset_and_cli_info(tmp_path, capsys):
    rng = np.random.default_rng(1)
    zs = [rng.choice([1, 6, 8], size=n) for n in (3, 7, 5, 9)]
    mols = MoleculeSet.from_lists(zs, [rng.normal(size=(len(z), 3)) for z in zs], [5, 6, 7, 8])
    write_dataset(tmp_path / "w", "qm9", {"train": mols}, shard_size=3)
    assert verify(tmp_path / "w")["splits"]["train"] == {"n_molecules": 4, "n_shards": 2}
    assert cli_main(["data", "info", str(tmp_path / "w")]) == 0
    assert "train" in capsys.readouterr().out
    assert cli_main(["data", "verify", str(tmp_path / "nope")]) == 1


def test_full_qm9_npz_gives_the_edm_split(shared_data, tmp_path):
    out = tmp_path / "qm9"
    r = subprocess.run([sys.executable, "-m", "symdiff.cli", "data", "build", "--dataset", "qm9", "--source",
                        str(shared_data / "qm9" / "qm9.npz"), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    man = read_manifest(out)
    assert {k: v["n_molecules"] for k, v in man["splits"].items()} == \
        {"train": 100_000, "valid": 17_748, "test": 13_083}
    assert man["max_atoms"] == 29 and man["has_formal_charges"]
    # p(N) of the training split equals EDM's hard-coded qm9_with_h histogram (SPEC §1.4)
    assert man["n_atoms_histogram"]["train"]["29"] == 25 and man["n_atoms_histogram"]["train"]["19"] == 13832
    assert "28" not in man["n_atoms_histogram"]["train"]
    split = np.load(shared_data / "qm9" / "qm9_edm_split.npz")
    assert np.array_equal(read_split(out, "test").mol_ids, split["test"])
    assert verify(out)["max_atoms"] == 29


def test_molecule_set_select_gathers_the_right_atoms():
    rng = np.random.default_rng(0)
    zs = [rng.integers(1, 9, size=n) for n in rng.integers(0, 6, size=50)]
    m = MoleculeSet.from_lists(zs, [rng.normal(size=(len(z), 3)) for z in zs],
                               charges=[rng.integers(-1, 2, size=len(z)) for z in zs])
    idx = rng.integers(0, 50, size=80)
    s = m.select(idx)
    assert s.mol_ids.tolist() == idx.tolist()
    for k, i in enumerate(idx):
        a, b = m.offsets[i], m.offsets[i + 1]
        assert s.molecule(k)[0].tolist() == m.atomic_numbers[a:b].tolist()
        assert np.array_equal(s.molecule(k)[1], m.positions[a:b])
        assert s.formal_charges[s.offsets[k]:s.offsets[k + 1]].tolist() == m.formal_charges[a:b].tolist()
    assert len(m.select(np.zeros(0, np.int64))) == 0


def test_missing_formal_charges_are_named(bundled, tmp_path):
    d = _copy(bundled, tmp_path / "q")
    man = read_manifest(d)
    ent = man["splits"]["test"]["shards"][0]
    shard = d / ent["path"]
    with h5py.File(shard, "a") as f:
        del f["formal_charges"]
    from symdiff.data.shards import sha256_file
    ent["sha256"] = sha256_file(shard)  # a consistent checksum: only the structure is wrong
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataError, match=f"{shard}: missing array 'formal_charges'"):
        verify(d)


def _ensure(path: str) -> str:
    return str(ensure_bundled_shards(path))


def test_ensure_bundled_from_two_processes_at_once(tmp_path):
    import multiprocessing as mp
    target = str(tmp_path / "shared_cache" / "qm9")
    with mp.get_context("spawn").Pool(2) as pool:
        got = pool.map(_ensure, [target, target])
    assert got == [target, target]
    assert verify(target)["splits"]["train"]["n_molecules"] == 6000
    assert sorted(p.name for p in (tmp_path / "shared_cache").iterdir()) == ["qm9"]  # no temp dirs left

"""Bad input to `symdiff data build | verify | info` and the loader: one line naming the file and the problem, exit 1,
no traceback, nothing lost (issue #12, sections 3 and 4). Every case goes through the real CLI entry."""
from __future__ import annotations

import errno
import json
import re
import shutil
import tarfile
from pathlib import Path

import h5py
import msgpack
import numpy as np
import pytest

from symdiff.cli import main as cli_main
from symdiff.data.bundled import ensure_bundled_shards, subset_path
from symdiff.data.qm9 import format_xyz
from symdiff.data.shards import read_manifest, read_split, sha256_file

N_MOLS = 300


# ----------------------------------------------------------------------------------------------------- helpers
def fails(capsys, *argv: str) -> str:
    """Run the CLI, expect exit 1 with exactly one line on stderr and no traceback; return that line."""
    rc = cli_main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1 and len(lines) == 1, (rc, err)
    assert lines[0].startswith(f"symdiff {argv[0]}: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def arrays():
    """The first 300 bundled QM9 molecules in the qm9.npz layout."""
    z = np.load(subset_path())
    a = int(z["offsets"][N_MOLS])
    return {"mol_id": z["mol_id"][:N_MOLS], "offsets": z["offsets"][:N_MOLS + 1],
            "atomic_numbers": z["atomic_numbers"][:a], "positions": z["positions"][:a],
            "split_edm": z["split_edm"][:N_MOLS], "formal_charges": z["formal_charges"][:a]}


def _npz(tmp_path: Path, arrays: dict, name: str = "src.npz", compressed: bool = False, **edits) -> Path:
    d = {**arrays, **edits}
    p = tmp_path / name
    (np.savez_compressed if compressed else np.savez)(p, **d)
    return p


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return ensure_bundled_shards(tmp_path_factory.mktemp("ds") / "qm9")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _build(src: Path, out: Path, *extra: str) -> list[str]:
    return ["data", "build", "--dataset", "qm9", "--source", str(src), "--out", str(out), "--shard-size", "100",
            *extra]


def _damage_member(p: Path, member: str, offset: int = 200, n: int = 40) -> None:
    """Flip bytes inside one zip member's data (the zip directory stays intact, so the file still opens)."""
    raw = bytearray(p.read_bytes())
    at = raw.find(member.encode()) + offset
    for k in range(at, at + n):
        raw[k] ^= 0x5A
    p.write_bytes(bytes(raw))


# ----------------------------------------------------------------------------------------------------- data build
def test_corrupt_npz_member_is_one_line(tmp_path, capsys, arrays):
    src = _npz(tmp_path, arrays)
    _damage_member(src, "positions.npy")  # stored: the member's CRC no longer matches
    line = fails(capsys, *_build(src, tmp_path / "out"))
    assert str(src) in line and "'positions'" in line and "CRC" in line
    src = _npz(tmp_path, arrays, name="c.npz", compressed=True)
    _damage_member(src, "positions.npy", offset=100)  # deflated: the stream no longer decompresses
    line = fails(capsys, *_build(src, tmp_path / "out"))
    assert str(src) in line and "'positions'" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "src.npz"]  # no temp directory left


@pytest.mark.parametrize("content", [b"", b"atomic_numbers,positions\n6,0.0\n"])
def test_a_file_that_is_not_an_npz_is_named_as_such(tmp_path, capsys, content):
    # before: numpy fell back to unpickling and the message spoke of pickled data or "no data left"
    src = tmp_path / "qm9.npz"
    src.write_bytes(content)
    line = fails(capsys, *_build(src, tmp_path / "out"))
    assert f"{src}: not an .npz file" in line


@pytest.mark.parametrize("what,edit,expect", [
    ("positions not a multiple of 3", lambda a: {"positions": a["positions"].reshape(-1)[:-1]},
     r"array 'positions' has shape \(\d+,\), expected \(\d+, 3\)"),
    ("positions short a row", lambda a: {"positions": a["positions"][:-1]},
     r"array 'positions' has shape \(\d+, 3\), expected"),
    ("offsets past the arrays", lambda a: {"offsets": np.r_[a["offsets"][:-1], a["offsets"][-1] + 50]},
     r"array 'offsets' runs 0\.\.\d+, expected 0\.\.\d+"),
    ("offsets not monotone", lambda a: {"offsets": a["offsets"][[0, 1, 2, 3, 4, 6, 5, *range(7, N_MOLS + 1)]]},
     r"array 'offsets' decreases: offsets\[6\] = \d+ < offsets\[5\]"),
    ("offsets not starting at 0", lambda a: {"offsets": np.r_[3, a["offsets"][1:]]}, r"array 'offsets' runs 3\.\."),
    ("atomic numbers not integers", lambda a: {"atomic_numbers": a["atomic_numbers"] + 0.5},
     r"array 'atomic_numbers' must hold integers"),
    ("split list too short", lambda a: {"split_edm": a["split_edm"][:-2]}, r"array 'split_edm' has 298 entries"),
])
def test_inconsistent_npz_arrays_are_one_line(tmp_path, capsys, arrays, what, edit, expect):
    src = _npz(tmp_path, arrays, **edit(arrays))
    line = fails(capsys, *_build(src, tmp_path / "out"))
    assert str(src) in line
    assert re.search(expect, line), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit,expect", [
    (lambda g: {"conf_offsets": np.r_[g["conf_offsets"][:-1], g["conf_offsets"][-1] + 9]},
     "array 'conf_offsets' runs 0..1155, expected 0..1146"),
    (lambda g: {"conf_mol_index": g["conf_mol_index"] + 5}, "array 'conf_mol_index' refers to molecule 7"),
    (lambda g: {"positions": g["positions"][:, :2]}, "array 'positions' has shape (1146, 2)"),
])
def test_inconsistent_geom_npz_is_one_line(tmp_path, capsys, edit, expect):
    from symdiff.data.bundled import geom_sample_path

    g = dict(np.load(geom_sample_path()))
    src = tmp_path / "geom.npz"
    np.savez(src, **{**g, **edit(g)})
    line = fails(capsys, *_geom(src, tmp_path / "out"))
    assert str(src) in line and expect in line


def _xyz_dir(tmp_path: Path, arrays: dict, n: int = 5) -> Path:
    d = tmp_path / "xyz"
    d.mkdir()
    off = arrays["offsets"]
    for m in range(n):
        i = int(arrays["mol_id"][m])
        text = format_xyz(i, arrays["atomic_numbers"][off[m]:off[m + 1]], arrays["positions"][off[m]:off[m + 1]])
        (d / f"dsgdb9nsd_{i:06d}.xyz").write_text(text)
    return d


@pytest.mark.parametrize("as_tar", [False, True])
def test_binary_xyz_is_one_line(tmp_path, capsys, arrays, as_tar):
    d = _xyz_dir(tmp_path, arrays)
    bad = sorted(d.iterdir())[2]
    bad.write_bytes(bytes(range(256)) * 4)  # not UTF-8 text
    src = d
    if as_tar:
        src = tmp_path / "dsgdb9nsd.xyz.tar.bz2"
        with tarfile.open(src, "w:bz2") as tf:
            for f in sorted(d.iterdir()):
                tf.add(f, arcname=f.name)
    line = fails(capsys, *_build(src, tmp_path / "out"))
    assert bad.name in line and "not a UTF-8 text file" in line


def test_full_disk_is_one_line_and_keeps_the_old_dataset(tmp_path, capsys, monkeypatch, dataset):
    import symdiff.data.build as b

    out = _copy(dataset, tmp_path / "qm9")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real, calls = b.write_shard, {"n": 0}

    def full_disk(path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # like h5py: OSError with errno 28 and a long HDF5 message
            raise OSError(errno.ENOSPC, "Can't synchronously write data (file write failed: errno = 28, ...)")
        return real(path, *a, **k)

    monkeypatch.setattr(b, "write_shard", full_disk)
    line = fails(capsys, *_build(subset_path(), out, "--overwrite"))
    assert str(out) in line and "No space left on device" in line and "HDF5" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qm9"]  # the temporary build is gone
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def _msgpack(tmp_path: Path, *objs, cut: int = 0) -> Path:
    data = b"".join(msgpack.packb(o) for o in objs)
    p = tmp_path / "drugs_crude.msgpack"
    p.write_bytes(data[:len(data) - cut])
    return p


def _geom(src: Path, out: Path) -> list[str]:
    return ["data", "build", "--dataset", "geom", "--source", str(src), "--out", str(out), "--split-smiles", "none"]


MOL = {"CO": {"conformers": [{"xyz": [[6, 0, 0, 0], [8, 1.4, 0, 0], [1, -0.5, 0.9, 0]], "totalenergy": -1.0}]}}


def test_truncated_geom_msgpack_is_named_not_silently_shortened(tmp_path, capsys):
    src = _msgpack(tmp_path, MOL, {"CCO": MOL["CO"]}, cut=5)  # cut inside the second object
    line = fails(capsys, *_geom(src, tmp_path / "out"))
    assert str(src) in line and "truncated" in line and "object 1" in line
    assert not (tmp_path / "out").exists()


def test_geom_atomic_number_beyond_int8_is_not_wrapped_into_carbon(tmp_path, capsys):
    # 262 = 6 + 256: stored as int8 it would silently become carbon
    src = _msgpack(tmp_path, {"CO": {"conformers": [{"xyz": [[262, 0, 0, 0], [8, 1.4, 0, 0]], "totalenergy": 0}]}})
    line = fails(capsys, *_geom(src, tmp_path / "out"))
    assert str(src) in line and "atomic number 262" in line


def test_a_source_without_molecules_builds_nothing(tmp_path, capsys):
    src = _msgpack(tmp_path)  # an empty file
    line = fails(capsys, *_geom(src, tmp_path / "out"))
    assert str(src) in line and "no molecules" in line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------- --overwrite
@pytest.mark.parametrize("kind", ["file", "directory", "symlink", "broken dataset"])
def test_overwrite_replaces_only_a_dataset(tmp_path, capsys, arrays, dataset, kind):
    src = _npz(tmp_path, arrays)
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("my thesis\n")
    elif kind == "directory":
        out.mkdir()
        (out / "notes.txt").write_text("keep me\n")
    elif kind == "symlink":
        out.symlink_to(_copy(dataset, tmp_path / "real"), target_is_directory=True)
    else:
        _copy(dataset, out)
        man = json.loads((out / "manifest.json").read_text())
        del man["splits"]["test"]["shards"][0]["sha256"]
        (out / "manifest.json").write_text(json.dumps(man))
    before = sorted(p.name for p in tmp_path.iterdir())
    line = fails(capsys, *_build(src, out, "--overwrite"))
    assert str(out) in line and "not a symdiff dataset" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing renamed aside, nothing left over
    if kind == "file":
        assert out.read_text() == "my thesis\n"
    elif kind == "directory":
        assert (out / "notes.txt").read_text() == "keep me\n"
    elif kind == "symlink":
        assert out.is_symlink() and read_manifest(out)


@pytest.mark.parametrize("exchange", [True, False])
def test_overwrite_swaps_a_dataset_with_no_moment_without_one(tmp_path, capsys, monkeypatch, arrays, dataset,
                                                              exchange):
    import symdiff.data.publish as pub

    out = _copy(dataset, tmp_path / "out")
    seen = []

    def watch(real):
        def call(*a, **k):
            r = real(*a, **k)
            seen.append((out / "manifest.json").is_file())  # after every rename: is there a dataset at out?
            return r
        return call

    if not exchange:  # a filesystem without RENAME_EXCHANGE: the two-rename fallback
        monkeypatch.setattr(pub, "renameat2", lambda *a: False)
    else:
        monkeypatch.setattr(pub, "renameat2", watch(pub.renameat2))
    monkeypatch.setattr(pub.os, "rename", watch(pub.os.rename))
    src = _npz(tmp_path, arrays)
    assert cli_main(_build(src, out, "--overwrite")) == 0
    capsys.readouterr()
    assert read_manifest(out)["source"] == str(src)
    assert len(read_split(out, "train")) + len(read_split(out, "valid")) + len(read_split(out, "test")) == N_MOLS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src.npz"]
    # the exchange is one call with a dataset at out before and after; the fallback has one rename without
    assert seen == ([True] if exchange else [False, True])


def test_overwrite_fallback_puts_the_old_dataset_back_if_the_new_cannot_move_in(tmp_path, capsys, monkeypatch,
                                                                                arrays, dataset):
    import symdiff.data.publish as pub

    out = _copy(dataset, tmp_path / "out")
    before = (out / "manifest.json").read_bytes()
    monkeypatch.setattr(pub, "renameat2", lambda *a: False)
    real = pub.os.rename

    def second_fails(a, b):
        if Path(a).name.startswith(".out.building-"):
            raise OSError(errno.EIO, "Input/output error", str(b))
        return real(a, b)

    monkeypatch.setattr(pub.os, "rename", second_fails)
    line = fails(capsys, *_build(_npz(tmp_path, arrays), out, "--overwrite"))
    assert str(out) in line and "Input/output error" in line
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src.npz"]


# ----------------------------------------------------------------------------------------------------- verify, info
def _edit_manifest(d: Path, edit) -> Path:
    man = json.loads((d / "manifest.json").read_text())
    man = edit(man) or man
    (d / "manifest.json").write_text(json.dumps(man))
    return d


def _pop(d: dict, key: str) -> None:
    del d[key]


@pytest.mark.parametrize("edit,key", [
    (lambda m: _pop(m["splits"]["test"]["shards"][0], "sha256"), "splits.test.shards[0].sha256"),
    (lambda m: m.__setitem__("splits", list(m["splits"].values())), "splits"),
    (lambda m: m["splits"]["train"].__setitem__("shards", {"a": 1}), "splits.train.shards"),
    (lambda m: m["splits"]["valid"].__setitem__("n_molecules", "12"), "splits.valid.n_molecules"),
    (lambda m: m["splits"]["test"]["shards"][0].__setitem__("path", "../../etc/passwd"),
     "splits.test.shards[0].path"),
    (lambda m: m["splits"]["test"]["shards"][0].__setitem__("sha256", 5), "splits.test.shards[0].sha256"),
    (lambda m: m.__setitem__("n_atoms_histogram", [1, 2]), "n_atoms_histogram"),
    (lambda m: m.__setitem__("atom_types", 5), "atom_types"),
    (lambda m: m.__setitem__("max_atoms", "29"), "max_atoms"),
    (lambda m: [m], None),
])
@pytest.mark.parametrize("action", ["verify", "info"])
def test_hand_edited_manifest_names_the_file_and_the_key(tmp_path, capsys, dataset, edit, key, action):
    d = _edit_manifest(_copy(dataset, tmp_path / "d"), edit)
    line = fails(capsys, "data", action, d)
    assert str(d / "manifest.json") in line
    assert (f"'{key}'" in line) if key else "top level" in line


def test_binary_manifest_is_one_line(tmp_path, capsys, dataset):
    d = _copy(dataset, tmp_path / "d")
    (d / "manifest.json").write_bytes(b"\xff\xfe\x00 not json")
    line = fails(capsys, "data", "verify", d)
    assert str(d / "manifest.json") in line and "UTF-8" in line


def _rewrite_shard(d: Path, edit) -> Path:
    """Edit the first test shard with h5py and record its new checksum: a shard that verifies by sha256 but is
    structurally wrong (a hand-made or foreign file), so only the structural checks can catch it."""
    man = json.loads((d / "manifest.json").read_text())
    ent = man["splits"]["test"]["shards"][0]
    p = d / ent["path"]
    with h5py.File(p, "a") as f:
        edit(f)
    ent["sha256"] = sha256_file(p)
    (d / "manifest.json").write_text(json.dumps(man))
    return p


def _replace(name: str, fn):
    def edit(f):
        v = f[name][()]
        del f[name]
        out = fn(v)
        if out is None:
            f.create_group(name)
        else:
            f[name] = out
    return edit


@pytest.mark.parametrize("edit,expect", [
    (_replace("offsets", lambda v: None), "'offsets' is an HDF5 group"),
    (_replace("offsets", lambda v: v.reshape(1, -1)), "array 'offsets' has shape (1, "),
    (_replace("atomic_numbers", lambda v: np.array([b"C"] * len(v))), "array 'atomic_numbers' has dtype"),
    (_replace("offsets", lambda v: v.astype(np.float64) + 0.5), "array 'offsets' has dtype float64"),
    (_replace("mol_ids", lambda v: v[:-3]), "array 'mol_ids' has shape"),
])
def test_structurally_bad_shard_is_one_line(tmp_path, capsys, dataset, edit, expect):
    d = _copy(dataset, tmp_path / "d")
    shard = _rewrite_shard(d, edit)
    line = fails(capsys, "data", "verify", d)
    assert str(shard) in line and expect in line


def test_loader_refuses_a_bad_shard_in_one_line(tmp_path, dataset):
    from symdiff.data.loader import ShardLoader
    from symdiff.errors import DataError

    d = _copy(dataset, tmp_path / "d")
    shard = _rewrite_shard(d, _replace("offsets", lambda v: None))
    with pytest.raises(DataError, match=f"{shard}: 'offsets' is an HDF5 group"):
        ShardLoader(d, "test", batch_size=8)


def test_one_line_squeezes_a_library_message_and_names_the_type_when_it_is_empty():
    # shards, the shard reader and the npz readers all print library errors through this one helper
    from symdiff.errors import one_line

    assert one_line(OSError("unable to open file\n  (truncated)\n\tmajor = 'File accessibility'")) == (
        "unable to open file (truncated) major = 'File accessibility'")
    assert one_line(ValueError("x" * 500)) == "x" * 200
    assert one_line(EOFError()) == "EOFError"

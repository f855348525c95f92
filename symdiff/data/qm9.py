"""QM9 sources: the project's flat .npz files and the raw ``dsgdb9nsd_*.xyz`` release (directory or .tar.bz2).

Split (SPEC §1.1): drop the 3,054 uncharacterized molecules, permute the 130,831 kept indices with numpy's
legacy ``RandomState(0)``; first 100,000 = train, next 17,748 = valid, last 13,083 = test. The split is a
function of the QM9 id alone, so any subset of the raw files lands in the same splits as the full set.
"""
from __future__ import annotations

import functools
import re
import tarfile
from importlib import resources
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from symdiff.data.elements import NUMBERS
from symdiff.data.molecules import MoleculeSet
from symdiff.data.validate import checked_set, decode_text, int_array, npz_array, open_npz
from symdiff.errors import DataError

N_QM9_FILES = 133_885
N_EXCLUDED = 3_054
SPLITS = ("train", "valid", "test")
SPLIT_SIZES = (100_000, 17_748, 13_083)
_XYZ_NAME = re.compile(r"dsgdb9nsd_(\d{6})\.xyz$")


def excluded_ids(path: Optional[Path] = None) -> np.ndarray:
    """The 3,054 uncharacterized QM9 ids: from ``uncharacterized.txt`` if given, else the copy shipped with us."""
    if path is not None:
        ids = parse_uncharacterized(Path(path).read_text(), str(path))
    else:
        with resources.files("symdiff.data.bundled").joinpath("qm9_uncharacterized.npz").open("rb") as f:
            ids = np.load(f)["ids"].astype(np.int64)
    if len(ids) != N_EXCLUDED:
        raise DataError(f"{path or 'bundled exclusion list'}: {len(ids)} excluded ids, QM9 has {N_EXCLUDED}")
    return np.sort(ids)


def parse_uncharacterized(text: str, source: str) -> np.ndarray:
    """QM9's ``uncharacterized.txt``: a header, then rows whose first number is the molecule index."""
    ids = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].isdigit():
            ids.append(int(fields[0]))
    if not ids:
        raise DataError(f"{source}: no molecule ids found (expected QM9's uncharacterized.txt)")
    return np.asarray(ids, dtype=np.int64)


@functools.lru_cache(maxsize=2)
def edm_split_lists(excluded: tuple[int, ...] | None = None) -> dict[str, np.ndarray]:
    """Sorted QM9 ids of each EDM split."""
    exc = np.asarray(excluded) if excluded is not None else excluded_ids()
    kept = np.setdiff1d(np.arange(1, N_QM9_FILES + 1), exc)
    perm = np.random.RandomState(0).permutation(len(kept))
    a, b = SPLIT_SIZES[0], SPLIT_SIZES[0] + SPLIT_SIZES[1]
    return {"train": np.sort(kept[perm[:a]]), "valid": np.sort(kept[perm[a:b]]), "test": np.sort(kept[perm[b:]])}


def split_positions(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(split index 0/1/2 or -1 for excluded/unknown, position inside the sorted split list) per QM9 id."""
    lists = edm_split_lists()
    split = np.full(len(ids), -1, dtype=np.int64)
    pos = np.full(len(ids), -1, dtype=np.int64)
    for s, name in enumerate(SPLITS):
        lst = lists[name]
        j = np.searchsorted(lst, ids)
        hit = (j < len(lst)) & (lst[np.minimum(j, len(lst) - 1)] == ids)
        split[hit] = s
        pos[hit] = j[hit]
    return split, pos


# ------------------------------------------------------------------------------------------------ npz
class QM9Npz:
    """``qm9.npz`` (or a file of the same layout, e.g. the bundled subset); formal charges from
    ``formal_charges`` in the file itself or from ``qm9_rdkit_graphs.npz`` beside it."""

    dataset = "qm9"

    def __init__(self, path: Path, shard_size: int) -> None:
        self.path = Path(path)
        self.z = open_npz(self.path)
        for key in ("mol_id", "offsets", "atomic_numbers", "positions"):
            if key not in self.z.files:
                raise DataError(f"{self.path}: missing array '{key}' (expected the qm9.npz layout)")
        self.ids = int_array(str(self.path), "mol_id", npz_array(self.z, self.path, "mol_id"))
        self.offsets = int_array(str(self.path), "offsets", npz_array(self.z, self.path, "offsets"))
        if len(self.offsets) != len(self.ids) + 1:
            raise DataError(f"{self.path}: offsets has {len(self.offsets)} entries for {len(self.ids)} molecules")
        if "split_edm" in self.z.files:
            split = int_array(str(self.path), "split_edm", npz_array(self.z, self.path, "split_edm"))
            if len(split) != len(self.ids):
                raise DataError(f"{self.path}: array 'split_edm' has {len(split)} entries for "
                                f"{len(self.ids)} molecules")
        else:
            split, _ = split_positions(self.ids)
        self.split = split
        self.charges_from = None
        if "formal_charges" in self.z.files:
            self.charges_from = (self.path, "formal_charges")
        else:
            g = self.path.parent / "qm9_rdkit_graphs.npz"
            if g.is_file():
                self.charges_from = (g, "formal_charges")
        self.shard_size = shard_size
        self.has_formal_charges = self.charges_from is not None
        self.n_excluded = int((split < 0).sum())

    def describe(self) -> dict:
        return {"source": str(self.path), "source_format": "qm9-npz", "split_method": "edm",
                "formal_charges_from": None if self.charges_from is None else str(self.charges_from[0])}

    def parts(self) -> list[tuple[int, str, np.ndarray]]:
        out = []
        for s, name in enumerate(SPLITS):
            rows = np.flatnonzero(self.split == s)
            for start in range(0, len(rows), self.shard_size):
                out.append((len(out), name, rows[start:start + self.shard_size]))
        return out

    def iter_parts(self, rank: int, world: int) -> Iterator[tuple[int, dict[str, MoleculeSet]]]:
        z = npz_array(self.z, self.path, "atomic_numbers")
        q = None
        if self.charges_from is not None:
            cpath = self.charges_from[0]
            cz = self.z if cpath == self.path else open_npz(cpath)
            if cpath != self.path and "mol_id" in cz.files and \
                    not np.array_equal(npz_array(cz, cpath, "mol_id").astype(np.int64), self.ids):
                raise DataError(f"{cpath}: mol_id order differs from {self.path}")
            q = npz_array(cz, cpath, self.charges_from[1])
            if cpath != self.path and len(q) != len(z):
                raise DataError(f"{cpath}: {len(q)} formal charges for {len(z)} atoms in {self.path}")
        full = checked_set(str(self.path), z, npz_array(self.z, self.path, "positions"), self.offsets, self.ids, q,
                           id_key="mol_id")
        for key, name, rows in self.parts():
            if key % world == rank:
                yield key, {name: full.select(rows)}


# ------------------------------------------------------------------------------------------------ raw xyz
def _num(tok: str) -> float:
    # QM9 writes tiny numbers Mathematica-style: 1.2345*^-6
    return float(tok.replace("*^", "e"))


def parse_xyz(text: str, source: str) -> tuple[int, np.ndarray, np.ndarray]:
    """One ``dsgdb9nsd_*.xyz`` record -> (QM9 id, Z [n], positions [n, 3])."""
    lines = text.splitlines()
    try:
        n = int(lines[0].split()[0])
        head = lines[1].split()
        if len(head) < 2 or head[0] != "gdb":
            raise ValueError(f"line 2 should start with 'gdb <id>', got {lines[1][:40]!r}")
        mol_id = int(head[1])
        if n <= 0:
            return mol_id, np.zeros(0, np.int8), np.zeros((0, 3), np.float32)
        if len(lines) < n + 2:
            raise ValueError(f"{n} atoms announced but only {len(lines) - 2} atom lines")
        z = np.empty(n, dtype=np.int8)
        x = np.empty((n, 3), dtype=np.float64)
        for i in range(n):
            f = lines[2 + i].split()
            if f[0] not in NUMBERS:
                raise ValueError(f"atom {i}: unknown element symbol {f[0]!r}")
            z[i] = NUMBERS[f[0]]
            x[i] = (_num(f[1]), _num(f[2]), _num(f[3]))
    except (ValueError, IndexError) as exc:
        raise DataError(f"{source}: malformed QM9 xyz record: {exc}") from exc
    return mol_id, z, x.astype(np.float32)


def _fmt(v: float) -> str:
    # QM9's own style: plain decimals, tiny magnitudes Mathematica-style (2.1*^-6)
    if v != 0 and abs(v) < 1e-3:
        mant, exp = f"{v:.9e}".split("e")
        return f"{mant}*^{int(exp)}"
    return f"{v:.10f}"


def format_xyz(mol_id: int, z: np.ndarray, x: np.ndarray, *, properties: Optional[np.ndarray] = None,
               mulliken: Optional[np.ndarray] = None, frequencies: Optional[np.ndarray] = None,
               smiles: str = "", inchi: str = "") -> str:
    """One molecule as a ``dsgdb9nsd_*.xyz`` record (the raw QM9 format). Fields we do not have are zeros."""
    from symdiff.data.elements import SYMBOLS
    n = len(z)
    props = np.zeros(15) if properties is None else np.asarray(properties)
    q = np.zeros(n) if mulliken is None else np.asarray(mulliken)
    freq = np.zeros(max(1, 3 * n - 6)) if frequencies is None else np.asarray(frequencies)
    lines = [str(n), f"gdb {mol_id}\t" + "\t".join(f"{float(p):.6g}" for p in props) + "\t"]
    for zi, xi, qi in zip(z, x, q):
        lines.append(f"{SYMBOLS[int(zi)]}\t" + "\t".join(_fmt(float(v)) for v in xi) + "\t" + _fmt(float(qi)))
    lines += ["\t".join(f"{float(f):.4f}" for f in freq), f"{smiles}\t{smiles}", f"{inchi}\t{inchi}", ""]
    return "\n".join(lines)


def _read_xyz_file(path: Path) -> str:
    try:
        return decode_text(path.read_bytes(), str(path))
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _open_compressed(path: Path):
    """A buffered, decompressed stream of a (.bz2 / .gz / plain) tarball: much faster than tarfile's own "r|*"."""
    import bz2
    import gzip
    import io
    with open(path, "rb") as f:
        magic = f.read(3)
    if magic == b"BZh":
        raw = bz2.open(path, "rb")
    elif magic[:2] == b"\x1f\x8b":
        raw = gzip.open(path, "rb")
    else:
        raw = open(path, "rb")
    return io.BufferedReader(raw, 1 << 20)


class QM9Xyz:
    """The raw QM9 release: a directory of ``dsgdb9nsd_*.xyz`` files or the ``dsgdb9nsd.xyz.tar.bz2`` tarball.

    Ids come from the file names; molecules in QM9's uncharacterized list are excluded (an ``uncharacterized.txt``
    beside the files or inside the tarball is checked against the shipped copy). Part ``k`` is ``shard_size``
    consecutive ids of the full EDM split, a function of the id alone: a build from the raw files has the same shards
    as one from ``qm9.npz``, and the tarball is read in one streaming pass (bzip2 has no random access).
    """

    dataset = "qm9"
    has_formal_charges = False

    def __init__(self, path: Path, shard_size: int) -> None:
        self.path = Path(path)
        self.shard_size = shard_size
        self.is_tar = self.path.is_file()
        self.n_excluded = 0
        self.n_files = 0
        self.chunks_before = np.cumsum([0] + [-(-n // shard_size) for n in SPLIT_SIZES])
        if not self.is_tar:
            self.members = {}
            for p in self.path.glob("dsgdb9nsd_*.xyz"):
                hit = _XYZ_NAME.search(p.name)
                if hit:
                    self.members[int(hit.group(1))] = p
            if not self.members:
                raise DataError(f"{self.path}: no dsgdb9nsd_*.xyz files found")
            unc = self.path / "uncharacterized.txt"
            if unc.is_file():
                self._check_uncharacterized(_read_xyz_file(unc), str(unc))

    def _check_uncharacterized(self, text: str, where: str) -> None:
        ids = parse_uncharacterized(text, where)
        if len(ids) != N_EXCLUDED or not np.array_equal(np.sort(ids), excluded_ids()):
            raise DataError(f"{where}: lists {len(ids)} ids that differ from QM9's {N_EXCLUDED} excluded molecules")

    def describe(self) -> dict:
        return {"source": str(self.path), "source_format": "qm9-xyz-tar" if self.is_tar else "qm9-xyz-dir",
                "split_method": "edm", "excluded_files_seen": self.n_excluded, "xyz_files_seen": self.n_files}

    def _keys(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(part key, split index) per id; key -1 for excluded ids."""
        bad = ids[(ids < 1) | (ids > N_QM9_FILES)]
        if len(bad):
            raise DataError(f"{self.path}: file id {int(bad[0])} outside QM9's 1..{N_QM9_FILES}")
        split, pos = split_positions(ids)
        key = np.where(split >= 0, self.chunks_before[np.maximum(split, 0)] + pos // self.shard_size, -1)
        return key, split

    def iter_parts(self, rank: int, world: int) -> Iterator[tuple[int, dict[str, MoleculeSet]]]:
        texts: dict[int, tuple[str, str]] = {}  # id -> (where, text) of this rank's molecules
        if self.is_tar:
            key_of = np.concatenate([[-1], self._keys(np.arange(1, N_QM9_FILES + 1))[0]])
            try:
                with _open_compressed(self.path) as raw, tarfile.open(fileobj=raw, mode="r|") as tf:
                    for m in tf:
                        hit = _XYZ_NAME.search(m.name)
                        if m.name.endswith("uncharacterized.txt") and m.isfile():
                            where = f"{self.path}:{m.name}"
                            self._check_uncharacterized(decode_text(tf.extractfile(m).read(), where), where)
                        if not (hit and m.isfile()):
                            continue
                        i = int(hit.group(1))
                        self.n_files += 1
                        if not 1 <= i <= N_QM9_FILES:
                            raise DataError(f"{self.path}: file id {i} outside QM9's 1..{N_QM9_FILES}")
                        k = key_of[i]
                        if k < 0:
                            self.n_excluded += 1
                        elif k % world == rank:
                            where = f"{self.path}:{m.name}"
                            texts[i] = (where, decode_text(tf.extractfile(m).read(), where))
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise DataError(f"{self.path}: cannot read tarball: {exc}") from exc
            if self.n_files == 0:
                raise DataError(f"{self.path}: no dsgdb9nsd_*.xyz files in the tarball")
            ids = np.array(sorted(texts), dtype=np.int64)
        else:
            all_ids = np.array(sorted(self.members), dtype=np.int64)
            self.n_files = len(all_ids)
            key, _ = self._keys(all_ids)
            self.n_excluded = int((key < 0).sum())
            ids = all_ids[(key >= 0) & (key % world == rank)]
        key, split = self._keys(ids)
        for k in np.unique(key):
            sel = ids[key == k]  # ascending ids = the order of the split list
            zs, xs = [], []
            for i in sel:
                i = int(i)
                if self.is_tar:
                    where, text = texts.pop(i)
                else:
                    where = str(self.members[i])
                    text = _read_xyz_file(self.members[i])
                mol_id, z, x = parse_xyz(text, where)
                if mol_id != i:
                    raise DataError(f"{where}: header says gdb {mol_id} but the file name says {i}")
                zs.append(z)
                xs.append(x)
            yield int(k), {SPLITS[int(split[key == k][0])]: MoleculeSet.from_lists(zs, xs, [int(i) for i in sel])}

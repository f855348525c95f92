"""HDF5 shards + manifest.json: the on-disk dataset format, its atomic writer, readers and verifier.

Layout of ``DIR``::

    manifest.json
    <split>/<name>.h5      one shard = a few thousand molecules, ragged atoms stored flat with offsets

Every shard holds ``atomic_numbers`` int8 [A], ``positions`` float32 [A, 3], ``offsets`` int64 [M+1],
``mol_ids`` int64 [M] and, where the source knows them, ``formal_charges`` int8 [A].
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional

import h5py
import numpy as np

from symdiff.data.elements import Alphabet, alphabet
from symdiff.data.manifest import FORMAT, MANIFEST, read_manifest  # noqa: F401  (re-exported)
from symdiff.data.molecules import MoleculeSet
from symdiff.data.publish import publish, temp_dir_for  # noqa: F401  (re-exported)
from symdiff.data.validate import checked_set
from symdiff.errors import DataError, one_line

ARRAYS = ("atomic_numbers", "positions", "offsets", "mol_ids")


# ----------------------------------------------------------------------------------------------- validation
class Skipped:
    """Counts of molecules dropped by ``--skip-invalid``, by reason, with a few example ids per reason."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: dict[str, list[int]] = {}

    def add(self, reason: str, mol_id: int) -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 10:
            ex.append(int(mol_id))

    def merge(self, other: dict[str, Any]) -> None:
        for reason, n in other.get("counts", {}).items():
            self.counts[reason] += n
            ex = self.examples.setdefault(reason, [])
            ex.extend(other.get("examples", {}).get(reason, [])[: max(0, 10 - len(ex))])

    @property
    def total(self) -> int:
        return int(sum(self.counts.values()))

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "counts": dict(self.counts), "examples": self.examples}


def problems(mols: MoleculeSet, alpha: Alphabet) -> list[tuple[int, str]]:
    """(row, reason) for every molecule that must not enter a dataset of this alphabet."""
    n = mols.n_atoms
    out: list[tuple[int, str]] = []
    for i in np.flatnonzero(n == 0):
        out.append((int(i), "empty molecule (0 atoms)"))
    for i in np.flatnonzero(n > alpha.max_atoms):
        out.append((int(i), f"{int(n[i])} atoms > max_atoms {alpha.max_atoms}"))
    atom_mol = np.repeat(np.arange(len(mols)), n)
    bad_z = alpha.encode(mols.atomic_numbers) < 0
    for i in np.unique(atom_mol[bad_z]):
        zs = sorted(set(int(z) for z in mols.atomic_numbers[mols.offsets[i]:mols.offsets[i + 1]]
                        if alpha.encode(np.array([z]))[0] < 0))
        out.append((int(i), f"element(s) Z={zs} not in the {alpha.name} alphabet"))
    bad_x = ~np.isfinite(mols.positions).all(axis=1)
    for i in np.unique(atom_mol[bad_x]):
        out.append((int(i), "non-finite (NaN/inf) coordinates"))
    return sorted(out)


def check_molecules(mols: MoleculeSet, alpha: Alphabet, *, skip_invalid: bool, source: str,
                    skipped: Optional[Skipped] = None) -> MoleculeSet:
    """Return ``mols`` minus invalid molecules when ``skip_invalid`` (counted in ``skipped``); else raise."""
    bad = problems(mols, alpha)
    if not bad:
        return mols
    if not skip_invalid:
        row, reason = bad[0]
        more = f" (and {len(bad) - 1} more invalid molecules)" if len(bad) > 1 else ""
        raise DataError(f"{source}: molecule id {int(mols.mol_ids[row])}: {reason}{more}; "
                        "fix the source or pass --skip-invalid to count and skip such molecules")
    drop = np.zeros(len(mols), dtype=bool)
    for row, reason in bad:
        if not drop[row] and skipped is not None:
            skipped.add(reason.split(" (")[0] if "atoms >" not in reason else "too many atoms",
                        int(mols.mol_ids[row]))
        drop[row] = True
    return mols.select(np.flatnonzero(~drop))


# ----------------------------------------------------------------------------------------------- writing
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shard(path: Path, mols: MoleculeSet, *, dataset: str, split: str) -> dict[str, Any]:
    """Write one shard (to ``path``; the caller owns atomicity of the directory) and return its manifest entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # track_times=False makes shard bytes a function of the molecules only, so serial and MPI builds match.
    kw = dict(track_times=False)
    with h5py.File(path, "w", libver="latest") as f:
        f.attrs["format"] = FORMAT
        f.attrs["dataset"] = dataset
        f.attrs["split"] = split
        f.attrs["n_molecules"] = len(mols)
        f.create_dataset("atomic_numbers", data=mols.atomic_numbers.astype(np.int8), **kw)
        f.create_dataset("positions", data=mols.positions.astype(np.float32).reshape(-1, 3), **kw)
        f.create_dataset("offsets", data=mols.offsets.astype(np.int64), **kw)
        f.create_dataset("mol_ids", data=mols.mol_ids.astype(np.int64), **kw)
        if mols.formal_charges is not None:
            f.create_dataset("formal_charges", data=mols.formal_charges.astype(np.int8), **kw)
    return {"n_molecules": len(mols), "n_atoms": int(mols.offsets[-1]), "sha256": sha256_file(path),
            "n_atoms_histogram": _hist(mols.n_atoms)}


def _hist(n_atoms: np.ndarray) -> dict[str, int]:
    vals, counts = np.unique(np.asarray(n_atoms), return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(vals, counts)}


def make_manifest(dataset: str, splits: dict[str, list[dict[str, Any]]], *, extra: Optional[dict] = None
                  ) -> dict[str, Any]:
    """Assemble manifest.json from per-split lists of shard entries (each with path relative to the root)."""
    alpha = alphabet(dataset)
    man: dict[str, Any] = {"format": FORMAT, "dataset": dataset, "atom_types": list(alpha.atomic_numbers),
                           "atom_symbols": alpha.symbols, "splits": {}, "n_atoms_histogram": {}}
    max_atoms = 0
    for split, shards in splits.items():
        hist: Counter = Counter()
        entries = []
        for s in shards:
            hist.update({k: v for k, v in s["n_atoms_histogram"].items()})
            entries.append({"path": s["path"], "n_molecules": s["n_molecules"], "n_atoms": s["n_atoms"],
                            "sha256": s["sha256"]})
        man["splits"][split] = {"n_molecules": int(sum(s["n_molecules"] for s in shards)),
                                "n_atoms": int(sum(s["n_atoms"] for s in shards)), "shards": entries}
        man["n_atoms_histogram"][split] = {k: hist[k] for k in sorted(hist, key=int)}
        if hist:
            max_atoms = max(max_atoms, max(int(k) for k in hist))
    man["max_atoms"] = max_atoms
    man["alphabet_max_atoms"] = alpha.max_atoms
    man["has_formal_charges"] = None
    if extra:
        man.update(extra)
    return man


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    tmp = root / f".{MANIFEST}.{uuid.uuid4().hex}"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, root / MANIFEST)


def write_dataset(out: Path, dataset: str, splits: dict[str, MoleculeSet], *, shard_size: int = 10_000,
                  overwrite: bool = False, extra: Optional[dict] = None) -> dict[str, Any]:
    """Write in-memory splits as a complete dataset at ``out`` (atomically). Used for small sets and tests."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(out)
    try:
        entries: dict[str, list[dict]] = {}
        charges = True
        for split, mols in splits.items():
            charges &= mols.formal_charges is not None
            entries[split] = []
            for k, start in enumerate(range(0, max(len(mols), 1), shard_size)):
                part = mols.select(np.arange(start, min(start + shard_size, len(mols))))
                rel = f"{split}/{split}-{k:05d}.h5"
                e = write_shard(tmp / rel, part, dataset=dataset, split=split)
                entries[split].append({"path": rel, **e})
        man = make_manifest(dataset, entries, extra=extra)
        man["has_formal_charges"] = bool(charges)
        write_manifest(tmp, man)
        publish(tmp, out, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return man


# ----------------------------------------------------------------------------------------------- reading
def split_entry(man: dict[str, Any], split: str, root: str | Path) -> dict[str, Any]:
    if split not in man["splits"]:
        raise DataError(f"{Path(root) / MANIFEST}: no split '{split}' (have: {', '.join(man['splits'])})")
    return man["splits"][split]


def read_shard(path: str | Path, start: int = 0, stop: Optional[int] = None) -> MoleculeSet:
    """Molecules ``start:stop`` of one shard (contiguous slices only: one read per array), validated."""
    path = Path(path)
    with open_shard(path) as (ds, n_mols, n_atoms):
        stop = n_mols if stop is None else min(stop, n_mols)
        off = read_offsets(path, ds, start, stop, n_mols, n_atoms)
        a0, a1 = int(off[0]), int(off[-1])
        try:
            charges = ds["formal_charges"][a0:a1] if "formal_charges" in ds else None
            arrays = (ds["atomic_numbers"][a0:a1], ds["positions"][a0:a1], ds["mol_ids"][start:stop])
        except (OSError, ValueError, TypeError) as exc:
            raise DataError(f"{path}: cannot read shard: {one_line(exc)}") from None
    return checked_set(str(path), arrays[0], arrays[1], off - a0, arrays[2], charges)


class open_shard:
    """``with open_shard(p) as (arrays, n_molecules, n_atoms)``: the HDF5 datasets of a shard whose shapes and
    dtypes fit together (checked from metadata only, before any data is read). Errors become one-line DataErrors
    naming the file."""

    def __init__(self, path: Path) -> None:
        self.path, self.f = path, None

    def __enter__(self) -> tuple[dict[str, h5py.Dataset], int, int]:
        p = self.path
        if not p.is_file():
            raise DataError(f"{p}: shard listed in the manifest is missing" if not p.exists()
                            else f"{p}: not a shard file")
        try:
            self.f = h5py.File(p, "r")
        except OSError as exc:
            raise DataError(f"{p}: not a readable HDF5 shard (truncated or damaged?): {one_line(exc)}") from None
        try:
            return self._shapes()
        except BaseException:
            self.f.close()
            raise

    def _shapes(self) -> tuple[dict[str, h5py.Dataset], int, int]:
        f, p = self.f, self.path
        ds, shapes = {}, {}
        for name in ARRAYS + ("formal_charges",):
            obj = f.get(name)
            if obj is None:
                if name == "formal_charges":  # optional: only sources that know charges write them
                    continue
                raise DataError(f"{p}: missing array '{name}'")
            if not isinstance(obj, h5py.Dataset):
                raise DataError(f"{p}: '{name}' is an HDF5 {type(obj).__name__.lower()}, expected an array")
            want = "f" if name == "positions" else "iu"
            if obj.dtype.kind not in want:
                raise DataError(f"{p}: array '{name}' has dtype {obj.dtype}, expected "
                                + ("floats" if want == "f" else "integers"))
            ds[name], shapes[name] = obj, obj.shape
        n_atoms = shapes["atomic_numbers"][0] if len(shapes["atomic_numbers"]) == 1 else -1
        n_mols = shapes["offsets"][0] - 1 if len(shapes["offsets"]) == 1 else -1
        want_shapes = {"atomic_numbers": (n_atoms,), "positions": (n_atoms, 3), "mol_ids": (n_mols,),
                       "formal_charges": (n_atoms,)}
        if n_mols < 0:
            raise DataError(f"{p}: array 'offsets' has shape {shapes['offsets']}, expected (n_molecules + 1,)")
        for name, shape in shapes.items():
            if name != "offsets" and shape != want_shapes[name]:
                raise DataError(f"{p}: array '{name}' has shape {shape}, expected {want_shapes[name]} "
                                f"({n_mols} molecules, {max(n_atoms, 0)} atoms)")
        return ds, int(n_mols), int(n_atoms)

    def __exit__(self, *exc) -> None:
        self.f.close()


def read_offsets(path: Path, ds: dict[str, h5py.Dataset], start: int, stop: int, n_mols: int, n_atoms: int
                 ) -> np.ndarray:
    """``offsets[start:stop + 1]`` checked: non-decreasing, inside ``0..n_atoms``, exact at the shard's ends."""
    if not 0 <= start <= stop <= n_mols:
        raise DataError(f"{path}: molecules {start}:{stop} requested, the shard holds {n_mols}")
    try:
        off = ds["offsets"][start:stop + 1].astype(np.int64)
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: cannot read shard offsets: {one_line(exc)}") from None
    bad = ((start == 0 and off[0] != 0) or (stop == n_mols and off[-1] != n_atoms)
           or off[0] < 0 or off[-1] > n_atoms or np.any(np.diff(off) < 0))
    if bad:
        raise DataError(f"{path}: array 'offsets' is not a non-decreasing 0..{n_atoms} sequence")
    return off


def read_split(root: str | Path, split: str) -> MoleculeSet:
    """The whole split in memory (for evaluation, statistics and small sets; training streams instead)."""
    man = read_manifest(root)
    ent = split_entry(man, split, root)
    parts = [read_shard(Path(root) / s["path"]) for s in ent["shards"]]
    if not parts:
        return MoleculeSet.from_lists([], [])
    return MoleculeSet.concatenate(parts)


# ----------------------------------------------------------------------------------------------- verify
def verify(root: str | Path, *, deep: bool = True) -> dict[str, Any]:
    """Check checksums and structural invariants of every shard against the manifest.

    Raises DataError naming the first bad file; returns a summary on success.
    """
    root = Path(root)
    man = read_manifest(root)
    mpath = root / MANIFEST
    try:
        alpha = alphabet(man["dataset"])
    except ValueError as exc:
        raise DataError(f"{mpath}: {exc}") from exc
    if list(man["atom_types"]) != list(alpha.atomic_numbers):
        raise DataError(f"{mpath}: atom_types {man['atom_types']} differ from the {alpha.name} alphabet")
    overall_max = 0
    summary: dict[str, Any] = {"dataset": man["dataset"], "splits": {}}
    for split, ent in man["splits"].items():
        hist: Counter = Counter()
        n_total = 0
        for s in ent["shards"]:
            p = root / s["path"]
            if not p.is_file():
                raise DataError(f"{p}: shard listed in the manifest is missing" if not p.exists()
                                else f"{p}: shard listed in the manifest is not a file")
            try:
                digest = sha256_file(p)
            except OSError as exc:
                raise DataError(f"{p}: cannot read shard: {exc.strerror or exc}") from None
            if digest != s["sha256"]:
                raise DataError(f"{p}: checksum mismatch (sha256 {digest[:16]}..., manifest says "
                                f"{s['sha256'][:16]}...): the shard is corrupted or was modified")
            mols = _check_shard_structure(p, s, alpha, man)
            n = mols.n_atoms
            hist.update(str(int(k)) for k in n)
            n_total += len(mols)
            if len(n):
                overall_max = max(overall_max, int(n.max()))
        if n_total != ent["n_molecules"]:
            raise DataError(f"{mpath}: split '{split}' says {ent['n_molecules']} molecules, shards hold {n_total}")
        want = {str(k): int(v) for k, v in man["n_atoms_histogram"].get(split, {}).items()}
        if dict(hist) != want:
            raise DataError(f"{mpath}: n_atoms_histogram of split '{split}' does not match its shards")
        summary["splits"][split] = {"n_molecules": n_total, "n_shards": len(ent["shards"])}
    if overall_max != man["max_atoms"]:
        raise DataError(f"{mpath}: max_atoms {man['max_atoms']} but the largest molecule has {overall_max} atoms")
    summary["max_atoms"] = overall_max
    return summary


def _check_shard_structure(p: Path, entry: dict, alpha: Alphabet, man: dict) -> MoleculeSet:
    # read_shard checks shapes, dtypes and offsets; what is left is agreement with the manifest and the alphabet
    mols = read_shard(p)
    if man.get("has_formal_charges") and mols.formal_charges is None:
        raise DataError(f"{p}: missing array 'formal_charges' (manifest says the dataset has them)")
    if len(mols) != entry["n_molecules"]:
        raise DataError(f"{p}: holds {len(mols)} molecules, manifest says {entry['n_molecules']}")
    bad = problems(mols, alpha)
    if bad:
        row, reason = bad[0]
        raise DataError(f"{p}: molecule id {int(mols.mol_ids[row])}: {reason}")
    return mols

"""A rank's reads from HDF5 shards: many short runs of molecules, each byte read once.

A rank of W holds about 1/W of every global batch, scattered through the shuffle window, so beyond a few ranks its
molecules come as runs of about one molecule each. Two HDF5 mechanisms would make it read far more than its share
or take far too long: the data sieve (every partial read of a contiguous dataset pulls 64 KiB by default), and the
union hyperslab selection that would read all runs in one call, whose construction is quadratic in the number of
runs (measured with HDF5 2.0: 25 us per run at 1,000 runs, 1.5 ms per run at 20,000). So the arrays that
``write_shard`` writes (contiguous, no filters) are read with one ``pread`` per run at the byte offset HDF5 itself
reports (H5Dget_offset); any other layout (chunked or compressed, from another writer) falls back to one HDF5 read
per run, which reads whole chunks.
"""
from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from symdiff.data.molecules import MoleculeSet
from symdiff.data.shards import open_shard, read_offsets
from symdiff.data.validate import checked_set
from symdiff.errors import DataError, one_line


MAX_OPEN_FILES = 256
# Shards with an open descriptor, least recently read first (weak: a dropped loader's shards close themselves).
_OPEN: "OrderedDict[int, weakref.ref[Shard]]" = OrderedDict()


@dataclass
class _Array:
    name: str
    dtype: np.dtype
    row: tuple[int, ...]  # trailing shape of one row
    offset: Optional[int]  # byte offset in the file when contiguous and unfiltered, else None

    def __post_init__(self) -> None:
        self.row_bytes = int(self.dtype.itemsize * int(np.prod(self.row, dtype=np.int64)))  # once: read per run


class Shard:
    """One shard's molecule offsets (read once, validated) and where its atom arrays lie in the file.

    Only the offsets (and with ``ids_up_front`` the molecule ids, 8 more bytes a molecule) are read at start-up;
    the HDF5 file is closed again, and the atoms are read through one file descriptor opened on first use.
    """

    def __init__(self, path: str | Path, *, ids_up_front: bool = False) -> None:
        self.path = Path(path)
        self.mol_ids: Optional[np.ndarray] = None
        with open_shard(self.path) as (ds, n_mols, n_atoms):
            self.offsets = read_offsets(self.path, ds, 0, n_mols, n_mols, n_atoms)
            if ids_up_front:
                try:
                    self.mol_ids = ds["mol_ids"][()]
                except (OSError, ValueError, TypeError) as exc:
                    raise DataError(f"{self.path}: cannot read array 'mol_ids': {one_line(exc)}") from None
            self.arrays = {name: _Array(name, d.dtype, tuple(d.shape[1:]), _direct_offset(d))
                           for name, d in ds.items() if name != "offsets"}
        self.n_molecules, self.n_atoms = int(n_mols), int(n_atoms)
        self._fd: Optional[int] = None
        self._h5: Optional[h5py.File] = None

    @property
    def has_charges(self) -> bool:
        return "formal_charges" in self.arrays

    def read_rows(self, name: str, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """Rows ``starts[k]:stops[k]`` of array ``name`` for every run k, concatenated in run order."""
        a = self.arrays[name]
        counts = (stops - starts).astype(np.int64)
        out_shape = (int(counts.sum()),) + a.row
        if a.offset is None:
            return self._read_rows_hdf5(name, starts, stops, out_shape, a.dtype)
        rb, fd, pread = a.row_bytes, self._descriptor(), os.pread
        try:
            data = b"".join([pread(fd, n, s) for s, n in zip((a.offset + starts.astype(np.int64) * rb).tolist(),
                                                             (counts * rb).tolist())])
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read array '{name}': {exc.strerror or exc}") from None
        if len(data) != out_shape[0] * rb:  # a short pread: the file ends early
            raise DataError(f"{self.path}: array '{name}' is cut short (truncated file?)")
        return np.frombuffer(data, dtype=a.dtype).reshape(out_shape)

    def _descriptor(self) -> int:
        if self._fd is None:
            # Bounded: a 7M-conformer set is ~700 shards, and clusters often allow 1,024 open files per process.
            while len(_OPEN) >= MAX_OPEN_FILES:
                oldest = _OPEN.popitem(last=False)[1]()
                if oldest is not None:
                    oldest.close()
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as exc:
                raise DataError(f"{self.path}: cannot open shard: {exc.strerror or exc}") from None
        _OPEN[id(self)] = weakref.ref(self)
        _OPEN.move_to_end(id(self))
        return self._fd

    def _read_rows_hdf5(self, name: str, starts: np.ndarray, stops: np.ndarray, out_shape: tuple[int, ...],
                        dtype: np.dtype) -> np.ndarray:
        if self._h5 is None:
            try:
                self._h5 = h5py.File(self.path, "r")
            except OSError as exc:
                raise DataError(f"{self.path}: not a readable HDF5 shard: {one_line(exc)}") from None
        ds = self._h5[name]
        try:
            parts = [ds[s:e] for s, e in zip(starts.tolist(), stops.tolist())]
        except (OSError, ValueError, TypeError) as exc:
            raise DataError(f"{self.path}: cannot read array '{name}': {one_line(exc)}") from None
        return np.concatenate(parts) if parts else np.zeros(out_shape, dtype)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            _OPEN.pop(id(self), None)
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: os may be gone already
            pass


def _direct_offset(ds: h5py.Dataset) -> Optional[int]:
    if ds.chunks is not None or ds.compression is not None:
        return None
    off = ds.id.get_offset()  # None while no storage is allocated (an empty dataset)
    return None if off is None else int(off)


def read_runs(shard: Shard, starts: np.ndarray, stops: np.ndarray) -> MoleculeSet:
    """Molecules ``starts[k]:stops[k]`` of ``shard`` for every run k (sorted, disjoint), in that order, as read:
    check them with :func:`checked_runs` (once for many shards: the checks cost more than the reads at W >= 64)."""
    starts = np.asarray(starts, dtype=np.int64)
    stops = np.asarray(stops, dtype=np.int64)
    a0, a1 = shard.offsets[starts], shard.offsets[stops]
    z = shard.read_rows("atomic_numbers", a0, a1)
    x = shard.read_rows("positions", a0, a1)
    q = shard.read_rows("formal_charges", a0, a1) if shard.has_charges else None
    counts = stops - starts
    mol = np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))
    off = np.zeros(len(mol) + 1, dtype=np.int64)
    np.cumsum(shard.offsets[mol + 1] - shard.offsets[mol], out=off[1:])
    ids = shard.read_rows("mol_ids", starts, stops) if shard.mol_ids is None else shard.mol_ids[mol]
    return MoleculeSet(atomic_numbers=z, positions=x, offsets=off, mol_ids=ids, formal_charges=q)


def checked_runs(parts: list[MoleculeSet], shards: list[Shard]) -> MoleculeSet:
    """``parts`` (from :func:`read_runs` of ``shards``) concatenated and validated; a bad one names its file."""
    data = MoleculeSet.concatenate(parts)
    try:
        return _checked(str(shards[0].path), data)
    except DataError:
        for part, shard in zip(parts, shards):
            _checked(str(shard.path), part)
        raise


def _checked(where: str, m: MoleculeSet) -> MoleculeSet:
    return checked_set(where, m.atomic_numbers, m.positions, m.offsets, m.mol_ids, m.formal_charges)

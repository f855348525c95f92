"""Validated readers of raw molecule arrays: every source (npz, HDF5 shard, sample file) passes through here.

A file from outside is judged once, at the point it is read, and a bad one becomes a :class:`DataError` of one
line naming the file, the array (or member) and the problem, never an IndexError three calls later. The checks are
cheap (shapes, dtypes, one pass over the offsets) next to the read itself.
"""
from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np

from symdiff.data.molecules import MoleculeSet
from symdiff.errors import DataError, one_line

MAX_Z = 118


# ------------------------------------------------------------------------------------------------------ npz files
def open_npz(path: Path) -> Any:
    """``np.load`` of an .npz without pickle; a file that is not a readable zip raises DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: " + ("not a file" if path.exists() else "no such file"))
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):  # numpy would try to unpickle anything else
        raise DataError(f"{path}: not an .npz file (no zip signature; empty or another format?)")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises several types for an empty, truncated or foreign file
        raise DataError(f"{path}: cannot open as .npz: {one_line(exc)}") from None
    return z


def npz_array(z: Any, path: Path, key: str) -> np.ndarray:
    """Member ``key`` of an open npz; a missing, damaged (bad CRC, truncated stream) or pickled member raises."""
    if key not in z.files:
        raise DataError(f"{path}: missing array '{key}'")
    try:
        return z[key]
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise DataError(f"{path}: array '{key}' is unreadable (damaged file?): {one_line(exc)}") from None


# ------------------------------------------------------------------------------------------------------ arrays
def int_array(where: str, key: str, a: Any, *, ndim: int = 1) -> np.ndarray:
    """``a`` as int64 if it holds integers (integer dtype, or floats with integral values); else DataError."""
    a = np.asarray(a)
    if a.ndim != ndim:
        raise DataError(f"{where}: array '{key}' has shape {a.shape}, expected {ndim} dimension(s)")
    if a.dtype.kind in "iub":
        return a.astype(np.int64)
    if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
        return a.astype(np.int64)
    raise DataError(f"{where}: array '{key}' must hold integers, found dtype {a.dtype}"
                    + (" with non-integral values" if a.dtype.kind == "f" else ""))


def check_offsets(where: str, off: Any, n_items: int, n_atoms: int, key: str = "offsets") -> np.ndarray:
    """Ragged offsets: ``n_items + 1`` integers, 0 first, ``n_atoms`` last, never decreasing."""
    off = int_array(where, key, off)
    if len(off) != n_items + 1:
        raise DataError(f"{where}: array '{key}' has {len(off)} entries for {n_items} molecules "
                        f"(expected {n_items + 1})")
    if off[0] != 0 or off[-1] != n_atoms:
        raise DataError(f"{where}: array '{key}' runs {int(off[0])}..{int(off[-1])}, expected 0..{n_atoms} "
                        "(the number of atoms)")
    step = np.diff(off)
    if np.any(step < 0):
        k = int(np.flatnonzero(step < 0)[0])
        raise DataError(f"{where}: array '{key}' decreases: {key}[{k + 1}] = {int(off[k + 1])} < "
                        f"{key}[{k}] = {int(off[k])}")
    return off


def check_positions(where: str, x: Any, n_atoms: int, key: str = "positions") -> np.ndarray:
    """Float32 ``[n_atoms, 3]``; a flat array of ``3 * n_atoms`` numbers is accepted (some npz writers flatten)."""
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise DataError(f"{where}: array '{key}' must hold numbers, found dtype {x.dtype}")
    if x.shape == (n_atoms * 3,):
        x = x.reshape(n_atoms, 3)
    if x.shape != (n_atoms, 3):
        raise DataError(f"{where}: array '{key}' has shape {x.shape}, expected ({n_atoms}, 3) for {n_atoms} atoms")
    return x.astype(np.float32, copy=False)


def check_atomic_numbers(where: str, z: Any, key: str = "atomic_numbers") -> np.ndarray:
    """Integers in 1..118 as int8 (a wider value would wrap around in int8 and name the wrong element)."""
    z = int_array(where, key, z)
    bad = (z < 1) | (z > MAX_Z)
    if np.any(bad):
        k = int(np.flatnonzero(bad)[0])
        raise DataError(f"{where}: array '{key}': atom {k} has atomic number {int(z[k])}, not an element (1..{MAX_Z})")
    return z.astype(np.int8)


def checked_set(where: str, z: Any, x: Any, off: Any, ids: Any, q: Optional[Any] = None, *,
                id_key: str = "mol_ids") -> MoleculeSet:
    """A :class:`MoleculeSet` from raw flat arrays, after checking that they fit together."""
    z = check_atomic_numbers(where, z)
    ids = int_array(where, id_key, ids)
    off = check_offsets(where, off, len(ids), len(z))
    x = check_positions(where, x, len(z))
    if q is not None:
        q = int_array(where, "formal_charges", q)
        if len(q) != len(z):
            raise DataError(f"{where}: array 'formal_charges' has {len(q)} entries for {len(z)} atoms")
        if np.any(np.abs(q) > 127):
            raise DataError(f"{where}: array 'formal_charges' holds {int(q[np.argmax(np.abs(q))])}, not a charge")
        q = q.astype(np.int8)
    return MoleculeSet(atomic_numbers=z, positions=x, offsets=off, mol_ids=ids, formal_charges=q)


def decode_text(data: bytes, where: str) -> str:
    """UTF-8 text of a raw text record; a binary or otherwise encoded file raises DataError."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not a UTF-8 text file (byte {exc.start} is 0x{data[exc.start]:02x}; "
                        "binary or wrongly encoded?)") from None

"""Molecule files: SDF (V2000, with or without bonds), multi-molecule XYZ, and the project's own .npz sample format.

The .npz sample format ("symdiff-molecules", version 1) is a :class:`MoleculeSet` saved with ``numpy.savez``:

=================  =========  ===============  ==================================================
key                dtype      shape            meaning
=================  =========  ===============  ==================================================
``format``         ``<U..``   ()               ``"symdiff-molecules"``
``version``        int64      ()               1
``atomic_numbers`` int8       (n_atoms,)       element numbers Z (flat over all molecules)
``positions``      float32    (n_atoms, 3)     Angstrom
``offsets``        int64      (n_mols + 1,)    molecule i owns atoms ``offsets[i]:offsets[i+1]``
``mol_ids``        int64      (n_mols,)        the producer's ids (sample index, dataset id)
``formal_charges`` int8       (n_atoms,)       optional; absent when the producer has none
=================  =========  ===============  ==================================================

It opens with ``numpy.load`` alone (no pickle). Every writer here writes to a temporary file beside the target and
renames it into place, so an interrupted write never leaves a half-written file under the final name.

Readers keep molecules with NaN coordinates (the evaluator counts and reports them); they raise
:class:`DataError` naming the file, record and line for anything they cannot parse (empty file, unknown element
symbol, truncated record).
"""
from __future__ import annotations

import io
import math
import os
import re
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from symdiff.data.molecules import MoleculeSet
from symdiff.data.validate import checked_set, npz_array, open_npz
from symdiff.errors import DataError
from symdiff.io.atomic import atomic_write_bytes, atomic_write_text

NPZ_FORMAT = "symdiff-molecules"
NPZ_VERSION = 1

PathLike = Union[str, os.PathLike]

_SYMBOLS: Optional[list[str]] = None
_NUMBERS: Optional[dict[str, int]] = None


def _element_tables() -> tuple[list[str], dict[str, int]]:
    # RDKit's periodic table raises (and prints a C++ stack trace) on unknown symbols, so build a dict once.
    global _SYMBOLS, _NUMBERS
    if _SYMBOLS is None:
        from rdkit import Chem

        pt = Chem.GetPeriodicTable()
        _SYMBOLS = ["*"] + [pt.GetElementSymbol(z) for z in range(1, 119)]
        _NUMBERS = {s.lower(): z for z, s in enumerate(_SYMBOLS) if z > 0}
    return _SYMBOLS, _NUMBERS  # type: ignore[return-value]


def element_symbol(z: int) -> str:
    symbols, _ = _element_tables()
    if not 1 <= int(z) < len(symbols):
        raise ValueError(f"atomic number {z} is not an element")
    return symbols[int(z)]


def element_number(symbol: str) -> int:
    """Element symbol (any case) or a plain atomic number as text -> Z; ValueError if it is neither."""
    _, numbers = _element_tables()
    s = symbol.strip()
    if s.isdigit():
        z = int(s)
        if 1 <= z <= 118:
            return z
        raise ValueError(f"atomic number {z} is not an element")
    try:
        return numbers[s.lower()]
    except KeyError:
        raise ValueError(f"'{symbol}' is not an element symbol") from None




# ----------------------------------------------------------------------------------------------------------- writers
def _charges(mols: MoleculeSet) -> np.ndarray:
    if mols.formal_charges is None:
        return np.zeros(len(mols.atomic_numbers), dtype=np.int64)
    return np.asarray(mols.formal_charges, dtype=np.int64)


def _fmt_coord(v: float) -> str:
    # SDF's fixed columns are 10 wide; NaN is written as 'nan' so a reader can see and count it.
    return f"{v:10.4f}" if math.isfinite(v) else f"{'nan':>10}"


def write_sdf(path: PathLike, mols: MoleculeSet, bonds: Optional[Sequence[np.ndarray]] = None,
              names: Optional[Sequence[str]] = None) -> None:
    """Write ``mols`` as a V2000 SDF, one record per molecule.

    ``bonds[i]`` (optional) is an int array of rows ``(atom_i, atom_j, order)`` with 0-based local indices and
    order 1/2/3, or 4 for aromatic (the SDF code). Without ``bonds`` the records hold atoms only; the evaluator
    assigns bonds from distances anyway. Formal charges go into ``M  CHG`` lines. The record title is
    ``names[i]`` or ``mol_id=<id>``.
    """
    if bonds is not None and len(bonds) != len(mols):
        raise ValueError(f"write_sdf: {len(bonds)} bond lists for {len(mols)} molecules")
    charges = _charges(mols)
    symbols, _ = _element_tables()
    out = io.StringIO()
    for i in range(len(mols)):
        lo, hi = int(mols.offsets[i]), int(mols.offsets[i + 1])
        n = hi - lo
        b = np.zeros((0, 3), dtype=np.int64) if bonds is None else np.asarray(bonds[i], dtype=np.int64).reshape(-1, 3)
        if n > 999 or len(b) > 999:
            raise ValueError(f"write_sdf: molecule {i} has {n} atoms / {len(b)} bonds; V2000 allows 999")
        title = names[i] if names is not None else f"mol_id={int(mols.mol_ids[i])}"
        out.write(f"{title}\n  symdiff\n\n{n:3d}{len(b):3d}  0  0  0  0  0  0  0  0999 V2000\n")
        for k in range(lo, hi):
            x, y, z = (float(v) for v in mols.positions[k])
            out.write(f"{_fmt_coord(x)}{_fmt_coord(y)}{_fmt_coord(z)} {symbols[int(mols.atomic_numbers[k])]:<3}"
                      f" 0  0  0  0  0  0  0  0  0  0  0  0\n")
        for a, c, order in b:
            out.write(f"{int(a) + 1:3d}{int(c) + 1:3d}{int(order):3d}  0\n")
        charged = [(k - lo + 1, int(charges[k])) for k in range(lo, hi) if charges[k] != 0]
        for s in range(0, len(charged), 8):  # at most 8 entries per M  CHG line
            chunk = charged[s:s + 8]
            out.write(f"M  CHG{len(chunk):3d}" + "".join(f" {a:3d} {q:3d}" for a, q in chunk) + "\n")
        out.write("M  END\n$$$$\n")
    atomic_write_text(path, out.getvalue())


def write_xyz(path: PathLike, mols: MoleculeSet) -> None:
    """Multi-molecule XYZ: per molecule an atom-count line, a comment ``mol_id=<id>``, then ``symbol x y z``."""
    symbols, _ = _element_tables()
    out = io.StringIO()
    charges = mols.formal_charges
    for i in range(len(mols)):
        lo, hi = int(mols.offsets[i]), int(mols.offsets[i + 1])
        comment = f"mol_id={int(mols.mol_ids[i])}"
        if charges is not None and np.any(charges[lo:hi] != 0):
            comment += " formal_charges=" + ",".join(str(int(q)) for q in charges[lo:hi])
        out.write(f"{hi - lo}\n{comment}\n")
        for k in range(lo, hi):
            x, y, z = (float(v) for v in mols.positions[k])
            out.write(f"{symbols[int(mols.atomic_numbers[k])]:<2} {x:14.8f} {y:14.8f} {z:14.8f}\n")
    atomic_write_text(path, out.getvalue())


def write_npz(path: PathLike, mols: MoleculeSet) -> None:
    """The project's own sample format (see the module docstring)."""
    arrays = dict(
        format=np.array(NPZ_FORMAT), version=np.array(NPZ_VERSION, dtype=np.int64),
        atomic_numbers=np.asarray(mols.atomic_numbers, dtype=np.int8),
        positions=np.asarray(mols.positions, dtype=np.float32).reshape(-1, 3),
        offsets=np.asarray(mols.offsets, dtype=np.int64), mol_ids=np.asarray(mols.mol_ids, dtype=np.int64),
    )
    if mols.formal_charges is not None:
        arrays["formal_charges"] = np.asarray(mols.formal_charges, dtype=np.int8)
    atomic_write_bytes(path, lambda fh: np.savez(fh, **arrays))


def write_molecules(path: PathLike, mols: MoleculeSet) -> None:
    """Pick the writer by extension: .sdf, .xyz or .npz."""
    suffix = Path(path).suffix.lower()
    writers = {".sdf": write_sdf, ".xyz": write_xyz, ".npz": write_npz}
    if suffix not in writers:
        raise DataError(f"{path}: unknown molecule file extension '{suffix}' (use .sdf, .xyz or .npz)")
    writers[suffix](path, mols)


# ----------------------------------------------------------------------------------------------------------- readers
class MoleculeRecords:
    """What a reader found: the molecules plus, for SDF with bonds, the per-molecule bond lists."""

    def __init__(self, mols: MoleculeSet, bonds: Optional[list[np.ndarray]] = None,
                 names: Optional[list[str]] = None) -> None:
        self.mols = mols
        # per molecule rows (i, j, sdf_order), 0-based, or None for a record without bonds;
        # the whole list is None when no record has bonds
        self.bonds = bonds
        self.names = names


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: " + ("not a file" if path.exists() else "no such file"))
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a text file ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty (no molecules)")
    return text


def _parse_float(tok: str, where: str) -> float:
    try:
        return float(tok)  # accepts 'nan': such molecules are kept and counted by the evaluator
    except ValueError:
        raise DataError(f"{where}: '{tok}' is not a number") from None


def read_sdf_records(path: PathLike) -> MoleculeRecords:
    """Parse a V2000 SDF (bonds optional). A V3000 record is read through RDKit."""
    path = Path(path)
    lines = _read_text(path).splitlines()
    zs, xs, qs, ids, bond_lists, names = [], [], [], [], [], []
    has_bonds = False
    i = 0
    rec = 0
    while i < len(lines):
        # skip blank lines between records (some writers leave a trailing newline after $$$$)
        if not lines[i].strip() and all(not ln.strip() for ln in lines[i:i + 4]):
            i += 1
            continue
        start = i
        where = f"{path}: record {rec + 1} (line {start + 1})"
        if i + 3 >= len(lines):
            raise DataError(f"{where}: truncated: the header block (3 lines + counts line) is incomplete")
        name = lines[i].strip()
        counts = lines[i + 3]
        if "V3000" in counts:
            end = i
            while end < len(lines) and lines[end].strip() != "$$$$":
                end += 1
            block = "\n".join(lines[i:end])
            zz, xx, qq, bb = _parse_v3000(block, where)
            has_bonds |= len(bb) > 0
            zs.append(zz), xs.append(xx), qs.append(qq), bond_lists.append(bb if len(bb) else None)
            names.append(name)
            ids.append(_id_from_title(name, rec))
            i, rec = end + 1, rec + 1
            continue
        try:
            n_atoms, n_bonds = int(counts[0:3]), int(counts[3:6])
        except ValueError:
            raise DataError(f"{where}: line {i + 4} is not a V2000 counts line: {counts!r}") from None
        i += 4
        if i + n_atoms + n_bonds > len(lines):
            raise DataError(f"{where}: truncated: the counts line announces {n_atoms} atoms and {n_bonds} bonds "
                            f"but the file ends after {len(lines) - i} more lines")
        z = np.zeros(n_atoms, dtype=np.int64)
        x = np.zeros((n_atoms, 3), dtype=np.float64)
        q = np.zeros(n_atoms, dtype=np.int64)
        for a in range(n_atoms):
            ln = lines[i + a]
            lw = f"{path}: record {rec + 1}, line {i + a + 1}"
            if len(ln) < 34:
                raise DataError(f"{lw}: atom line too short: {ln!r}")
            x[a] = [_parse_float(ln[0:10], lw), _parse_float(ln[10:20], lw), _parse_float(ln[20:30], lw)]
            try:
                z[a] = element_number(ln[31:34])
            except ValueError as exc:
                raise DataError(f"{lw}: atom {a + 1}: {exc}") from None
            # old-style charge code in the atom block (columns 37-39); M  CHG lines override it below
            code = ln[36:39].strip()
            if code.isdigit() and 1 <= int(code) <= 7 and int(code) != 4:
                q[a] = 4 - int(code)
        i += n_atoms
        b = np.zeros((n_bonds, 3), dtype=np.int64)
        for k in range(n_bonds):
            ln = lines[i + k]
            try:
                b[k] = [int(ln[0:3]) - 1, int(ln[3:6]) - 1, int(ln[6:9])]
            except ValueError:
                raise DataError(f"{path}: record {rec + 1}, line {i + k + 1}: bad bond line {ln!r}") from None
            if not (0 <= b[k, 0] < n_atoms and 0 <= b[k, 1] < n_atoms):
                raise DataError(f"{path}: record {rec + 1}, line {i + k + 1}: bond refers to an atom beyond "
                                f"{n_atoms}")
        i += n_bonds
        has_bonds |= n_bonds > 0
        chg_seen = False
        while True:
            if i >= len(lines):
                raise DataError(f"{where}: truncated: missing 'M  END' / '$$$$' at the end of the file")
            ln = lines[i]
            i += 1
            if ln.startswith("M  CHG"):
                if not chg_seen:
                    q[:] = 0  # an M  CHG block supersedes the atom-block charge codes
                    chg_seen = True
                for a, v in _chg_entries(ln, n_atoms, f"{path}: record {rec + 1}, line {i}"):
                    q[a] = v
            elif ln.strip() == "$$$$":
                break
        # a record without a bond block has no graph (None), not an empty graph
        zs.append(z), xs.append(x), qs.append(q), bond_lists.append(b if n_bonds else None), names.append(name)
        ids.append(_id_from_title(name, rec))
        rec += 1
    if not zs:
        raise DataError(f"{path}: no molecules found")
    mols = MoleculeSet.from_lists(zs, xs, ids=ids, charges=qs)
    return MoleculeRecords(mols, bond_lists if has_bonds else None, names)


def _chg_entries(ln: str, n_atoms: int, where: str) -> list[tuple[int, int]]:
    """``M  CHGnn8 aaa vvv ...``: (0-based atom, charge) pairs, checked against the record's atom count."""
    toks = ln[6:].split()
    if not toks or not _is_int(toks[0]) or len(toks) != 1 + 2 * int(toks[0]):
        raise DataError(f"{where}: malformed 'M  CHG' line {ln.strip()!r} (expected a count, then that many "
                        "atom/charge pairs)")
    out = []
    for a, v in zip(toks[1::2], toks[2::2]):
        if not (_is_int(a) and _is_int(v)):
            raise DataError(f"{where}: 'M  CHG' entry {a} {v}: atom index and charge must be integers")
        if not 1 <= int(a) <= n_atoms:
            raise DataError(f"{where}: 'M  CHG' names atom {int(a)}, the record has {n_atoms} atoms")
        if not -15 <= int(v) <= 15:
            raise DataError(f"{where}: 'M  CHG' gives atom {int(a)} the charge {int(v)} (V2000 allows -15..15)")
        out.append((int(a) - 1, int(v)))
    return out


def _parse_v3000(block: str, where: str):
    from rdkit import Chem

    mol = Chem.MolFromMolBlock(block, sanitize=False, removeHs=False, strictParsing=False)
    if mol is None:
        raise DataError(f"{where}: RDKit could not parse this V3000 record")
    n = mol.GetNumAtoms()
    z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    q = np.array([a.GetFormalCharge() for a in mol.GetAtoms()], dtype=np.int64)
    x = mol.GetConformer().GetPositions() if mol.GetNumConformers() else np.full((n, 3), np.nan)
    code = {Chem.BondType.SINGLE: 1, Chem.BondType.DOUBLE: 2, Chem.BondType.TRIPLE: 3, Chem.BondType.AROMATIC: 4}
    b = np.array([[bd.GetBeginAtomIdx(), bd.GetEndAtomIdx(), code.get(bd.GetBondType(), 8)]
                  for bd in mol.GetBonds()], dtype=np.int64).reshape(-1, 3)
    return z, x, q, b


_ID_RE = re.compile(r"mol_id=(-?\d+)")


def _id_from_title(title: str, index: int) -> int:
    m = _ID_RE.search(title)
    return int(m.group(1)) if m else index


def read_xyz(path: PathLike) -> MoleculeSet:
    """Multi-molecule XYZ: repeated blocks of count line, comment line, ``symbol x y z`` lines.

    A comment ``mol_id=<id>`` (as written by :func:`write_xyz`) sets the id, else the block index is used.
    Extra columns after x y z (e.g. forces, charges of extended XYZ) are ignored.
    """
    path = Path(path)
    lines = _read_text(path).splitlines()
    zs, xs, qs, ids = [], [], [], []
    any_charges = False
    i, rec = 0, 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        where = f"{path}: molecule {rec + 1} (line {i + 1})"
        try:
            n = int(lines[i].split()[0])
        except ValueError:
            raise DataError(f"{where}: expected an atom count, found {lines[i]!r}") from None
        if n < 0:
            raise DataError(f"{where}: negative atom count {n}")
        if i + 2 + n > len(lines):
            raise DataError(f"{where}: truncated: {n} atoms announced but only {max(len(lines) - i - 2, 0)} "
                            f"atom lines follow")
        comment = lines[i + 1]
        z = np.zeros(n, dtype=np.int64)
        x = np.zeros((n, 3), dtype=np.float64)
        for a in range(n):
            lw = f"{path}: molecule {rec + 1}, line {i + 3 + a}"
            toks = lines[i + 2 + a].split()
            if len(toks) < 4:
                raise DataError(f"{lw}: expected 'symbol x y z', found {lines[i + 2 + a]!r}")
            try:
                z[a] = element_number(toks[0])
            except ValueError as exc:
                raise DataError(f"{lw}: atom {a + 1}: {exc}") from None
            x[a] = [_parse_float(t, lw) for t in toks[1:4]]
        q = np.zeros(n, dtype=np.int64)
        m = _CHARGES_RE.search(comment)
        if m:
            q[:] = _xyz_charges(m.group(1), n, f"{path}: molecule {rec + 1}, line {i + 2}")
            any_charges = True
        zs.append(z), xs.append(x), qs.append(q), ids.append(_id_from_title(comment, rec))
        i += 2 + n
        rec += 1
    if not zs:
        raise DataError(f"{path}: no molecules found")
    mols = MoleculeSet.from_lists(zs, xs, ids=ids, charges=qs if any_charges else None)
    return mols


_CHARGES_RE = re.compile(r"formal_charges=(\S*)")


def _xyz_charges(field: str, n: int, where: str) -> list[int]:
    """The comment's ``formal_charges=q1,q2,...``: exactly one integer per atom."""
    vals = field.split(",") if field else []
    bad = [v for v in vals if not _is_int(v) or not -15 <= int(v) <= 15]
    if bad or len(vals) != n:
        what = (f"'{bad[0]}' is not a formal charge (an integer in -15..15)" if bad
                else f"{len(vals)} values for {n} atoms (expected one comma-separated integer per atom)")
        raise DataError(f"{where}: malformed formal_charges={field[:60]!r}: {what}")
    return [int(v) for v in vals]


def _is_int(tok: str) -> bool:
    t = tok.strip()
    return (t[1:] if t[:1] in "+-" else t).isdigit()


def read_npz(path: PathLike) -> MoleculeSet:
    path = Path(path)
    data = open_npz(path)
    with data:
        fmt = str(npz_array(data, path, "format")) if "format" in data.files else None
        if fmt != NPZ_FORMAT:
            raise DataError(f"{path}: not a symdiff sample file (key 'format' is {fmt!r}, expected '{NPZ_FORMAT}')")
        version = npz_array(data, path, "version") if "version" in data.files else None
        if version is None or version.shape != () or version.dtype.kind not in "iu" or int(version) != NPZ_VERSION:
            raise DataError(f"{path}: sample-file version {version!r} is not supported (expected {NPZ_VERSION})")
        arrays = [npz_array(data, path, k) for k in ("atomic_numbers", "positions", "offsets", "mol_ids")]
        q = npz_array(data, path, "formal_charges") if "formal_charges" in data.files else None
    mols = checked_set(str(path), arrays[0], arrays[1], arrays[2], arrays[3], q)
    if len(mols) == 0:
        raise DataError(f"{path}: the file holds no molecules")
    return mols


def read_records(path: PathLike) -> MoleculeRecords:
    """Like :func:`read_molecules` but also returns the SDF's bonds where the file has them."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".sdf", ".mol", ".sd"):
        return read_sdf_records(path)
    if suffix == ".xyz":
        return MoleculeRecords(read_xyz(path))
    if suffix == ".npz":
        return MoleculeRecords(read_npz(path))
    raise DataError(f"{path}: unknown molecule file extension '{suffix}' (expected .sdf, .xyz or .npz)")


def read_molecules(path: PathLike) -> MoleculeSet:
    """Read SDF (with or without bonds), multi-molecule XYZ, or a symdiff .npz sample file into a MoleculeSet.

    ``atomic_numbers`` come back as int8 (Z <= 118), ``formal_charges`` from SDF charge fields / XYZ comments
    (None for XYZ without charges). Raises :class:`DataError` naming the file and record on unreadable input.
    """
    return read_records(path).mols

"""GEOM-Drugs sources: the ``drugs_crude.msgpack`` release (as EDM used it), the ``rdkit_folder`` pickles, and
npz files of the layout in ``../shared/data/geom_drugs`` (the real 10-molecule sample, our GEOM-like sets).

Every conformer becomes its own datapoint (SPEC §1.2). Its id is ``1_000_000 * part + k``, with ``part`` the
msgpack object (or group of pickle files) it came from and ``k`` its running number inside that part: unique and
stable however many MPI ranks build the set.

Splits: by default leak-free by molecule: a SMILES listed in the MiDi split lists (``midi_split_smiles_*.txt.gz``)
goes to that split, any other to train/valid/test by a seeded hash of the SMILES (80/10/10). With EDM's
``geom_permutation.npy`` the EDM per-conformer split instead (it needs a serial build and the set in memory).
"""
from __future__ import annotations

import gc
import gzip
import hashlib
import logging
import os
import pickle
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import msgpack
import numpy as np

from symdiff.data.molecules import MoleculeSet
from symdiff.data.validate import (MAX_Z, check_atomic_numbers, check_offsets, check_positions, int_array, npz_array,
                                   open_npz)
from symdiff.errors import DataError, UserError

log = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")
PART_STRIDE = 1_000_000
MIDI_FILES = {"train": "midi_split_smiles_train.txt.gz", "valid": "midi_split_smiles_val.txt.gz",
              "test": "midi_split_smiles_test.txt.gz"}


def default_split_smiles_dir() -> Optional[Path]:
    """``$SYMDIFF_SHARED/data/geom_drugs`` or ``../shared/data/geom_drugs`` beside the checkout, if present."""
    cands = []
    if os.environ.get("SYMDIFF_SHARED"):
        cands.append(Path(os.environ["SYMDIFF_SHARED"]) / "data" / "geom_drugs")
    cands.append(Path(__file__).resolve().parents[2].parent / "shared" / "data" / "geom_drugs")
    for c in cands:
        if all((c / f).is_file() for f in MIDI_FILES.values()):
            return c
    return None


def smiles_files(given: Optional[Sequence[Path]]) -> list[Path]:
    """The SMILES lists a synthetic GEOM generator reads: ``given``, else the three MiDi split lists (real GEOM-Drugs
    SMILES); a missing one is a UserError naming it."""
    if given is None:
        d = default_split_smiles_dir()
        if d is None:
            raise UserError("no --smiles given and ../shared/data/geom_drugs (or $SYMDIFF_SHARED) not found")
        return [d / name for name in MIDI_FILES.values()]
    for f in given:
        if not Path(f).is_file():
            raise UserError(f"{f}: SMILES list not found")
    return [Path(f) for f in given]


class SmilesSplitter:
    """Molecule-level (leak-free) split: MiDi lists where they know the SMILES, a seeded hash elsewhere."""

    def __init__(self, lists_dir: Optional[Path], seed: int = 0, fractions: tuple[float, float] = (0.8, 0.9)):
        self.seed, self.fractions = seed, fractions
        self.lookup: dict[str, str] = {}
        self.lists_dir = lists_dir
        if lists_dir is not None:
            for split, name in MIDI_FILES.items():
                p = Path(lists_dir) / name
                if not p.is_file():
                    raise UserError(f"{p}: MiDi split list not found (--split-smiles names its directory)")
                with gzip.open(p, "rt") as f:
                    for line in f:
                        s = line.strip()
                        if s:
                            self.lookup[s] = split
        self.from_lists = 0
        self.from_hash = 0

    def describe(self) -> dict[str, Any]:
        return {"split_method": "smiles", "split_seed": self.seed,
                "split_lists": None if self.lists_dir is None else str(self.lists_dir)}

    def __call__(self, smiles: str) -> str:
        if self.lookup:
            hit = self.lookup.get(smiles)
            if hit is None:
                canon = _canonical(smiles)
                hit = self.lookup.get(canon) if canon else None
            if hit is not None:
                self.from_lists += 1
                return hit
        self.from_hash += 1
        h = hashlib.sha256(f"{self.seed}:{smiles}".encode()).digest()
        u = int.from_bytes(h[:8], "little") / 2 ** 64
        return SPLITS[0] if u < self.fractions[0] else SPLITS[1] if u < self.fractions[1] else SPLITS[2]


def _canonical(smiles: str) -> Optional[str]:
    from rdkit import Chem, RDLogger
    RDLogger.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles)
    return None if mol is None else Chem.MolToSmiles(mol)


def lowest_energy(energies: list[float], keep: int) -> np.ndarray:
    """Indices of the ``keep`` lowest energies, ties in file order (a stable sort, as EDM's argsort on floats)."""
    return np.argsort(np.asarray(energies, dtype=np.float64), kind="stable")[:keep]


class _Collector:
    """Conformers of one part, grouped per split in the order they were read."""

    def __init__(self, part: int) -> None:
        self.part, self.k = part, 0
        self.data: dict[str, tuple[list, list, list, list]] = {}

    def add(self, split: str, z: np.ndarray, x: np.ndarray, q: Optional[np.ndarray]) -> None:
        zs, xs, ids, qs = self.data.setdefault(split, ([], [], [], []))
        zs.append(z)
        xs.append(x)
        ids.append(self.part * PART_STRIDE + self.k)
        qs.append(q)
        self.k += 1

    def sets(self) -> dict[str, MoleculeSet]:
        out = {}
        for split in SPLITS:
            if split in self.data:
                zs, xs, ids, qs = self.data[split]
                charges = None if any(q is None for q in qs) else qs
                out[split] = MoleculeSet.from_lists(zs, xs, ids, charges)
        return out


class _GeomSource:
    dataset = "geom"
    split_names = SPLITS

    def __init__(self, path: Path, shard_size: int, splitter: SmilesSplitter, conformers: int,
                 permutation: Optional[Path]) -> None:
        self.path, self.shard_size, self.splitter, self.keep = Path(path), shard_size, splitter, conformers
        self.permutation = permutation
        self.synthetic = False  # a streamed source learns it from the molecules it reads

    def describe(self) -> dict[str, Any]:
        d = {"source": str(self.path), "source_format": self.fmt, "conformers_per_molecule": self.keep,
             "synthetic": self.synthetic}
        d.update(self.splitter.describe() if self.permutation is None else
                 {"split_method": "edm-permutation", "split_permutation": str(self.permutation)})
        return d

    def iter_parts(self, rank: int, world: int) -> Iterator[tuple[int, dict[str, MoleculeSet]]]:
        if self.permutation is None:
            yield from self._parts(rank, world)
            return
        if world != 1:
            raise UserError("the EDM permutation split (--geom-permutation) needs a serial build (no --mpi)")
        yield from _edm_permutation_split(self._parts(0, 1), self.permutation, self.shard_size)

    def _parts(self, rank: int, world: int) -> Iterator[tuple[int, dict[str, MoleculeSet]]]:
        raise NotImplementedError


class GeomMsgpack(_GeomSource):
    """``drugs_crude.msgpack``: a stream of dicts {SMILES: info}; ``info['conformers']`` is a list of dicts with
    ``'xyz'`` ([[Z, x, y, z], ...]) and ``'totalenergy'``. Read object by object; rank r parses objects
    ``i % world == r``. Under the MPI build (``comm`` set) rank 0 finds the objects' byte ranges once and every rank
    reads only its own objects; without it each rank skips the others' objects itself."""

    fmt = "geom-msgpack"
    has_formal_charges = False
    comm = None  # the MPI build's communicator

    def _parts(self, rank: int, world: int) -> Iterator[tuple[int, dict[str, MoleculeSet]]]:
        if world > 1 and self.comm is not None:
            yield from self._indexed_parts(rank, world)
            return
        with open(self.path, "rb") as f:
            unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False, max_buffer_size=2 ** 31 - 1)
            i, done = 0, 0  # done: bytes of the complete objects read so far
            size = os.fstat(f.fileno()).st_size
            while True:
                try:
                    if i % world != rank:
                        unpacker.skip()
                        i, done = i + 1, unpacker.tell()
                        continue
                    obj = _without_gc(unpacker.unpack)
                    done = unpacker.tell()
                except msgpack.OutOfData:
                    if done < size:  # OutOfData also ends a file cut inside an object: not a clean end
                        raise self._truncated(i, done, size) from None
                    return
                except (msgpack.UnpackException, ValueError, TypeError) as exc:
                    raise DataError(f"{self.path}: msgpack object {i}: cannot decode: {exc}") from exc
                sets = self._object_sets(i, obj)
                del obj  # the decoded object is the biggest thing alive: not kept while its shards are written
                yield i, sets
                i += 1

    def object_bounds(self) -> list[int]:
        """Byte offsets where the objects start, and the file size at the end (one pass that builds nothing)."""
        bounds = [0]
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False, max_buffer_size=2 ** 31 - 1)
            while True:
                try:
                    unpacker.skip()
                except msgpack.OutOfData:
                    if bounds[-1] < size:
                        raise self._truncated(len(bounds) - 1, bounds[-1], size) from None
                    return bounds
                except (msgpack.UnpackException, ValueError, TypeError) as exc:
                    raise DataError(f"{self.path}: msgpack object {len(bounds) - 1}: cannot decode: {exc}") from exc
                bounds.append(unpacker.tell())

    def _indexed_parts(self, rank: int, world: int) -> Iterator[tuple[int, dict[str, MoleculeSet]]]:
        # Skipping the others' objects costs every rank a pass over the whole file (K x the file at K ranks, and
        # as long as parsing its share at K >= 8); one pass on rank 0 and a broadcast make it once.
        bounds, err = None, None
        if rank == 0:
            # Whatever stops the scan is broadcast: a rank 0 that raised here would leave the others waiting below,
            # and its next collective (the build's gather) would meet their bcast.
            try:
                bounds = self.object_bounds()
            except DataError as exc:
                err = str(exc)
            except OSError as exc:
                err = f"{self.path}: cannot read: {exc.strerror or exc}"
            except Exception as exc:
                err = f"{self.path}: rank 0: {type(exc).__name__}: {exc}"
        req = self.comm.Ibarrier()
        while not req.Test():  # a sleeping wait: Open MPI's blocking bcast would spin on the core rank 0 scans with
            time.sleep(0.005)
        bounds, err = self.comm.bcast((bounds, err), root=0)
        if err:
            raise DataError(err)
        with open(self.path, "rb") as f:
            for i in range(rank, len(bounds) - 1, world):
                f.seek(bounds[i])
                # Streamed from the file, not read into one bytes object first: that copy cost ~50 MB per rank.
                unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False, max_buffer_size=2 ** 31 - 1,
                                            read_size=1 << 20)
                try:
                    obj = _without_gc(unpacker.unpack)
                except (msgpack.UnpackException, ValueError, TypeError) as exc:
                    raise DataError(f"{self.path}: msgpack object {i}: cannot decode: {exc}") from exc
                del unpacker
                sets = self._object_sets(i, obj)
                del obj
                yield i, sets

    def _truncated(self, i: int, done: int, size: int) -> DataError:
        return DataError(f"{self.path}: truncated: the file ends inside msgpack object {i} (byte {done} of {size})")

    def _object_sets(self, i: int, obj: Any) -> dict[str, MoleculeSet]:
        if not isinstance(obj, dict):
            raise DataError(f"{self.path}: msgpack object {i} is a {type(obj).__name__}, expected a dict "
                            "SMILES -> molecule info (the drugs_crude.msgpack schema)")
        return self._read_object(i, obj).sets()

    def _read_object(self, i: int, obj: dict) -> _Collector:
        col = _Collector(i)
        for smiles, info in obj.items():
            where = f"{self.path}: object {i}, molecule {smiles!r}"
            if not isinstance(smiles, str):
                raise DataError(f"{where}: the key is a {type(smiles).__name__}, expected a SMILES string")
            try:
                confs = info["conformers"]
                energies = [float(c["totalenergy"]) for c in confs]
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{where}: no conformers/totalenergy ({exc!r})") from exc
            if info.get("synthetic") is True:
                self.synthetic = True
            split = self.splitter(smiles)
            keep = lowest_energy(energies, self.keep)
            block = _conformer_block(confs, keep)
            if block is None:  # ragged, odd or invalid: one conformer at a time, which names the bad one
                for j in keep:
                    z, x = self._conformer(where, confs, j)
                    col.add(split, z, x, None)
                continue
            z, x = block
            for c in range(len(keep)):
                col.add(split, z[c], x[c], None)
        return col

    @staticmethod
    def _conformer(where: str, confs: list, j: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            xyz = np.asarray(confs[j]["xyz"], dtype=np.float64)
            if xyz.size == 0:  # an empty conformer is judged (and skippable) like any invalid molecule
                xyz = xyz.reshape(0, 4)
            if xyz.ndim != 2 or xyz.shape[1] != 4:
                raise ValueError(f"'xyz' has shape {xyz.shape}, expected (n_atoms, 4)")
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where}, conformer {j}: bad 'xyz': {exc}") from exc
        z = check_atomic_numbers(f"{where}, conformer {j}", xyz[:, 0], key="xyz[:, 0]")
        return z, xyz[:, 1:].astype(np.float32)


def _conformer_block(confs: list, keep: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(Z [k, n] int8, x [k, n, 3] float32) of the kept conformers in one numpy conversion, when they all have the
    same number of atoms and valid atomic numbers (GEOM's always do); None otherwise. Converting per conformer
    costs ~150 us each, most of a 7M-conformer build."""
    try:
        xyz = np.array([confs[j]["xyz"] for j in keep], dtype=np.float64)
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    if xyz.ndim != 3 or xyz.shape[2] != 4 or xyz.shape[1] == 0:
        return None
    z = xyz[:, :, 0]
    if not (np.all(z >= 1) and np.all(z <= MAX_Z) and np.all(z == np.floor(z))):
        return None
    return z.astype(np.int8), xyz[:, :, 1:].astype(np.float32)


def _without_gc(unpack: Callable[[], Any]) -> Any:
    """``unpack()`` with the cyclic GC off: unpacking builds millions of lists (no cycles), and every GC pass over
    them rescans all of them, which made unpacking a 33 MB object 3x slower."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return unpack()
    finally:
        if enabled:
            gc.enable()


class GeomPickleFolder(_GeomSource):
    """GEOM's ``rdkit_folder``: one pickle per molecule (``drugs/<name>.pickle``), a dict with ``'smiles'`` and
    ``'conformers'`` (each with ``'rd_mol'``, an RDKit Mol with one conformer, and ``'totalenergy'``). Unpickling
    runs code, so it is refused unless the caller trusts the files (``--trust-pickle``)."""

    fmt = "geom-rdkit-folder"
    has_formal_charges = True
    files_per_part = 1000

    def __init__(self, *a, trust_pickle: bool = False, **k) -> None:
        super().__init__(*a, **k)
        if not trust_pickle:
            raise UserError(f"{self.path}: reading rdkit_folder pickles executes code from the files; pass "
                            "--trust-pickle if you trust them (or use drugs_crude.msgpack)")
        base = self.path / "drugs" if (self.path / "drugs").is_dir() else self.path
        self.files = sorted(base.glob("*.pickle"))
        if not self.files:
            raise DataError(f"{base}: no *.pickle files (expected GEOM's rdkit_folder/drugs)")

    def _parts(self, rank: int, world: int) -> Iterator[tuple[int, dict[str, MoleculeSet]]]:
        n_parts = -(-len(self.files) // self.files_per_part)
        for part in range(n_parts):
            if part % world != rank:
                continue
            col = _Collector(part)
            for p in self.files[part * self.files_per_part:(part + 1) * self.files_per_part]:
                self._read_file(p, col)
            yield part, col.sets()

    def _read_file(self, p: Path, col: _Collector) -> None:
        try:
            with open(p, "rb") as f:
                d = pickle.load(f)
            confs = d["conformers"]
            energies = [float(c["totalenergy"]) for c in confs]
        except Exception as exc:
            raise DataError(f"{p}: not a GEOM rdkit_folder pickle: {type(exc).__name__}: {exc}") from exc
        smiles = d.get("smiles") or p.stem
        split = self.splitter(smiles)
        for j in lowest_energy(energies, self.keep):
            try:
                mol = confs[j]["rd_mol"]
                z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int8)
                q = np.array([a.GetFormalCharge() for a in mol.GetAtoms()], dtype=np.int8)
                x = np.asarray(mol.GetConformer().GetPositions(), dtype=np.float32)
            except Exception as exc:
                raise DataError(f"{p}: conformer {j}: no usable 'rd_mol' ({type(exc).__name__}: {exc})") from exc
            col.add(split, z, x, q)


class GeomNpz(_GeomSource):
    """npz in the layout of ``geom_drugs_sample_10mols.npz``: ``mol_smiles``, ``conf_mol_index``,
    ``conf_offsets``, ``atomic_numbers``, ``positions``, optional ``formal_charges`` and ``conf_energy``.
    Without energies every conformer is kept (the file's order); with them the ``conformers`` lowest."""

    fmt = "geom-npz"

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.z = open_npz(self.path)
        for key in ("mol_smiles", "conf_mol_index", "conf_offsets", "atomic_numbers", "positions"):
            if key not in self.z.files:
                raise DataError(f"{self.path}: missing array '{key}' (expected the GEOM sample npz layout)")
        self.has_formal_charges = "formal_charges" in self.z.files
        self.synthetic = bool(npz_array(self.z, self.path, "synthetic")) if "synthetic" in self.z.files else False

    def _arrays(self) -> tuple[np.ndarray, ...]:
        """The file's arrays, checked to fit together (conformer c owns atoms conf_offsets[c]:conf_offsets[c+1])."""
        z, p, where = self.z, self.path, str(self.path)
        smiles = npz_array(z, p, "mol_smiles")
        mol_of = int_array(where, "conf_mol_index", npz_array(z, p, "conf_mol_index"))
        if len(mol_of) and (mol_of.min() < 0 or mol_of.max() >= len(smiles)):
            raise DataError(f"{where}: array 'conf_mol_index' refers to molecule {int(mol_of.max())}, "
                            f"the file has {len(smiles)}")
        Z = check_atomic_numbers(where, npz_array(z, p, "atomic_numbers"))
        off = check_offsets(where, npz_array(z, p, "conf_offsets"), len(mol_of), len(Z), key="conf_offsets")
        X = check_positions(where, npz_array(z, p, "positions"), len(Z))
        energy = npz_array(z, p, "conf_energy") if "conf_energy" in z.files else None
        if energy is not None and energy.shape != mol_of.shape:
            raise DataError(f"{where}: array 'conf_energy' has shape {energy.shape}, expected {mol_of.shape}")
        charges = None
        if self.has_formal_charges:
            charges = int_array(where, "formal_charges", npz_array(z, p, "formal_charges")).astype(np.int8)
            if len(charges) != len(Z):
                raise DataError(f"{where}: array 'formal_charges' has {len(charges)} entries for {len(Z)} atoms")
        return smiles, mol_of, off, energy, charges, Z, X

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["synthetic"] = self.synthetic
        if "conf_energy" not in self.z.files:
            d["conformers_per_molecule"] = "all (the source has no energies)"
        return d

    def _parts(self, rank: int, world: int) -> Iterator[tuple[int, dict[str, MoleculeSet]]]:
        smiles, mol_of, off, energy, charges, Z, X = self._arrays()
        n_mols = len(smiles)
        mols_per_part = 1000
        for part in range(-(-n_mols // mols_per_part)):
            if part % world != rank:
                continue
            col = _Collector(part)
            lo, hi = part * mols_per_part, min((part + 1) * mols_per_part, n_mols)
            sel = np.flatnonzero((mol_of >= lo) & (mol_of < hi))
            for m in range(lo, hi):
                confs = sel[mol_of[sel] == m]
                if energy is not None:
                    confs = confs[lowest_energy(list(energy[confs]), self.keep)]
                split = self.splitter(str(smiles[m]))
                for c in confs:
                    a, b = off[c], off[c + 1]
                    col.add(split, Z[a:b], X[a:b], None if charges is None else charges[a:b])
            yield part, col.sets()


def _edm_permutation_split(parts: Iterator[tuple[int, dict[str, MoleculeSet]]], perm_path: Path,
                           shard_size: int) -> Iterator[tuple[int, dict[str, MoleculeSet]]]:
    # EDM splits conformers, not molecules: gather all in read order, then val/test/train by the permutation.
    sets = [s for _, by_split in parts for s in by_split.values()]
    if not sets:
        return
    allm = MoleculeSet.concatenate(sets)
    order = np.argsort(allm.mol_ids, kind="stable")  # read order = id order
    allm = allm.select(order)
    try:
        perm = np.load(perm_path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{perm_path}: cannot load the permutation: {exc}") from exc
    m = len(allm)
    if not isinstance(perm, np.ndarray) or perm.shape != (m,) or not np.array_equal(np.sort(perm), np.arange(m)):
        raise DataError(f"{perm_path}: not a permutation of the {m} conformers read from the source")
    n_val = n_test = int(0.1 * m)
    groups = {"valid": perm[:n_val], "test": perm[n_val:n_val + n_test], "train": perm[n_val + n_test:]}
    key = 0
    for split in SPLITS:
        idx = groups[split]
        for start in range(0, len(idx), shard_size):
            yield key, {split: allm.select(idx[start:start + shard_size])}
            key += 1


def open_geom_source(source: Path, *, shard_size: int, trust_pickle: bool, split_smiles: Optional[Path],
                     split_seed: int, permutation: Optional[Path], conformers: int):
    if conformers < 1:
        raise UserError(f"--conformers must be >= 1, got {conformers}")
    if split_smiles is not None and str(split_smiles).lower() == "none":
        lists = None  # hash split only: the same on every machine, with or without ../shared
    else:
        lists = Path(split_smiles) if split_smiles is not None else default_split_smiles_dir()
    splitter = SmilesSplitter(lists, split_seed)
    args = (source, shard_size, splitter, conformers, permutation)
    if source.is_dir():
        return GeomPickleFolder(*args, trust_pickle=trust_pickle)
    if source.suffix == ".npz":
        return GeomNpz(*args)
    if source.suffix == ".pickle" or source.suffix == ".pkl":
        raise UserError(f"{source}: pass the rdkit_folder directory (with --trust-pickle), not one pickle")
    return GeomMsgpack(*args)

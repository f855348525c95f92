"""Reference data for evaluation: a dataset's own molecules (the "Data" row) and training SMILES for novelty.

Sources, in order: a shard directory given with ``--data-root`` (read with :func:`symdiff.data.shards.read_split`),
else the real data beside the checkout (``$SYMDIFF_SHARED/data`` or ``../shared/data``): QM9 from ``qm9.npz``
(EDM split), GEOM-Drugs from the 503-conformer sample (split name ``sample``) and the MiDi split SMILES.

Training SMILES sets are expensive to build (QM9: 100,000 molecules through the EDM rules), so they are cached
under ``.cache/eval/`` (or ``$SYMDIFF_CACHE_DIR``) in files whose names carry the protocol version, the RDKit
version and a fingerprint of the source; a change of any of them makes a new cache file.
"""
from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from symdiff.data.molecules import MoleculeSet
from symdiff.errors import DataError, UserError

REPO = Path(__file__).resolve().parents[2]
QM9_SPLITS = {"train": 0, "valid": 1, "val": 1, "test": 2}
CACHE_VERSION = 1


def shared_data_dir() -> Path:
    base = Path(os.environ.get("SYMDIFF_SHARED", REPO.parent / "shared"))
    return base / "data"


def cache_dir() -> Path:
    return Path(os.environ.get("SYMDIFF_CACHE_DIR", REPO / ".cache" / "eval"))


@dataclass
class Reference:
    """A reference molecule set; ``bonds`` (rows a, b, order with 4 = aromatic) where the source has a graph."""

    mols: MoleculeSet
    bonds: Optional[list[np.ndarray]]
    description: str


def _qm9_npz(shared: Path) -> Path:
    p = shared / "qm9" / "qm9.npz"
    if not p.is_file():
        raise UserError(f"QM9 data not found at {p} (give --data-root DIR with shards, or set SYMDIFF_SHARED)")
    return p


def load_qm9_split(split: str, shared: Optional[Path] = None, with_bonds: bool = False) -> Reference:
    if split not in QM9_SPLITS:
        raise UserError(f"unknown QM9 split '{split}' (known: train, valid, test)")
    shared = shared or shared_data_dir()
    path = _qm9_npz(shared)
    with np.load(path) as q:
        rows = np.flatnonzero(q["split_edm"] == QM9_SPLITS[split])
        full = MoleculeSet(atomic_numbers=q["atomic_numbers"], positions=q["positions"], offsets=q["offsets"],
                           mol_ids=q["mol_id"].astype(np.int64))
        mols = full.select(rows)
    bonds = None
    gpath = shared / "qm9" / "qm9_rdkit_graphs.npz"
    if with_bonds and gpath.is_file():
        with np.load(gpath) as g:
            mols.formal_charges = g["formal_charges"][np.concatenate(
                [np.arange(full.offsets[r], full.offsets[r + 1]) for r in rows])]
            bonds = _graph_bonds(g["bonds"], g["bond_offsets"], rows)
    return Reference(mols, bonds, f"QM9 EDM split '{split}' from {path} ({len(mols)} molecules)")


def _graph_bonds(table: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
    """Rows (i, j, Kekulé order, aromatic) -> (i, j, order) in Kekulé form: RDKit perceives aromaticity itself."""
    out = []
    for r in rows:
        b = table[offsets[r]:offsets[r + 1]].astype(np.int64)
        out.append(b[:, :3].copy())
    return out


def load_geom_sample(shared: Optional[Path] = None) -> Reference:
    shared = shared or shared_data_dir()
    path = shared / "geom_drugs" / "geom_drugs_sample_10mols.npz"
    if not path.is_file():
        raise UserError(f"GEOM-Drugs sample not found at {path} (give --data-root DIR with shards)")
    with np.load(path) as g:
        n = len(g["conf_n_atoms"])
        mols = MoleculeSet(atomic_numbers=g["atomic_numbers"], positions=g["positions"],
                           offsets=g["conf_offsets"].astype(np.int64), mol_ids=np.arange(n, dtype=np.int64),
                           formal_charges=g["formal_charges"])
        bonds = _graph_bonds(g["bonds"], g["conf_bond_offsets"], np.arange(n))
    return Reference(mols, bonds, f"GEOM-Drugs sample (10 molecules, {n} conformers) from {path}")


def load_reference(dataset: str, split: str, data_root: Optional[str] = None, with_bonds: bool = False
                   ) -> Reference:
    """The molecules of ``split``: from shards under ``data_root`` if given, else from the shared real data."""
    if data_root:
        from symdiff.data.shards import read_split

        mols = read_split(data_root, split)
        if len(mols) == 0:
            raise DataError(f"{data_root}: split '{split}' holds no molecules")
        return Reference(mols, None, f"split '{split}' of the shards in {data_root} ({len(mols)} molecules)")
    if dataset == "qm9":
        return load_qm9_split(split, with_bonds=with_bonds)
    if dataset == "geom":
        if split != "sample":
            raise UserError(f"GEOM-Drugs split '{split}' is not available without --data-root; the real data "
                            f"here is the 503-conformer sample: use --reference-split sample")
        return load_geom_sample()
    raise UserError(f"unknown dataset '{dataset}'")


# ------------------------------------------------------------------------------------------- SMILES caches
def _fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]


def _cached_set(name: str, build) -> set[str]:
    from rdkit import rdBase

    path = cache_dir() / f"{name}_v{CACHE_VERSION}_rdkit{rdBase.rdkitVersion}.txt.gz"
    if path.is_file():
        with gzip.open(path, "rt") as fh:
            return {ln.rstrip("\n") for ln in fh if ln.strip()}
    values = build()
    from symdiff.io.atomic import atomic_write_bytes

    payload = gzip.compress(("\n".join(sorted(values)) + "\n").encode("utf-8"))
    atomic_write_bytes(path, lambda fh: fh.write(payload))
    return values


def edm_train_smiles(dataset: str, data_root: Optional[str] = None) -> Optional[set[str]]:
    """The EDM novelty reference: whole-molecule SMILES of the training molecules built by the EDM rules.

    QM9 only (the reference code reports no GEOM novelty: its GEOM graphs have single bonds only).
    """
    if dataset != "qm9":
        return None
    from symdiff.eval.edm import detect_bonds, edm_smiles
    from symdiff.eval.metrics import DATASET_SYMBOLS

    if data_root:
        from symdiff.data.shards import read_manifest

        if "train" not in read_manifest(data_root)["splits"]:
            return None  # novelty is then reported as not computed
        key = "shards_" + _fingerprint(Path(data_root) / "manifest.json")
    else:
        key = "npz_" + _fingerprint(_qm9_npz(shared_data_dir()))

    def build() -> set[str]:
        ref = load_reference("qm9", "train", data_root)
        m = ref.mols
        bad_atom = ~np.isfinite(m.positions).all(axis=1)
        owner = np.repeat(np.arange(len(m)), m.n_atoms)
        include = (np.bincount(owner, weights=bad_atom, minlength=len(m)) == 0) & (m.n_atoms > 0)
        graphs = detect_bonds(m.atomic_numbers, m.positions, m.offsets, DATASET_SYMBOLS["qm9"], include)
        out = set()
        for i in np.flatnonzero(include):
            s = edm_smiles(m.atomic_numbers[m.offsets[i]:m.offsets[i + 1]], graphs.bonds[i], largest_fragment=False)
            if s is not None:
                out.add(s)
        return out

    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")
    try:
        return _cached_set(f"qm9_edm_train_smiles_{key}", build)
    finally:
        RDLogger.EnableLog("rdApp.*")


def canonical_train_smiles(dataset: str) -> Optional[set[str]]:
    """The revised-protocol novelty reference: canonical SMILES (no H, no stereo) of the training split."""
    from symdiff.eval.revised import canonicalize_smiles_list

    shared = shared_data_dir()
    if dataset == "geom":
        src = shared / "geom_drugs" / "midi_split_smiles_train.txt.gz"
        if not src.is_file():
            return None

        def build() -> set[str]:
            with gzip.open(src, "rt") as fh:
                return canonicalize_smiles_list([ln.split()[0] for ln in fh if ln.strip()])

        return _cached_set(f"geom_midi_train_canonical_{_fingerprint(src)}", build)
    if dataset == "qm9":
        src = shared / "qm9" / "qm9.npz"
        if not src.is_file():
            return None

        def build_q() -> set[str]:
            with np.load(src) as q:
                return canonicalize_smiles_list(list(q["smiles_gdb"][q["split_edm"] == 0]))

        return _cached_set(f"qm9_train_canonical_{_fingerprint(src)}", build_q)
    return None

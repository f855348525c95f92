"""Valency tables keyed by (element, formal charge), derived from reference molecules (revised protocol).

Following Nikitin et al. 2025 ("GEOM-Drugs Revisited"), an atom is stable when its bonding pattern was observed
for the same element and formal charge in the reference data. A bonding pattern is the pair
``(n_aromatic, valence)``: the number of aromatic bonds of the atom and the summed order of its other bonds
(hydrogens are explicit atoms, so they count as bonds). A Kekulé structure has ``n_aromatic = 0`` and the plain
valence, so one table serves molecules written with or without aromatic bonds; aromatic bonds are never
truncated to single bonds (the error the revised protocol corrects).

The tables shipped in ``symdiff/eval/data/`` were derived with :func:`derive_from_smiles` from the training SMILES
of each dataset; regenerate them with ``python -m symdiff.eval.valency``.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional

DATA_DIR = Path(__file__).resolve().parent / "data"
TABLE_FILES = {"geom": DATA_DIR / "valency_geom.json", "qm9": DATA_DIR / "valency_qm9.json"}

Key = tuple[int, int]  # (atomic number, formal charge)
Pattern = tuple[int, int]  # (n_aromatic bonds, summed order of the other bonds)


class ValencyTable:
    """Allowed bonding patterns per (atomic number, formal charge), with the counts they were seen with."""

    def __init__(self, counts: dict[tuple[int, int, int, int], int], meta: Optional[dict] = None,
                 min_count: int = 1) -> None:
        self.counts = counts
        self.meta = meta or {}
        self.allowed: dict[Key, set[Pattern]] = {}
        for (z, q, n_arom, val), c in counts.items():
            if c >= min_count:
                self.allowed.setdefault((z, q), set()).add((n_arom, val))

    def is_allowed(self, z: int, charge: int, n_aromatic: int, valence: int) -> bool:
        return (n_aromatic, valence) in self.allowed.get((z, charge), ())

    def to_json(self) -> dict:
        from symdiff.io.molfiles import element_symbol

        rows = [{"element": element_symbol(z), "z": z, "charge": q, "n_aromatic": a, "valence": v, "count": c}
                for (z, q, a, v), c in sorted(self.counts.items())]
        return {**self.meta, "entries": rows}

    @classmethod
    def from_json(cls, data: dict, min_count: int = 1) -> "ValencyTable":
        counts = {(int(r["z"]), int(r["charge"]), int(r["n_aromatic"]), int(r["valence"])): int(r["count"])
                  for r in data["entries"]}
        meta = {k: v for k, v in data.items() if k != "entries"}
        return cls(counts, meta, min_count)


def atom_patterns(mol) -> list[tuple[int, int, int, int]]:
    """(Z, formal charge, n_aromatic, valence) per atom of an RDKit molecule whose hydrogens are explicit atoms."""
    out = []
    for atom in mol.GetAtoms():
        n_arom, val = 0, 0
        for b in atom.GetBonds():
            if b.GetIsAromatic():
                n_arom += 1
            else:
                val += int(round(b.GetBondTypeAsDouble()))
        # hydrogens stored as an atom property (e.g. [NH4+] before AddHs) are bonds too; implicit hydrogens that
        # RDKit would invent for an under-bonded atom are deliberately not counted (that is what instability means)
        val += atom.GetNumExplicitHs()
        out.append((atom.GetAtomicNum(), atom.GetFormalCharge(), n_arom, val))
    return out


def derive_from_smiles(smiles: Iterable[str], meta: Optional[dict] = None) -> tuple[ValencyTable, dict]:
    """Count bonding patterns over reference molecules, both in RDKit's aromatic form and Kekulé form.

    Molecules that do not parse/sanitise or have more than one fragment are skipped (as the revised protocol's
    reference cleaning does); the returned stats say how many.
    """
    from rdkit import Chem, RDLogger, rdBase

    RDLogger.DisableLog("rdApp.*")
    counts: Counter = Counter()
    stats = {"n_smiles": 0, "n_used": 0, "n_unparsable": 0, "n_fragmented": 0, "n_kekulize_failed": 0}
    for s in smiles:
        stats["n_smiles"] += 1
        mol = Chem.MolFromSmiles(s)
        if mol is None:
            stats["n_unparsable"] += 1
            continue
        if len(Chem.GetMolFrags(mol)) > 1:
            stats["n_fragmented"] += 1
            continue
        mol = Chem.AddHs(mol)
        counts.update(atom_patterns(mol))
        try:
            Chem.Kekulize(mol, clearAromaticFlags=True)
        except ValueError:
            stats["n_kekulize_failed"] += 1
            continue
        counts.update(atom_patterns(mol))
        stats["n_used"] += 1
    RDLogger.EnableLog("rdApp.*")
    info = {**(meta or {}), "rdkit_version": rdBase.rdkitVersion, **stats}
    return ValencyTable(dict(counts), info), stats


def load_table(dataset: str, path: Optional[os.PathLike] = None, min_count: int = 1) -> ValencyTable:
    from symdiff.errors import DataError

    p = Path(path) if path is not None else TABLE_FILES.get(dataset)
    if p is None or not p.is_file():
        raise DataError(f"no valency table for dataset '{dataset}' (looked for {p})")
    try:
        return ValencyTable.from_json(json.loads(p.read_text()), min_count)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{p}: not a valency table ({exc})") from None


def _read_smiles(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        return [ln.split()[0] for ln in fh if ln.strip()]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="derive a (element, formal charge) valency table from SMILES")
    ap.add_argument("--smiles", required=True, help="text or .gz file, one SMILES per line (first column)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--source", default="", help="provenance text stored in the table")
    args = ap.parse_args(argv)
    smi = _read_smiles(Path(args.smiles))
    table, stats = derive_from_smiles(smi, {"source": args.source or str(args.smiles)})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from symdiff.io.atomic import atomic_write_text

    atomic_write_text(out, json.dumps(table.to_json(), indent=1) + "\n")
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

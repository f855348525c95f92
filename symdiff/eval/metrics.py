"""One entry point for the metrics: screen the input, run a protocol, and summarise as a JSON-ready dict.

Input problems never drop a molecule silently: a molecule with no atoms, non-finite coordinates or an element
outside the dataset's alphabet is *excluded from the bond analysis*, still counted in ``n_molecules`` (and its
atoms in the atom count), and scored as unstable and invalid. The summary lists the exclusions by reason with
the first examples, so a user sees exactly what happened.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

import numpy as np

from symdiff.data.elements import GEOM, QM9, alphabet
from symdiff.data.molecules import MoleculeSet

DATASET_SYMBOLS = {"qm9": QM9.symbols, "geom": GEOM.symbols}
PROTOCOLS = ("edm", "revised")
MAX_EXAMPLES = 20


def rdkit_version() -> str:
    from rdkit import rdBase

    return rdBase.rdkitVersion


def screen(mols: MoleculeSet, dataset: str) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """(include mask, [(molecule index, reason)]) for the molecules the protocols cannot analyse."""
    from symdiff.io.molfiles import element_symbol

    allowed = set(alphabet(dataset).atomic_numbers)
    n = len(mols)
    include = np.ones(n, dtype=bool)
    reasons: list[tuple[int, str]] = []
    n_atoms = mols.n_atoms
    finite_atom = np.isfinite(np.asarray(mols.positions, dtype=np.float64)).all(axis=1)
    z = np.asarray(mols.atomic_numbers, dtype=np.int64)
    in_alpha = np.isin(z, list(allowed))
    for i in range(n):
        lo, hi = int(mols.offsets[i]), int(mols.offsets[i + 1])
        if n_atoms[i] == 0:
            reasons.append((i, "no atoms"))
        elif not finite_atom[lo:hi].all():
            reasons.append((i, "non-finite coordinates (NaN or inf)"))
        elif not in_alpha[lo:hi].all():
            bad = sorted({element_symbol(int(v)) for v in z[lo:hi][~in_alpha[lo:hi]]})
            reasons.append((i, f"element outside the {dataset} alphabet: {', '.join(bad)}"))
        else:
            continue
        include[i] = False
    return include, reasons


def _frac(num: float, den: float) -> Optional[float]:
    return float(num) / float(den) if den else None


def _uniqueness_novelty(smiles: list[Optional[str]], valid: np.ndarray, train: Optional[set[str]]
                        ) -> dict[str, Optional[float]]:
    valid_smiles = [s for s, v in zip(smiles, valid) if v]
    unique = set(valid_smiles)
    out = {
        "n_valid": int(valid.sum()),
        "n_unique": len(unique),
        "uniqueness": _frac(len(unique), len(valid_smiles)),
        "valid_and_unique": _frac(len(unique), len(valid)),
        "novelty": None,
        "n_novel": None,
    }
    if train is not None and unique:
        novel = len(unique - train)
        out["n_novel"] = novel
        out["novelty"] = novel / len(unique)
    return out


def _exclusion_summary(mols: MoleculeSet, reasons: list[tuple[int, str]]) -> dict:
    by_reason = Counter(r.split(":")[0] for _, r in reasons)
    return {
        "n_excluded": len(reasons),
        "exclusions": dict(by_reason),
        "excluded_examples": [{"index": i, "mol_id": int(mols.mol_ids[i]), "reason": r}
                              for i, r in reasons[:MAX_EXAMPLES]],
    }


def _headline(protocol: str, dataset: str, mols: MoleculeSet, res) -> dict:
    """The keys both protocols report, in the same order."""
    return {
        "protocol": protocol,
        "dataset": dataset,
        "rdkit_version": rdkit_version(),
        "n_molecules": len(mols),
        "n_atoms": int(mols.offsets[-1]),
        "atom_stability": _frac(res.atom_stable.sum(), len(res.atom_stable)),
        "mol_stability": _frac(res.mol_stable.sum(), len(mols)),
        "validity": _frac(res.valid.sum(), len(mols)),
    }


def evaluate_edm_protocol(mols: MoleculeSet, dataset: str, train_smiles: Optional[set[str]] = None,
                          include: Optional[np.ndarray] = None, reasons: Optional[list] = None) -> dict:
    """EDM metrics (SPEC §4): atom/molecule stability, validity (largest fragment), uniqueness, novelty."""
    from symdiff.eval.edm import evaluate_edm

    if include is None:
        include, reasons = screen(mols, dataset)
    res = evaluate_edm(np.asarray(mols.atomic_numbers), np.asarray(mols.positions), np.asarray(mols.offsets),
                       DATASET_SYMBOLS[dataset], include, geom_rules=dataset == "geom")
    out = _headline("edm", dataset, mols, res)
    out.update(_uniqueness_novelty(res.smiles, res.valid, train_smiles if dataset == "qm9" else None))
    notes = []
    if dataset == "geom":
        notes.append("EDM's GEOM validity builds single bonds only; novelty is not defined under this protocol "
                     "(the reference code prints 0.0); see the revised protocol")
    elif train_smiles is None:
        notes.append("novelty not computed: no training SMILES available")
    out.update(_exclusion_summary(mols, reasons or []))
    out["notes"] = notes
    out["_details"] = res
    return out


def evaluate_revised_protocol(mols: MoleculeSet, dataset: str, bonds: Optional[list[np.ndarray]] = None,
                              train_smiles: Optional[set[str]] = None, table=None,
                              include: Optional[np.ndarray] = None, reasons: Optional[list] = None) -> dict:
    """Revised protocol (Nikitin et al. 2025): explicit bonds, (element, charge) valencies, connected validity."""
    from symdiff.eval.revised import evaluate_revised
    from symdiff.eval.valency import load_table

    if include is None:
        include, reasons = screen(mols, dataset)
    table = table or load_table(dataset)
    res = evaluate_revised(np.asarray(mols.atomic_numbers), np.asarray(mols.positions), np.asarray(mols.offsets),
                           mols.formal_charges, bonds, include, table)
    sources = Counter(s or "unassigned" for s, inc in zip(res.bond_source, include) if inc)
    out = _headline("revised", dataset, mols, res)
    out["sanitizable"] = _frac(res.sanitizable.sum(), len(mols))
    out["connected"] = _frac(res.connected.sum(), len(mols))
    out.update(_uniqueness_novelty(res.smiles, res.valid, train_smiles))
    out["bond_sources"] = dict(sources)
    out["n_aromatic_bonds"] = res.n_aromatic_bonds
    charges = Counter(q for q in res.assigned_charge if q is not None)
    if charges:
        out["assigned_total_charges"] = {str(k): v for k, v in sorted(charges.items())}
    out["valency_table"] = table.meta.get("source", "")
    out.update(_exclusion_summary(mols, reasons or []))
    notes = []
    if train_smiles is None:
        notes.append("novelty not computed: no training SMILES available")
    if sources.get("unassigned"):
        notes.append(f"{sources['unassigned']} molecules got no bond orders from their 3D structure "
                     f"(scored unstable and invalid)")
    out["notes"] = notes
    out["_details"] = res
    return out


def public(result: dict) -> dict:
    """The JSON-serialisable part of a result (drops the per-molecule details)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}

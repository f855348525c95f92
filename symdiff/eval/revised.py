"""The revised GEOM-Drugs protocol (Nikitin et al. 2025, "GEOM-Drugs Revisited"), as implemented here.

Per molecule:

1. **Bonds.** Taken from the file when it has them (SDF bond block; aromatic bonds kept as aromatic). Otherwise
   assigned from the 3D structure with RDKit's ``rdDetermineBonds`` (connectivity from covalent radii, then bond
   orders and formal charges by the xyz2mol method). The total charge of a generated molecule is unknown, so the
   charges 0, +1, -1, +2, -2 are tried in that order and the first one with a valid assignment is kept; nitro
   groups are set to [N+](=O)[O-] beforehand (:mod:`symdiff.eval.bonds3d`). A molecule whose bond orders cannot be
   assigned counts as unstable and invalid (reported).
2. **Stability.** Every atom's bonding pattern ``(n_aromatic, valence)`` must be one seen for its
   (element, formal charge) in the reference data (:mod:`symdiff.eval.valency`).
3. **Validity.** RDKit sanitisation succeeds *and* the molecule is one connected fragment. Sanitisable and
   connected fractions are reported separately as well.
4. **Uniqueness / novelty** use RDKit canonical SMILES without hydrogens and without stereo, of valid molecules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from symdiff.eval.bonds3d import assign_bonds_3d, mol_from_atoms
from symdiff.eval.valency import ValencyTable, atom_patterns


@dataclass
class RevisedResult:
    atom_stable: np.ndarray  # bool per atom (flat)
    mol_stable: np.ndarray
    sanitizable: np.ndarray
    connected: np.ndarray
    valid: np.ndarray  # sanitizable & connected
    smiles: list[Optional[str]]  # canonical, no H, no stereo; None unless valid
    bond_source: list[Optional[str]]  # "file", "3d" or None (could not assign)
    assigned_charge: list[Optional[int]]  # total charge used by the 3D assignment
    n_aromatic_bonds: int
    bond_lengths: list[tuple[int, float]]  # (order code 1/2/3/4, length in Angstrom), for reports


def _add_file_bonds(mol, bonds: np.ndarray) -> None:
    from rdkit import Chem

    types = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE, 4: Chem.BondType.AROMATIC}
    for a, b, o in bonds:
        o = int(o)
        if o not in types:
            raise ValueError(f"bond type {o} between atoms {a + 1} and {b + 1} is not single/double/triple/aromatic")
        mol.AddBond(int(a), int(b), types[o])
        if o == 4:
            bd = mol.GetBondBetweenAtoms(int(a), int(b))
            bd.SetIsAromatic(True)
            mol.GetAtomWithIdx(int(a)).SetIsAromatic(True)
            mol.GetAtomWithIdx(int(b)).SetIsAromatic(True)


def evaluate_revised(atomic_numbers: np.ndarray, positions: np.ndarray, offsets: np.ndarray,
                     formal_charges: Optional[np.ndarray], file_bonds: Optional[list[np.ndarray]],
                     include: np.ndarray, table: ValencyTable) -> RevisedResult:
    from rdkit import Chem, RDLogger

    n_mols = len(offsets) - 1
    atom_stable = np.zeros(len(atomic_numbers), dtype=bool)
    mol_stable = np.zeros(n_mols, dtype=bool)
    sanitizable = np.zeros(n_mols, dtype=bool)
    connected = np.zeros(n_mols, dtype=bool)
    smiles: list[Optional[str]] = [None] * n_mols
    source: list[Optional[str]] = [None] * n_mols
    charges_used: list[Optional[int]] = [None] * n_mols
    lengths: list[tuple[int, float]] = []
    n_arom = 0
    RDLogger.DisableLog("rdApp.*")
    try:
        for m in np.flatnonzero(include):
            lo, hi = int(offsets[m]), int(offsets[m + 1])
            z, x = atomic_numbers[lo:hi], positions[lo:hi].astype(np.float64)
            if file_bonds is not None and file_bonds[m] is not None:
                q = formal_charges[lo:hi] if formal_charges is not None else None
                mol = mol_from_atoms(z, x, q)
                try:
                    _add_file_bonds(mol, file_bonds[m])
                except (ValueError, RuntimeError):
                    continue  # a malformed bond (duplicate, unknown type) leaves the molecule unstable/invalid
                source[m] = "file"
            else:
                mol, total = assign_bonds_3d(z, x)
                if mol is None:
                    continue
                source[m], charges_used[m] = "3d", total
            # patterns are read before sanitisation, which could re-perceive aromaticity
            pats = atom_patterns(mol)
            ok = np.array([table.is_allowed(*p) for p in pats], dtype=bool)
            atom_stable[lo:hi] = ok
            mol_stable[m] = bool(ok.all())
            for bd in mol.GetBonds():
                code = 4 if bd.GetIsAromatic() else int(round(bd.GetBondTypeAsDouble()))
                n_arom += code == 4
                i, j = bd.GetBeginAtomIdx(), bd.GetEndAtomIdx()
                lengths.append((code, float(np.linalg.norm(x[i] - x[j]))))
            connected[m] = len(Chem.GetMolFrags(mol)) == 1
            try:
                Chem.SanitizeMol(mol)
            except ValueError:
                continue
            sanitizable[m] = True
            if connected[m]:
                smiles[m] = canonical_smiles(mol)
    finally:
        RDLogger.EnableLog("rdApp.*")
    return RevisedResult(atom_stable=atom_stable, mol_stable=mol_stable, sanitizable=sanitizable,
                         connected=connected, valid=sanitizable & connected, smiles=smiles, bond_source=source,
                         assigned_charge=charges_used, n_aromatic_bonds=n_arom, bond_lengths=lengths)


def canonical_smiles(mol) -> Optional[str]:
    """Canonical SMILES without hydrogens and stereo: the form compared for uniqueness and novelty."""
    from rdkit import Chem

    # stereo goes first: a double bond's stereo (set from 3D by rdDetermineBonds) makes RemoveHs keep the H that
    # defines it, so an imine would be written [H]N=C and never match the reference's N=C
    m = Chem.Mol(mol)
    Chem.RemoveStereochemistry(m)
    try:
        m = Chem.RemoveHs(m, sanitize=True)
    except ValueError:
        return None
    return Chem.MolToSmiles(m, isomericSmiles=False)


def canonicalize_smiles_list(smiles: list[str]) -> set[str]:
    """The novelty reference: canonical SMILES (no stereo) of reference SMILES that parse."""
    from rdkit import Chem, RDLogger

    out = set()
    RDLogger.DisableLog("rdApp.*")
    try:
        for s in smiles:
            m = Chem.MolFromSmiles(s)
            if m is not None:
                out.add(Chem.MolToSmiles(m, isomericSmiles=False))
    finally:
        RDLogger.EnableLog("rdApp.*")
    return out

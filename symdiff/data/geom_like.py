"""A GEOM-Drugs-LIKE set: real GEOM-Drugs SMILES (the MiDi split lists), 3D conformers made here by RDKit
ETKDG embedding, ranked by an MMFF94 single-point energy.

These are NOT GEOM-Drugs conformers (no CREST/GFN2-xTB): the output is flagged ``synthetic`` and every manifest built
from it says so. It exists for pipeline and scaling tests at GEOM sizes (3..181 atoms), never for reported results.
"""
from __future__ import annotations

import gzip
import logging
import multiprocessing as mp
from pathlib import Path
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)


def _embed(args: tuple[int, str, int, int]) -> Optional[tuple[str, list, list, list, list]]:
    i, smiles, n_conf, seed = args
    from rdkit import Chem, RDLogger
    from rdkit.Chem import AllChem
    RDLogger.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return None
    mol = Chem.AddHs(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = seed + i
    cids = list(AllChem.EmbedMultipleConfs(mol, numConfs=n_conf, params=params))
    if not cids:
        return None
    energies = []
    props = AllChem.MMFFGetMoleculeProperties(mol)
    for cid in cids:
        e = np.nan
        if props is not None:
            ff = AllChem.MMFFGetMoleculeForceField(mol, props, confId=cid)
            if ff is not None:
                e = ff.CalcEnergy()
        energies.append(float(e))
    z = [a.GetAtomicNum() for a in mol.GetAtoms()]
    q = [a.GetFormalCharge() for a in mol.GetAtoms()]
    xs = [mol.GetConformer(c).GetPositions().astype(np.float32) for c in cids]
    return smiles, z, q, xs, energies


def make_geom_like(smiles_files: list[Path], out: Path, *, n_molecules: int, conformers: int = 5, seed: int = 0,
                   workers: int = 1) -> dict:
    """Write ``out`` (.npz in the GEOM-sample layout plus ``conf_energy`` and ``synthetic=True``).

    Molecules are drawn at random (seeded) from the union of ``smiles_files``; SMILES that RDKit cannot embed are
    counted and replaced by the next ones.
    """
    pool_smiles = []
    for smiles_file in smiles_files:
        with gzip.open(smiles_file, "rt") if str(smiles_file).endswith(".gz") else open(smiles_file) as f:
            pool_smiles += [s.strip() for s in f if s.strip()]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pool_smiles))
    jobs = ((k, pool_smiles[j], conformers, seed) for k, j in enumerate(order))
    mols, failed = [], 0
    ctx = mp.get_context("fork")
    with ctx.Pool(workers) if workers > 1 else _Serial() as pool:
        for res in pool.imap(_embed, jobs, chunksize=4):
            if res is None:
                failed += 1
            else:
                mols.append(res)
            if len(mols) >= n_molecules:
                break
        if workers > 1:
            pool.terminate()
    zs, xs, qs, mol_of, energy = [], [], [], [], []
    for m, (_, z, q, confs, es) in enumerate(mols):
        for x, e in zip(confs, es):
            zs.append(np.asarray(z, np.int8))
            qs.append(np.asarray(q, np.int8))
            xs.append(x)
            mol_of.append(m)
            energy.append(e)
    counts = np.array([len(z) for z in zs], dtype=np.int64)
    offsets = np.zeros(len(zs) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, synthetic=np.array(True), description=np.array(
                 "GEOM-Drugs-LIKE (synthetic): real GEOM SMILES, RDKit ETKDGv3 conformers, MMFF94 energies"),
             mol_smiles=np.array([m[0] for m in mols]), mol_key=np.array([m[0] for m in mols]),
             mol_n_conformers=np.array([len(m[3]) for m in mols], np.int32),
             conf_mol_index=np.asarray(mol_of, np.int32), conf_n_atoms=counts.astype(np.int16),
             conf_offsets=offsets, conf_energy=np.asarray(energy, np.float64),
             atomic_numbers=np.concatenate(zs), positions=np.concatenate(xs), formal_charges=np.concatenate(qs))
    tmp.replace(out)
    return {"molecules": len(mols), "conformers": len(zs), "failed_embeddings": failed,
            "atoms_min": int(counts.min()) if len(counts) else 0, "atoms_max": int(counts.max()) if len(counts) else 0,
            "atoms_mean": float(counts.mean()) if len(counts) else 0.0}


class _Serial:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap(fn, it, chunksize=1):
        return map(fn, it)

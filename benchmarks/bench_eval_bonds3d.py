#!/usr/bin/env python
"""How often 3D bond assignment gives back the true molecule: plain xyz2mol vs the nitro-aware version.

    .venv/bin/python benchmarks/bench_eval_bonds3d.py [--n 300] [--seed 0]

Draws --n random GEOM-Drugs train SMILES (MiDi split) that contain a nitro group and --n that contain no charged
atom, embeds one ETKDG conformer of each (hydrogens explicit), assigns bonds from the coordinates alone with
(a) plain ``rdDetermineBonds`` over the total charges 0, +1, -1, +2, -2 and (b) ``symdiff.eval.bonds3d``, and
counts the molecules whose canonical SMILES (no H, no stereo) equals the input's. Misses of (b) are grouped by a
rough cause. Writes benchmarks/results/eval_bonds3d.json.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMILES = ROOT.parent / "shared" / "data" / "geom_drugs" / "midi_split_smiles_train.txt.gz"


def miss_cause(smiles: str | None) -> str:
    if smiles is None:
        return "no assignment"
    if "[S+]" in smiles or "[s+]" in smiles:
        return "sulfur written as S+ (ylide / sulfoxide form)"
    if "N([O-])[O-]" in smiles:
        return "over-reduced nitro N([O-])[O-]"
    return "other"


def run_set(smiles: list[str]) -> dict:
    from rdkit import Chem
    from rdkit.Chem import AllChem

    from symdiff.eval.bonds3d import assign_bonds_3d
    from symdiff.eval.revised import canonical_smiles

    def plain(z: np.ndarray, x: np.ndarray):  # the assignment before the nitro fix
        return assign_bonds_3d(z, x, fix_nitro=False)

    out = {"n": 0, "plain_correct": 0, "fixed_correct": 0, "plain_charges": Counter(), "fixed_charges": Counter(),
           "fixed_miss_causes": Counter(), "plain_miss_causes": Counter(), "plain_s": 0.0, "fixed_s": 0.0}
    for s in smiles:
        ref = Chem.MolFromSmiles(s)
        if ref is None:
            continue
        truth = Chem.MolToSmiles(ref, isomericSmiles=False)
        mh = Chem.AddHs(ref)
        if AllChem.EmbedMolecule(mh, randomSeed=1) != 0:
            continue
        z = np.array([a.GetAtomicNum() for a in mh.GetAtoms()])
        x = mh.GetConformer().GetPositions()
        out["n"] += 1
        for name, fn in (("plain", plain), ("fixed", assign_bonds_3d)):
            t0 = time.perf_counter()
            mol, q = fn(z, x)
            out[f"{name}_s"] += time.perf_counter() - t0
            got = canonical_smiles(Chem.Mol(mol)) if mol is not None else None
            out[f"{name}_charges"][str(q)] += 1
            if got == truth:
                out[f"{name}_correct"] += 1
            else:
                out[f"{name}_miss_causes"][miss_cause(got)] += 1
    return {k: (dict(v) if isinstance(v, Counter) else round(v, 3) if isinstance(v, float) else v)
            for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_bonds3d.json"))
    args = ap.parse_args()
    from rdkit import RDLogger, rdBase

    RDLogger.DisableLog("rdApp.*")
    with gzip.open(SMILES, "rt") as f:
        train = [line.strip() for line in f if line.strip()]
    nitro = [s for s in train if "[N+](=O)[O-]" in s or "O=[N+]([O-])" in s]
    neutral = [s for s in train if "+" not in s and "-]" not in s]
    # one generator per set, so each set is the same whatever the size of the other
    sets = {"nitro": random.Random(args.seed).sample(nitro, args.n),
            "no_charged_atoms": random.Random(args.seed + 1).sample(neutral, args.n)}
    res = {"machine": machine(), "rdkit": rdBase.rdkitVersion, "source": str(SMILES), "n_train": len(train),
           "n_train_nitro": len(nitro), "seed": args.seed, "sets": {k: run_set(v) for k, v in sets.items()}}
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    for k, v in res["sets"].items():
        print(f"{k}: {v['n']} molecules, correct plain {v['plain_correct']} / fixed {v['fixed_correct']}; "
              f"fixed misses {v['fixed_miss_causes']}; plain charges {v['plain_charges']}")


if __name__ == "__main__":
    main()

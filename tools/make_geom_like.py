#!/usr/bin/env python
"""Make a GEOM-Drugs-LIKE (synthetic) set: real GEOM SMILES + RDKit conformers. Never report it as GEOM-Drugs.

    .venv/bin/python tools/make_geom_like.py --n-molecules 2000 --conformers 5 --out data/geom_like.npz
    .venv/bin/symdiff data build --dataset geom --source data/geom_like.npz --out data/geom_like
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from symdiff.data.geom import smiles_files
from symdiff.errors import UserError
from symdiff.data.geom_like import make_geom_like


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smiles", type=Path, nargs="+", default=None,
                   help="SMILES lists (.txt or .txt.gz); default: the three MiDi GEOM-Drugs split lists in "
                        "../shared/data/geom_drugs (so the leak-free split puts molecules in all splits)")
    p.add_argument("--n-molecules", type=int, required=True)
    p.add_argument("--conformers", type=int, default=5, help="RDKit conformers per molecule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    try:
        smiles = smiles_files(a.smiles)
    except UserError as exc:
        print(f"make_geom_like: error: {exc}", file=sys.stderr)
        return 1
    stats = make_geom_like(smiles, a.out, n_molecules=a.n_molecules, conformers=a.conformers, seed=a.seed,
                           workers=a.workers)
    print(json.dumps({"out": str(a.out), "synthetic": True, **stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

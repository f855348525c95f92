#!/usr/bin/env python
"""Write a GEOM-scale SYNTHETIC drugs_crude.msgpack (real GEOM SMILES, cheap jittered 3D copies; never GEOM-Drugs).

    .venv/bin/python tools/make_geom_scale.py --workers 2 --out /work/scale/geom_7m/drugs_crude.msgpack
    .venv/bin/python tools/make_geom_scale.py --workers 2 --max-bytes 1e9 --out /work/scale/geom_1gb/drugs_crude.msgpack
    .venv/bin/symdiff data build --dataset geom --source /work/scale/geom_7m/drugs_crude.msgpack --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from symdiff.data.geom import smiles_files
from symdiff.errors import UserError
from symdiff.data.geom_scale import make_geom_scale, read_smiles


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smiles", type=Path, nargs="+", default=None,
                   help="SMILES lists (.txt or .txt.gz); default: the three MiDi split lists in "
                        "../shared/data/geom_drugs")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-molecules", type=int, default=None, help="only the first N SMILES (of the seeded order)")
    p.add_argument("--max-bytes", type=float, default=None, help="stop after the object that reaches this size")
    p.add_argument("--molecules-per-object", type=int, default=1000)
    p.add_argument("--min-conformers", type=int, default=10)
    p.add_argument("--max-conformers", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args()
    try:
        files = smiles_files(a.smiles)
    except UserError as exc:
        print(f"make_geom_scale: error: {exc}", file=sys.stderr)
        return 1
    smiles = read_smiles(files, seed=a.seed)[:a.n_molecules]
    stats = make_geom_scale(smiles, a.out, molecules_per_object=a.molecules_per_object,
                            min_conformers=a.min_conformers, max_conformers=a.max_conformers, seed=a.seed,
                            workers=a.workers, max_bytes=None if a.max_bytes is None else int(a.max_bytes))
    print(json.dumps({"out": str(a.out), "smiles_listed": len(smiles), **stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

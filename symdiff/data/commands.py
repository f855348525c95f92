"""`symdiff data build | verify | info`."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from symdiff.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="raw QM9 / GEOM-Drugs (or our .npz) -> HDF5 shards + manifest.json")
    b.add_argument("--dataset", required=True, choices=["qm9", "geom"])
    b.add_argument("--source", required=True, type=Path,
                   help="qm9: qm9.npz, a directory of dsgdb9nsd_*.xyz, or dsgdb9nsd.xyz.tar.bz2; "
                        "geom: drugs_crude.msgpack, an rdkit_folder (needs --trust-pickle), or a GEOM .npz")
    b.add_argument("--out", required=True, type=Path)
    b.add_argument("--shard-size", type=int, default=10_000, help="molecules per shard (default 10000)")
    b.add_argument("--mpi", action="store_true", help="run under mpirun: ranks build disjoint shards")
    b.add_argument("--skip-invalid", action="store_true",
                   help="count and skip invalid molecules (reported in the manifest) instead of failing")
    b.add_argument("--overwrite", action="store_true", help="replace an existing OUT (atomically)")
    b.add_argument("--trust-pickle", action="store_true",
                   help="allow reading GEOM rdkit_folder pickles (unpickling runs code: only for files you trust)")
    b.add_argument("--conformers", type=int, default=30, help="GEOM: lowest-energy conformers kept per molecule")
    b.add_argument("--split-smiles", default=None,
                   help="GEOM: directory with midi_split_smiles_{train,val,test}.txt.gz for the leak-free split "
                        "(default: ../shared/data/geom_drugs if present); 'none' = seeded SMILES hash only")
    b.add_argument("--split-seed", type=int, default=0, help="GEOM: seed of the SMILES-hash split")
    b.add_argument("--geom-permutation", type=Path, default=None,
                   help="GEOM: EDM's geom_permutation.npy for EDM's per-conformer split (serial builds only)")
    b.add_argument("-v", "--verbose", action="store_true")
    v = sub.add_parser("verify", help="check checksums and invariants of a built dataset")
    v.add_argument("root", type=Path)
    i = sub.add_parser("info", help="print a dataset's manifest summary")
    i.add_argument("root", type=Path)
    i.add_argument("--json", action="store_true", help="print the whole manifest")


def run(args: argparse.Namespace) -> int:
    if args.data_command == "build":
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(asctime)s %(name)s: %(message)s")
        from symdiff.data.build import build
        man = build(args.dataset, args.source, args.out, shard_size=args.shard_size, mpi=args.mpi,
                    skip_invalid=args.skip_invalid, overwrite=args.overwrite, trust_pickle=args.trust_pickle,
                    split_smiles=args.split_smiles, split_seed=args.split_seed,
                    geom_permutation=args.geom_permutation, conformers=args.conformers)
        rank = 0
        if args.mpi:
            from mpi4py import MPI
            rank = MPI.COMM_WORLD.Get_rank()
        if rank == 0:
            print(_summary(args.out, man))
        return 0
    if args.data_command == "verify":
        from symdiff.data.shards import verify
        s = verify(args.root)
        parts = ", ".join(f"{k} {v['n_molecules']} molecules in {v['n_shards']} shards" for k, v in s["splits"].items())
        print(f"{args.root}: OK ({s['dataset']}: {parts}; max_atoms {s['max_atoms']})")
        return 0
    if args.data_command == "info":
        from symdiff.data.shards import read_manifest
        man = read_manifest(args.root)
        print(json.dumps(man, indent=1) if args.json else _summary(args.root, man))
        return 0
    raise UserError(f"unknown data action {args.data_command}")


def _summary(root: Path, man: dict) -> str:
    lines = [f"{root}: dataset {man['dataset']}, max_atoms {man['max_atoms']}, "
             f"formal charges {'yes' if man.get('has_formal_charges') else 'no'}"]
    if man.get("synthetic"):
        lines.append("  SYNTHETIC: a GEOM-Drugs-LIKE set (RDKit conformers), not GEOM-Drugs")
    for name, s in man["splits"].items():
        lines.append(f"  {name:6s} {s['n_molecules']:>9,d} molecules {s.get('n_atoms', 0):>11,d} atoms "
                     f"{len(s['shards']):>5d} shards")
    sk = man.get("skipped") or {}
    if sk.get("total"):
        lines.append(f"  skipped {sk['total']} invalid molecules: {sk['counts']}")
    return "\n".join(lines)

#!/usr/bin/env python
"""Thin wrapper of `symdiff data build` for job scripts that call a file rather than the console script:

    mpirun -n 4 python tools/build_shards.py --dataset qm9 --source qm9.npz --out data/qm9 --mpi
"""
import sys

from symdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "build", *sys.argv[1:]]))

#!/usr/bin/env python
"""Thin wrapper of `symdiff profile` for job scripts that call a file rather than the console script:

    python tools/profile_kernels.py --json benchmarks/results/kernels_h100.json
"""
import sys

from symdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["profile", *sys.argv[1:]]))

"""Test-side fault injection for `symdiff train` subprocesses (and the ranks they spawn): NaNs, sleeps, failed writes.

Tests put this directory on PYTHONPATH and describe the faults in JSON in SYMDIFF_TRAIN_TEST_HOOKS (see
symdiff_train_hooks.py beside this file). Python imports this file at start-up in every process of the run, the
`--nproc` ranks included, and the hooks patch symdiff's functions before the CLI runs. Production code reads
neither.
"""
import os

if os.environ.get("SYMDIFF_TRAIN_TEST_HOOKS"):
    import symdiff_train_hooks

    symdiff_train_hooks.install_from_env()

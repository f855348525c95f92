"""`symdiff train --config C --run-dir DIR [--nproc N] [--resume auto|never|PATH] [key=value ...]`."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from symdiff.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    p.add_argument("--run-dir", required=True, help="run directory: config, logs, checkpoints")
    p.add_argument("--nproc", type=int, default=0,
                   help="start N local processes (CPU: gloo). Leave out under srun/mpirun/torchrun")
    p.add_argument("--resume", default="auto",
                   help="auto (newest complete checkpoint in the run dir, if any) | never | PATH to a checkpoint")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.max_steps=1000 train.zero_stage=2")


def check_run_dir(run_dir: Path) -> None:
    """A run directory is a directory, or a path where one can be made: say which in one line, before any work."""
    for p in (run_dir, *run_dir.parents):  # the nearest part of the path that exists decides
        if not p.exists():
            continue
        if not p.is_dir():
            raise UserError(f"--run-dir {run_dir}: {p} is a file, not a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise UserError(f"--run-dir {run_dir}: {p} is not writable")
        return


def run(args: argparse.Namespace) -> int:
    from symdiff.config import load_config
    from symdiff.train import launch

    if launch.is_launch_child():
        launch.die_with_parent()  # first: a rank must not outlive its launcher even while it imports torch
    cfg = load_config(args.config, args.overrides)  # validate before spawning anything
    check_run_dir(Path(args.run_dir))
    if args.resume not in ("auto", "never") and not Path(args.resume).exists():
        raise UserError(f"--resume {args.resume}: no such checkpoint or run directory")
    if args.nproc and not launch.is_launch_child():
        argv = ["train", "--config", args.config, "--run-dir", args.run_dir, "--resume", args.resume,
                *args.overrides]
        return launch.spawn_local(args.nproc, argv)
    from symdiff.train.trainer import train

    return train(cfg, Path(args.run_dir), args.resume)

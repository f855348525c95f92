"""The `symdiff` command line. It only parses and dispatches; each subcommand lives with its package.

Every subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``. A subcommand whose module
does not exist yet answers "not yet available" with exit code 2 rather than pretending to work.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "data": ("symdiff.data.commands", "build, verify and inspect sharded HDF5 molecule datasets"),
    "train": ("symdiff.train.commands", "train a model (DeepSpeed; single or multi-process)"),
    "sample": ("symdiff.sampling.commands", "sample molecules from a trained run or checkpoint"),
    "eval": ("symdiff.eval.commands", "evaluate molecules: stability, validity, uniqueness, novelty"),
    "info": ("symdiff.models.commands", "print parameter counts of a config's model"),
    "profile": ("symdiff.kernels.profile", "profile the fused kernels against their references"),
    "submit": ("symdiff.cluster.commands", "render and submit SLURM jobs"),
    "demo": ("symdiff.demo", "the embedded end-to-end default: data -> train -> sample -> eval -> report"),
}


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        # Only "the subcommand module itself is missing" means not available; other import errors are bugs.
        if exc.name and module.startswith(exc.name):
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="symdiff", description="SymDiff-HPC command line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    requested = argv[0] if argv else None
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Import only what is asked for: importing torch/deepspeed for `symdiff data` would cost seconds.
        if name == requested:
            mod = _load(module)
            modules[name] = mod
            if mod is not None:
                mod.add_arguments(p)
            else:
                p.add_argument("rest", nargs=argparse.REMAINDER)
    if not argv:
        parser.print_help()
        return 2
    args = parser.parse_args(argv)
    mod = modules.get(args.command)
    if mod is None:
        print(f"symdiff {args.command}: not yet available in this version", file=sys.stderr)
        return 2
    from symdiff.errors import UserError

    try:
        return int(mod.run(args) or 0)
    except UserError as exc:
        print(f"symdiff {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

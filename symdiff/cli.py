"""The `symdiff` command line. It only parses and dispatches; each subcommand lives with its package.

Every subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``. A subcommand whose module
does not exist yet answers "not yet available" with exit code 2 rather than pretending to work.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from symdiff.errors import UserError

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
    # Ctrl-C while torch is still importing is as much the user's as one during the work.
    return run_guarded(argv[0] if argv else "", lambda: _dispatch(argv))


def _dispatch(argv: list[str]) -> int:
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
    return int(mod.run(args) or 0)


# Errors of the machine or of a path the user gave, not of our code: a full disk, a read-only or missing folder.
USER_OS_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR,
                            errno.ENOTDIR, errno.ENOENT, errno.EEXIST, errno.ENAMETOOLONG, errno.EFBIG,
                            errno.ELOOP})


# Files of the installed package itself: one of them missing or unreadable is our bug, not the user's path.
PACKAGE_DIRS = tuple(Path(__file__).resolve().parent.parent / d for d in ("symdiff", "kernels"))


def _inside_package(filename: object) -> bool:
    if not isinstance(filename, (str, os.PathLike)):
        return False
    path = Path(os.path.abspath(filename))
    return any(path.is_relative_to(d) for d in PACKAGE_DIRS)


def _os_error_line(exc: OSError) -> str:
    names = [str(f) for f in (exc.filename, exc.filename2) if f is not None]
    what = exc.strerror or str(exc)
    return f"{' -> '.join(names)}: {what}" if names else what


def _say_error(line: str, folder: Optional[str]) -> None:
    """Print the one-line error, or, in a rank of `--nproc` (``folder`` set), hand it to the launcher (which prints
    each distinct line once instead of once per rank)."""
    if folder and os.path.isdir(folder):
        from symdiff.io.atomic import atomic_write_text

        try:
            atomic_write_text(Path(folder) / f"rank{os.environ.get('RANK', '0')}.txt", line + "\n")
            return
        except OSError:
            pass  # the launcher's folder went away: say it here
    print(line, file=sys.stderr)


def run_guarded(command: str, work: Callable[[], Optional[int]]) -> int:
    """The CLI's error boundary: run one subcommand and turn what is the user's doing into one line and an exit
    code. UserError (bad input, named by the code that found it) -> 1; Ctrl-C -> 130; an OSError of the kinds in
    USER_OS_ERRNOS (full disk, permissions, missing or wrong-kind paths) -> 1, naming the file; out of memory -> 1.
    Anything else is a bug of ours and keeps its traceback."""
    prefix = f"symdiff {command}" if command in SUBCOMMANDS else "symdiff"
    # symdiff.train.launch.ERRORS_DIR, read without importing it; taken out of the environment so that a command
    # this one starts prints its own errors instead of writing them to this rank's file
    folder = os.environ.pop("SYMDIFF_LAUNCH_ERRORS", None)
    try:
        return int(work() or 0)
    except UserError as exc:
        _say_error(f"{prefix}: error: {exc}", folder)
        return 1
    except KeyboardInterrupt:
        print(f"\n{prefix}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `symdiff eval ... | head`: the reader left. Point stdout at /dev/null so the exit flush cannot fail again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout without a file descriptor (captured): nothing left to flush
            pass
        return 141
    except OSError as exc:
        if exc.errno not in USER_OS_ERRNOS or _inside_package(exc.filename):
            raise
        _say_error(f"{prefix}: error: {_os_error_line(exc)}", folder)
        return 1
    except MemoryError:
        _say_error(f"{prefix}: error: out of memory (try a smaller --batch-size or --n)", folder)
        return 1
    except RuntimeError as exc:
        # torch.cuda.OutOfMemoryError, matched by name so the CLI does not import torch for every command
        if type(exc).__name__ != "OutOfMemoryError":
            raise
        _say_error(f"{prefix}: error: {str(exc).splitlines()[0]} (try a smaller --batch-size)", folder)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""What every command does with the files it writes: check the path before the work, never replace an existing
output unless ``--overwrite`` is given, and write through a temporary name so a failure leaves the old file.

One policy for all of them (``data build --out``, ``sample --out``, ``eval --json/--report``, ``info --json``,
``profile --json``): a command that would lose a user's earlier result refuses, as ``data build`` always has.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Sequence

from symdiff.errors import UserError

OVERWRITE_HELP = "replace existing output files (without it, an existing output is an error)"


def add_overwrite_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def _check_parent(path: Path, flag: str) -> None:
    parent = path.parent
    if not parent.exists():
        raise UserError(f"{flag} {path}: folder {parent} does not exist")
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is not a folder")
    _probe_writable(parent, f"{flag} {path}")


def _probe_writable(folder: Path, what: str) -> None:
    """Create and remove a file in ``folder``: permission bits alone miss read-only mounts, /proc and the like."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".symdiff-write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{what}: cannot create files in {folder}: {exc.strerror or exc}") from None


def check_output_file(path: str | Path, flag: str, overwrite: bool,
                      suffixes: Optional[Sequence[str]] = None) -> Path:
    """``path`` as a Path once it is known to be writable, before any work is done for it.

    Refuses: an unknown suffix (where ``suffixes`` is given), a directory, a missing or read-only parent folder,
    and an existing file unless ``overwrite``.
    """
    out = Path(path)
    if suffixes is not None and out.suffix.lower() not in suffixes:
        raise UserError(f"{flag} {out}: unknown extension '{out.suffix}' (use {', '.join(suffixes)})")
    if out.is_dir():
        raise UserError(f"{flag} {out}: is a directory, expected a file name")
    _check_parent(out, flag)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise UserError(f"{flag} {out}: already exists; pass --overwrite to replace it")
    return out


def check_output_dir(path: str | Path, flag: str, overwrite: bool) -> Path:
    """A directory a command fills with several files: it may be new or empty; a non-empty one needs
    ``overwrite`` (its files of the same names are then replaced, others are left alone)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out}: exists and is not a directory")
    if out.is_dir():
        if any(out.iterdir()) and not overwrite:
            raise UserError(f"{flag} {out}: directory is not empty; pass --overwrite to replace its files")
        _probe_writable(out, f"{flag} {out}")
    else:
        _check_parent(out, flag)
    return out


@contextmanager
def writing(path: str | Path, flag: str = "") -> Iterator[None]:
    """Turn an OSError while writing ``path`` (a full disk, a folder that vanished) into one line naming it."""
    try:
        yield
    except OSError as exc:
        raise UserError(f"{flag + ' ' if flag else ''}{path}: cannot write: {exc.strerror or exc}") from None


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None], flag: str = "") -> None:
    """``write(fileobj)`` into a temporary file beside ``path``, then rename it over ``path``: whatever was at
    ``path`` before stays as it was if anything fails."""
    from symdiff.io.atomic import atomic_write_bytes

    with writing(path, flag):
        atomic_write_bytes(path, write)


def write_text_atomic(path: str | Path, text: str, flag: str = "") -> None:
    write_atomic(path, lambda fh: fh.write(text.encode("utf-8")), flag)


__all__ = ["add_overwrite_flag", "check_output_file", "check_output_dir", "writing", "write_atomic", "write_text_atomic"]

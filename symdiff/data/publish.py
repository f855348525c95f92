"""Publishing a finished build: the temporary directory beside ``out`` becomes ``out`` by rename.

How atomic a directory replacement can be on POSIX: ``rename(2)`` replaces only an *empty* directory, so a
populated dataset cannot be swapped out in one portable call. On Linux (3.15+, glibc 2.28+, and a filesystem that
supports it: ext4, xfs, btrfs, tmpfs, ...) ``renameat2(RENAME_EXCHANGE)`` swaps two paths atomically, so ``out``
names the old dataset until the instant it names the new one; the old one is then deleted from the temporary name.
Elsewhere (or where the filesystem answers EINVAL) we fall back to two renames: the old dataset is moved aside,
the new one moved in, and only then is the old one deleted; if the second rename fails the old one is moved back.
That leaves a window of one rename where ``out`` does not exist, but never one where no complete dataset exists.
A first publication uses ``RENAME_NOREPLACE`` where available, so two builds racing for the same ``out`` cannot
both win.

Only a dataset is ever replaced: ``out`` must be a directory whose manifest this project wrote and can read. A plain
file, a symbolic link or any other directory is refused, so ``--overwrite`` can never delete what it did not make.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Optional

from symdiff.data.manifest import is_dataset
from symdiff.errors import DataError

_AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def temp_dir_for(out: Path) -> Path:
    """A sibling of ``out`` (same filesystem, so the final rename is atomic)."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.building-{uuid.uuid4().hex[:12]}"


def check_replaceable(out: Path, *, overwrite: bool) -> None:
    """Raise unless ``out`` is free, or is a dataset and ``overwrite`` is set."""
    out = Path(out)
    if not (out.exists() or out.is_symlink()):
        return
    ok, why = is_dataset(out)
    if not ok:
        raise DataError(f"{out}: exists and is not a symdiff dataset ({why}); --overwrite replaces only a dataset, "
                        "so choose another --out or remove it yourself")
    if not overwrite:
        raise DataError(f"{out}: already exists; pass --overwrite to replace it")


def publish(tmp: Path, out: Path, *, overwrite: bool) -> None:
    """Move the finished build ``tmp`` to ``out``; an existing ``out`` is replaced only if asked and a dataset."""
    out = Path(out)
    check_replaceable(out, overwrite=overwrite)
    if not (out.exists() or out.is_symlink()):
        try:
            if not renameat2(tmp, out, RENAME_NOREPLACE):
                os.rename(tmp, out)
        except (FileExistsError, IsADirectoryError, NotADirectoryError) as exc:
            raise DataError(f"{out}: appeared while building (another build finished first?): "
                            f"{exc.strerror}") from None
        return
    if renameat2(tmp, out, RENAME_EXCHANGE):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old dataset
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


_renameat2_fn: Optional[object] = None


def renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2``: True when done, False where the call or the flag is unsupported; OSError otherwise."""
    global _renameat2_fn
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2_fn is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):  # musl / old glibc without the wrapper
            _renameat2_fn = False
            return False
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        _renameat2_fn = fn
    if _renameat2_fn is False:
        return False
    rc = _renameat2_fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags)  # type: ignore[operator]
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(dst))

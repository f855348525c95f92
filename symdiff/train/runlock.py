"""One training per run directory: an exclusive lock on ``RUN_DIR/train.lock``, held for the life of the process.

Two trainings in one run directory interleave ``metrics.jsonl``, prune each other's checkpoints and leave
``latest`` naming a removed one. The lock is ``flock(2)`` on an open file: the kernel drops it when the holder dies
in any way (SIGKILL, OOM, node reboot of a local disk), so a lock left by a dead run is never stale. The file keeps
the holder's host, pid and start time for the message a second run prints. Only rank 0 takes it, which covers
every rank of the run (they share the directory); over NFS, flock is mapped to NFS byte-range locks.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

from symdiff.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = "train.lock"


class RunDirLock:
    """``with RunDirLock(run_dir):`` or ``acquire()``/``release()``. Raises UserError naming the holder."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"{self.path}: cannot open the run directory's lock file ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _describe(_read(fd))
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"{self.path.parent}: another training is running in this run directory "
                                f"({holder}); wait for it to end or use another --run-dir") from None
            # A file system without flock support (some Lustre/NFS mounts): train, but say what is not guarded.
            log.warning("%s: cannot lock (%s): a second training into this run directory would not be detected",
                        self.path, exc.strerror)
            return
        previous = _read(fd)
        if previous:
            log.info("%s: taking over the lock of a run that is gone (%s)", self.path, _describe(previous))
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "RunDirLock":
        self.acquire()
        return self

    def __exit__(self, *_exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {holder.get('started', '?')}")

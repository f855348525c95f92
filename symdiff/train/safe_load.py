"""Reading .pt files without running code from them.

torch's full unpickler (``torch.load`` with weights-only off) builds arbitrary objects, so a crafted file runs its
payload the moment it is opened, whatever checksums sit beside it. Every checkpoint file symdiff reads goes through :func:`load`:
torch's weights-only unpickler (tensors, containers, numbers, strings) plus an allow-list of the exact extra
classes that kind of file holds. A file that needs anything else is refused with one line before any object in it
is built. ``trust_pickle=True`` (the CLI's ``--trust-pickle``) is the explicit way out for a file whose source the
user trusts.
"""
from __future__ import annotations

import logging
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from symdiff.errors import CheckpointError

log = logging.getLogger(__name__)

_np_core = getattr(np, "_core", None) or np.core
# numpy's MT19937 state (a uint32 key array) in rank files written before RNG states were stored as tensors.
NUMPY_ARRAY: tuple = (_np_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)))

TRUST_HINT = "symdiff sample and eval take --trust-pickle for a file you trust"


def deepspeed_classes() -> tuple:
    """The non-tensor classes DeepSpeed 0.19's own checkpoint files hold, listed (get_unsafe_globals_in_checkpoint)
    from files that real runs wrote: model and ZeRO 1/2/3 optimizer states in fp32 and bf16, 1 and 2 ranks, and
    their universal conversions. (fp16, which symdiff never enables, would add DynamicLossScaler.)"""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (fragment_address, ZeroStageEnum, LossScaler)


def _refusal(exc: BaseException) -> str | None:
    """Why the weights-only unpickler refused the file, or None where the file is simply not a torch file."""
    text = str(exc)
    m = re.search(r"GLOBAL (\S+)", text)
    if m:
        return (f"it needs {m.group(1)}, which is not among the tensors and plain data a checkpoint may hold "
                f"(unpickling other objects can run code)")
    m = re.search(r"WeightsUnpickler error: \s*(.+)", text)
    return f"it holds more than tensors and plain data ({m.group(1).strip()})" if m else None


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def load(path: str | Path, *, allow: Iterable = (), trust_pickle: bool = False, mmap: bool = False) -> Any:
    """``torch.load`` of ``path`` on the CPU with only tensors, plain data and the classes in ``allow``.

    Raises CheckpointError (one line naming the file) for a file that needs anything else or is not a torch file
    at all. ``mmap=True`` maps tensor data instead of reading it (for files that are only being checked)."""
    path = Path(path)
    try:
        if trust_pickle is True:  # only ever from the user's explicit --trust-pickle, never a truthy default
            return _load_trusted(path)
        with torch.serialization.safe_globals(list(allow)), warnings.catch_warnings():
            # the refusal below says what matters; torch's note on a plain pickle's protocol would be a second line
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # mmap needs torch's zip format; an old-format file is simply read
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as exc:  # any failure to read is one answer for the user: this file cannot be used
        if not path.is_file():
            raise CheckpointError(f"{path}: not a file") from None
        refusal = None if trust_pickle else _refusal(exc)
        if refusal is None:
            raise CheckpointError(f"{path}: not a readable torch checkpoint file ({_first_line(exc)})") from None
        raise CheckpointError(f"{path}: refused to load: {refusal}; {TRUST_HINT}") from None


def _load_trusted(path: Path) -> Any:
    """The one full unpickle in the package, reached only through --trust-pickle; says so on stderr each time, so a
    log shows which file's code was allowed to run."""
    log.warning("%s: --trust-pickle: opened with torch's full unpickler (any code in the file runs)", path)
    return torch.load(path, map_location="cpu", weights_only=False)


def check_files(paths: Iterable[Path], allow: Iterable = ()) -> None:
    """Open every file in ``paths`` with :func:`load` (tensor data mapped, not read) so that a crafted one is
    refused before a library that unpickles without restrictions (DeepSpeed's loaders) sees it."""
    allow = tuple(allow)
    for p in paths:
        load(p, allow=allow, mmap=True)

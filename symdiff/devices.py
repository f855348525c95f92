"""``--device`` of the commands that run a model: checked before anything is loaded, in one line when wrong."""
from __future__ import annotations

import re

from symdiff.errors import UserError

DEVICE_HELP = "auto (cuda if available) | cpu | cuda | cuda:I"


def resolve_device(choice: str, flag: str = "--device"):
    """The torch.device ``choice`` names; UserError for an unknown name or a CUDA device that is not there."""
    import torch

    choice = str(choice).strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", choice)
    if m is None:
        raise UserError(f"{flag} {choice}: unknown device (use {DEVICE_HELP})")
    if not torch.cuda.is_available():
        raise UserError(f"{flag} {choice}: no CUDA device is visible to torch (use --device cpu)")
    index = int(m.group(1)) if m.group(1) is not None else None
    if index is not None and index >= torch.cuda.device_count():
        raise UserError(f"{flag} {choice}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device(choice)


__all__ = ["DEVICE_HELP", "resolve_device"]

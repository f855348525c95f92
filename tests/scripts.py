"""Benchmarks and tools are scripts, not a package: tests import them by path through this one helper."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(rel: str) -> ModuleType:
    """The script at ``REPO/rel`` as a module, registered in sys.modules under its stem (dataclasses and
    pickling look a module up there); a second call returns the same module."""
    path = REPO / rel
    name = path.stem
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod

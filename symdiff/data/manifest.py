"""``manifest.json``: its expected structure, checked in one place by the one reader that verify, info, the loader,
training and sampling all use. A hand-edited or foreign manifest fails here, in one line naming the file and the
key (``splits.train.shards[3].sha256``), not as a KeyError or TypeError wherever it is first used."""
from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

from symdiff.errors import DataError

FORMAT = "symdiff-shards/1"
MANIFEST = "manifest.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of the dataset ``root``, checked against the structure :func:`check_manifest` describes."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no manifest (is {root} a dataset built by `symdiff data build`?)")
    try:
        man = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text file (byte {exc.start}): not a manifest") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    check_manifest(man, path)
    return man


def is_dataset(root: str | Path) -> tuple[bool, str]:
    """(True, "") if ``root`` is a dataset directory with a valid manifest; else (False, why not)."""
    root = Path(root)
    if root.is_symlink():
        return False, "a symbolic link"
    if not root.is_dir():
        return False, "a file, not a dataset directory" if root.exists() else "missing"
    if not (root / MANIFEST).is_file():
        return False, f"a directory without {MANIFEST}"
    try:
        read_manifest(root)
    except DataError as exc:
        return False, str(exc).replace(f"{root / MANIFEST}: ", f"its {MANIFEST}: ", 1)
    return True, ""


# ------------------------------------------------------------------------------------------------------ structure
def check_manifest(man: Any, path: Path) -> None:
    """Raise DataError naming ``path`` and the first key whose value is missing or of the wrong type."""
    c = _Checker(path)
    c.obj(man, "")
    fmt = c.key(man, "format", str, "a string")
    if fmt != FORMAT:
        raise DataError(f"{path}: key 'format' is {fmt!r}, expected {FORMAT!r} (not a manifest of this project)")
    c.key(man, "dataset", str, "a string")
    for k, z in enumerate(c.key(man, "atom_types", list, "a list")):
        c.int(z, f"atom_types[{k}]")
    c.int(c.key(man, "max_atoms", int, "an integer"), "max_atoms")
    splits = c.key(man, "splits", dict, "an object {split name: split}")
    for name, ent in splits.items():
        where = f"splits.{name}"
        c.obj(ent, where)
        c.int(c.key(ent, "n_molecules", int, "an integer", where), f"{where}.n_molecules")
        if "n_atoms" in ent:
            c.int(ent["n_atoms"], f"{where}.n_atoms")
        for k, s in enumerate(c.key(ent, "shards", list, "a list of shards", where)):
            _check_shard_entry(c, s, f"{where}.shards[{k}]")
    hist = c.key(man, "n_atoms_histogram", dict, "an object {split name: {n_atoms: count}}")
    for name, h in hist.items():
        c.obj(h, f"n_atoms_histogram.{name}")
        for n, count in h.items():
            if not n.isdigit():
                raise DataError(f"{path}: key 'n_atoms_histogram.{name}' has the key {n!r}, expected an atom count")
            c.int(count, f"n_atoms_histogram.{name}.{n}")
    if man.get("has_formal_charges") is not None and not isinstance(man["has_formal_charges"], bool):
        raise DataError(f"{path}: key 'has_formal_charges' is {_kind(man['has_formal_charges'])}, expected true/false")
    if "skipped" in man:
        c.obj(man["skipped"], "skipped")
        c.key(man["skipped"], "counts", dict, "an object {reason: count}", "skipped")


def _check_shard_entry(c: "_Checker", s: Any, where: str) -> None:
    c.obj(s, where)
    p = c.key(s, "path", str, "a path relative to the dataset", where)
    rel = PurePosixPath(p)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise DataError(f"{c.path}: key '{where}.path' is {p!r}, expected a path inside the dataset directory")
    c.int(c.key(s, "n_molecules", int, "an integer", where), f"{where}.n_molecules")
    if "n_atoms" in s:
        c.int(s["n_atoms"], f"{where}.n_atoms")
    digest = c.key(s, "sha256", str, "a hex string", where)
    if not _SHA256.fullmatch(digest):
        raise DataError(f"{c.path}: key '{where}.sha256' is {digest[:20]!r}, expected 64 hex digits")


class _Checker:
    def __init__(self, path: Path) -> None:
        self.path = path

    def obj(self, v: Any, where: str) -> None:
        if not isinstance(v, dict):
            at = f"key '{where}'" if where else "the top level"
            raise DataError(f"{self.path}: {at} is {_kind(v)}, expected an object")

    def key(self, d: dict, key: str, typ: type, desc: str, where: str = "") -> Any:
        full = f"{where}.{key}" if where else key
        if key not in d:
            raise DataError(f"{self.path}: missing key '{full}'")
        v = d[key]
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise DataError(f"{self.path}: key '{full}' is {_kind(v)}, expected {desc}")
        return v

    def int(self, v: Any, where: str) -> None:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise DataError(f"{self.path}: key '{where}' is {_kind(v)}, expected a non-negative integer")


def _kind(v: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    shown = json.dumps(v)[:40] if not isinstance(v, (dict, list)) else ""
    return names.get(type(v), type(v).__name__) + (f" ({shown})" if shown else "")

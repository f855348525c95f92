"""What a config's ``data.root`` names, resolved the same way for every command whatever the working directory.

* ``bundled:qm9`` is the QM9 subset shipped with the package; its shards are built on first use into the user's
  cache (``$SYMDIFF_CACHE``, else ``$XDG_CACHE_HOME/symdiff``, else ``~/.cache/symdiff``).
* A relative path written in a config file is relative to that file's directory (as ``base:`` is).
* A relative path given on the command line (``data.root=DIR``) is relative to the working directory, like every
  other path argument.

:func:`symdiff.config.load_config` applies these rules, so a run's ``config.yaml`` records an absolute directory.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

BUNDLED = "bundled:"


def anchor(root: str, base_dir: str | Path) -> str:
    """``root`` as an absolute path, a relative one taken from ``base_dir``; bundled names are left as they are."""
    if root.startswith(BUNDLED) or "${" in root:  # a name, or an interpolation OmegaConf resolves later
        return root
    return os.path.abspath(os.path.join(base_dir, os.path.expanduser(root)))


def resolve(root: str, base_dir: str | Path) -> str:
    """The absolute shard directory ``root`` names; a bundled dataset is built first if it is not in the cache."""
    if root.startswith(BUNDLED):
        from symdiff.data.bundled import bundled_root

        return str(bundled_root(root[len(BUNDLED):]))
    return anchor(root, base_dir)


def anchor_layer(raw: Any, base_dir: str | Path) -> None:
    """Make a relative ``data.root`` of one loaded config file absolute against the file's directory, in place."""
    root = _root_of(raw, resolve=False)  # an interpolation may name keys of another file: leave it to the merge
    if root is not None:
        raw.data.root = anchor(root, base_dir)


def resolve_config(cfg: Any, base_dir: str | Path) -> None:
    """Resolve the merged config's ``data.root`` in place (what is still relative came from the command line)."""
    root = _root_of(cfg)
    if root is not None:
        cfg.data.root = resolve(root, base_dir)


def _root_of(cfg: Any, resolve: bool = True) -> str | None:
    # Only a plain string is a path; anything else is left for the schema to reject with its own message.
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig) or not isinstance(cfg.get("data"), DictConfig):
        return None
    if "root" not in cfg.data or OmegaConf.is_missing(cfg.data, "root"):
        return None
    root = cfg.data.root if resolve else OmegaConf.to_container(cfg.data, resolve=False)["root"]
    return root if isinstance(root, str) and root else None

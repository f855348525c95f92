"""The real QM9 subset shipped with the package (see README.md here) and its default shard directory."""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Optional

from symdiff.errors import DataError

SUBSET = "qm9_subset.npz"
SHARD_SIZE = 2000


def subset_path() -> Path:
    """Path of the bundled QM9 subset (.npz in the qm9.npz layout, plus formal charges)."""
    return Path(str(resources.files("symdiff.data.bundled").joinpath(SUBSET)))


def default_shard_dir() -> Path:
    cache = os.environ.get("SYMDIFF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "symdiff")
    return Path(cache) / "bundled_qm9"


def ensure_bundled_shards(out_dir: Optional[str | Path] = None) -> Path:
    """Build the bundled subset's shards at ``out_dir`` once and return the directory.

    Safe to call from several processes at once: each builds into its own temporary directory and the first
    rename wins; a directory that exists but fails verification is reported, never silently rebuilt over.
    """
    from symdiff.data.build import build
    from symdiff.data.shards import MANIFEST, verify

    out = Path(out_dir) if out_dir is not None else default_shard_dir()
    if not (out / MANIFEST).is_file():
        try:
            build("qm9", subset_path(), out, shard_size=SHARD_SIZE)
        except DataError:
            if not (out / MANIFEST).is_file():  # not a lost race with another process: a real failure
                raise
    verify(out)
    return out


def geom_sample_path() -> Path:
    """Three real GEOM-Drugs molecules with all their conformers (30), in the layout of the shared GEOM sample."""
    return Path(str(resources.files("symdiff.data.bundled").joinpath("geom_sample_3mols.npz")))

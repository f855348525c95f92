"""The real QM9 subset shipped with the package (see README.md here) and its shards, built on first use."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from importlib import resources
from pathlib import Path
from typing import Iterator, Optional

from symdiff.errors import DataError

SUBSET = "qm9_subset.npz"
SHARD_SIZE = 2000
# Names a config may give as ``data.root: bundled:<name>`` -> (dataset, file in this package).
DATASETS = {"qm9": ("qm9", SUBSET)}


def subset_path() -> Path:
    """Path of the bundled QM9 subset (.npz in the qm9.npz layout, plus formal charges)."""
    return Path(str(resources.files("symdiff.data.bundled").joinpath(SUBSET)))


def cache_dir() -> Path:
    """The user's cache for built data: ``$SYMDIFF_CACHE``, else ``$XDG_CACHE_HOME/symdiff``, else ~/.cache/symdiff."""
    explicit = os.environ.get("SYMDIFF_CACHE")
    if explicit:
        return Path(explicit).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg).expanduser().absolute() / "symdiff"


def _digest(path: Path) -> str:
    # The cache entry is named by the content it was built from, so a package update never reuses stale shards.
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def bundled_root(name: str) -> Path:
    """The shard directory of the bundled dataset ``name`` (``qm9``), built into the cache if not there yet."""
    if name not in DATASETS:
        known = ", ".join(f"bundled:{k}" for k in DATASETS)
        raise DataError(f"data.root 'bundled:{name}': no such bundled dataset (known: {known})")
    dataset, member = DATASETS[name]
    source = Path(str(resources.files("symdiff.data.bundled").joinpath(member)))
    return _ensure(dataset, source, cache_dir() / "bundled" / f"{name}-{_digest(source)}")


def default_shard_dir() -> Path:
    """Where ``bundled:qm9`` lives in the cache (without building it)."""
    return cache_dir() / "bundled" / f"qm9-{_digest(subset_path())}"


def ensure_bundled_shards(out_dir: Optional[str | Path] = None) -> Path:
    """Build the bundled QM9 subset's shards at ``out_dir`` (default: the cache entry of ``bundled:qm9``) once.

    Safe to call from several processes at once: they take a lock on the directory holding ``out_dir``; the build
    itself goes to a temporary directory renamed into place, so a killed build leaves nothing half-written. A directory that exists
    but fails verification is reported, never silently rebuilt over.
    """
    if out_dir is None:
        return bundled_root("qm9")
    return _ensure("qm9", subset_path(), Path(out_dir))


def _ensure(dataset: str, source: Path, out: Path) -> Path:
    from symdiff.data.build import build
    from symdiff.data.shards import MANIFEST, verify

    out = out.absolute()
    if not (out / MANIFEST).is_file():
        with _build_lock(out):
            if not (out / MANIFEST).is_file():  # another process may have built it while we waited
                build(dataset, source, out, shard_size=SHARD_SIZE)
    verify(out)
    return out


@contextlib.contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on the directory that holds ``out``: no lock file left behind, and the kernel releases it
    if the holder dies."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(out.parent, os.O_RDONLY)
    except OSError as exc:
        raise DataError(f"{out.parent}: cannot create the data cache ({exc.strerror}); "
                        "set SYMDIFF_CACHE to a writable directory") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def geom_sample_path() -> Path:
    """Three real GEOM-Drugs molecules with all their conformers (30), in the layout of the shared GEOM sample."""
    return Path(str(resources.files("symdiff.data.bundled").joinpath("geom_sample_3mols.npz")))

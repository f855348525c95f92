"""Checks of the dataset a training is about to read, run once by rank 0 before any work.

- The config must describe the shards: ``data.dataset`` (and ``data.remove_h`` / ``data.include_charges`` where
  the manifest records them) must match the manifest, else a GEOM config would train on QM9 shards.
- The shards the run reads (train, and the validation split when ``train.eval_every`` > 0) are checked against the
  manifest, as ``data.verify`` says: ``full`` (default) their sha256 and array lengths, ``size`` the array lengths
  only (HDF5 metadata), ``off`` nothing. On full QM9 (14 shards, 34 MB, all splits) the sha256 took 0.16 s and
  the lengths 0.03 s (2-core development machine, 2026-12-01); the cost grows with the dataset's bytes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from symdiff.errors import DataError, UserError

VERIFY_LEVELS = ("full", "size", "off")


def check_config_matches(manifest: dict[str, Any], data_cfg: Any, root: Path) -> None:
    """Raise DataError if the config's dataset keys disagree with the manifest of ``root``."""
    where = root / "manifest.json"
    if str(manifest.get("dataset")) != str(data_cfg.dataset):
        raise DataError(f"{where}: the shards are dataset '{manifest.get('dataset')}' but data.dataset="
                        f"{data_cfg.dataset}; point data.root at a {data_cfg.dataset} dataset or fix data.dataset")
    for key in ("remove_h", "include_charges"):
        if key in manifest and bool(manifest[key]) != bool(data_cfg[key]):
            raise DataError(f"{where}: the shards were built with {key}={manifest[key]} but data.{key}="
                            f"{data_cfg[key]}")


def verify_shards(manifest: dict[str, Any], root: Path, splits: Iterable[str], level: str) -> int:
    """Check the shards of ``splits`` at ``level`` (full | size | off). Returns the number of shards checked."""
    if level not in VERIFY_LEVELS:
        raise UserError(f"data.verify: expected {'|'.join(VERIFY_LEVELS)}, got '{level}'")
    if level == "off":
        return 0
    from symdiff.data.shards import sha256_file, split_entry

    n = 0
    for split in dict.fromkeys(splits):  # once each, in order
        for entry in split_entry(manifest, split, root)["shards"]:
            path = root / entry["path"]
            _check_lengths(path, entry)
            if level == "full" and sha256_file(path) != entry.get("sha256"):
                raise DataError(f"{path}: checksum differs from the manifest (the shard is corrupted or was "
                                f"modified); rebuild the dataset, or set data.verify=size to train anyway")
            n += 1
    return n


def _check_lengths(path: Path, entry: dict[str, Any]) -> None:
    import h5py

    if not path.is_file():
        raise DataError(f"{path}: shard listed in the manifest is missing")
    try:
        with h5py.File(path, "r") as f:
            n_mols, n_atoms = f["offsets"].shape[0] - 1, f["atomic_numbers"].shape[0]
            rows = f["positions"].shape[0]
    except (OSError, KeyError) as exc:
        raise DataError(f"{path}: not a readable shard ({exc})") from None
    if (n_mols, n_atoms, rows) != (entry.get("n_molecules"), entry.get("n_atoms"), entry.get("n_atoms")):
        raise DataError(f"{path}: holds {n_mols} molecules / {n_atoms} atoms ({rows} position rows), the manifest "
                        f"says {entry.get('n_molecules')} / {entry.get('n_atoms')}: the shard was truncated or "
                        f"replaced; rebuild the dataset")

"""`symdiff data build`: a source -> HDF5 shards + manifest, serial or under MPI, always atomic.

A source cuts its input into numbered *parts*; part ``k`` becomes the shards ``<split>/<split>-<k>-<j>.h5``.
Under MPI, rank ``r`` reads and writes the parts with ``k % world == r`` (disjoint files, serial h5py per rank);
rank 0 then orders all shards by (part, j) into the manifest, so the molecules and their global order are those of
the serial build, whatever the number of ranks.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from symdiff.data.elements import alphabet
from symdiff.data.publish import check_replaceable, publish, temp_dir_for
from symdiff.data.shards import Skipped, check_molecules, make_manifest, write_manifest, write_shard
from symdiff.errors import DataError, UserError

log = logging.getLogger(__name__)


def open_source(dataset: str, source: Path, *, shard_size: int, trust_pickle: bool = False,
                split_smiles: Optional[Path] = None, split_seed: int = 0,
                geom_permutation: Optional[Path] = None, conformers: int = 30):
    """Pick the reader for ``source`` from the dataset and what the path looks like."""
    source = Path(source)
    if not source.exists():
        raise UserError(f"{source}: source not found")
    if dataset == "qm9":
        from symdiff.data import qm9
        if source.is_file() and source.suffix == ".npz":
            return qm9.QM9Npz(source, shard_size)
        if source.is_dir() or ".tar" in source.name:
            return qm9.QM9Xyz(source, shard_size)
        raise UserError(f"{source}: not a QM9 source (a .npz, a directory of dsgdb9nsd_*.xyz, or the .tar.bz2)")
    if dataset == "geom":
        from symdiff.data import geom
        return geom.open_geom_source(source, shard_size=shard_size, trust_pickle=trust_pickle,
                                     split_smiles=split_smiles, split_seed=split_seed,
                                     permutation=geom_permutation, conformers=conformers)
    raise UserError(f"unknown dataset '{dataset}' (qm9 | geom)")


def build(dataset: str, source: str | Path, out: str | Path, *, shard_size: int = 10_000, mpi: bool = False,
          skip_invalid: bool = False, overwrite: bool = False, **source_kw: Any) -> dict[str, Any]:
    """Build the sharded dataset ``out`` from ``source``; returns the manifest (on every rank)."""
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    alpha = alphabet(dataset)
    out = Path(out).absolute()
    comm = None
    rank, world = 0, 1
    if mpi:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        rank, world = comm.Get_rank(), comm.Get_size()
    err: Optional[str] = None
    tmp = temp_dir_for(out) if rank == 0 else None
    if rank == 0:
        try:  # before any work: a build that cannot be published must not run for an hour first
            check_replaceable(out, overwrite=overwrite)
            tmp.mkdir(parents=True)
        except DataError as exc:
            err = str(exc)
        except OSError as exc:
            err = f"{out}: cannot create the build directory beside it: {_reason(exc)}"
    if comm is not None:
        err, tmp = comm.bcast((err, tmp), root=0)
    if err:
        raise DataError(err)

    t0 = time.perf_counter()
    entries: list[tuple[str, int, int, dict]] = []
    skipped = Skipped()
    info: dict[str, Any] = {}
    error: Optional[str] = None
    try:
        src = open_source(dataset, Path(source), shard_size=shard_size, **source_kw)
        if hasattr(src, "comm"):  # a source that can share work between ranks (the GEOM msgpack's object index)
            src.comm = comm
        for key, by_split in src.iter_parts(rank, world):
            for split, mols in by_split.items():
                where = f"{source} ({split})"
                mols = check_molecules(mols, alpha, skip_invalid=skip_invalid, source=where, skipped=skipped)
                for j, start in enumerate(range(0, len(mols), shard_size)):
                    part = mols.select(np.arange(start, min(start + shard_size, len(mols))))
                    rel = f"{split}/{split}-{key:06d}-{j:03d}.h5"
                    e = _write_shard(tmp, out, rel, part, dataset=dataset, split=split)
                    entries.append((split, key, j, {"path": rel, **e}))
                    log.info("rank %d wrote %s (%d molecules)", rank, rel, len(part))
        has_charges = getattr(src, "has_formal_charges", False)
        info = src.describe()  # after reading: streamed sources only know what they saw at the end
    except UserError as exc:
        error, has_charges = str(exc), False
    except OSError as exc:  # the machine, not our code: a full disk, a file vanishing, no permission
        error, has_charges = _os_error(exc, source), False
    except BaseException as exc:
        if comm is None or not isinstance(exc, Exception):
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # A crash on one rank must not leave the others waiting forever in the gather below.
        error, has_charges = f"rank {rank}: {type(exc).__name__}: {exc}", False

    # CPU seconds per rank show how the work was split even on a machine busy with other jobs.
    # Peak RSS per rank shows whether the build streams: it must not grow with the source.
    mine = (entries, skipped.to_dict(), error, info, round(time.process_time(), 3), _peak_rss_mb())
    if comm is not None:
        # Open MPI's blocking collectives busy-poll: a rank that finishes first would spin at 100 % CPU and steal a
        # core from the ranks still parsing. Wait for everybody with a sleeping poll instead.
        req = comm.Ibarrier()
        while not req.Test():
            time.sleep(0.005)
    gathered = comm.gather(mine, root=0) if comm is not None else [mine]
    man = None
    final_error = None
    if rank == 0:
        errors = [g[2] for g in gathered if g[2]]
        if errors:
            shutil.rmtree(tmp, ignore_errors=True)
            final_error = errors[0]
        else:
            all_entries = sorted((e for g in gathered for e in g[0]), key=lambda e: (e[1], e[2]))
            splits: dict[str, list[dict]] = {}
            for split in getattr(src, "split_names", ("train", "valid", "test")):
                splits[split] = []
            for split, _, _, e in all_entries:
                splits.setdefault(split, []).append(e)
            total_skipped = Skipped()
            for g in gathered:
                total_skipped.merge(g[1])
            if not all_entries:
                shutil.rmtree(tmp, ignore_errors=True)
                final_error = (f"{source}: no molecules to build a dataset from"
                               + (f" (all {total_skipped.total} were invalid and skipped)" if total_skipped.total
                                  else " (an empty source?)"))
            # A streamed source learns whether it is synthetic from what it read: any rank's molecules say so.
            if any(g[3].get("synthetic") for g in gathered):
                info = {**info, "synthetic": True}
            extra = {**info, "shard_size": shard_size, "skipped": total_skipped.to_dict(),
                     "build": {"ranks": world, "seconds": round(time.perf_counter() - t0, 3),
                               "rank_cpu_seconds": [g[4] for g in gathered],
                               "rank_peak_rss_mb": [g[5] for g in gathered]}}
            man = make_manifest(dataset, splits, extra=extra)
            man["has_formal_charges"] = bool(has_charges)
            try:
                if final_error is None:
                    write_manifest(tmp, man)
                    publish(tmp, out, overwrite=overwrite)
            except Exception as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                final_error = (f"{out}: cannot publish the dataset: {_reason(exc)}; nothing was published"
                               if isinstance(exc, OSError) else str(exc))
    if comm is not None:
        man, final_error = comm.bcast((man, final_error), root=0)
    if final_error:
        raise DataError(final_error)
    return man


def _peak_rss_mb() -> float:
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _write_shard(tmp: Path, out: Path, rel: str, part, *, dataset: str, split: str) -> dict[str, Any]:
    try:
        return write_shard(tmp / rel, part, dataset=dataset, split=split)
    except OSError as exc:
        raise DataError(f"{out}: cannot write shard {rel}: {_reason(exc)}; nothing was published "
                        "(an existing dataset there is untouched)") from None


def _os_error(exc: OSError, where: Path | str) -> str:
    return f"{exc.filename or where}: {_reason(exc)}"


def _reason(exc: OSError) -> str:
    # h5py's messages run to several lines of HDF5 internals; the errno says what the user needs to know
    return os.strerror(exc.errno) if exc.errno else " ".join(str(exc).split())[:200]

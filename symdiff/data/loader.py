"""Streaming, distributed, resumable loader over HDF5 shards.

How one epoch's order is made (it depends only on the seed, the epoch and the data, never on the world size):

1. Each shard is cut into *chunks* of ``chunk_size`` consecutive molecules. The epoch shuffles the chunk order.
2. Consecutive groups of ``window_chunks`` chunks form a *window*: the only molecules held in memory (plus a
   few carried over). Molecules are shuffled inside the window.
3. Global batches are cut from the window: a fixed molecule count (``batch_size``; the remainder of a window is
   carried into the next, so every batch is full but the last), or, with ``max_atoms_per_batch``, a token budget:
   the window is sorted by atom count into ``n_buckets`` buckets (each shuffled), and the bucket sequence is cut
   greedily so a batch's real atoms stay within the budget; batch order is then shuffled inside the window.
4. Every rank sees the same list of global batches and takes its share of each (every ``world_size``-th molecule).

Steps 1-3 need only the molecules' sizes, which every rank has from the shards' offsets (read once at start-up).
So a rank reads the atoms of its own share of each batch and nothing else: per window, the union of its shares,
sorted and coalesced into contiguous runs (:mod:`symdiff.data.shard_reader`), and the bytes it reads fall as
1/world_size.

Because all of this is a pure function of (seed, epoch), resuming at global batch ``k`` replays exactly the same
batches, and a run on 1 or 8 ranks consumes the same molecules per optimiser step.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from symdiff.data.batch import Batch, collate
from symdiff.data.manifest import read_manifest
from symdiff.data.molecules import MoleculeSet
from symdiff.data.shard_reader import Shard, checked_runs, read_runs
from symdiff.data.shards import split_entry
from symdiff.errors import DataError

log = logging.getLogger(__name__)
IDS_UP_FRONT_MAX_WORLD = 8


class ShardLoader:
    """Yields this rank's :class:`Batch` of each global batch of the epoch (see the module doc for the order)."""

    def __init__(self, root: str | Path, split: str, *, batch_size: int, max_atoms_per_batch: int = 0,
                 n_buckets: int = 8, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, chunk_size: int = 256, window_chunks: int = 64) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size} is not a valid pair")
        if max_atoms_per_batch <= 0 and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        self.root, self.split = Path(root), split
        self.manifest = read_manifest(self.root)
        entry = split_entry(self.manifest, split, self.root)
        self.batch_size, self.max_atoms = int(batch_size), int(max_atoms_per_batch)
        self.n_buckets, self.shuffle, self.seed = max(1, int(n_buckets)), bool(shuffle), int(seed)
        self.rank, self.world_size, self.drop_last = int(rank), int(world_size), bool(drop_last)
        self.chunk_size, self.window_chunks = max(1, int(chunk_size)), max(1, int(window_chunks))

        self.shard_paths = [self.root / s["path"] for s in entry["shards"]]
        self.shards: list[Shard] = []
        # A rank of a few reads most molecules' ids anyway, and a third pread per run of about one molecule costs
        # it ~25% of its time; a rank of many reads ~1/W of them with its runs, not 8 bytes of every molecule.
        ids_up_front = self.world_size <= IDS_UP_FRONT_MAX_WORLD
        for p, s in zip(self.shard_paths, entry["shards"]):
            shard = Shard(p, ids_up_front=ids_up_front)
            if shard.n_molecules != s["n_molecules"]:
                raise DataError(f"{p}: holds {shard.n_molecules} molecules, manifest says {s['n_molecules']}")
            self.shards.append(shard)
        counts = np.array([sh.n_molecules for sh in self.shards], dtype=np.int64)
        self.shard_start = np.zeros(len(counts) + 1, dtype=np.int64)  # global index of each shard's first molecule
        np.cumsum(counts, out=self.shard_start[1:])
        self.sizes = (np.concatenate([np.diff(sh.offsets) for sh in self.shards]).astype(np.int32)
                      if self.shards else np.zeros(0, np.int32))
        # chunk c = global molecules [chunk_start[c], chunk_start[c] + chunk_len[c]), never across a shard boundary
        per_shard = -(-counts // self.chunk_size)
        shard_of = np.repeat(np.arange(len(counts)), per_shard)
        local = np.arange(int(per_shard.sum())) - np.repeat(np.cumsum(per_shard) - per_shard, per_shard)
        self.chunk_start = self.shard_start[shard_of] + local * self.chunk_size
        self.chunk_len = np.minimum(self.chunk_size, counts[shard_of] - local * self.chunk_size)
        self.epoch = 0
        self._next_batch = 0  # global batch index inside the epoch
        self._plan_cache: tuple[int, list[list[np.ndarray]]] | None = None
        self.stats = {"batches": 0, "molecules": 0, "atoms": 0, "slots": 0}

    # ------------------------------------------------------------------ planning (sizes only, no atom data)
    def _plan(self, epoch: int) -> list[list[np.ndarray]]:
        """Per window, the global molecule indices of each of its global batches. Kept grouped by window because a
        window's batches are read together, and resume skips whole windows."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
        n_chunks = len(self.chunk_start)
        order = rng.permutation(n_chunks) if self.shuffle else np.arange(n_chunks)
        windows: list[list[np.ndarray]] = []
        carry = np.zeros(0, dtype=np.int64)
        for w0 in range(0, n_chunks, self.window_chunks):
            chunks = order[w0:w0 + self.window_chunks]
            lens = self.chunk_len[chunks]
            mols = np.repeat(self.chunk_start[chunks] - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))
            if self.shuffle:
                mols = mols[rng.permutation(len(mols))]
            last = w0 + self.window_chunks >= n_chunks
            if self.max_atoms > 0:
                windows.append(self._token_batches(mols, rng))
            else:
                stream = np.concatenate([carry, mols])
                n_full = len(stream) // self.batch_size
                batches = list(stream[:n_full * self.batch_size].reshape(n_full, self.batch_size))
                rest = stream[n_full * self.batch_size:]
                if last and len(rest) and not self.drop_last:
                    batches.append(rest)
                windows.append(batches)
                carry = rest
        self._plan_cache = (epoch, windows)
        return windows

    def _token_batches(self, mols: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        # Buckets = size quantiles of the window, each in random order; batches are cut greedily along the
        # bucket sequence, so a bucket's remainder fills up with the next (slightly larger) molecules instead
        # of becoming a tiny batch: one short batch per window at most.
        by_size = mols[np.argsort(self.sizes[mols], kind="stable")]
        buckets = np.array_split(by_size, min(self.n_buckets, max(1, len(by_size))))
        if self.shuffle:
            buckets = [b[rng.permutation(len(b))] for b in buckets]
        seq = np.concatenate(buckets) if buckets else by_size
        # Greedy cut, one step per batch: a batch runs while its atoms fit the budget (at least one molecule).
        ends = np.zeros(len(seq) + 1, dtype=np.int64)
        np.cumsum(self.sizes[seq], out=ends[1:])
        batches: list[np.ndarray] = []
        start = 0
        while start < len(seq):
            stop = max(start + 1, int(np.searchsorted(ends, ends[start] + self.max_atoms, side="right")) - 1)
            batches.append(seq[start:stop])
            start = stop
        if self.shuffle and batches:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def global_batches(self, epoch: Optional[int] = None) -> list[np.ndarray]:
        """Global molecule indices (into the split, in shard order) of every global batch of the epoch."""
        return [b for w in self._plan(self.epoch if epoch is None else epoch) for b in w]

    def __len__(self) -> int:
        return sum(len(w) for w in self._plan(self.epoch))

    # ------------------------------------------------------------------ state
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._next_batch = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "next_batch": self._next_batch, "seed": self.seed, "split": self.split,
                "n_molecules": int(len(self.sizes)), "batch_size": self.batch_size,
                "max_atoms_per_batch": self.max_atoms}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "n_molecules", "batch_size", "max_atoms_per_batch"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise DataError(f"loader state was saved with {key}={state[key]}, this loader has {mine}")
        self.epoch, self._next_batch = int(state["epoch"]), int(state["next_batch"])

    @property
    def padding_fraction(self) -> float:
        """Padding share of all [B, Nmax] slots yielded so far by this loader."""
        return 0.0 if not self.stats["slots"] else 1.0 - self.stats["atoms"] / self.stats["slots"]

    # ------------------------------------------------------------------ data
    def _read(self, gids: np.ndarray) -> MoleculeSet:
        """Molecules ``gids`` (sorted, unique global indices), in that order: one run per stretch of neighbours."""
        k = np.searchsorted(self.shard_start, gids, side="right") - 1
        cut = np.flatnonzero((np.diff(gids) != 1) | (np.diff(k) != 0)) + 1
        first = np.concatenate([[0], cut])
        last = np.concatenate([cut, [len(gids)]])
        parts, shards = [], []
        for shard in np.unique(k[first]):
            sel = k[first] == shard
            base = self.shard_start[shard]
            shards.append(self.shards[shard])
            parts.append(read_runs(shards[-1], gids[first[sel]] - base, gids[last[sel] - 1] + 1 - base))
        return checked_runs(parts, shards)

    def _my_share(self, idx: np.ndarray) -> np.ndarray:
        if self.world_size == 1:
            return idx
        if self.max_atoms > 0:
            # Size-sorted round robin gives every rank nearly the same number of atoms.
            idx = idx[np.argsort(-self.sizes[idx], kind="stable")]
        if len(idx) < self.world_size:
            # Too few molecules for every rank: wrap around rather than hand a rank an empty batch.
            return idx[[self.rank % len(idx)]]
        return idx[self.rank::self.world_size]

    def __iter__(self) -> Iterator[Batch]:
        windows = self._plan(self.epoch)
        k = 0
        for win in windows:
            if k + len(win) <= self._next_batch:  # skip whole windows before the resume point
                k += len(win)
                continue
            skip = max(0, self._next_batch - k)
            k += skip
            shares = [self._my_share(idx) for idx in win[skip:]]
            # This rank's molecules of the rest of the window, and nothing else: the only data it reads.
            need = np.unique(np.concatenate(shares))
            loaded = self._read(need)
            for mine in shares:
                batch = collate(loaded, np.searchsorted(need, mine))
                k += 1
                self._next_batch = k
                self.stats["batches"] += 1
                self.stats["molecules"] += len(mine)
                self.stats["atoms"] += int(batch.n_atoms.sum())
                self.stats["slots"] += int(batch.mask.numel())
                yield batch
        # The epoch is over: the next iteration starts the next epoch unless set_epoch says otherwise.
        self.epoch += 1
        self._next_batch = 0

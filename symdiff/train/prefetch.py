"""The next batch, cut into micro-batches and on its way to the device while the current step runs.

On CUDA each micro-batch is copied from pinned (page-locked) memory with ``non_blocking=True``: the copy is queued
behind the step's kernels instead of the host waiting for it, and a copy from pageable memory would make the
stream synchronise first. Elsewhere ``.to(device)`` is a no-op (CPU) or a plain copy. The loader's state is taken
right after each batch is drawn, so a checkpoint of a step records where the data stood after that step's batch,
not after the batch already fetched ahead of it (bitwise resume depends on that).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from symdiff.data.batch import Batch


@dataclass
class Fetched:
    batch: Batch  # this rank's batch, on the host (the step's counts are read from it)
    micros: list[Batch]  # its micro-batches, on the device (on CUDA, copies possibly still in flight)
    loader_state: dict[str, Any]  # the loader's state right after this batch


class Prefetcher:
    """Draws batches from ``loader`` forever (a new epoch when one ends), ``split`` cuts each into micro-batches."""

    def __init__(self, loader: Any, device: torch.device, split: Callable[[Batch], list[Batch]]) -> None:
        self.loader, self.device, self.split = loader, device, split
        self._it: Iterator[Batch] = iter(loader)
        self.pinned = device.type == "cuda"

    def next(self) -> Fetched:
        while True:
            try:
                batch = next(self._it)
                break
            except StopIteration:  # epoch over; the loader has moved on to the next epoch by itself
                self._it = iter(self.loader)
        state = self.loader.state_dict()
        return Fetched(batch, [self._to_device(m) for m in self.split(batch)], state)

    def _to_device(self, micro: Batch) -> Batch:
        if self.pinned:
            return micro.pin_memory().to(self.device, non_blocking=True)
        return micro.to(self.device)

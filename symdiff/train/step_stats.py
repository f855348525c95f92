"""The one small all-reduce of every step (loss, data counts, the data-order check, the stop request), read on the
host without stalling the device.

Reading a reduced tensor with ``.cpu()``/``float()`` right away waits for the whole queue of GPU work, so the host
stops feeding the device every step. Here the reduction is queued, its result copied into pinned host memory with
``non_blocking=True`` behind it and marked with an event; the trainer reads a step's result one step later (when the
next step's work is already queued) or at once only on the steps it logs. On CPU (gloo) everything is synchronous
and the result is there at once. The values are those of the synchronous code to the bit: the loss is summed in
float64 on the device in the order the host summed it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist


class PendingStats:
    """One step's reduced statistics, on their way to the host."""

    def __init__(self, host: torch.Tensor, event: Optional["torch.cuda.Event"]) -> None:
        self._host, self._event = host, event

    def result(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()  # waits for this reduction only, not for the work queued after it
            self._event = None
        return self._host


def reduce_stats(loss_sum: torch.Tensor, counts: Sequence[float], device: torch.device,
                 device_sums: Optional[torch.Tensor] = None) -> PendingStats:
    """All-reduce [loss_sum, *counts, *device_sums] (float64) over the ranks; returns the pending host copy.
    ``device_sums`` are further sums already on the device (the process's step statistics)."""
    cuda = device.type == "cuda"
    n_extra = 0 if device_sums is None else int(device_sums.numel())
    host = torch.tensor([0.0, *counts, *([0.0] * n_extra)], dtype=torch.float64)
    stats = (host.pin_memory() if cuda else host).to(device, non_blocking=cuda)
    stats[0] += loss_sum  # 0.0 + x is x: the first entry is the device's sum, bit for bit
    if n_extra:
        stats[len(stats) - n_extra:] += device_sums.reshape(-1)
    dist.all_reduce(stats)  # NCCL queues it on the device; the host goes on
    if not cuda:
        return PendingStats(stats, None)
    out = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
    out.copy_(stats, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return PendingStats(out, event)

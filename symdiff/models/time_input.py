"""What the DiT's time embedder is fed (``model.time_input``): the process's t in [0, 1], mapped to one scalar.

The embedder's sinusoid has a 10^4 period (SPEC D9). Fed t / T, as the paper and the official code do, its 256-d
feature moves by 0.27 of its norm of 11.3 between t = 0 and t = 100 while sigma changes 45x (issue 18): the
network barely sees where it is at low noise. The integer step t, or the log-SNR -gamma(t) (which spans about
-12..+12 over the schedule, most of it at low noise), move the feature by much more there.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from symdiff.config import TIME_INPUTS


class TimeInput(nn.Module):
    """t in [0, 1] (t_int / T for vdm) -> the scalar the sinusoid sees: t, t * T, or -gamma(t) interpolated."""

    def __init__(self, mode: str = "t_over_T", timesteps: int = 1000, gamma_table: Optional[np.ndarray] = None
                 ) -> None:
        super().__init__()
        if mode not in TIME_INPUTS:
            raise ValueError(f"time input '{mode}' is not one of {', '.join(TIME_INPUTS)}")
        if mode == "log_snr" and gamma_table is None:
            raise ValueError("time input 'log_snr' needs the process's gamma table (the vdm process)")
        self.mode, self.timesteps = mode, int(timesteps)
        # Plain numpy, not a buffer: nothing enters the state dict, and dtype casts of the model cannot round it.
        self._gamma = None if gamma_table is None else np.asarray(gamma_table, dtype=np.float64)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if self.mode == "t_over_T":
            return t  # the paper's input, untouched (bitwise)
        u = t.double() * self.timesteps
        if self.mode == "t_int":
            return u.to(t.dtype)
        table = torch.from_numpy(self._gamma).to(t.device)
        # linear interpolation between integer steps (vdm only ever asks for integer t)
        lo = u.floor().clamp(0, self.timesteps).long()
        hi = (lo + 1).clamp(max=self.timesteps)
        w = u - lo.double()
        return (-(table[lo] * (1 - w) + table[hi] * w)).to(t.dtype)

    def extra_repr(self) -> str:
        return self.mode

"""The polynomial_2 noise schedule of EDM/SymDiff (SPEC §2.2), as a lookup table of gamma(t) = -log SNR(t).

Everything is computed in float64 and stored as a buffer; callers index it with integer times t_int in 0..T.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def polynomial_alpha2(timesteps: int, s: float = 1e-5, power: float = 2.0) -> np.ndarray:
    """alpha^2_t for t = 0..T: (1 - (t/T)^power)^2, clipped step ratios, then squeezed by the precision s."""
    steps = timesteps + 1
    u = np.linspace(0, steps, steps) / steps
    alphas2 = (1.0 - np.power(u, power)) ** 2
    # The last ratio would be 0 (alpha^2_T = 0): clipping each step ratio to >= 0.001 keeps SNR(T) finite.
    alphas2 = np.concatenate([np.ones(1), alphas2])
    ratios = np.clip(alphas2[1:] / alphas2[:-1], a_min=0.001, a_max=1.0)
    alphas2 = np.cumprod(ratios)
    return (1.0 - 2.0 * s) * alphas2 + s


class NoiseSchedule(nn.Module):
    """gamma(t) lookup with the derived alpha, sigma and transition quantities (all from gamma, stably)."""

    def __init__(self, timesteps: int = 1000, schedule: str = "polynomial_2", precision: float = 1e-5) -> None:
        super().__init__()
        if not schedule.startswith("polynomial_"):
            raise ValueError(f"unknown noise schedule '{schedule}' (supported: polynomial_<power>)")
        power = float(schedule.split("_", 1)[1])
        a2 = polynomial_alpha2(timesteps, precision, power)
        gamma = -(np.log(a2) - np.log(1.0 - a2))
        self.timesteps = int(timesteps)
        self._gamma64 = gamma
        # float64 table: gamma differences between adjacent steps near t = 0 are ~0.2 and the expm1 in
        # sigma^2_{t|s} needs them exactly; persistent=False because it is a pure function of the config.
        self.register_buffer("table", torch.from_numpy(gamma), persistent=False)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # model.half()/.bfloat16() (mixed-precision engines) casts floating buffers too: keep the table in
        # float64 on whatever device it moved to.
        super()._apply(fn, recurse)
        if self.table.dtype != torch.float64:
            self.table = torch.from_numpy(self._gamma64).to(self.table.device)
        return self

    @property
    def gamma64(self) -> np.ndarray:
        """gamma(t) for t = 0..T as a float64 numpy array, a copy (editing it cannot change the schedule).

        For consumers outside the module tree (model.time_input's log-SNR): they need the exact float64 values
        whatever dtype or device the model was cast to, without reading the buffer back from the GPU.
        """
        return self._gamma64.copy()

    def gamma(self, t_int: torch.Tensor) -> torch.Tensor:
        """gamma at integer times (any shape), float64."""
        return self.table[t_int.long()]

    @staticmethod
    def alpha(gamma: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(torch.sigmoid(-gamma))

    @staticmethod
    def sigma(gamma: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(torch.sigmoid(gamma))

    @staticmethod
    def sigma2_t_given_s(gamma_t: torch.Tensor, gamma_s: torch.Tensor) -> torch.Tensor:
        return -torch.expm1(F.softplus(gamma_s) - F.softplus(gamma_t))

    @staticmethod
    def alpha_t_given_s(gamma_t: torch.Tensor, gamma_s: torch.Tensor) -> torch.Tensor:
        return torch.exp(0.5 * (F.logsigmoid(-gamma_t) - F.logsigmoid(-gamma_s)))

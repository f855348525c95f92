"""What every process shares: its name, its samplers (the default one first) and the CoM-free projection."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from symdiff.diffusion import edm
from symdiff.diffusion.quotient import TARGETS


class Process(nn.Module):
    name = "process"
    samplers: tuple[str, ...] = ()
    default_sampler = ""
    backend = "auto"

    def check_sampler(self, sampler: Optional[str]) -> str:
        """The sampler ``sampler`` names (None, "" or "auto": the default), or ValueError naming the choices."""
        sampler = self.default_sampler if sampler in (None, "", "auto") else str(sampler)
        if sampler not in self.samplers:
            raise ValueError(f"sampler '{sampler}' is not one of the {self.name} process's: {', '.join(self.samplers)}")
        return sampler

    target = "standard"
    target_options: dict[str, Any] = {}

    def _set_target(self, target: str, options: Optional[dict[str, Any]]) -> None:
        """The eps target of a Gaussian process's loss: standard, or a quotient estimator (diffusion/quotient.py)."""
        if target not in TARGETS:
            raise ValueError(f"diffusion target '{target}' is not one of {', '.join(TARGETS)}")
        self.target, self.target_options = str(target), dict(options or {})

    @staticmethod
    def _loss_stats(loss: torch.Tensor, err_x: torch.Tensor, err_h: torch.Tensor, denom: int, mask: torch.Tensor,
                    target: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-step statistics of an eps-matching loss (vdm, vpsde), from its per-molecule squared errors."""
        dtype = err_x.dtype
        stats = {"loss": loss.detach(), "l2_x": (0.5 * err_x / denom).mean().detach(),
                 "l2_h": (0.5 * err_h / denom).mean().detach(),
                 "atoms_per_mol": mask.sum(1).to(dtype).mean().detach(),
                 "padding_fraction": 1.0 - mask.to(dtype).mean().detach()}
        if target is not eps:  # how far the quotient target moved from the drawn noise, on the loss's scale
            stats["l2_target_shift"] = (0.5 * ((target - eps) ** 2).sum((1, 2)) / denom).mean().detach()
        return stats

    def nll(self, *args: Any, **kwargs: Any) -> Any:
        """Each process with a likelihood overrides this (vdm: the variational bound; vpsde and flow: the ODE's);
        one without refuses with one message."""
        raise NotImplementedError(f"the {self.name} process defines no likelihood here (no NLL); use "
                                  "diffusion.process=vdm for test NLLs")

    def _finish(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Project x back onto the CoM-free subspace and zero the padding (after every sampler step)."""
        x = edm.remove_mean(z[..., :3], mask, self.backend)
        return torch.cat([x, z[..., 3:]], dim=-1) * mask.to(z.dtype).unsqueeze(-1)

"""Generative processes on the CoM-free subspace: noise schedule, noise, likelihood terms, samplers.

A process (``diffusion.process``) owns the mathematics of one generative model and calls the network only
through a denoiser function; :func:`build_process` makes the one a config names.
"""
from __future__ import annotations

from typing import Any

from symdiff.diffusion.flow import Flow
from symdiff.diffusion.process import Process
from symdiff.diffusion.quotient import permutation_target, target_options
from symdiff.diffusion.schedule import NoiseSchedule, polynomial_alpha2
from symdiff.diffusion.vdm import VDM, recipe_options
from symdiff.diffusion.vpsde import VPSDE

PROCESSES: dict[str, type[Process]] = {"vdm": VDM, "vpsde": VPSDE, "flow": Flow}


def build_process(cfg: Any, d: int, num_classes: int, backend: str = "auto") -> Process:
    """The process ``cfg.diffusion.process`` names, for a state of 3 + ``d`` channels (``num_classes`` one-hot)."""
    dc = cfg.diffusion
    name = str(getattr(dc, "process", "vdm"))
    if name not in PROCESSES:
        raise ValueError(f"'{name}' is not one of {', '.join(PROCESSES)}")
    nf = [float(v) for v in dc.normalize_factors]
    # Keys of one process only go to that process (configs validated before flow_align existed lack it).
    extra = {"align": str(getattr(dc, "flow_align", "none"))} if name == "flow" else {}
    target = str(getattr(dc, "target", "standard"))
    if name in ("vdm", "vpsde"):
        extra = {"target": target, "target_options": target_options(dc)}
        if name == "vdm":
            extra["recipe"] = recipe_options(cfg)
    elif target != "standard":
        raise ValueError(f"diffusion.target '{target}' needs a Gaussian forward kernel (vdm, vpsde), not {name}")
    return PROCESSES[name](d, num_classes, *nf, timesteps=int(dc.timesteps), schedule=str(dc.schedule),
                           precision=float(dc.precision), backend=backend, **extra)


__all__ = ["NoiseSchedule", "polynomial_alpha2", "Process", "VDM", "VPSDE", "Flow", "PROCESSES", "build_process",
           "permutation_target"]

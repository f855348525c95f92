"""Models: build a SymDiffModel (eps-net, gamma, embedding, diffusion) from a config; count its parameters."""
from __future__ import annotations

from typing import Any

from symdiff.models.symdiff import KINDS, SymDiffModel


def build_model(cfg: Any) -> SymDiffModel:
    """The model a config describes (``cfg.model.kind`` picks dit | dit_aug | symdiff_haar | symdiff | egnn)."""
    return SymDiffModel(cfg)


def count_params(model: SymDiffModel) -> dict[str, int]:
    """Parameter counts as in SPEC §3.5: eps = eps-net plus the shared Gaussian embedding (the whole EGNN for kind
    egnn), gamma = f_theta."""
    if model.kind == "egnn":
        eps = sum(p.numel() for p in model.egnn.parameters())
    else:
        eps = (sum(p.numel() for p in model.eps_net.parameters())
               + sum(p.numel() for p in model.embedding.parameters()))
    gamma = sum(p.numel() for p in model.gamma_net.parameters()) if model.gamma_net is not None else 0
    return {"eps": eps, "gamma": gamma, "total": eps + gamma}


__all__ = ["build_model", "count_params", "SymDiffModel", "KINDS"]

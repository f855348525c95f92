#!/usr/bin/env python
"""Write tests/data/vdm_reference.pt: tiny models of each kind and their vdm outputs at fixed seeds.

Run once on the code *before* the denoiser/process split (commit e95438b); tests/test_process_vdm.py loads the
state dicts into the current code and asserts the same losses, NLL terms and samples bit for bit. Tensors and
plain data only (loads with weights_only=True).

    PYTHONPATH=. python tests/data/make_vdm_reference.py tests/data/vdm_reference.pt
"""
from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import torch
from omegaconf import OmegaConf

from symdiff.config import load_config
from symdiff.models import build_model

KINDS = ("dit", "dit_aug", "symdiff_haar", "symdiff")
TINY = ["data.root=unused", "model.hidden_size=24", "model.xh_hidden_size=12", "model.num_gaussians=8",
        "model.depth=1", "model.num_heads=2", "model.gamma_hidden_size=8", "model.gamma_depth=1",
        "model.gamma_num_heads=2", "model.gamma_dec_hidden=8", "model.kernel_backend=torch"]
WATER = ([8, 1, 1], [[0.0, 0.0, 0.1173], [0.0, 0.7572, -0.4692], [0.0, -0.7572, -0.4692]])
METHANE = ([6, 1, 1, 1, 1], [[0.0, 0.0, 0.0], [0.6291, 0.6291, 0.6291], [-0.6291, -0.6291, 0.6291],
                             [-0.6291, 0.6291, -0.6291], [0.6291, -0.6291, -0.6291]])


def batch() -> SimpleNamespace:
    mols = [WATER, METHANE, METHANE, WATER]
    N = max(len(z) for z, _ in mols)
    pos = torch.zeros(len(mols), N, 3)
    Z = torch.zeros(len(mols), N, dtype=torch.long)
    for i, (z, x) in enumerate(mols):
        pos[i, :len(z)] = torch.tensor(x) + 1.5
        Z[i, :len(z)] = torch.tensor(z)
    return SimpleNamespace(positions=pos, atomic_numbers=Z, mask=Z > 0, formal_charges=None,
                           mol_ids=torch.arange(len(mols)), n_atoms=(Z > 0).sum(1))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def outputs(model: torch.nn.Module, b: SimpleNamespace) -> dict[str, torch.Tensor]:
    """Every vdm output the split must keep: the tests recompute exactly this with the new code."""
    out: dict[str, torch.Tensor] = {}
    loss, stats = model.training_loss(b, generator=gen(11))
    out["loss"] = loss.detach()
    out.update({f"stat_{k}": v for k, v in stats.items()})
    loss.backward()
    out["grad_final"] = model.eps_net.dit.final_linear.weight.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    total, terms = model.nll(b, return_terms=True, generator=gen(12))
    out["nll"] = total.detach()
    out.update({f"nll_{k}": v.detach() for k, v in terms.items()})
    with torch.no_grad():
        x, h, mask, _, _ = model.features(b)
        z = torch.cat([x, h], -1)
        out["denoise"] = model.denoise(z, mask, torch.full((z.shape[0],), 0.4), generator=gen(13))
        out["step"] = model.reverse_step(z, mask, 700, 650, generator=gen(14))
        dx, dZ = model.decode(z, mask, generator=gen(15))
        out["decode_x"], out["decode_Z"] = dx, dZ
    for steps in (5, 50):
        xs, Zs, ms = model.sample(torch.tensor([3, 5, 4]), steps=steps, generator=gen(16))
        out[f"sample{steps}_x"], out[f"sample{steps}_Z"], out[f"sample{steps}_mask"] = xs, Zs, ms
    return out


def main(path: str) -> None:
    b = batch()
    ref: dict[str, object] = {"batch": {"positions": b.positions, "atomic_numbers": b.atomic_numbers}}
    cases = [(k, "fp32") for k in KINDS] + [("symdiff", "bf16")]
    for kind, prec in cases:
        cfg = load_config(None, TINY + [f"model.kind={kind}"])
        torch.manual_seed(3)
        model = build_model(cfg)
        g = gen(4)
        with torch.no_grad():  # away from the adaLN-Zero init, where eps_hat = 0 hides most of the code
            for name, p in model.named_parameters():
                if not name.endswith(("mu", "sigma")):
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        if prec == "bf16":
            model = model.bfloat16()
        model.train()
        ref[f"{kind}_{prec}"] = {"config": OmegaConf.to_container(cfg, resolve=True),
                                 "state": {k: v.clone() for k, v in model.state_dict().items()},
                                 "out": outputs(model, b)}
    torch.save(ref, path)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/vdm_reference.pt")

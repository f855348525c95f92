"""Test NLL hook: the paper's Jensen bound (SPEC §2.4, §4.5) averaged over a data split.

Each pass visits every molecule of the split once (unshuffled, in the loader's fixed order) and averages the
model's per-molecule ``nll``; the result is the mean over passes (the paper: QM9 5 passes, GEOM 1) with the
per-pass values, so the Monte-Carlo spread of the bound is visible. All randomness comes from a private generator
seeded here (or one the caller passes), so a call is reproducible and leaves the caller's global RNG alone.

``nll`` is the labelled bound: the density of the molecule with its atoms in the file's order. A model trained on
the quotient space (diffusion.target, docs/quotient.md) is a density of unlabelled point clouds; since every model
here is permutation invariant, the two differ by the log of the number of distinct labellings, log N! for N atoms
at distinct positions (every real molecule), and ``nll_unlabelled`` = ``nll`` - mean log N! is reported beside it.

Every process reports the same fields: vdm's ``nll`` is the variational bound of SPEC §2.4, vpsde's and flow's the
bound through their ODE (symdiff/diffusion/ode_likelihood.py, with ``likelihood`` naming the solver and probes).
"""
from __future__ import annotations

import math
import time
from typing import Any, Iterable, Optional

import torch

from symdiff.errors import UserError


def split_nll(model: Any, batches_for_pass: Any, passes: int = 1, device: str | torch.device = "cpu",
              seed: int = 0, generator: Optional[torch.Generator] = None, max_molecules: Optional[int] = None,
              options: Optional[dict[str, Any]] = None) -> dict:
    """Mean per-molecule NLL (nats) over ``passes`` passes.

    ``batches_for_pass(p)`` returns an iterable of batches for pass ``p`` (a fresh iteration of a loader);
    ``max_molecules`` keeps only the first molecules of each pass (the ODE likelihoods cost hundreds of network
    calls a molecule); ``options`` go to ``model.nll`` (vpsde, flow: ``ode=ODEOptions(...)``).
    """
    if passes < 1:
        raise ValueError("passes must be at least 1")
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    was_training = model.training
    model.eval()
    per_pass: list[float] = []
    nfe: list[float] = []
    n_molecules = 0
    log_labellings = 0.0
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for p in range(passes):
                total, count, log_lab = 0.0, 0, 0.0
                batches: Iterable = batches_for_pass(p)
                for batch in batches:
                    if max_molecules is not None:
                        if count >= max_molecules:
                            break
                        if count + len(batch) > max_molecules:
                            batch = batch.select(slice(0, max_molecules - count))
                    log_lab += float(torch.lgamma(batch.mask.sum(1).double() + 1).sum())
                    v, terms = model.nll(batch.to(device), generator=generator, return_terms=True, **(options or {}))
                    if "nfe" in terms:  # an ODE likelihood: its field evaluations, the measure of its cost
                        nfe.append(float(terms["nfe"][0]))
                    if not torch.isfinite(v).all():
                        bad = int((~torch.isfinite(v)).sum())
                        raise FloatingPointError(f"pass {p}: {bad} molecule(s) got a non-finite NLL")
                    total += float(v.double().sum())
                    count += int(v.numel())
                if count == 0:
                    raise ValueError("the split produced no molecules")
                per_pass.append(total / count)
                n_molecules, log_labellings = count, log_lab / count
    finally:
        model.train(was_training)
    mean = sum(per_pass) / len(per_pass)
    std = math.sqrt(sum((v - mean) ** 2 for v in per_pass) / (len(per_pass) - 1)) if len(per_pass) > 1 else None
    return {"nll": mean, "nll_unlabelled": mean - log_labellings, "log_labellings": log_labellings,
            "nll_per_pass": per_pass, "nll_std_over_passes": std, "passes": passes,
            "n_molecules": n_molecules, "seconds": round(time.perf_counter() - t0, 3),
            "ode_evaluations_per_batch": sum(nfe) / len(nfe) if nfe else None}


def run_split_nll(source: str, data_root: Optional[str] = None, split: Optional[str] = None, passes: int = 1,
                  batch_size: Optional[int] = None, device: str = "cpu", use_ema: bool = True, seed: int = 0,
                  trust_pickle: bool = False, ode: Optional[dict[str, Any]] = None,
                  max_molecules: Optional[int] = None) -> dict:
    """Load a trained model (run dir, checkpoint dir or exported .pt) and compute its NLL on a shard split.

    ``ode`` (fields of :class:`~symdiff.diffusion.ode_likelihood.ODEOptions`) sets the vpsde/flow likelihood's
    solver and probes; a vdm model, whose NLL is the variational bound, refuses them.
    """
    from symdiff.data.loader import ShardLoader
    from symdiff.diffusion.ode_likelihood import ODEOptions
    from symdiff.train.checkpoint import load_for_inference

    cfg, model = load_for_inference(source, use_ema=use_ema, trust_pickle=trust_pickle)
    if model.process.name == "vdm":
        if ode:
            raise UserError(f"--nll {source}: --ode-*/--probes set the ODE likelihood of vpsde and flow models; a "
                            "vdm model's NLL is the variational bound (SPEC §2.4)")
        options: dict[str, Any] = {}
        likelihood = "variational bound (SPEC 2.4)"
    else:
        try:
            options = {"ode": ODEOptions(**(ode or {}))}
        except ValueError as exc:
            raise UserError(f"--nll {source}: {exc}") from None
        likelihood = f"{model.process.name} ODE, {options['ode'].describe()}"
    root = data_root or str(cfg.data.root)
    split = split or str(cfg.data.test_split)
    loader = ShardLoader(root, split, batch_size=batch_size or int(cfg.data.batch_size), shuffle=False,
                         drop_last=False)
    model.to(device)
    out = split_nll(model, lambda p: iter(loader), passes=passes, device=device, seed=seed,
                    max_molecules=max_molecules, options=options)
    out.update({"split": split, "data_root": root, "weights": "ema" if use_ema else "raw",
                "process": model.process.name, "likelihood": likelihood})
    return out

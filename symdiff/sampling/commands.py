"""`symdiff sample --run DIR|--ckpt PATH --n N --out FILE.sdf|.xyz|.npz`: sample molecules from a trained model."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from symdiff.errors import UserError

log = logging.getLogger("symdiff.sample")
OUT_SUFFIXES = (".sdf", ".xyz", ".npz")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (its newest complete checkpoint is used)")
    src.add_argument("--ckpt", help="a checkpoint directory or an exported .pt file")
    parser.add_argument("--n", type=int, default=None, help="number of molecules (default: sample.n_samples)")
    parser.add_argument("--out", required=True, help="output file: .sdf, .xyz or .npz")
    parser.add_argument("--batch-size", type=int, default=None, help="molecules per batch (default: sample.batch_size)")
    parser.add_argument("--steps", type=int, default=None,
                        help="reverse steps; fewer than the diffusion's T uses a strided sampler (default: sample.steps)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: sample.seed)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    parser.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda[:i]")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def size_histogram_from_data(cfg: Any) -> dict[int, int] | None:
    """Training-split atom-count histogram from the run's dataset manifest, or None where it is not readable."""
    from symdiff.data.shards import read_manifest

    try:
        man = read_manifest(cfg.data.root)
    except UserError as exc:
        log.info("p(N): %s; using the histogram stored with the model", exc)
        return None
    hist = man.get("n_atoms_histogram", {}).get(cfg.data.train_split)
    return {int(k): int(v) for k, v in hist.items()} if hist else None


def run(args: argparse.Namespace) -> int:
    import torch

    from symdiff.io.molfiles import write_molecules
    from symdiff.sampling import sample_molecules
    from symdiff.train.checkpoint import load_for_inference

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise UserError(f"--out {out}: unknown extension '{out.suffix}' (use {', '.join(OUT_SUFFIXES)})")
    if not out.parent.exists():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    source = args.run or args.ckpt
    if not Path(source).exists():
        raise UserError(f"{'--run' if args.run else '--ckpt'} {source}: no such file or directory")
    cfg, model = load_for_inference(source, use_ema=not args.no_ema)
    n = args.n if args.n is not None else int(cfg.sample.n_samples)
    batch_size = args.batch_size if args.batch_size is not None else int(cfg.sample.batch_size)
    steps = args.steps if args.steps is not None else int(cfg.sample.steps)
    seed = args.seed if args.seed is not None else int(cfg.sample.seed)
    if n < 1:
        raise UserError(f"--n {n}: need at least one molecule")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be positive")
    if not 1 <= steps <= model.timesteps:
        raise UserError(f"--steps {steps}: must be in 1..{model.timesteps}")
    hist = size_histogram_from_data(cfg)
    if hist:
        model.set_n_atoms_histogram(hist)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    model.to(device)
    t0 = time.perf_counter()
    mols = sample_molecules(model, n, batch_size=batch_size, steps=steps, seed=seed, progress=not args.no_progress)
    elapsed = time.perf_counter() - t0
    write_molecules(out, mols)
    log.info("wrote %d molecules (%d atoms) to %s in %.1f s (%.3f s/molecule, %d steps, %s)", len(mols),
             int(mols.n_atoms.sum()), out, elapsed, elapsed / n, steps, device)
    return 0

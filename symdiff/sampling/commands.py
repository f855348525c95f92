"""`symdiff sample --run DIR|--ckpt PATH --n N --out FILE.sdf|.xyz|.npz`: sample molecules from a trained model."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from symdiff.devices import DEVICE_HELP, resolve_device
from symdiff.errors import UserError
from symdiff.outputs import add_overwrite_flag, check_output_file, writing

log = logging.getLogger("symdiff.sample")
OUT_SUFFIXES = (".sdf", ".xyz", ".npz")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (its newest complete checkpoint is used)")
    src.add_argument("--ckpt", help="a checkpoint directory or an exported .pt file")
    parser.add_argument("--n", type=int, default=None, help="number of molecules (default: sample.n_samples)")
    parser.add_argument("--out", required=True, help="output file: .sdf, .xyz or .npz")
    add_overwrite_flag(parser)
    parser.add_argument("--batch-size", type=int, default=None, help="molecules per batch (default: sample.batch_size)")
    parser.add_argument("--steps", type=int, default=None,
                        help="reverse steps; fewer than the diffusion's T uses a strided sampler (default: sample.steps)")
    parser.add_argument("--sampler", default=None,
                        help="the process's sampler (vdm: ancestral, ddim, dpmpp2m; vpsde: em, heun; flow: heun, "
                             "euler; default: sample.sampler, auto = the process's default)")
    parser.add_argument("--ddim-eta", type=float, default=None,
                        help="DDIM noise scale in [0, 1]: 0 deterministic, 1 the ancestral variance "
                             "(default: sample.ddim_eta)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: sample.seed)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="load a checkpoint that needs Python objects beyond tensors (that can run code: only "
                             "for files you trust)")
    parser.add_argument("--n-atoms-from", metavar="DATA_DIR", default=None,
                        help="draw molecule sizes from the training-split histogram of this shard directory instead "
                             "of the p(N) stored with the model")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def size_histogram_from_data(root: str | Path, split: str, dataset: str) -> dict[int, int]:
    """Atom-count histogram of ``split`` from a shard directory's manifest (``--n-atoms-from``)."""
    from symdiff.data.shards import read_manifest

    man = read_manifest(root)
    if man.get("dataset") != dataset:
        raise UserError(f"--n-atoms-from {root}: a {man.get('dataset')} dataset, but the model was trained on "
                        f"{dataset}")
    hist = (man.get("n_atoms_histogram") or {}).get(split)
    if not hist:
        raise UserError(f"--n-atoms-from {root}: the manifest has no atom-count histogram for split '{split}'")
    return {int(k): int(v) for k, v in hist.items()}


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise UserError(f"{flag} {value}: must be at least 1")


def run(args: argparse.Namespace) -> int:
    from symdiff.io.molfiles import write_molecules
    from symdiff.sampling import sample_molecules
    from symdiff.train.checkpoint import load_for_inference

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Everything the user typed is checked before the checkpoint is read and the samples are drawn: a bad
    # --out found after sampling would lose the work.
    out = check_output_file(args.out, "--out", args.overwrite, OUT_SUFFIXES)
    device = resolve_device(args.device)
    _positive(args.n, "--n")
    _positive(args.batch_size, "--batch-size")
    _positive(args.steps, "--steps")
    source = args.run or args.ckpt
    if not Path(source).exists():
        raise UserError(f"{'--run' if args.run else '--ckpt'} {source}: no such file or directory")
    if args.n_atoms_from is not None and not Path(args.n_atoms_from).is_dir():
        raise UserError(f"--n-atoms-from {args.n_atoms_from}: not a directory")
    cfg, model = load_for_inference(source, use_ema=not args.no_ema, trust_pickle=args.trust_pickle)
    n = args.n if args.n is not None else int(cfg.sample.n_samples)
    batch_size = args.batch_size if args.batch_size is not None else int(cfg.sample.batch_size)
    steps = args.steps if args.steps is not None else int(cfg.sample.steps)
    seed = args.seed if args.seed is not None else int(cfg.sample.seed)
    if not 1 <= steps <= model.timesteps:
        raise UserError(f"--steps {steps}: must be in 1..{model.timesteps}")
    sampler = args.sampler if args.sampler is not None else str(cfg.sample.sampler)
    try:
        sampler = model.process.check_sampler(sampler)
    except ValueError as exc:
        raise UserError(f"--sampler: {exc}") from None
    ddim_eta = args.ddim_eta if args.ddim_eta is not None else float(cfg.sample.ddim_eta)
    if not 0.0 <= ddim_eta <= 1.0:
        raise UserError(f"--ddim-eta {ddim_eta}: must be in [0, 1]")
    if args.n_atoms_from is not None:
        model.set_n_atoms_histogram(size_histogram_from_data(args.n_atoms_from, str(cfg.data.train_split),
                                                             str(cfg.data.dataset)))
        log.info("p(N): training-split histogram of %s (--n-atoms-from)", args.n_atoms_from)
    model.to(device)
    t0 = time.perf_counter()
    mols = sample_molecules(model, n, batch_size=batch_size, steps=steps, seed=seed, progress=not args.no_progress,
                            sampler=sampler, ddim_eta=ddim_eta)
    elapsed = time.perf_counter() - t0
    with writing(out, "--out"):  # the writers go through a temporary name
        write_molecules(out, mols)
    log.info("wrote %d molecules (%d atoms) to %s in %.3f s (%.4f s/molecule, %d steps (%s), %s)", len(mols),
             int(mols.n_atoms.sum()), out, elapsed, elapsed / n, steps, sampler, device)
    return 0


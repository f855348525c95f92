"""Sampling molecules from a model: sizes from p(N), batched by size, with a progress bar."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from tqdm import tqdm

from symdiff.data.molecules import MoleculeSet


@torch.no_grad()
def sample_molecules(model: torch.nn.Module, n: int, batch_size: int = 100, steps: Optional[int] = None,
                     seed: Optional[int] = None, progress: bool = True,
                     n_atoms: Optional[np.ndarray] = None,
                     generator: Optional[torch.Generator] = None, sampler: Optional[str] = None,
                     **options: Any) -> MoleculeSet:
    """Draw ``n`` molecules: sizes N ~ p(N) (the model's stored histogram) unless ``n_atoms`` is given.

    Sizes are sorted before batching, so each batch pads to nearly its own size rather than to the largest
    molecule of the dataset. Molecules come back in the drawn (unsorted) order with mol_ids 0..n-1.
    Randomness (sizes and diffusion noise) comes from ``generator`` (on the model's device), or from a private
    generator seeded with ``seed``; with neither, from torch's global RNG. The caller's global RNG is never reseeded.
    ``sampler`` names one of the model's process's samplers (its default when None); ``options`` go to it.
    """
    if n < 1:
        raise ValueError(f"number of samples must be positive, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    if generator is None and seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(int(seed))
    model.eval()
    # p(N) is drawn on the CPU: a CUDA generator cannot drive it, so it gets a CPU stream derived from the same seed.
    size_gen = generator if generator is None or generator.device.type == "cpu" else \
        torch.Generator().manual_seed(int(generator.initial_seed()))
    sizes = (np.asarray(n_atoms, dtype=np.int64) if n_atoms is not None
             else model.sample_n_atoms(n, generator=size_gen).numpy().astype(np.int64))
    if len(sizes) != n:
        raise ValueError(f"n_atoms has {len(sizes)} entries for {n} samples")
    order = np.argsort(sizes, kind="stable")
    calls = (steps or model.timesteps) + 1
    n_batches = (n + batch_size - 1) // batch_size
    zs: list[Optional[np.ndarray]] = [None] * n
    xs: list[Optional[np.ndarray]] = [None] * n
    with tqdm(total=n_batches * calls, desc="sampling", unit="step", disable=not progress) as bar:
        for b in range(n_batches):
            idx = order[b * batch_size:(b + 1) * batch_size]
            x, Z, mask = model.sample(torch.from_numpy(sizes[idx]), steps=steps, progress=bar, generator=generator,
                                      sampler=sampler, **options)
            x, Z, mask = x.float().cpu().numpy(), Z.cpu().numpy(), mask.cpu().numpy()
            for row, i in enumerate(idx):
                zs[i] = Z[row][mask[row]]
                xs[i] = x[row][mask[row]]
            bar.set_postfix(molecules=min((b + 1) * batch_size, n))
    return MoleculeSet.from_lists(zs, xs, ids=list(range(n)))  # type: ignore[arg-type]


__all__ = ["sample_molecules"]

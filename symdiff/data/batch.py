"""The padded mini-batch the loader hands to the model."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import torch

from symdiff.data.molecules import MoleculeSet


@dataclass
class Batch:
    """B molecules padded to the largest one in the batch (positions are NOT centred).

    ``atomic_numbers`` is 0 and ``mask`` False on padding; ``formal_charges`` is None when the dataset has none.
    """

    positions: torch.Tensor  # float32 [B, Nmax, 3]
    atomic_numbers: torch.Tensor  # int64 [B, Nmax]
    mask: torch.Tensor  # bool [B, Nmax]
    formal_charges: Optional[torch.Tensor]  # int64 [B, Nmax] or None
    mol_ids: torch.Tensor  # int64 [B]
    n_atoms: torch.Tensor  # int64 [B]

    def __len__(self) -> int:
        return int(self.n_atoms.shape[0])

    def select(self, idx: torch.Tensor | slice, *, trim: bool = False) -> "Batch":
        """Molecules ``idx`` (index tensor or slice, in that order); with ``trim`` the padding is cut to the largest
        of them. Without it the width is kept, so a prefix ``select(slice(0, k))`` is a view of this batch."""
        n_atoms = self.n_atoms[idx]
        width = int(n_atoms.max()) if trim and len(n_atoms) else None
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            # Per-molecule fields are [B], per-atom ones [B, Nmax, ...]. One indexing op for the latter (not [idx]
            # then [:, :width]): a trimmed field comes out compact, not as a strided view into a full-width copy.
            out[f.name] = None if t is None else t[idx] if t.dim() == 1 else t[idx, :width]
        return Batch(**out)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        moved = {f.name: (None if getattr(self, f.name) is None
                          else getattr(self, f.name).to(device, non_blocking=non_blocking)) for f in fields(self)}
        return Batch(**moved)

    def pin_memory(self) -> "Batch":
        """The same batch in page-locked host memory (needs CUDA), for non-blocking copies to the GPU."""
        return Batch(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).pin_memory())
                        for f in fields(self)})

    @property
    def padding_fraction(self) -> float:
        """Share of the [B, Nmax] slots that are padding (0 for an unpadded batch)."""
        total = self.mask.numel()
        return 0.0 if total == 0 else 1.0 - float(self.mask.sum()) / total


def collate(mols: MoleculeSet, idx: np.ndarray) -> Batch:
    """Pad molecules ``idx`` of ``mols`` (in that order) into a Batch.

    Vectorised scatter into preallocated arrays: the per-molecule Python loop of a naive collate is what limits
    loader throughput on small molecules such as QM9.
    """
    idx = np.asarray(idx, dtype=np.int64)
    counts = mols.offsets[idx + 1] - mols.offsets[idx]
    b = len(idx)
    nmax = int(counts.max()) if b else 0
    total = int(counts.sum())
    # Row/column of every real atom in the padded layout, and where it sits in the flat arrays.
    rows = np.repeat(np.arange(b), counts)
    starts = np.zeros(b, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:]) if b > 1 else None
    cols = np.arange(total) - np.repeat(starts, counts)
    src = np.repeat(mols.offsets[idx], counts) + cols

    pos = np.zeros((b, nmax, 3), dtype=np.float32)
    pos[rows, cols] = mols.positions[src]
    z = np.zeros((b, nmax), dtype=np.int64)
    z[rows, cols] = mols.atomic_numbers[src]
    charges = None
    if mols.formal_charges is not None:
        charges = np.zeros((b, nmax), dtype=np.int64)
        charges[rows, cols] = mols.formal_charges[src]
    return Batch(
        positions=torch.from_numpy(pos),
        atomic_numbers=torch.from_numpy(z),
        mask=torch.from_numpy(z > 0),
        formal_charges=None if charges is None else torch.from_numpy(charges),
        mol_ids=torch.from_numpy(mols.mol_ids[idx].astype(np.int64)),
        n_atoms=torch.from_numpy(counts.astype(np.int64)),
    )

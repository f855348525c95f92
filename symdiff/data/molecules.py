"""In-memory molecule collections: ragged atoms stored flat with offsets (the same layout as the shards)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np


@dataclass
class MoleculeSet:
    """Molecule i owns atoms ``offsets[i]:offsets[i+1]`` of the flat arrays.

    ``formal_charges`` is None where the source has no formal charges (e.g. GEOM msgpack, QM9 xyz).
    ``mol_ids`` are the source's own ids (QM9 index, GEOM conformer id) so errors can name a molecule.
    """

    atomic_numbers: np.ndarray  # (n_atoms,) int8
    positions: np.ndarray  # (n_atoms, 3) float32, Angstrom
    offsets: np.ndarray  # (n_mols + 1,) int64
    mol_ids: np.ndarray  # (n_mols,) int64
    formal_charges: Optional[np.ndarray] = None  # (n_atoms,) int8

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_atoms(self) -> np.ndarray:
        return np.diff(self.offsets)

    def molecule(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s = slice(self.offsets[i], self.offsets[i + 1])
        return self.atomic_numbers[s], self.positions[s]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(len(self)):
            yield self.molecule(i)

    def select(self, idx: np.ndarray) -> "MoleculeSet":
        """A new set holding molecules ``idx`` (in that order)."""
        idx = np.asarray(idx, dtype=np.int64)
        counts = self.n_atoms[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        # Vectorised gather (a per-molecule arange loop dominates shard building and loader windows otherwise).
        total = int(offsets[-1])
        gather = np.repeat(self.offsets[idx] - offsets[:-1], counts) + np.arange(total, dtype=np.int64)
        return MoleculeSet(
            atomic_numbers=self.atomic_numbers[gather],
            positions=self.positions[gather],
            offsets=offsets,
            mol_ids=self.mol_ids[idx],
            formal_charges=None if self.formal_charges is None else self.formal_charges[gather],
        )

    @staticmethod
    def concatenate(parts: list["MoleculeSet"]) -> "MoleculeSet":
        if not parts:
            raise ValueError("nothing to concatenate")
        offsets = [np.zeros(1, dtype=np.int64)]
        base = 0
        for p in parts:
            offsets.append(p.offsets[1:] + base)
            base += int(p.offsets[-1])
        charges = None
        if all(p.formal_charges is not None for p in parts):
            charges = np.concatenate([p.formal_charges for p in parts])
        return MoleculeSet(
            atomic_numbers=np.concatenate([p.atomic_numbers for p in parts]),
            positions=np.concatenate([p.positions for p in parts]),
            offsets=np.concatenate(offsets),
            mol_ids=np.concatenate([p.mol_ids for p in parts]),
            formal_charges=charges,
        )

    @staticmethod
    def from_lists(zs: list[np.ndarray], xs: list[np.ndarray], ids: Optional[list[int]] = None,
                   charges: Optional[list[np.ndarray]] = None) -> "MoleculeSet":
        counts = np.array([len(z) for z in zs], dtype=np.int64)
        offsets = np.zeros(len(zs) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return MoleculeSet(
            atomic_numbers=np.concatenate(zs).astype(np.int8) if zs else np.zeros(0, np.int8),
            positions=np.concatenate(xs).astype(np.float32).reshape(-1, 3) if xs else np.zeros((0, 3), np.float32),
            offsets=offsets,
            mol_ids=np.asarray(ids if ids is not None else np.arange(len(zs)), dtype=np.int64),
            formal_charges=None if charges is None else np.concatenate(charges).astype(np.int8),
        )

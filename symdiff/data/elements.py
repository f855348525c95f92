"""Atom alphabets of the datasets (SPEC §1.1, §1.2): encoder index = position in the decoder list."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SYMBOLS = {1: "H", 5: "B", 6: "C", 7: "N", 8: "O", 9: "F", 13: "Al", 14: "Si", 15: "P", 16: "S", 17: "Cl",
           33: "As", 35: "Br", 53: "I", 80: "Hg", 83: "Bi"}
NUMBERS = {s: z for z, s in SYMBOLS.items()}


@dataclass(frozen=True)
class Alphabet:
    name: str
    atomic_numbers: tuple[int, ...]
    max_atoms: int

    @property
    def symbols(self) -> list[str]:
        return [SYMBOLS[z] for z in self.atomic_numbers]

    @property
    def num_classes(self) -> int:
        return len(self.atomic_numbers)

    def encode(self, z: np.ndarray) -> np.ndarray:
        """Atomic numbers -> class indices; -1 where the element is not in the alphabet."""
        lut = np.full(128, -1, dtype=np.int64)
        lut[list(self.atomic_numbers)] = np.arange(self.num_classes)
        z = np.asarray(z, dtype=np.int64)
        out = np.full(z.shape, -1, dtype=np.int64)
        ok = (z >= 0) & (z < 128)
        out[ok] = lut[z[ok]]
        return out

    def decode(self, idx: np.ndarray) -> np.ndarray:
        return np.asarray(self.atomic_numbers, dtype=np.int64)[np.asarray(idx, dtype=np.int64)]


QM9 = Alphabet("qm9", (1, 6, 7, 8, 9), 29)
GEOM = Alphabet("geom", (1, 5, 6, 7, 8, 9, 13, 14, 15, 16, 17, 33, 35, 53, 80, 83), 181)
ALPHABETS = {"qm9": QM9, "geom": GEOM}


def alphabet(dataset: str) -> Alphabet:
    try:
        return ALPHABETS[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset '{dataset}' (known: {', '.join(ALPHABETS)})") from None

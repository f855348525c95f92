"""The EDM bond-length tables, margins and allowed valences (SPEC §4.1-4.2), as dense lookup arrays.

Lengths are in picometres, as in the published tables. A bond of order k is detected when the distance (pm) is
below ``table_k[a][b] + margin_k``; the order is the highest k whose test passes, and a higher order is only tried
when the lower one passed (the published nested rule). A pair missing from a table never passes that table's test.

The single-bond table is symmetric. The double-bond table has one one-sided entry, C=S, listed under C only:
lookups use the pair sorted by the dataset's atom-type index, and C comes before S in every alphabet used here,
so C=S is detectable. We keep that asymmetry to stay comparable with published numbers.
"""
from __future__ import annotations

import numpy as np

# ---- single bonds (pm): symmetric, each pair listed once
_SINGLE = {
    ("H", "H"): 74, ("H", "C"): 109, ("H", "N"): 101, ("H", "O"): 96, ("H", "F"): 92, ("H", "B"): 119,
    ("H", "Si"): 148, ("H", "P"): 144, ("H", "S"): 134, ("H", "Cl"): 127, ("H", "Br"): 141, ("H", "I"): 161,
    ("H", "As"): 152,
    ("C", "C"): 154, ("C", "N"): 147, ("C", "O"): 143, ("C", "F"): 135, ("C", "Si"): 185, ("C", "P"): 184,
    ("C", "S"): 182, ("C", "Cl"): 177, ("C", "Br"): 194, ("C", "I"): 214,
    ("N", "N"): 145, ("N", "O"): 140, ("N", "F"): 136, ("N", "P"): 177, ("N", "S"): 168, ("N", "Cl"): 175,
    ("N", "Br"): 214, ("N", "I"): 222,
    ("O", "O"): 148, ("O", "F"): 142, ("O", "Si"): 163, ("O", "P"): 163, ("O", "S"): 151, ("O", "Cl"): 164,
    ("O", "Br"): 172, ("O", "I"): 194,
    ("F", "F"): 142, ("F", "Si"): 160, ("F", "P"): 156, ("F", "S"): 158, ("F", "Cl"): 166, ("F", "Br"): 178,
    ("F", "I"): 187,
    ("B", "Cl"): 175,
    ("Si", "Si"): 233, ("Si", "S"): 200, ("Si", "Cl"): 202, ("Si", "Br"): 215, ("Si", "I"): 243,
    ("P", "P"): 221, ("P", "S"): 210, ("P", "Cl"): 203, ("P", "Br"): 222,
    ("S", "S"): 204, ("S", "Cl"): 207, ("S", "Br"): 225, ("S", "I"): 234,
    ("Cl", "Cl"): 199, ("Cl", "Br"): 214,
    ("Br", "Br"): 228,
    ("I", "I"): 266,
}
# ---- double bonds (pm): symmetric except C=S (one-sided, see module docstring)
_DOUBLE = {("C", "C"): 134, ("C", "N"): 129, ("C", "O"): 120, ("N", "N"): 125, ("N", "O"): 121, ("O", "O"): 121,
           ("O", "P"): 150, ("P", "S"): 186}
_DOUBLE_ONE_SIDED = {("C", "S"): 160}
# ---- triple bonds (pm): symmetric
_TRIPLE = {("C", "C"): 120, ("C", "N"): 116, ("C", "O"): 113, ("N", "N"): 110}

# Tuned by EDM to maximise the stability of real QM9 molecules; part of the protocol.
MARGINS_PM = (10, 5, 3)

# Allowed total bond order per element (EDM; no charged states).
ALLOWED_VALENCES: dict[str, tuple[int, ...]] = {
    "H": (1,), "C": (4,), "N": (3,), "O": (2,), "F": (1,), "B": (3,), "Al": (3,), "Si": (4,), "P": (3, 5),
    "S": (4,), "Cl": (1,), "As": (3,), "Br": (1,), "I": (1,), "Hg": (1, 2), "Bi": (3, 5),
}

MAX_VALENCE_INDEX = 16  # valence sums at or above this are never allowed (no element allows more than 5)


def _fill(table: np.ndarray, pairs: dict, index: dict[str, int], symmetric: bool) -> None:
    for (a, b), v in pairs.items():
        if a in index and b in index:
            table[index[a], index[b]] = v
            if symmetric:
                table[index[b], index[a]] = v


def threshold_tables(symbols: list[str]) -> np.ndarray:
    """Thresholds (pm, table length + margin) as float32 [3, K, K] over an alphabet; NaN where no entry.

    Entry ``[k, a, b]`` is for the ordered pair (a, b) (a = first in the dataset's sorted order).
    """
    index = {s: i for i, s in enumerate(symbols)}
    k = len(symbols)
    out = np.full((3, k, k), np.nan, dtype=np.float64)
    _fill(out[0], _SINGLE, index, True)
    _fill(out[1], _DOUBLE, index, True)
    _fill(out[1], _DOUBLE_ONE_SIDED, index, False)
    _fill(out[2], _TRIPLE, index, True)
    for order, margin in enumerate(MARGINS_PM):
        out[order] += margin
    # integer + integer is exact in float32, so comparisons against float32 distances match the reference code
    return out.astype(np.float32)


def allowed_valence_table(symbols: list[str]) -> np.ndarray:
    """bool [K, MAX_VALENCE_INDEX]: ``[a, v]`` is True iff total bond order v makes an atom of type a stable."""
    out = np.zeros((len(symbols), MAX_VALENCE_INDEX), dtype=bool)
    for i, s in enumerate(symbols):
        for v in ALLOWED_VALENCES.get(s, ()):
            out[i, v] = True
    return out

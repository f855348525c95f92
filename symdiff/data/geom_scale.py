"""A GEOM-scale SYNTHETIC ``drugs_crude.msgpack``: every real GEOM-Drugs SMILES (the MiDi split lists), one cheap
3D structure each, and jittered copies of it as its "conformers", written in GEOM's own msgpack format so that the
real reader (:class:`symdiff.data.geom.GeomMsgpack`) and the real build are what a scale test measures.

These are NOT GEOM-Drugs conformers and not even physical ones: RDKit's 2D depiction of the heavy atoms with
hydrogens added, lifted to 3D by a small random out-of-plane offset, then Gaussian-jittered copies whose
``totalenergy`` grows with the jitter (so that lowest-energy selection has something to select). Every molecule's
info dict says ``"synthetic": true``, and a manifest built from the file says so too. ETKDG (10-50 ms a SMILES) would
take hours on 304k SMILES; the depiction takes about 0.5 ms.

The file is a stream of msgpack maps {SMILES: info}, ``molecules_per_object`` molecules each (GEOM's own file holds
1,000 per object). Conformers are packed with numpy straight into msgpack bytes (fixarray [Z, x, y, z] with float64
coordinates, as msgpack packs Python floats), so no Python object per atom is ever built, and the output is
streamed to a temporary name and renamed: memory stays a few objects whatever the file size.
"""
from __future__ import annotations

import gzip
import multiprocessing as mp
import time
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Optional

import msgpack
import numpy as np

from symdiff.data.elements import GEOM
from symdiff.io.atomic import atomic_write_bytes

METHOD = ("synthetic: RDKit 2D depiction of the heavy atoms + AddHs(addCoords), lifted to 3D by a random "
          "out-of-plane offset, then Gaussian-jittered copies; totalenergy = base + jitter energy (not GEOM-Drugs)")
# One atom as msgpack packs [Z, x, y, z] with a small int Z and float64 coordinates: 0x94, Z, then 0xcb + 8 bytes.
ATOM = np.dtype([("head", "u1"), ("z", "u1"), ("tx", "u1"), ("x", ">f8"), ("ty", "u1"), ("y", ">f8"),
                 ("tz", "u1"), ("zc", ">f8")])
assert ATOM.itemsize == 29


def read_smiles(files: Iterable[Path], *, seed: int = 0) -> list[str]:
    """The union of the SMILES lists, duplicates dropped, in a seeded random order (so a prefix spans all splits)."""
    seen: dict[str, None] = {}
    for p in files:
        with gzip.open(p, "rt") if str(p).endswith(".gz") else open(p) as f:
            for line in f:
                s = line.strip()
                if s:
                    seen.setdefault(s, None)
    smiles = list(seen)
    order = np.random.default_rng(seed).permutation(len(smiles))
    return [smiles[i] for i in order]


def structure(smiles: str) -> Optional[tuple[np.ndarray, np.ndarray, int]]:
    """(Z [n] uint8, positions [n, 3] float64, total charge) of one cheap 3D structure, or None where RDKit cannot
    parse the SMILES or the molecule does not fit the GEOM alphabet (its build would reject it)."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem import rdDepictor
    RDLogger.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return None
    try:
        rdDepictor.Compute2DCoords(mol)
        mol = Chem.AddHs(mol, addCoords=True)
    except Exception:  # RDKit raises its own types for odd valences: such a SMILES is skipped and counted
        return None
    # RDKit's Python atom iterator costs more than the depiction itself; indexing does not.
    z = np.array([mol.GetAtomWithIdx(i).GetAtomicNum() for i in range(mol.GetNumAtoms())], dtype=np.int64)
    if len(z) == 0 or len(z) > GEOM.max_atoms or np.any(GEOM.encode(z) < 0):
        return None
    x = np.asarray(mol.GetConformer().GetPositions(), dtype=np.float64)
    return z.astype(np.uint8), x, int(Chem.GetFormalCharge(mol))


def pack_conformers(packer: msgpack.Packer, z: np.ndarray, xs: np.ndarray, energies: np.ndarray) -> bytes:
    """The msgpack bytes of the list ``[{"xyz": [[Z, x, y, z], ...], "totalenergy": e}, ...]`` for the C
    conformers ``xs`` [C, n, 3] of one molecule, built as one numpy array (identical to ``msgpack.packb``)."""
    c, n = xs.shape[0], len(z)
    prefix = np.frombuffer(packer.pack_map_header(2) + packer.pack("xyz") + packer.pack_array_header(n), np.uint8)
    key = np.frombuffer(packer.pack("totalenergy") + b"\xcb", np.uint8)
    atoms = np.empty((c, n), dtype=ATOM)
    atoms["head"], atoms["z"] = 0x94, z
    atoms["tx"] = atoms["ty"] = atoms["tz"] = 0xCB
    atoms["x"], atoms["y"], atoms["zc"] = xs[..., 0], xs[..., 1], xs[..., 2]
    width = len(prefix) + n * ATOM.itemsize + len(key) + 8
    rows = np.empty((c, width), dtype=np.uint8)
    a = len(prefix)
    rows[:, :a] = prefix
    rows[:, a:a + n * ATOM.itemsize] = atoms.view(np.uint8).reshape(c, -1)
    a += n * ATOM.itemsize
    rows[:, a:a + len(key)] = key
    rows[:, a + len(key):] = np.asarray(energies, dtype=">f8").view(np.uint8).reshape(c, 8)
    return packer.pack_array_header(c) + rows.tobytes()


def pack_object(args: tuple[int, list[str], int, int, float, float, int]) -> tuple[bytes, int, int, int]:
    """One msgpack object {SMILES: info} for a chunk of SMILES -> (bytes, molecules, conformers, skipped SMILES).
    Seeded by (seed, object index) alone, so the file is the same whatever the number of workers."""
    index, chunk, lo, hi, jitter, lift, seed = args
    rng = np.random.default_rng([seed, index])
    packer = msgpack.Packer()
    body, n_mols, n_confs, skipped = [], 0, 0, 0
    for smiles in chunk:
        s = structure(smiles)
        if s is None:
            skipped += 1
            continue
        z, x, charge = s
        x = x + np.stack([np.zeros(len(z)), np.zeros(len(z)), rng.normal(0.0, lift, len(z))], axis=1)
        c = int(rng.integers(lo, hi + 1))
        d = rng.normal(0.0, jitter, (c, len(z), 3))
        # A harmonic penalty on the displacement: the least-jittered copies are the "lowest-energy conformers".
        energies = -0.5 * float(z.astype(np.float64).sum()) + 0.5 * (d ** 2).sum(axis=(1, 2))
        info = {"synthetic": True, "synthetic_method": METHOD, "charge": charge, "totalconfs": c, "uniqueconfs": c}
        info_head = (packer.pack(smiles) + packer.pack_map_header(len(info) + 1)
                     + b"".join(packer.pack(k) + packer.pack(v) for k, v in info.items()) + packer.pack("conformers"))
        body.append(info_head + pack_conformers(packer, z, x[None] + d, energies))
        n_mols += 1
        n_confs += c
    return packer.pack_map_header(n_mols) + b"".join(body), n_mols, n_confs, skipped


def _chunks(smiles: list[str], per_object: int, lo: int, hi: int, jitter: float, lift: float, seed: int
            ) -> Iterator[tuple[int, list[str], int, int, float, float, int]]:
    for k, start in enumerate(range(0, len(smiles), per_object)):
        yield k, smiles[start:start + per_object], lo, hi, jitter, lift, seed


def make_geom_scale(smiles: list[str], out: Path, *, molecules_per_object: int = 1000, min_conformers: int = 10,
                    max_conformers: int = 40, jitter: float = 0.1, lift: float = 0.3, seed: int = 0,
                    workers: int = 1, max_bytes: Optional[int] = None) -> dict:
    """Write the synthetic msgpack ``out`` (atomically, streamed) from ``smiles`` in order; stop after the object
    that reaches ``max_bytes`` (a prefix of the list). The conformer count per molecule is uniform in
    ``min_conformers..max_conformers``: 10..40 keeps about 23 of 30 on average, GEOM-Drugs' ~7M for 304k SMILES."""
    if not 1 <= min_conformers <= max_conformers:
        raise ValueError(f"need 1 <= min_conformers <= max_conformers, got {min_conformers}, {max_conformers}")
    stats = {"objects": 0, "molecules": 0, "conformers": 0, "skipped_smiles": 0, "bytes": 0}
    t0 = time.perf_counter()
    jobs = _chunks(smiles, molecules_per_object, min_conformers, max_conformers, jitter, lift, seed)

    def write(fh: BinaryIO) -> None:
        ctx = mp.get_context("fork")
        pool = ctx.Pool(workers) if workers > 1 else None
        try:
            results = pool.imap(pack_object, jobs) if pool else map(pack_object, jobs)
            for data, n_mols, n_confs, skipped in results:
                fh.write(data)
                stats["objects"] += 1
                stats["molecules"] += n_mols
                stats["conformers"] += n_confs
                stats["skipped_smiles"] += skipped
                stats["bytes"] += len(data)
                if max_bytes is not None and stats["bytes"] >= max_bytes:
                    break
        finally:
            if pool:
                pool.terminate()
                pool.join()

    atomic_write_bytes(out, write)
    stats.update({"seconds": round(time.perf_counter() - t0, 1), "workers": workers, "synthetic": True,
                  "method": METHOD, "molecules_per_object": molecules_per_object,
                  "conformers_per_molecule": [min_conformers, max_conformers], "jitter_A": jitter, "seed": seed})
    return stats

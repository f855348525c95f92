"""The GEOM-Drugs-like generator: real GEOM SMILES -> RDKit conformers, flagged synthetic all the way through."""
from __future__ import annotations

import numpy as np

from symdiff.data.build import build
from symdiff.data.bundled import geom_sample_path
from symdiff.data.geom_like import make_geom_like
from symdiff.data.shards import read_split, verify


def test_geom_like_is_labelled_synthetic_and_builds(tmp_path, capsys):
    smiles = [str(s).replace("_", "/") for s in np.load(geom_sample_path())["mol_key"]]
    (tmp_path / "smiles.txt").write_text("\n".join(smiles) + "\n")
    stats = make_geom_like([tmp_path / "smiles.txt"], tmp_path / "gl.npz", n_molecules=3, conformers=3, seed=1)
    assert stats["molecules"] == 3 and stats["conformers"] == 9 and stats["failed_embeddings"] == 0
    z = np.load(tmp_path / "gl.npz")
    assert bool(z["synthetic"]) and "synthetic" in str(z["description"])
    assert set(z["mol_smiles"].tolist()) == set(smiles)
    # conformers are 3D structures with explicit H: every H sits 0.95-1.2 A from its nearest heavy atom
    x, at = z["positions"][: z["conf_offsets"][1]], z["atomic_numbers"][: z["conf_offsets"][1]]
    assert (at == 1).any() and np.isfinite(z["conf_energy"]).all()
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    xh = d[np.ix_(at > 1, at == 1)].min(axis=0)
    assert np.all((xh > 0.95) & (xh < 1.2))
    man = build("geom", tmp_path / "gl.npz", tmp_path / "out", conformers=2, split_smiles="none")
    assert man["synthetic"] is True
    assert sum(s["n_molecules"] for s in man["splits"].values()) == 6  # the 2 lowest MMFF energies of 3
    verify(tmp_path / "out")
    from symdiff.cli import main
    assert main(["data", "info", str(tmp_path / "out")]) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    kept = np.concatenate([read_split(tmp_path / "out", s).mol_ids for s in man["splits"]])
    assert len(set(kept.tolist())) == 6

"""Valency tables keyed by (element, formal charge): derivation and the shipped tables."""
from __future__ import annotations

import json

from symdiff.eval.valency import ValencyTable, derive_from_smiles, load_table, main


def test_derivation_counts_aromatic_and_kekule_forms():
    table, stats = derive_from_smiles(["c1ccccc1", "[NH4+]", "CC(=O)[O-]", "not a smiles"])
    assert stats["n_used"] == 3 and stats["n_unparsable"] == 1
    c, n, o = 6, 7, 8
    assert table.allowed[(c, 0)] == {(2, 1), (0, 4)}  # aromatic C-H, and the same atom in Kekulé form
    assert table.allowed[(n, 1)] == {(0, 4)}
    assert table.allowed[(o, -1)] == {(0, 1)} and table.allowed[(o, 0)] == {(0, 2)}
    # a truncated aromatic C (aromatic bonds read as single: valence 3) is not an allowed pattern
    assert not table.is_allowed(c, 0, 0, 3)
    assert (c, 1) not in table.allowed


def test_json_round_trip_and_min_count(tmp_path):
    smi = tmp_path / "s.txt"
    smi.write_text("CCO\nCC[O-]\nCCN\n")
    out = tmp_path / "t.json"
    assert main(["--smiles", str(smi), "--out", str(out), "--source", "three molecules"]) == 0
    data = json.loads(out.read_text())
    assert data["source"] == "three molecules" and data["n_used"] == 3
    t = ValencyTable.from_json(data)
    assert t.is_allowed(8, -1, 0, 1)
    # O- was seen in one molecule (counted in both forms = 2); a threshold above that drops it
    assert not ValencyTable.from_json(data, min_count=3).is_allowed(8, -1, 0, 1)


def test_shipped_tables_cover_the_common_states():
    geom = load_table("geom")
    for z, q, pattern in [(6, 0, (0, 4)), (6, 0, (2, 1)), (6, 0, (3, 0)), (7, 1, (0, 4)), (8, -1, (0, 1)),
                          (16, 0, (0, 6)), (15, 0, (0, 5)), (17, 0, (0, 1)), (35, 0, (0, 1)), (7, 0, (2, 1))]:
        assert geom.is_allowed(z, q, *pattern), (z, q, pattern)
    assert not geom.is_allowed(6, 0, 0, 3) and not geom.is_allowed(6, 0, 0, 5)
    assert geom.meta["n_used"] == 243480
    qm9 = load_table("qm9")
    assert qm9.is_allowed(7, 1, 0, 4) and not qm9.is_allowed(16, 0, 0, 2)  # no sulfur in QM9

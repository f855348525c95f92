"""bench_quality.py --merge: runs split over processes pool into one table, and only when they are one protocol."""
from __future__ import annotations

import json
import statistics

import pytest

from tests.scripts import load_script

bq = load_script("benchmarks/bench_quality.py")
PROTOCOL = {"benchmark": "bench_quality", "steps": 800, "overrides": ["train.ema_decay=0.99"], "nll_molecules": 500,
            "samples": 200, "sample_steps": 100, "data": "/data/qm9"}


def _run(kind: str, seed: int, atom: float) -> dict:
    return {"kind": kind, "seed": seed, "nll": 100.0 + seed, "atom_stability": atom, "mol_stability": 0.0,
            "validity": 0.1, "uniqueness": 0.9, "train_wall_s": 10.0, "loss_curve": [[10, 0.3], [20, 0.2]]}


def _part(tmp_path, name: str, runs: list[dict], **protocol) -> object:
    path = tmp_path / name
    path.write_text(json.dumps({**PROTOCOL, **protocol, "commit": "abc", "machine": {"cores": 2}, "runs": runs}))
    return path


def test_merge_pools_the_runs_of_every_file(tmp_path):
    a = _part(tmp_path, "a.json", [_run("dit", 0, 0.20), _run("dit", 1, 0.26)])
    b = _part(tmp_path, "b.json", [_run("egnn", 0, 0.15), _run("dit", 2, 0.23)])
    saved = {}
    bq.merge([a, b], "pooled", lambda res, *rest: saved.update(res), results=tmp_path)
    assert [(r["kind"], r["seed"]) for r in saved["runs"]] == [("dit", 0), ("dit", 1), ("egnn", 0), ("dit", 2)]
    dit = saved["summary"]["dit"]
    assert dit["atom_stability"]["n_seeds"] == 3
    assert dit["atom_stability"]["mean"] == pytest.approx(0.23)
    assert dit["atom_stability"]["std"] == pytest.approx(statistics.pstdev([0.20, 0.26, 0.23]))
    assert saved["summary"]["egnn"]["nll"]["mean"] == 100.0
    assert saved["seeds"] == [0, 1, 2] and saved["merged_from"] == ["a.json", "b.json"]
    assert (tmp_path / "pooled.png").is_file()


def test_merge_refuses_another_protocol(tmp_path):
    a = _part(tmp_path, "a.json", [_run("dit", 0, 0.2)])
    b = _part(tmp_path, "b.json", [_run("egnn", 0, 0.2)], steps=1000)
    with pytest.raises(SystemExit, match=r"b\.json: protocol differs from .*a\.json in steps"):
        bq.merge([a, b], "pooled", lambda *a: None, results=tmp_path)


def test_merge_refuses_a_run_counted_twice(tmp_path):
    a = _part(tmp_path, "a.json", [_run("dit", 0, 0.2)])
    b = _part(tmp_path, "b.json", [_run("dit", 0, 0.3)])
    with pytest.raises(SystemExit, match=r"b\.json: dit seed 0 is also in .*a\.json"):
        bq.merge([a, b], "pooled", lambda *a: None, results=tmp_path)

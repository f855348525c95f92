"""benchmarks/bench_steps.py measures the product: `symdiff train`, then `symdiff sample` and `symdiff eval` per cell.

A tiny run (the flow process and its Heun sampler, 2 training steps, 2 step counts, a few molecules) goes through
the benchmark's whole code path; its cells must hold the numbers that `symdiff eval` wrote and that the sampled
file gives when scored again here. A second call with the same run root redoes nothing. The goals and the priority
plan are checked on numbers given by hand.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import yaml

from scripts import load_script

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.xh_hidden_size=16",
              "model.num_gaussians=16", "model.gamma_hidden_size=16", "model.gamma_depth=1",
              "model.gamma_num_heads=2", "model.gamma_dec_hidden=16", "model.kernel_backend=torch",
              "data.batch_size=16"]


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_steps.py")


def argv(root: Path) -> list[str]:
    return ["--run-root", str(root / "runs"), "--out", str(root / "steps.json"), "--data-root", "bundled:qm9",
            "--processes", "flow", "--samplers", "heun", "--train-steps", "2", "--steps", "3,2", "--samples", "4",
            "--samples-reduced", "3", "--samples-reduced-long", "2", "--batch-size", "4", "--threads", "1",
            *TINY_MODEL]


@pytest.fixture(scope="module")
def tiny_run(bench, tmp_path_factory):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    root = tmp_path_factory.mktemp("bench_steps")
    assert bench.main(argv(root)) == 0
    return root, json.loads((root / "steps.json").read_text())


def test_training_is_symdiff_train_with_the_budget_asked(tiny_run) -> None:
    root, res = tiny_run
    tr = res["train"]["flow"]
    assert tr["command"][:2] == ["symdiff", "train"] and tr["max_steps"] == 2 and tr["steps_logged"] == 2
    recorded = yaml.safe_load((root / "runs" / "flow" / "config.yaml").read_text())  # what the trainer ran with
    assert recorded["diffusion"]["process"] == "flow" and recorded["train"]["max_steps"] == 2
    assert recorded["model"]["hidden_size"] == 32 and recorded["data"]["batch_size"] == tr["batch_size"] == 16
    assert tr["train_wall_s"] > 0 and len(tr["load_average_start"]) == 3
    assert (root / "runs" / "flow" / "checkpoints" / "step_00000002").is_dir()
    assert res["commit"] and res["machine"]["load_average_1_5_15min"]


def test_every_cell_holds_what_symdiff_eval_scored_on_the_sampled_file(tiny_run) -> None:
    from symdiff.eval.metrics import evaluate_edm_protocol
    from symdiff.io import read_molecules

    root, res = tiny_run
    got = {(c["sampler"], c["steps"]): c["n_samples"] for c in res["cells"]}
    # the top step count gets --samples-reduced-long, the others --samples-reduced (no cell here is a priority)
    assert got == {("heun", 3): 2, ("heun", 2): 3}
    for c in res["cells"]:
        assert c["sample_command"][:2] == ["symdiff", "sample"] and c["eval_command"][:2] == ["symdiff", "eval"]
        i = c["sample_command"].index("--steps")
        assert c["sample_command"][i:i + 4] == ["--steps", str(c["steps"]), "--sampler", c["sampler"]]
        written = json.loads(Path(c["eval_json"]).read_text())
        mols = read_molecules(c["samples_file"])
        assert len(mols) == c["n_samples"] == written["n_molecules"]
        again = evaluate_edm_protocol(mols, "qm9")
        for key in ("atom_stability", "mol_stability", "validity", "uniqueness"):
            assert c[key] == written[key] == again[key]
        assert c["s_per_molecule"] > 0 and c["sample_command_wall_s"] >= c["sample_s"]
        assert 0 <= c["atom_stability_se"] < 0.5  # bootstrap over molecules of the same file (checked equal above)
    assert "| flow | heun | 3 | 2 |" in (root / "steps.md").read_text()
    assert (root / "steps.png").stat().st_size > 1000


def test_a_second_call_redoes_nothing(bench, tiny_run, monkeypatch) -> None:
    root, res = tiny_run

    def no_run(*_a, **_k):
        raise AssertionError("a finished training or cell was run again")

    monkeypatch.setattr(bench, "run_cli", no_run)
    assert bench.main(argv(root)) == 0
    again = json.loads((root / "steps.json").read_text())
    assert again["cells"] == res["cells"] and again["train"] == res["train"]
    assert len(again["invocations"]) == 2


def test_a_json_of_another_budget_is_refused(bench, tiny_run) -> None:
    from symdiff.errors import UserError

    root, _ = tiny_run
    with pytest.raises(UserError, match="steps.json: made from another run root or training budget"):
        bench.main([*argv(root), "--train-steps", "5"])  # the last --train-steps wins


def _cell(p: str, s: str, k: int, atom: float) -> dict:
    return {"process": p, "sampler": s, "steps": k, "atom_stability": atom}


def test_goals_take_the_best_vdm_sampler_and_flow_heun_against_ancestral_1000(bench) -> None:
    res = {"steps_grid": [1000, 100], "cells": [
        _cell("vdm", "ancestral", 1000, 0.80), _cell("vdm", "ancestral", 100, 0.70),
        _cell("vdm", "ddim", 100, 0.795), _cell("vdm", "dpmpp2m", 100, 0.78), _cell("flow", "heun", 100, 0.79)]}
    g = bench.goals(res)
    assert g["vdm_100_steps"]["best_sampler"] == "ddim" and g["vdm_100_steps"]["points_lost"] == 0.5
    assert g["vdm_100_steps"]["met"] is True and "points_lost_se" not in g["vdm_100_steps"]
    res["cells"][0]["atom_stability_se"], res["cells"][2]["atom_stability_se"] = 0.003, 0.004
    assert bench.goals(res)["vdm_100_steps"]["points_lost_se"] == 0.5  # 100 * sqrt(0.003^2 + 0.004^2)
    assert g["flow_heun_100_steps"]["met"] is False
    res["cells"][-1]["atom_stability"] = 0.80
    assert bench.goals(res)["flow_heun_100_steps"]["met"] is True
    assert bench.goals({"steps_grid": [1000, 100], "cells": res["cells"][1:]}) == {}  # no reference: no verdict


def test_plan_puts_the_priority_cells_first_with_the_full_sample_count(bench) -> None:
    args = argparse.Namespace(samples=1000, samples_reduced=100, samples_reduced_long=50, samplers=None)
    cells = bench.plan(["vdm", "vpsde", "flow"], [1000, 250, 100, 50, 20], args)
    assert len(cells) == 7 * 5
    prio = [c for c in cells if c["priority"]]
    assert cells[:len(prio)] == prio and len(prio) == 8  # vdm ancestral 1000 and the seven 100-step cells
    assert {(c["process"], c["sampler"], c["steps"]) for c in prio if c["steps"] != 100} == {("vdm", "ancestral",
                                                                                               1000)}
    assert all(c["n_samples"] == 1000 for c in prio)
    assert {c["n_samples"] for c in cells if not c["priority"] and c["steps"] == 1000} == {50}
    assert {c["n_samples"] for c in cells if not c["priority"] and c["steps"] != 1000} == {100}

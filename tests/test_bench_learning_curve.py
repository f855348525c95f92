"""benchmarks/bench_model_learning_curve.py measures the product: `symdiff train`, then the saved EMA checkpoints.

A tiny run (4 steps, a checkpoint every 2) shows the overrides reach the trainer and every checkpoint is scored with
the sampler the JSON states; the keys the benchmark manages are refused as overrides, and unknown keys stop it
before any training.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from symdiff.errors import UserError

from scripts import load_script

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.xh_hidden_size=16",
              "model.num_gaussians=16", "model.gamma_hidden_size=16", "model.gamma_depth=1",
              "model.gamma_num_heads=2", "model.gamma_dec_hidden=16", "model.kernel_backend=torch"]


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_model_learning_curve.py")


def test_learning_curve_trains_with_symdiff_train_and_scores_every_checkpoint(bench, tmp_path: Path,
                                                                            monkeypatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR",
                                                              str(REPO / ".cache" / "torch_extensions")))
    run, out = tmp_path / "run", tmp_path / "lc.json"
    rc = bench.main(["--run-dir", str(run), "--out", str(out), "--threads", "1", "--eval-every", "2",
                     "--eval-samples", "3", "--eval-steps", "5", "--kind", "symdiff_haar",
                     "train.max_steps=4", "data.batch_size=16", "train.log_every=1", "sample.batch_size=2",
                     *TINY_MODEL])
    assert rc == 0
    recorded = yaml.safe_load((run / "config.yaml").read_text())  # what the trainer itself ran with
    assert recorded["data"]["batch_size"] == 16 and recorded["model"]["kind"] == "symdiff_haar"
    assert recorded["train"]["ckpt_every"] == 2 and recorded["train"]["keep_last"] == 0
    res = json.loads(out.read_text())
    assert res["command"][:2] == ["-m", "symdiff.cli"] and "train" in res["command"]
    assert [r["step"] for r in res["loss_curve"]] == [1, 2, 3, 4]  # the trainer's metrics.jsonl
    assert [e["step"] for e in res["evals"]] == [2, 4]
    for e in res["evals"]:
        assert e["sampler"] == "ancestral" and e["sampling_steps"] == 5 and e["n_samples"] == 3
        assert e["weights"] == "ema" and 0.0 <= e["atom_stability"] <= 1.0
    assert res["config"]["data"]["batch_size"] == 16 and res["kind"] == "symdiff_haar"


@pytest.mark.parametrize("argv, message", [
    (["--kind", "dit", "model.kind=dit"], "override 'model.kind': set by the benchmark (use --kind instead)"),
    (["--eval-every", "5", "train.ckpt_every=3"], "override 'train.ckpt_every': set by the benchmark"),
    (["train.keep_last=2"], "override 'train.keep_last': set by the benchmark"),
    (["data.batchsize=16"], "batchsize"),
])
def test_overrides_are_honoured_or_refused_before_training(bench, tmp_path: Path, argv, message) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        bench.main(["--run-dir", str(tmp_path / "run"), *argv])
    assert not (tmp_path / "run").exists()


def test_rescore_takes_only_sampling_overrides(bench, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="override 'train.lr=1' would not change the trained checkpoints"):
        bench.main(["--rescore", str(tmp_path), "train.lr=1"])

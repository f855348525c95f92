"""benchmarks/gpu_suite.py (tools/gpu_suite.sh): the GPU suite's whole code path at tiny sizes on CPU (--cpu-smoke),
so that it cannot rot between the rare GPU runs, and its pieces with known numbers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts import load_script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def suite():
    return load_script("benchmarks/gpu_suite.py")


def test_cpu_smoke_runs_every_section_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    # Boxes far above need: this checks the path, never the speed of a shared CI machine.
    boxes = [a for s in ("environment", "kernels", "training", "resume", "sampling") for a in ("--box", f"{s}=900")]
    res = subprocess.run(["bash", str(REPO / "tools" / "gpu_suite.sh"), "--cpu-smoke", "--out", str(out),
                          "--work", str(tmp_path / "work"), *boxes], env={**__import__("os").environ,
                                                                          "PYTHON": sys.executable},
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    (path,) = out.glob("gpu_suite_cpu_*_smoke.json")
    rep = json.loads(path.read_text())
    assert rep["device"] == "cpu" and rep["smoke"] is True and len(rep["date"]) == 10 and rep["commit"]
    for s in ("environment", "kernels", "training", "resume", "sampling"):
        assert rep[s]["status"] == "ok", (s, rep[s])
    env = rep["environment"]
    assert env["torch"] == torch.__version__ and env["ceilings"]["copy_GBps"] > 0 and env["deepspeed"]
    tests = rep["kernels"]["tests"]["bfloat16"]
    # bf16 results are findings, not gates: the two with a rotation compare with assert_close and pass; the two
    # without check the centring against a plain float32 threshold, which bf16 rounding cannot meet
    assert tests["tests"] == 4 and tests["passed"] == 2 and len(tests["failed_tests"]) == 2
    att = rep["kernels"]["attention"]["rows"]
    assert [a["shape"] for a in att] == ["qm9", "geom"]
    assert all(a["max_abs_diff"] < 1e-4 and a["padded_fwd_bwd_ms"] > 0 and a["varlen_fwd_bwd_ms"] > 0 for a in att)
    rows = rep["kernels"]["profile"]["rows"]
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"} and all(r["eager"]["median_ms"] > 0 for r in rows)
    cases = rep["training"]["cases"]
    assert [c["config"] for c in cases] == ["qm9_symdiff_l", "geom_symdiff_l"]
    for c in cases:
        assert c["steps_timed"] == 3 and c["it_per_s"] > 0 and c["tokens_per_s"] > c["molecules_per_s"] > 0
        assert c["flops_per_token"] > 0 and c["achieved_TFLOPs"] > 0 and c["mfu_vs_measured_matmul"] > 0
        assert c["peak_memory_gb"] > 0
    assert cases[1]["data_note"].startswith("GEOM-sized synthetic")
    r = rep["resume"]
    assert r["resumed_vs_uninterrupted"]["bitwise_equal"] and r["tolerance_rel"] == 0.0 and r["pass"]
    assert r["resumed_vs_uninterrupted"]["steps_compared"] == 2  # steps 3 and 4, after the stop at 2
    samplers = rep["sampling"]["samplers"]
    assert [(s["sampler"], s["steps"]) for s in samplers] == [("dpmpp2m", 3), ("ancestral", 5)]
    for s in samplers:
        assert s["s_per_molecule"] > 0 and s["eval"]["n_molecules"] == s["n"] > 0
    md = path.with_suffix(".md").read_text()
    assert "| training | it/s" in md and "resume (ZeRO-2, fp32)" in md and "pass" in md


def test_kernel_device_shim_runs_the_op_in_the_dtype_and_returns_grads_to_the_caller():
    sys.path.insert(0, str(REPO / "tests"))
    from kernel_device import on_device

    seen = []

    def op(x, w, n):
        seen.append((x.dtype, w.dtype, n.dtype))
        return (x * w).sum(-1) * n

    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    w = torch.tensor([0.5, 1.0 + 2 ** -10], dtype=torch.float64)  # float64 stays float64 (gradchecks)
    n = torch.tensor([1, 2])
    out = on_device(op, torch.device("cpu"), torch.bfloat16)(x, w, n)
    assert seen == [(torch.bfloat16, torch.float64, torch.int64)] and out.dtype == torch.float32
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g.dtype == torch.float32 and torch.equal(g, torch.tensor([[0.5, 1.0], [1.0, 2.0]]))


def test_throughput_counts_only_the_steps_after_the_warm_up(suite):
    # log every 2 steps; each row: the window's rates. Steps 3-6 took 2 s: 2 steps/s, 10 molecules a step
    rows = [{"step": s, "time": t, "it_per_s": 2.0 if s > 2 else 0.5, "molecules_per_s": 20.0 if s > 2 else 1.0,
             "tokens_per_s": 200.0, "memory_gb": m, "padding_fraction": 0.25, "loss": 1.0 / s}
            for s, t, m in ((2, 10.0, 1.0), (4, 11.0, 3.0), (6, 12.0, 2.0))]
    got = suite.throughput(rows, warmup=2)
    assert got["steps_timed"] == 4 and got["it_per_s"] == 2.0 and got["molecules_per_s"] == 20.0
    assert got["tokens_per_s"] == 200.0 and got["peak_memory_gb"] == 3.0 and got["final_loss"] == 1.0 / 6
    late = suite.throughput(rows, warmup=4)  # only steps 5-6: the warm-up's rows are not counted
    assert late["steps_timed"] == 2 and late["it_per_s"] == 2.0
    with pytest.raises(RuntimeError, match="too few logged steps"):
        suite.throughput(rows[:1], warmup=2)


def test_loss_comparison(suite):
    a = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.25}]
    b = [{"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.2}]
    got = suite.compare_losses(a, b)
    assert got["steps_compared"] == 2 and got["max_abs_diff"] == pytest.approx(0.05)
    assert got["max_rel_diff"] == pytest.approx(0.2) and got["bitwise_equal"] is False
    assert suite.compare_losses(a, a)["bitwise_equal"] is True


def test_geom_sized_data_follows_the_geom_size_histogram_and_builds(suite, tmp_path):
    from symdiff.models.symdiff import GEOM_N_HIST

    path = tmp_path / "g.npz"
    info = suite.write_geom_like(path, 3000, seed=1)
    z = np.load(path)
    n = np.diff(z["conf_offsets"])
    hist = np.array(list(GEOM_N_HIST.values()), dtype=float)
    mean = float((np.array(list(GEOM_N_HIST)) * hist).sum() / hist.sum())  # 46.6 atoms (SPEC §1.2)
    assert abs(n.mean() - mean) < 1.0 and set(n.tolist()) <= set(GEOM_N_HIST) and info["atoms_max"] == n.max()
    cdf = np.cumsum(hist) / hist.sum()
    for q in (0.1, 0.5, 0.9):  # the quantiles of the histogram, not just its mean
        assert abs(np.quantile(n, q) - list(GEOM_N_HIST)[int(np.searchsorted(cdf, q))]) <= 2
    assert len(z["atomic_numbers"]) == n.sum() == len(z["positions"]) and bool(z["synthetic"])
    bonds = np.linalg.norm(np.diff(z["positions"][: n[0]], axis=0), axis=1)
    assert np.allclose(bonds, 1.4, atol=1e-4)  # a random walk of 1.4 Angstrom steps
    from symdiff.data.build import build
    from symdiff.data.shards import read_manifest

    build("geom", path, tmp_path / "shards", shard_size=1000, conformers=1)
    man = read_manifest(tmp_path / "shards")
    assert sum(man["splits"][s]["n_molecules"] for s in man["splits"]) == 3000 and man["synthetic"]


def test_mfu_peak_names_and_a_failing_section_keeps_the_rest(suite, tmp_path):
    assert suite._peak_bf16("NVIDIA H100 PCIe") == 756.0 and suite._peak_bf16("NVIDIA H100 80GB HBM3") == 989.4
    assert suite._peak_bf16("NVIDIA H200") == 989.4 and suite._peak_bf16("Some GPU") is None
    ctx = suite.Ctx(plan=suite.smoke_plan(), work=tmp_path, out_dir=tmp_path, env={}, device="cpu")

    def broken(ctx, box):
        ctx.shared["partial_training"] = {"cases": [{"label": "kept"}]}
        raise ValueError("boom")

    def slow(ctx, box):
        raise suite.SectionTimeout("ran past")

    got = suite.run_section("training", broken, ctx)
    assert got["status"] == "error" and "boom" in got["error"] and got["cases"] == [{"label": "kept"}]
    assert suite.run_section("resume", slow, ctx)["status"] == "timed_out"
    assert suite.run_section("environment", lambda c, b: {"x": 1}, ctx)["status"] == "ok"

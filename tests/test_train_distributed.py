"""Real DeepSpeed, real processes, the real SymDiff model on the bundled real QM9 subset (tiny widths, fp32 CPU).

Every run is a `symdiff train` subprocess (gloo). References are uninterrupted runs of the same length; the
claims checked are the issue's: stop-and-resume is bitwise (ZeRO 1, 2, 3), SIGKILL at any moment (also inside
a checkpoint write) resumes from the newest complete checkpoint and ends bitwise equal, and a run continues on
another world size (2 -> 1, 1 -> 2) with the same global data order and loss trajectory within fp32 tolerance.
"""
from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "train_hooks"))
from symdiff_train_hooks import env as faults  # noqa: E402  (test-side fault injection for the subprocesses)

CONFIG = REPO / "configs" / "qm9_tiny.yaml"
TINY = ["model.hidden_size=32", "model.xh_hidden_size=16", "model.num_gaussians=16", "model.depth=1",
        "model.num_heads=2", "model.gamma_depth=1", "model.gamma_hidden_size=16", "model.gamma_dec_hidden=16",
        "model.gamma_num_heads=2", "data.batch_size=16", "train.log_every=1", "train.grad_shards=2",
        "train.ema_decay=0.9", "train.keep_last=10"]
STEPS = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from deepspeed.accelerator import get_accelerator

    from symdiff.data.bundled import ensure_bundled_shards

    # DeepSpeed JIT-builds a small shared-memory op at every process-group start (30-110 s cold, then cached in
    # TORCH_EXTENSIONS_DIR): build it once here rather than in two racing ranks of the first test.
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load(verbose=False)

    return ensure_bundled_shards(tmp_path_factory.mktemp("data") / "qm9_bundled")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "OMPI_", "PMI_"))}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def _cmd(run_dir: Path, shards: Path, nproc: int, *overrides: str, resume: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "symdiff.cli", "train", "--config", str(CONFIG), "--run-dir", str(run_dir)]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    if resume:
        cmd += ["--resume", resume]
    return cmd + [f"data.root={shards}", *TINY, *overrides]


def train(run_dir: Path, shards: Path, nproc: int, *overrides: str, env: dict[str, str] | None = None,
          expect: int = 0, resume: str | None = None) -> str:
    res = subprocess.run(_cmd(run_dir, shards, nproc, *overrides, resume=resume), env=_env(env),
                         capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == expect, f"exit {res.returncode} (expected {expect}):\n{out[-6000:]}"
    return out


def metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    by_step = {r["step"]: r for r in rows}
    assert len(by_step) == len(rows), "a step was logged twice (metrics not rewound on resume)"
    return by_step


def final_state(run_dir: Path, step: int = STEPS) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from symdiff.train import checkpoint as ckpt

    tag = run_dir / "checkpoints" / ckpt.tag_for(step)
    assert ckpt.verify(tag) is not None, f"{tag} is not a complete checkpoint"
    return ckpt.fp32_weights(tag), ckpt.read_state(tag)["ema"]


def assert_bitwise(run: Path, ref: Path) -> None:
    m, r = metrics(run), metrics(ref)
    assert sorted(m) == sorted(r) == list(range(1, STEPS + 1))
    for s in r:
        assert m[s]["loss"] == r[s]["loss"], f"step {s}: loss {m[s]['loss']!r} != {r[s]['loss']!r}"
        assert (m[s]["mol_id_sum"], m[s]["mol_id_sqsum"]) == (r[s]["mol_id_sum"], r[s]["mol_id_sqsum"])
    (w, e), (wr, er) = final_state(run), final_state(ref)
    assert w.keys() == wr.keys() and e.keys() == er.keys()
    for k in wr:
        assert torch.equal(w[k], wr[k]), f"parameter {k} differs"
    for k in er:
        assert torch.equal(e[k], er[k]), f"EMA {k} differs"


@pytest.fixture(scope="module")
def ref_zero2(tmp_path_factory, shards) -> Path:
    """Uninterrupted 2-process ZeRO-2 run: the reference of the kill and world-size tests."""
    run = tmp_path_factory.mktemp("ref") / "zero2"
    train(run, shards, 2, f"train.max_steps={STEPS}", "train.zero_stage=2", "train.ckpt_every=2")
    return run


def test_zero1_preempted_by_sigusr1_resumes_bitwise(tmp_path, shards):
    nan = faults(nan_loss=[6])  # a non-finite loss under ZeRO-1 is skipped the same way in both runs
    ref = tmp_path / "ref"
    train(ref, shards, 2, f"train.max_steps={STEPS}", "train.zero_stage=1", "train.ckpt_every=100", env=nan)
    run = tmp_path / "run"
    # The SLURM path: the signal reaches the launcher, every rank finishes its step, checkpoints and exits 75.
    proc = subprocess.Popen(_cmd(run, shards, 2, f"train.max_steps={STEPS}", "train.zero_stage=1",
                                 "train.ckpt_every=100"),
                            env=_env(faults(nan_loss=[6], step_sleep=0.3)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "metrics.jsonl").is_file():
        time.sleep(0.1)
    while time.time() < deadline and (run / "metrics.jsonl").read_text().count("\n") < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-4000:]
    stopped = max(metrics(run))
    assert 2 <= stopped < STEPS, f"stopped at step {stopped}"
    assert (run / "checkpoints" / f"step_{stopped:08d}" / "COMPLETE.json").is_file()
    out = train(run, shards, 2, f"train.max_steps={STEPS}", "train.zero_stage=1", "train.ckpt_every=100", env=nan)
    assert f"at step {stopped} " in out
    assert_bitwise(run, ref)
    assert [s for s, r in metrics(run).items() if r["skipped"]] == [6]


# Runs `train()` in a process of its own, with a signal sent to itself at step 2 when asked, and reports how many
# DeepSpeed engines were still alive when the process group was torn down.
_TEARDOWN_PROBE = """
import gc, json, os, signal, sys
import deepspeed, torch.distributed as dist
from symdiff.config import load_config
from symdiff.train import trainer
alive, destroy, loss = [], dist.destroy_process_group, trainer.compute_loss
def counting_destroy(*args, **kwargs):
    alive.append(sum(isinstance(o, deepspeed.DeepSpeedEngine) for o in gc.get_objects()))
    return destroy(*args, **kwargs)
def loss_then_signal(engine, micro, step):
    if step == 2 and sys.argv[3] == "preempt":
        os.kill(os.getpid(), signal.SIGUSR1)
    return loss(engine, micro, step)
dist.destroy_process_group, trainer.compute_loss = counting_destroy, loss_then_signal
code = trainer.train(load_config(sys.argv[1], sys.argv[4:]), sys.argv[2])
print("PROBE", json.dumps({"code": code, "engines_alive": alive}))
"""


@pytest.mark.parametrize("zero,how", [(1, "preempt"), (3, "finish")])
def test_engine_is_released_before_the_process_group_is_destroyed(tmp_path, shards, zero, how):
    # An engine alive at interpreter exit keeps its gloo subgroups alive into finalisation, where a rank aborted
    # with "terminate called without an active exception" (exit 134 where a preempted run must exit 75).
    res = subprocess.run([sys.executable, "-c", _TEARDOWN_PROBE, str(CONFIG), str(tmp_path / "run"), how,
                          f"data.root={shards}", *TINY, "train.max_steps=4", f"train.zero_stage={zero}"],
                         env=_env(), capture_output=True, text=True, timeout=600)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("PROBE ")]
    assert res.returncode == 0 and line, res.stdout[-3000:] + res.stderr[-3000:]
    probe = json.loads(line[0][len("PROBE "):])
    assert probe == {"code": 75 if how == "preempt" else 0, "engines_alive": [0]}


def test_zero3_stop_and_resume_bitwise(tmp_path, shards):
    # A NaN gradient at step 2 in every run: DeepSpeed's ZeRO-3 overflow check skips it, the count resumes.
    nan = faults(nan_grad=[2])
    ref = tmp_path / "ref"
    train(ref, shards, 2, f"train.max_steps={STEPS}", "train.zero_stage=3", "train.ckpt_every=100", env=nan)
    run = tmp_path / "run"
    train(run, shards, 2, "train.max_steps=3", "train.zero_stage=3", "train.ckpt_every=100", env=nan)
    out = train(run, shards, 2, f"train.max_steps={STEPS}", "train.zero_stage=3", "train.ckpt_every=100", env=nan)
    assert "at step 3 " in out
    assert_bitwise(run, ref)
    m = metrics(run)
    assert [s for s, r in m.items() if r["skipped"]] == [2] and m[STEPS]["nonfinite_total"] == 1


def test_sparse_logging_and_resume_from_a_checkpoint_written_while_a_batch_was_fetched_ahead(tmp_path, shards,
                                                                                             ref_zero2):
    """train.log_every=3: the statistics of the steps between logs are read on the host a step late, and every
    mid-run checkpoint is written while the next batch has already been fetched. The logged losses and the weights
    are the every-step run's to the bit, and a resume from step 4 (its loader state taken before the fetch ahead)
    continues the same trajectory."""
    from symdiff.train import checkpoint as ckpt

    run = tmp_path / "sparse"
    train(run, shards, 2, f"train.max_steps={STEPS}", "train.zero_stage=2", "train.ckpt_every=2", "train.log_every=3")
    m, r = metrics(run), metrics(ref_zero2)
    assert sorted(m) == [3, 6, 8]
    for s in m:
        assert (m[s]["loss"], m[s]["mol_id_sum"]) == (r[s]["loss"], r[s]["mol_id_sum"]), s
        assert m[s]["it_per_s"] > 0 and 0 < m[s]["padding_fraction"] < 1
    for step in (6, 8):
        shutil.rmtree(run / "checkpoints" / ckpt.tag_for(step))
    (run / "checkpoints" / "latest").write_text(ckpt.tag_for(4))
    out = train(run, shards, 2, f"train.max_steps={STEPS}", "train.zero_stage=2", "train.ckpt_every=2",
                "train.log_every=3")
    assert "at step 4 " in out
    (w, e), (wr, er) = final_state(run), final_state(ref_zero2)
    assert all(torch.equal(w[k], wr[k]) for k in wr) and all(torch.equal(e[k], er[k]) for k in er)
    assert metrics(run)[8]["loss"] == r[8]["loss"]


def _tmp_dirs(ckdir: Path) -> dict[str, int]:
    """Checkpoints being written: name -> inode (a re-created directory of the same name is a new write)."""
    out = {}
    for p in ckdir.glob(".tmp-step_*") if ckdir.is_dir() else []:
        try:
            out[p.name] = p.stat().st_ino
        except FileNotFoundError:
            pass
    return out


def test_sigkill_at_random_moments_resumes_from_last_complete_checkpoint(tmp_path, shards, ref_zero2):
    from symdiff.train import checkpoint as ckpt

    run = tmp_path / "run"
    ckdir = run / "checkpoints"
    rng = random.Random(20261125)
    args = [f"train.max_steps={STEPS}", "train.zero_stage=2", "train.ckpt_every=2"]
    # Slow steps and a pause inside every checkpoint write widen the windows the kills aim at.
    env = faults(step_sleep=0.2, save_sleep=1.0)
    expected: int | None = None  # step the next start must resume from (None: a fresh start)
    for attempt, kind in enumerate(["during_write", "random", "during_write", "finish"]):
        before = ckpt.complete_checkpoints(ckdir)
        stale = _tmp_dirs(ckdir)  # left by the previous kill; the new start removes them
        log = tmp_path / f"attempt{attempt}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(_cmd(run, shards, 2, *args), env=_env(env), stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            if kind == "finish":
                assert proc.wait(timeout=600) == 0, log.read_text()[-5000:]
            else:
                deadline = time.time() + 300
                killed_in_write = False
                while time.time() < deadline and proc.poll() is None:
                    writing = {k: v for k, v in _tmp_dirs(ckdir).items() if stale.get(k) != v}
                    done = ckpt.complete_checkpoints(ckdir)
                    if kind == "during_write" and writing and len(done) == len(before):
                        time.sleep(rng.uniform(0.0, 0.5))  # the write pauses 1 s before it is published
                        killed_in_write = any(_tmp_dirs(ckdir).get(k) == v for k, v in writing.items())
                        break
                    if kind == "random" and len(done) > len(before):
                        time.sleep(rng.uniform(0.0, 1.0))
                        break
                    time.sleep(0.02)
                assert proc.poll() is None, f"attempt {attempt}: the run ended before it could be killed"
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank, mid-flight
                proc.wait(timeout=60)
                if kind == "during_write":
                    assert killed_in_write, "the kill did not land inside a checkpoint write"
        text = log.read_text()
        found = re.search(r"resumed from \S+ at step (\d+)", text)
        if expected is None:
            assert found is None, text[-3000:]
        else:
            # never the half-written one: the newest checkpoint that was complete when the run was killed
            assert found and int(found.group(1)) == expected, text[-3000:]
        newest = ckpt.newest_complete(ckdir)
        expected = None if newest is None else int(newest.name.split("_")[1])
    assert not list(ckdir.glob(".tmp-*")), "a half-written checkpoint was left behind"
    assert_bitwise(run, ref_zero2)


def _assert_same_trajectory(run: Path, ref: Path, first: int = 1) -> None:
    m, r = metrics(run), metrics(ref)
    assert sorted(m) == list(range(first, STEPS + 1))
    for s in m:
        # the global data order is exactly the same, whatever the world size
        assert (m[s]["mol_id_sum"], m[s]["mol_id_sqsum"]) == (r[s]["mol_id_sum"], r[s]["mol_id_sqsum"]), s
        assert m[s]["loss"] == pytest.approx(r[s]["loss"], rel=1e-5, abs=1e-7), s
    (w, e), (wr, er) = final_state(run), final_state(ref)
    for k in wr:
        torch.testing.assert_close(w[k], wr[k], rtol=1e-5, atol=1e-6)
    for k in er:
        torch.testing.assert_close(e[k], er[k], rtol=1e-5, atol=1e-6)


def test_resume_on_another_world_size(tmp_path, shards, ref_zero2):
    args = [f"train.max_steps={STEPS}", "train.zero_stage=2", "train.ckpt_every=2"]
    # 2 -> 1: the 2-process checkpoint at step 4 (of another run directory: --resume PATH) is converted to
    # DeepSpeed's universal format, in this run's directory, and continued alone.
    one = tmp_path / "two_to_one"
    src = ref_zero2 / "checkpoints" / "step_00000004"
    out = train(one, shards, 1, *args, resume=str(src))
    assert "converting step_00000004 to DeepSpeed's universal format" in out
    assert (one / "checkpoints" / "universal" / "step_00000004" / "zero").is_dir()
    assert not (ref_zero2 / "checkpoints" / "universal").exists()
    _assert_same_trajectory(one, ref_zero2, first=5)
    # amsgrad's running maximum survived the conversion (DeepSpeed's converter alone drops it)
    assert list((one / "checkpoints" / "universal" / "step_00000004" / "zero").glob("*/max_exp_avg_sq.pt"))
    # 1 -> 2: start alone, continue on two processes (and ZeRO-1 -> ZeRO-2 on the way: the same maths).
    two = tmp_path / "one_to_two"
    train(two, shards, 1, "train.max_steps=4", "train.zero_stage=1", "train.ckpt_every=2")
    out = train(two, shards, 2, *args)
    assert "(1 -> 2 ranks, stage 1 -> 2)" in out
    _assert_same_trajectory(two, ref_zero2)


def test_mpirun_discovery_matches_the_local_launcher(tmp_path, shards, ref_zero2):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    run = tmp_path / "mpi"
    cmd = ["mpirun", "--allow-run-as-root", "-n", "2", "-x", "OMP_NUM_THREADS", "-x", "TORCH_EXTENSIONS_DIR",
           *_cmd(run, shards, 1, "train.max_steps=3", "train.zero_stage=2", "train.ckpt_every=2")]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    m, r = metrics(run), metrics(ref_zero2)
    assert [m[s]["loss"] for s in (1, 2, 3)] == [r[s]["loss"] for s in (1, 2, 3)]
    assert json.loads((run / "checkpoints" / "step_00000003" / "COMPLETE.json").read_text())["world_size"] == 2


def test_single_process_run_guards_logs_and_retention(tmp_path, shards):
    """`symdiff train` alone (ZeRO 0): non-finite steps are skipped (weights untouched), too many stop the run;
    the run directory has the resolved config, DeepSpeed JSON, metrics, TensorBoard, keep_last checkpoints."""
    from symdiff.train import checkpoint as ckpt

    run = tmp_path / "single"
    env = faults(nan_loss=[4], nan_grad=[6, 7, 8])
    # token-budget batches (size-sorted shards), 2 micro-batches accumulated in one process
    out = train(run, shards, 1, "train.max_steps=12", "train.zero_stage=0", "train.ckpt_every=1",
                "train.max_nonfinite_in_a_row=2", "train.keep_last=5", "data.max_atoms_per_batch=300",
                "train.eval_every=3", "train.eval_samples=40", "sample.batch_size=16", env=env, expect=3)
    assert "3 steps in a row had a non-finite loss or gradient" in out
    m = metrics(run)
    assert [s for s, r in m.items() if r["skipped"]] == [4, 6, 7, 8]
    assert m[8]["nonfinite_total"] == 4 and max(m) == 8
    # the stopping step is not checkpointed; keep_last=5 of steps 1..7
    assert [s for s, _ in ckpt.complete_checkpoints(run / "checkpoints")] == [3, 4, 5, 6, 7]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000007"
    tag = lambda s: run / "checkpoints" / ckpt.tag_for(s)  # noqa: E731
    for a, b, same in ((3, 4, True), (4, 5, False), (5, 6, True), (6, 7, True)):
        wa, wb = ckpt.fp32_weights(tag(a)), ckpt.fp32_weights(tag(b))
        ea, eb = ckpt.read_state(tag(a))["ema"], ckpt.read_state(tag(b))["ema"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa) is same, (a, b)  # a skipped step changes nothing
        assert all(torch.equal(ea[k], eb[k]) for k in ea) is same, (a, b)

    # periodic validation NLL with the EMA weights (steps 3 and 6 are multiples of eval_every; 6 was skipped)
    evals = [json.loads(ln) for ln in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [3] and evals[0]["val_molecules"] == 40
    from symdiff.config import from_dict
    from symdiff.train.trainer import validation_nll

    st = ckpt.read_state(tag(3))  # the EMA at step 3 gives the logged value again, to the bit
    again = validation_nll(from_dict(st["config"]), st["ema"], st["buffers"], 3, torch.device("cpu"))
    assert again == {"val_nll": evals[0]["val_nll"], "val_molecules": 40}
    assert "max_steps: 12" in (run / "config.yaml").read_text()
    ds = json.loads((run / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 0 and ds["optimizer"]["params"]["amsgrad"] is True
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    rec = m[5]
    for key in ("loss", "grad_norm", "lr", "it_per_s", "molecules_per_s", "tokens_per_s", "padding_fraction",
                "memory_gb"):
        assert isinstance(rec[key], float), key
    assert 0 < rec["grad_norm"] and 0 <= rec["padding_fraction"] < 1 and rec["lr"] == 5e-4
    # one step per logged window: real atoms of the global batch = tokens/s / it/s, within the token budget
    assert 100 < rec["tokens_per_s"] / rec["it_per_s"] <= 300 + 1e-6

    # The same run directory with another architecture: refused by name, nothing written or removed (but the lock
    # file, which records each start that held the directory).
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "train.lock"}
    out = train(run, shards, 1, "train.max_steps=12", "train.zero_stage=0", "data.max_atoms_per_batch=300",
                "model.hidden_size=48", expect=1)
    assert "config model.hidden_size: checkpoint 32 vs now 48" in out and "nothing was changed" in out
    assert re.search(r"parameter \S+: checkpoint shape \(\d+, 32\) vs model shape \(\d+, 48\)", out), out[-3000:]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "train.lock"} == before


def test_checkpoint_integrity_mismatch_and_export(tmp_path, ref_zero2):
    """Checksums pick the newest intact checkpoint; a mismatching config is refused by name; exports load."""
    from symdiff.config import load_config
    from symdiff.errors import CheckpointError
    from symdiff.models import build_model
    from symdiff.train import checkpoint as ckpt

    run = tmp_path / "copy"
    shutil.copytree(ref_zero2, run)
    ckdir = run / "checkpoints"
    assert ckpt.newest_complete(ckdir).name == "step_00000008"
    # our fp32 reassembly of ZeRO-1/2 shards (needed for bf16 files) equals DeepSpeed's zero_to_fp32
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    theirs = get_fp32_state_dict_from_zero_checkpoint(str(ckdir), tag="step_00000008")
    ours = ckpt.fp32_weights(ckdir / "step_00000008")
    assert {f"model.{k}" for k in ours} == set(theirs)
    assert all(torch.equal(ours[k], theirs[f"model.{k}"]) for k in ours)
    victim = ckdir / "step_00000008" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    victim.write_bytes(bytes(data))
    assert ckpt.verify(ckdir / "step_00000008") is None
    assert ckpt.newest_complete(ckdir).name == "step_00000006"
    (ckdir / "step_00000006" / "COMPLETE.json").unlink()
    assert ckpt.find_resume(run, "auto").name == "step_00000004"
    with pytest.raises(CheckpointError, match="--resume never"):
        ckpt.find_resume(run, "never")

    tag = ckdir / "step_00000004"
    # which resumes need DeepSpeed's universal format, and which DeepSpeed cannot do at all
    assert ckpt.plan_resume(tag, 2, 2, ckdir).universal is False
    assert ckpt.plan_resume(tag, 2, 1, ckdir).universal is False  # ZeRO 1 and 2 share a layout
    assert ckpt.plan_resume(tag, 1, 2, ckdir).universal is True
    for stage in (0, 3):
        with pytest.raises(CheckpointError, match=f"saved with ZeRO stage 2, now train.zero_stage={stage}"):
            ckpt.plan_resume(tag, 2, stage, ckdir)
    state = ckpt.read_state(tag)
    cfg = load_config(CONFIG, [f"data.root={run}", *TINY, "model.hidden_size=48"])
    model = build_model(cfg)
    shapes = {k: tuple(p.shape) for k, p in model.named_parameters()}
    with pytest.raises(CheckpointError) as err:
        ckpt.check_compatible(state, cfg, shapes, tag)
    msg = str(err.value)
    assert "config model.hidden_size: checkpoint 32 vs now 48" in msg
    assert re.search(r"parameter \S+: checkpoint shape \(\d+, 32\) vs model shape \(\d+, 48\)", msg), msg
    # implementation switches are not mismatches, nor is a checkpoint from before model.linear_backend existed
    cfg = load_config(CONFIG, [f"data.root={run}", *TINY, "model.linear_backend=aten", "model.kernel_backend=torch"])
    shapes = {k: tuple(p.shape) for k, p in build_model(cfg).named_parameters()}
    old_state = copy.deepcopy(state)
    old_state["config"]["model"].pop("linear_backend", None)
    for st in (state, old_state):
        ckpt.check_compatible(st, cfg, shapes, tag)

    # Export (tools/convert_checkpoint.py) and load_for_inference agree with the checkpoint, EMA by default.
    out = tmp_path / "export.pt"
    res = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), str(ref_zero2), str(out)],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    weights, ema = final_state(ref_zero2)
    for src in (ref_zero2, out):
        _, m_ema = ckpt.load_for_inference(src)
        _, m_raw = ckpt.load_for_inference(src, use_ema=False)
        for k, p in m_ema.named_parameters():
            assert torch.equal(p.detach(), ema[k]), (src, k)
            assert torch.equal(dict(m_raw.named_parameters())[k].detach(), weights[k]), (src, k)
        assert not m_ema.training
        assert float(m_ema.n_atoms_hist.sum()) == 6000.0  # p(N) of the training split travelled along


def test_bf16_code_path_on_cpu(tmp_path, shards):
    """The GPU default (bf16) run on CPU: fp32 master weights (stage 0 runs as ZeRO-1), DeepSpeed's bf16 overflow
    check skips a NaN gradient, and the EMA and the export stay fp32."""
    from symdiff.train import checkpoint as ckpt

    run = tmp_path / "bf16"
    train(run, shards, 1, "train.max_steps=3", "train.zero_stage=0", "train.precision=bf16", "train.ckpt_every=1",
          env=faults(nan_grad=[2]))
    m = metrics(run)
    assert [s for s, r in m.items() if r["skipped"]] == [2]
    meta = json.loads((run / "checkpoints" / "step_00000003" / "COMPLETE.json").read_text())
    assert meta["bf16"] is True and meta["zero_stage"] == 1
    w1, w2, w3 = (ckpt.fp32_weights(run / "checkpoints" / ckpt.tag_for(s)) for s in (1, 2, 3))
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and not all(torch.equal(w2[k], w3[k]) for k in w2)
    ema = ckpt.read_state(run / "checkpoints" / "step_00000003")["ema"]
    assert all(v.dtype == torch.float32 for v in ema.values())
    # the fp32 master weights are not bf16-rounded copies: some value is not representable in bf16
    assert any(not torch.equal(v, v.bfloat16().float()) for v in w3.values())


def test_bad_input_under_nproc_is_one_line_not_one_per_rank(tmp_path):
    # Every rank finds the same missing dataset; the user reads it once, without "rank N exited" noise.
    missing = tmp_path / "nowhere"
    out = train(tmp_path / "run", missing, 2, "train.max_steps=2", expect=1)
    errors = [ln for ln in out.splitlines() if "error:" in ln]
    assert errors == [f"symdiff train: error: {missing}/manifest.json: no manifest (is {missing} a dataset built "
                      "by `symdiff data build`?)"], out[-3000:]
    assert "exited with code" not in out and "Traceback" not in out, out[-3000:]

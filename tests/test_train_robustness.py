"""`symdiff train` under faults and bad input: real runs (tiny SymDiff, bundled QM9, gloo, CPU) in subprocesses.

One training per run directory (a second is refused naming the holder; a SIGKILLed holder leaves no stale lock),
ranks die with their `--nproc` launcher, Ctrl-C checkpoints, a resume applies new optimizer settings, a corrupt
checkpoint is replaced when the run reaches its step again, a failed checkpoint write (full disk) is one line and
leaves the previous checkpoint intact, and bad input (run dir, resume path, dataset, shards) is one line, exit 1.
Faults are injected from the test side (tests/train_hooks); production code has no test switches.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_train_distributed import CONFIG, TINY, _cmd, _env, faults, metrics, shards, train  # noqa: F401

from symdiff.train import checkpoint as ckpt

def _start(run: Path, shards: Path, nproc: int, *overrides: str, env: dict[str, str] | None = None,
           log: Path) -> subprocess.Popen:
    """A training in the background, in its own session (a terminal's process group), SIGINT at its default."""
    fh = open(log, "w")
    return subprocess.Popen(_cmd(run, shards, nproc, *overrides), env=_env(env), stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_steps(run: Path, proc: subprocess.Popen, n: int, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not log {n} steps (exit {proc.poll()}):\n{log.read_text()[-4000:]}")


def _running(tmp_path: Path, shards: Path) -> tuple[Path, Path, subprocess.Popen]:
    """A long 2-process training with slow steps, in the background, once it has logged two steps."""
    run, log = tmp_path / "run", tmp_path / "run.log"
    proc = _start(run, shards, 2, "train.max_steps=500", "train.ckpt_every=1000", env=faults(step_sleep=0.3),
                  log=log)
    try:
        _wait_for_steps(run, proc, 2, log)
    except BaseException:
        _kill_group(proc)
        raise
    return run, log, proc


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(x) for x in (task / "children").read_text().split()]
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def _one_error_line(out: str) -> str:
    assert "Traceback" not in out, out[-4000:]
    lines = [ln for ln in out.splitlines() if ln.startswith("symdiff train: error:")]
    assert lines, out[-4000:]
    return lines[0]


# ----------------------------------------------------------------------------------------------- run dir, launcher


def test_one_training_per_run_dir_and_ranks_die_with_their_launcher(tmp_path, shards):
    run, _log, first = _running(tmp_path, shards)
    try:
        ranks = _children(first.pid)
        assert len(ranks) == 2, ranks
        holder = json.loads((run / "train.lock").read_text())
        assert holder["pid"] in ranks  # rank 0 holds it for the run

        # A second training into the same run directory is refused, naming the holder; it changes nothing.
        written = {f: (run / f).stat().st_mtime_ns for f in ("config.yaml", "deepspeed_config.json")}
        out = train(run, shards, 1, "train.max_steps=500", expect=1)
        line = _one_error_line(out)
        assert "another training is running in this run directory" in line
        assert f"pid {holder['pid']}," in line and f"host {holder['host']}" in line and holder["started"] in line
        assert json.loads((run / "train.lock").read_text()) == holder
        assert {f: (run / f).stat().st_mtime_ns for f in written} == written
        assert not (run / "checkpoints").exists()

        # SIGKILL of the launcher alone: its ranks die with it instead of training on as orphans.
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
        deadline = time.time() + 60
        while time.time() < deadline and any(_alive(p) for p in ranks):
            time.sleep(0.1)
        assert not any(_alive(p) for p in ranks), "ranks outlived their launcher"
    finally:
        _kill_group(first)

    # The killed run's lock is not stale: the next start takes it and trains.
    out = train(run, shards, 1, "train.max_steps=2", "train.ckpt_every=1")
    assert "taking over the lock of a run that is gone" in out
    assert max(metrics(run)) == 2 and (run / "checkpoints" / "latest").read_text() == "step_00000002"


def test_ctrl_c_checkpoints_and_exits_with_the_requeue_code(tmp_path, shards):
    run, log, proc = _running(tmp_path, shards)
    try:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the launcher and every rank get it
        assert proc.wait(timeout=300) == 75, log.read_text()[-4000:]
    finally:
        _kill_group(proc)
    out = log.read_text()
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-4000:]
    stopped = max(metrics(run))
    assert f"SIGINT received: checkpointed at step {stopped}" in out
    assert ckpt.verify(run / "checkpoints" / ckpt.tag_for(stopped)) is not None


# ----------------------------------------------------------------------------------------------- resume


def _update(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(b[k] - a[k]).flatten() for k in sorted(a)])


def test_resume_applies_new_optimizer_and_schedule_settings(tmp_path, shards):
    """train.lr / train.warmup_steps changed on resume are used from the next step (and logged); the update of
    the step after the resume is the reference step's, scaled by the ratio of the learning rates."""
    base = tmp_path / "base"
    train(base, shards, 1, "train.max_steps=3", "train.ckpt_every=1", "train.zero_stage=0")
    runs = {name: tmp_path / name for name in ("same", "lr", "warmup")}
    for r in runs.values():
        shutil.copytree(base, r)
    train(runs["same"], shards, 1, "train.max_steps=4", "train.ckpt_every=1", "train.zero_stage=0")
    out_lr = train(runs["lr"], shards, 1, "train.max_steps=4", "train.ckpt_every=1", "train.zero_stage=0",
                   "train.lr=1e-4")
    # warmup added on resume: DeepSpeed's WarmupLR from 3 applied steps, 10 warmup steps -> 2/10 of 5e-4 at step 4
    out_wu = train(runs["warmup"], shards, 1, "train.max_steps=4", "train.ckpt_every=1", "train.zero_stage=0",
                   "train.warmup_steps=10")
    assert "train.lr 0.0005 -> 0.0001" in out_lr
    assert "train.warmup_steps 0 -> 10" in out_wu
    assert metrics(runs["same"])[4]["lr"] == 5e-4
    assert metrics(runs["lr"])[4]["lr"] == 1e-4
    assert metrics(runs["warmup"])[4]["lr"] == pytest.approx(5e-4 * 3 / 10)  # the lr after step 4 (iteration 3)
    assert "lr: 0.0001" in (runs["lr"] / "config.yaml").read_text()

    w3 = ckpt.fp32_weights(base / "checkpoints" / ckpt.tag_for(3))
    ref = _update(w3, ckpt.fp32_weights(runs["same"] / "checkpoints" / ckpt.tag_for(4)))
    big = ref.abs() > 1e-6
    assert int(big.sum()) > 1000
    for name in ("lr", "warmup"):  # both used lr 1e-4 for step 4: 1/5 of the reference's step
        upd = _update(w3, ckpt.fp32_weights(runs[name] / "checkpoints" / ckpt.tag_for(4)))
        ratio = (upd[big] / ref[big]).median()
        assert float(ratio) == pytest.approx(0.2, rel=1e-3), name


def test_resume_applies_a_new_clipping_norm_under_zero1(tmp_path, shards):
    """DeepSpeed's ZeRO-1/2 optimizer restores its clipping norm from the checkpoint; the new one must win."""
    base = tmp_path / "base"
    train(base, shards, 1, "train.max_steps=2", "train.zero_stage=1")
    same, clipped = tmp_path / "same", tmp_path / "clipped"
    shutil.copytree(base, same)
    shutil.copytree(base, clipped)
    train(same, shards, 1, "train.max_steps=3", "train.zero_stage=1")
    out = train(clipped, shards, 1, "train.max_steps=3", "train.zero_stage=1", "train.clip_grad_norm=1e-6")
    assert "train.clip_grad_norm 2.0 -> 1e-06" in out
    w2 = ckpt.fp32_weights(base / "checkpoints" / ckpt.tag_for(2))
    ref = _update(w2, ckpt.fp32_weights(same / "checkpoints" / ckpt.tag_for(3)))
    upd = _update(w2, ckpt.fp32_weights(clipped / "checkpoints" / ckpt.tag_for(3)))
    # Adam's moments mix the clipped gradient (norm 1e-6) with the earlier, unclipped ones: a much smaller step.
    assert float(upd.norm()) < 0.9 * float(ref.norm())


def test_amsgrad_change_on_resume_is_refused(tmp_path, shards):
    """amsgrad changes what the optimizer state holds: refused by name, while lr and the like are applied."""
    from symdiff.config import load_config, to_dict
    from symdiff.errors import CheckpointError
    from symdiff.models import build_model

    cfg = load_config(CONFIG, [f"data.root={shards}", *TINY])
    shapes = {k: tuple(p.shape) for k, p in build_model(cfg).named_parameters()}
    state = {"config": to_dict(cfg), "param_shapes": shapes}
    ckpt.check_compatible(state, cfg, shapes, tmp_path)
    changed = load_config(CONFIG, [f"data.root={shards}", *TINY, "train.amsgrad=false", "train.lr=1e-3"])
    with pytest.raises(CheckpointError, match=r"config train\.amsgrad: checkpoint True vs now False") as err:
        ckpt.check_compatible(state, changed, shapes, tmp_path)
    assert "train.lr" not in str(err.value)  # applied, not refused


def test_corrupt_checkpoint_is_replaced_when_the_run_reaches_its_step_again(tmp_path, shards):
    run = tmp_path / "run"
    args = ["train.max_steps=4", "train.ckpt_every=2", "train.zero_stage=0"]
    train(run, shards, 1, *args)
    ckdir = run / "checkpoints"
    victim = ckdir / "step_00000004" / "mp_rank_00_model_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert ckpt.verify(ckdir / "step_00000004") is None
    out = train(run, shards, 1, *args)
    assert "resumed from" in out and "at step 2 " in out
    assert ckpt.verify(ckdir / "step_00000004") is not None  # rewritten, not kept
    assert (ckdir / "latest").read_text() == "step_00000004"
    assert not list(ckdir.glob(".tmp-*"))


# ----------------------------------------------------------------------------------------------- full disk


def _assert_failed_write(out: str, run: Path) -> None:
    line = _one_error_line(out)
    assert f"{run / 'checkpoints' / 'step_00000002'}: cannot write the checkpoint (" in line, line
    assert "MiB free there" in line and "the previous checkpoint step_00000001 is intact" in line, line
    ckdir = run / "checkpoints"
    assert not list(ckdir.glob(".tmp-*")), "the partial checkpoint was left behind"
    assert [s for s, _ in ckpt.complete_checkpoints(ckdir)] == [1]
    assert ckpt.verify(ckdir / "step_00000001") is not None
    assert (ckdir / "latest").read_text() == "step_00000001"


@pytest.mark.parametrize("error", ["enforce", "enospc"])
def test_failed_checkpoint_write_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, shards, error):
    run = tmp_path / "run"
    out = train(run, shards, 1, "train.max_steps=3", "train.ckpt_every=1",
                env=faults(save_fail={"step": 2, "error": error}), expect=1)
    _assert_failed_write(out, run)
    assert ("unexpected pos" in out) if error == "enforce" else ("No space left on device" in out)


def test_full_disk_during_a_checkpoint(tmp_path, shards):
    """A real full file system (a tmpfs with room for one checkpoint), where the test may mount one (root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(disk)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()[:200]})")
    try:
        run = disk / "run"
        out = train(run, shards, 1, "train.max_steps=3", "train.ckpt_every=1", "train.zero_stage=0", expect=1)
        _assert_failed_write(out, run)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# ----------------------------------------------------------------------------------------------- bad input


def test_run_dir_that_is_a_file_is_one_line(tmp_path, shards):
    f = tmp_path / "taken"
    f.write_text("not a run\n")
    out = train(f, shards, 1, expect=1)
    assert _one_error_line(out) == f"symdiff train: error: --run-dir {f}: {f} is a file, not a directory"
    assert f.read_text() == "not a run\n"
    out = train(f / "sub", shards, 1, expect=1)
    assert f"{f} is a file, not a directory" in _one_error_line(out)


def test_resume_from_a_directory_that_is_not_a_checkpoint_exits_1_on_every_rank(tmp_path, shards):
    out = train(tmp_path / "run", shards, 2, resume=str(shards), expect=1)
    assert f"{shards}: not a checkpoint or a run directory with complete checkpoints" in _one_error_line(out)


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_max_steps_below_one_is_refused(tmp_path, shards, steps):
    out = train(tmp_path / "run", shards, 1, f"train.max_steps={steps}", expect=1)
    assert "train.max_steps" in _one_error_line(out)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_config_dataset_must_match_the_shards(tmp_path, shards):
    out = train(tmp_path / "run", shards, 1, "data.dataset=geom", "train.max_steps=1", expect=1)
    line = _one_error_line(out)
    assert f"{shards / 'manifest.json'}: the shards are dataset 'qm9' but data.dataset=geom" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_shards_are_verified_at_start_with_an_opt_out(tmp_path, shards):
    bad = tmp_path / "shards"
    shutil.copytree(shards, bad)
    man = json.loads((bad / "manifest.json").read_text())
    victim = bad / man["splits"]["train"]["shards"][1]["path"]
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF  # same size, one byte: only the checksum sees it
    victim.write_bytes(bytes(data))
    out = train(tmp_path / "run", bad, 1, "train.max_steps=1", expect=1)
    assert f"{victim}: checksum differs from the manifest" in _one_error_line(out)

    from symdiff.errors import DataError
    from symdiff.train.datacheck import verify_shards

    assert verify_shards(man, bad, ["train"], "size") == 3  # the lengths still match: data.verify=size passes
    assert verify_shards(man, bad, ["train"], "off") == 0
    with pytest.raises(DataError, match="checksum differs"):
        verify_shards(man, bad, ["train"], "full")
    short = json.loads(json.dumps(man))
    short["splits"]["train"]["shards"][0]["n_molecules"] += 1  # the manifest and the file disagree on length
    with pytest.raises(DataError, match=r"holds 2000 molecules / \d+ atoms .* the manifest says 2001"):
        verify_shards(short, bad, ["train"], "size")
    assert "rebuild" in str(pytest.raises(DataError, verify_shards, short, bad, ["train"], "size").value)

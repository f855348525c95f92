"""`symdiff submit --dry-run` rendering and the shell helpers' requeue decision (no SLURM daemons needed)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from symdiff.cluster.render import JOBS, SLURM_DIR, SubmitOptions, render, time_to_seconds
from symdiff.config import load_config
from symdiff.errors import UserError
from symdiff.train.launch import EXIT_REQUEUE

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def cfg_file(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text("name: tiny\ndata:\n  root: shards/qm9\n")
    return p


def _submit(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "symdiff.cli", "submit", *argv], cwd=cwd, capture_output=True,
                          text=True)


def _sbatch_lines(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")]


def test_dry_run_renders_options_and_writes_nothing(cfg_file: Path, tmp_path: Path) -> None:
    res = _submit("--config", str(cfg_file), "--nodes", "4", "--gpus-per-node", "8", "--time", "1-02:00:00",
                  "--partition", "h100", "--account", "chem42", "--signal-seconds", "600", "--exclusive",
                  "--run-dir", "runs/geom", "--dry-run", "train.lr=1e-3", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    script = res.stdout
    opts = _sbatch_lines(script)
    run_dir = (tmp_path / "runs" / "geom").resolve()
    assert opts == [
        "--job-name=symdiff-train-tiny", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
        "--cpus-per-task=8", "--time=1-02:00:00", "--partition=h100", "--account=chem42", "--exclusive",
        "--signal=USR1@600", "--requeue", "--open-mode=append", f"--output={run_dir}/slurm/%x-%j.out",
        f"--chdir={tmp_path.resolve()}"]
    assert f"export SYMDIFF_PREEMPT_EXIT={EXIT_REQUEUE}" in script
    assert f"--run-dir {run_dir}" in script
    # sbatch stops reading #SBATCH at the first command: every directive must come before it.
    lines = script.splitlines()
    first_cmd = next(i for i, line in enumerate(lines[1:], 1) if line.strip() and not line.startswith("#"))
    assert max(i for i, line in enumerate(lines) if line.startswith("#SBATCH")) < first_cmd
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert not (tmp_path / "runs").exists()


def test_frozen_config_carries_overrides(cfg_file: Path, tmp_path: Path) -> None:
    cfg = load_config(cfg_file, ["train.lr=0.001", "train.max_steps=7"])
    r = render(SubmitOptions(job="train", gpus_per_node=0, tasks_per_node=2, cpus_per_task=1), cfg,
               tmp_path / "run")
    assert r.config_path is not None and r.config_text is not None
    assert r.config_path.parent == (tmp_path / "run" / "slurm").resolve()
    frozen = tmp_path / "frozen.yaml"
    frozen.write_text(r.config_text)
    again = load_config(frozen)
    assert again.train.lr == 0.001 and again.train.max_steps == 7
    # The frozen copy lives in run/slurm/: it records the root resolved against the submitted file's directory.
    assert again.data.root == str(tmp_path / "shards" / "qm9")
    # CPU job: no GPU request at all (a --gpus-per-node=0 line would need GRES on the cluster)
    assert not any(o.startswith("--gpus") for o in _sbatch_lines(r.script))
    # other settings, other file: a queued job's config is never rewritten by a later submission
    r2 = render(SubmitOptions(job="train"), load_config(cfg_file, ["train.lr=0.002"]), tmp_path / "run")
    assert r2.config_path != r.config_path


@pytest.mark.parametrize("argv, message", [
    (["--time", "25h"], "HH:MM:SS"),
    (["--time", "01:75:00"], "below 60"),
    (["--partition", "gpu; rm -rf /"], "only letters"),
    (["--time", "00:04:00", "--signal-seconds", "300"], "signal-seconds"),
    (["--nodes", "0"], "--nodes must be >= 1"),
    (["--tasks-per-node", "0"], "--tasks-per-node must be >= 1"),
    (["--cpus-per-task", "0"], "--cpus-per-task must be >= 1"),
    (["--job", "sample", "--nodes", "2"], "one task on one node"),
    (["--sbatch-arg", "constraint=h100"], "one long option"),
    (["--env-file", str(REPO / "secrets.env")], "outside the repository"),
])
def test_bad_options_are_user_errors(cfg_file: Path, tmp_path: Path, argv: list[str], message: str) -> None:
    res = _submit("--config", str(cfg_file), "--dry-run", *argv, cwd=tmp_path)
    assert res.returncode == 1
    assert message in res.stderr and res.stdout == ""


def test_bad_config_key_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata:\n  root: r\ntrain:\n  lr_typo: 1\n")
    res = _submit("--config", str(bad), "--dry-run", cwd=tmp_path)
    assert res.returncode == 1 and "lr_typo" in res.stderr and str(bad) in res.stderr


def test_every_job_kind_renders(cfg_file: Path, tmp_path: Path) -> None:
    cfg = load_config(cfg_file)
    for job in JOBS:
        r = render(SubmitOptions(job=job, args=["--x"] if job in ("data", "profile") else []),
                   cfg if job in ("train", "sample") else None, tmp_path / "run")
        assert subprocess.run(["bash", "-n"], input=r.script, text=True).returncode == 0
        assert ("--requeue" in _sbatch_lines(r.script)) == (job == "train")
    sample = render(SubmitOptions(job="sample", n_samples=500), cfg, tmp_path / "run").script
    # the data root is the config file's, made absolute: the job's --chdir does not change which shards it reads
    assert (f"set -- {(tmp_path / 'run').resolve()} 500 qm9 edm {tmp_path / 'shards' / 'qm9'} --steps 1000 "
            "--batch-size 100 --seed 0 --sampler auto --ddim-eta 0.0\n") in sample
    # the sample section's sampler reaches `symdiff sample` in the job
    cfg.sample.sampler, cfg.sample.ddim_eta = "ddim", 0.5
    sample = render(SubmitOptions(job="sample", n_samples=500), cfg, tmp_path / "run").script
    assert "--seed 0 --sampler ddim --ddim-eta 0.5\n" in sample


def test_time_parsing() -> None:
    assert time_to_seconds("00:10:00") == 600
    assert time_to_seconds("2-00:00:01") == 2 * 86400 + 1


def test_scripts_share_helpers_not_code() -> None:
    """Each script sources lib.sh and keeps one contiguous #SBATCH block that rendering replaces."""
    for kind in JOBS.values():
        text = (SLURM_DIR / kind.script).read_text()
        assert 'slurm/lib.sh" || exit 1' in text and "symdiff_setup" in text
        idx = [i for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH")]
        assert idx == list(range(idx[0], idx[0] + len(idx)))


def _requeue_decision(rc: int, restart_count: int, max_restarts: int = 3) -> subprocess.CompletedProcess:
    """symdiff_train_with_requeue around a command exiting ``rc`` (the requeue itself: test_slurm_jobs.py)."""
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    env.update(SLURM_JOB_ID="4242", SLURM_RESTART_COUNT=str(restart_count),
               SYMDIFF_PREEMPT_EXIT=str(EXIT_REQUEUE), SYMDIFF_MAX_RESTARTS=str(max_restarts))
    cmd = f'source {SLURM_DIR}/lib.sh; symdiff_train_with_requeue bash -c "exit {rc}"'
    return subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True)


def test_requeue_decision_without_requeueing() -> None:
    finished = _requeue_decision(0, 0)
    assert finished.returncode == 0 and "training finished" in finished.stderr
    crashed = _requeue_decision(1, 0)  # a crash is not requeued: that would loop on a bug
    assert crashed.returncode == 1 and "not requeued" in crashed.stderr
    # restart budget used up: the run stays resumable and the job reports "not finished"
    spent = _requeue_decision(EXIT_REQUEUE, 3)
    assert spent.returncode == EXIT_REQUEUE and "3 restarts reached" in spent.stderr
    assert "requeueing job" not in spent.stderr


def test_signal_seconds_zero_means_no_warning_but_requeueable(cfg_file: Path) -> None:
    r = render(SubmitOptions(job="train", time="00:01:00", signal_seconds=0), load_config(cfg_file), Path("run"))
    opts = _sbatch_lines(r.script)
    assert "--requeue" in opts and not any(o.startswith("--signal") for o in opts)

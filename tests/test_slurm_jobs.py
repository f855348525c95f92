"""The real batch scripts of slurm/, rendered by `symdiff submit` and run by a real one-node SLURM (CPU).

- MPI shard build, 2 tasks through srun + PMIx == serial build (same shards, byte for byte).
- Training, 1 node x 2 tasks (gloo): trains, checkpoints, finishes.
- Preemption: `scancel --signal=USR1` -> checkpoint on every rank -> `scontrol requeue` -> resume in the same
  run directory -> the same final parameters as the uninterrupted run, with the log appended, not overwritten.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, slurm  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
BUNDLED_QM9 = REPO / "symdiff" / "data" / "bundled" / "qm9_subset.npz"


def job_env(slurm: SlurmCluster) -> dict[str, str]:
    env = slurm.env()
    # Jobs activate .venv (PATH first), so torch JIT-builds DeepSpeed's shm op with pip's ninja 1.13; pytest
    # without the venv on PATH uses the system ninja. The two disagree about each other's build logs and rebuild
    # the op (~1 min) whenever the other touched a shared cache, so the jobs get their own.
    env["TORCH_EXTENSIONS_DIR"] = str(REPO / ".cache" / "torch_extensions_slurm")
    return env


def submit(slurm: SlurmCluster, *argv: str, cwd: Path) -> str:
    """`symdiff submit` (the real sbatch path); returns the job id it recorded in the run directory."""
    res = subprocess.run([sys.executable, "-m", "symdiff.cli", "submit", *argv], cwd=cwd, env=job_env(slurm),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    run_dir = Path(argv[argv.index("--run-dir") + 1])
    run_dir = run_dir if run_dir.is_absolute() else cwd / run_dir
    job_id = (run_dir / "slurm" / "job_id").read_text().strip()
    assert f"submitted job {job_id}" in res.stdout
    history = [json.loads(line) for line in (run_dir / "slurm" / "jobs.jsonl").read_text().splitlines()]
    assert history[-1]["job_id"] == job_id and Path(history[-1]["script"]).is_file()
    return job_id


def job_log(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "slurm").glob("*.out")))


def test_mpi_shard_build_matches_serial(slurm: SlurmCluster, tmp_path: Path) -> None:
    common = ["--dataset", "qm9", "--source", str(BUNDLED_QM9), "--shard-size", "1000"]
    serial = subprocess.run([sys.executable, "-m", "symdiff.cli", "data", "build", *common,
                             "--out", str(tmp_path / "serial")], capture_output=True, text=True, timeout=120)
    assert serial.returncode == 0, serial.stderr
    job = submit(slurm, "--job", "data", "--tasks-per-node", "2", "--time", "00:10:00",
                 "--run-dir", str(tmp_path / "run"), "--", *common, "--out", str(tmp_path / "mpi"), "-v",
                 cwd=tmp_path)
    info = slurm.wait_job(job, timeout=120)
    log = job_log(tmp_path / "run")
    assert info["JobState"] == "COMPLETED", log
    # Both MPI ranks wrote shards: the build really was split across the two SLURM tasks.
    assert "rank 0 wrote" in log and "rank 1 wrote" in log
    a = json.loads((tmp_path / "serial" / "manifest.json").read_text())
    b = json.loads((tmp_path / "mpi" / "manifest.json").read_text())
    assert (a.pop("build")["ranks"], b.pop("build")["ranks"]) == (1, 2)
    assert a == b  # same molecules, same order, same shard files (the manifest holds each shard's sha256)
    assert a["splits"]["train"]["n_molecules"] == 6000 and len(a["splits"]["train"]["shards"]) == 6
    for split in a["splits"].values():
        for shard in split["shards"]:
            serial_bytes = (tmp_path / "serial" / shard["path"]).read_bytes()
            assert serial_bytes == (tmp_path / "mpi" / shard["path"]).read_bytes()


# ---------------------------------------------------------------------------------------------------- training
TRAIN_STEPS = 200
# Small enough for 2 CPU tasks to run ~20 steps/s, big enough to be the real SymDiff (learned gamma, DiT).
TINY = """\
base: {repo}/configs/qm9_tiny.yaml
name: slurm_test
data:
  root: {shards}
  batch_size: 8
model:
  hidden_size: 32
  depth: 1
  num_heads: 2
  xh_hidden_size: 16
  num_gaussians: 16
  gamma_hidden_size: 16
  gamma_depth: 1
  gamma_num_heads: 2
  gamma_dec_hidden: 16
  kernel_backend: torch
train:
  max_steps: {steps}
  ckpt_every: 100
  keep_last: 5
  log_every: 1
  zero_stage: 2
"""


@pytest.fixture(scope="module")
def train_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slurm_train")
    res = subprocess.run([sys.executable, "-m", "symdiff.cli", "data", "build", "--dataset", "qm9", "--source",
                          str(BUNDLED_QM9), "--out", str(root / "shards"), "--shard-size", "2000"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY.format(repo=REPO, shards=root / "shards", steps=TRAIN_STEPS))
    return cfg


def submit_training(slurm: SlurmCluster, cfg: Path, run_dir: Path, *extra: str) -> str:
    # 1 node x 2 tasks on CPU: gloo, one task per core; the same script as on a GPU cluster.
    options = {"--time": "00:15:00", "--signal-seconds": "60"}
    while extra and extra[0].startswith("--"):
        options[extra[0]], extra = extra[1], extra[2:]
    flat = [x for kv in options.items() for x in kv]
    return submit(slurm, "--config", str(cfg), "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2",
                  "--cpus-per-task", "1", *flat, "--run-dir", str(run_dir), *extra, cwd=cfg.parent)


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def final_state(run_dir: Path) -> tuple[dict, dict]:
    from symdiff.train import checkpoint as ckpt

    tag = run_dir / "checkpoints" / ckpt.tag_for(TRAIN_STEPS)
    return ckpt.fp32_weights(tag), ckpt.read_state(tag)["ema"]


@pytest.fixture(scope="module")
def uninterrupted(slurm: SlurmCluster, train_config: Path) -> tuple[Path, dict[str, str]]:
    run_dir = train_config.parent / "run_plain"
    job = submit_training(slurm, train_config, run_dir)
    info = slurm.wait_job(job, timeout=900)
    return run_dir, info


def test_training_job_trains_checkpoints_and_finishes(uninterrupted: tuple[Path, dict[str, str]]) -> None:
    run_dir, info = uninterrupted
    log = job_log(run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log
    assert "tasks=2" in log and "training finished" in log
    steps = [m["step"] for m in metrics(run_dir)]
    assert steps == list(range(1, TRAIN_STEPS + 1))
    losses = [m["loss"] for m in metrics(run_dir)]
    assert all(0 < x < 10 for x in losses)
    from symdiff.train import checkpoint as ckpt

    assert [s for s, _ in ckpt.complete_checkpoints(run_dir / "checkpoints")] == [100, 200]
    weights, ema = final_state(run_dir)
    assert set(ema) <= set(weights) and len(ema) > 10  # EMA of every parameter (buffers are not averaged)
    # two data-parallel ranks with ZeRO-2 both took part: one optimizer-state shard each
    assert len(list((run_dir / "checkpoints" / "step_00000200").glob("zero_pp_rank_*optim_states.pt"))) == 2


def wait_restarts(slurm: SlurmCluster, job: str, n: int, deadline: float, run_dir: Path) -> None:
    import time

    while int(slurm.job_info(job).get("Restarts", "0")) < n:
        assert time.monotonic() < deadline, f"not requeued: {slurm.job_info(job)}\n{job_log(run_dir)}"
        time.sleep(0.5)


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_result(
        slurm: SlurmCluster, train_config: Path, uninterrupted: tuple[Path, dict[str, str]]) -> None:
    """Two preemptions: one during start-up (before the trainer can catch USR1), one in mid-training."""
    import time

    import torch

    run_dir = train_config.parent / "run_preempted"
    job = submit_training(slurm, train_config, run_dir)
    deadline = time.monotonic() + 1200  # a hang guard only: the 2 cores may be shared
    # 1) As soon as the training step (srun, step 0; not the batch step) exists: the tasks are still importing
    #    torch and DeepSpeed.
    while f"{job}.0" not in slurm.run("squeue", "-h", "-s", "-j", job, "-o", "%i", check=False).stdout.split():
        assert time.monotonic() < deadline, f"no job step: {slurm.job_info(job)}\n{job_log(run_dir)}"
        time.sleep(0.1)
    slurm.run("scancel", "--signal=USR1", job)
    wait_restarts(slurm, job, 1, deadline, run_dir)
    # 2) In mid-training: the trainer finishes its step and checkpoints on both ranks.
    while not metrics(run_dir) or metrics(run_dir)[-1]["step"] < 5:
        assert time.monotonic() < deadline, f"training never started: {slurm.job_info(job)}\n{job_log(run_dir)}"
        assert slurm.job_info(job).get("JobState") in ("PENDING", "RUNNING"), job_log(run_dir)
        time.sleep(0.2)
    slurm.run("scancel", "--signal=USR1", job)
    wait_restarts(slurm, job, 2, deadline, run_dir)
    info = slurm.wait_job(job, timeout=900)
    log = job_log(run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", log

    from symdiff.train import checkpoint as ckpt

    # The second stop happened mid-run: a checkpoint at the step the signal was honoured, off the schedule.
    saved = [s for s, _ in ckpt.complete_checkpoints(run_dir / "checkpoints")]
    stopped_at = [s for s in saved if s not in (100, 200)]
    assert len(stopped_at) == 1 and 5 <= stopped_at[0] < TRAIN_STEPS, saved
    # One appended log holds all three starts (job <id>.<restart>) and the requeue decisions between them.
    assert "signal arrived during start-up" in log and "SIGUSR1 received: checkpointed at step" in log and "exiting with code 75 (requeue" in log
    for restart in (1, 2):
        assert log.index(f"job {job}.{restart - 1}] stopped by a preemption signal: requeueing") < \
            log.index(f"job {job}.{restart}] nodes=1")
    assert log.count("training finished") == 1

    # Same trajectory and the same final parameters (and EMA) as the uninterrupted run, to the bit.
    plain, resumed = metrics(uninterrupted[0]), metrics(run_dir)
    assert [m["step"] for m in resumed] == list(range(1, TRAIN_STEPS + 1))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in plain]
    (w0, e0), (w1, e1) = final_state(uninterrupted[0]), final_state(run_dir)
    assert set(w0) == set(w1) and set(e0) == set(e1)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    for k in e0:
        assert torch.equal(e0[k], e1[k]), k


def test_time_limit_leaves_a_resumable_run(slurm: SlurmCluster, train_config: Path) -> None:
    """No warning signal: at the 1-minute limit SLURM sends SIGTERM, the trainer checkpoints within KillWait,
    the job ends TIMEOUT (SLURM does not requeue those), and resubmitting the same run directory resumes."""
    run_dir = train_config.parent / "run_timeout"
    job = submit_training(slurm, train_config, run_dir, "--time", "00:01:00", "--signal-seconds", "0",
                          "train.max_steps=1000000", "train.ckpt_every=1000000")
    info = slurm.wait_job(job, timeout=600)
    log = job_log(run_dir)
    assert info["JobState"] == "TIMEOUT" and info["Restarts"] == "0", log

    from symdiff.train import checkpoint as ckpt

    saved = [s for s, _ in ckpt.complete_checkpoints(run_dir / "checkpoints")]
    assert len(saved) == 1 and saved[0] > 0, (saved, log)
    k = saved[0]
    assert f"checkpointed at step {k}" in log
    assert [m["step"] for m in metrics(run_dir)][-1] == k

    job2 = submit_training(slurm, train_config, run_dir, f"train.max_steps={k + 3}", "train.ckpt_every=1000000")
    info2 = slurm.wait_job(job2, timeout=600)
    log = job_log(run_dir)
    assert info2["JobState"] == "COMPLETED", log
    assert f"at step {k} (epoch" in log and "resumed from" in log
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, k + 4))
    # both jobs' ids are on record in the run directory
    history = [json.loads(line)["job_id"] for line in (run_dir / "slurm" / "jobs.jsonl").read_text().splitlines()]
    assert history == [job, job2]


def test_sample_eval_job_on_the_trained_run(slurm: SlurmCluster, train_config: Path,
                                            uninterrupted: tuple[Path, dict[str, str]]) -> None:
    run_dir = uninterrupted[0]
    job = submit(slurm, "--job", "sample", "--config", str(train_config), "--gpus-per-node", "0",
                 "--cpus-per-task", "1", "--time", "00:10:00", "--n", "4", "--run-dir", str(run_dir),
                 "sample.steps=20", cwd=train_config.parent)
    info = slurm.wait_job(job, timeout=600)
    log = job_log(run_dir)
    assert info["JobState"] == "COMPLETED", log
    assert "20 steps" in log  # the submitted config's sample section reached `symdiff sample`
    sdf = run_dir / "samples" / f"samples-{job}.sdf"
    assert sdf.read_text().count("$$$$") == 4
    ev = json.loads(sdf.with_suffix(".eval.json").read_text())
    assert (ev["protocol"], ev["dataset"], ev["n_molecules"]) == ("edm", "qm9", 4)
    assert 0.0 <= ev["validity"] <= 1.0 and ev["novelty"] is not None  # data.root gave the novelty reference

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


def submit(slurm: SlurmCluster, *argv: str, cwd: Path) -> str:
    """`symdiff submit` (the real sbatch path); returns the job id it recorded in the run directory."""
    res = subprocess.run([sys.executable, "-m", "symdiff.cli", "submit", *argv], cwd=cwd, env=slurm.env(),
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

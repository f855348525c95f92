"""The SLURM test fixture itself: a real controller and node, and a 2-task batch job through srun."""
from __future__ import annotations

from pathlib import Path

from slurm_cluster import SlurmCluster, slurm  # noqa: F401  (fixture)


def test_two_task_sbatch_reports_both_ranks(slurm: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "two.sbatch"
    out = tmp_path / "two.out"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --ntasks=2 --cpus-per-task=1 --output={out}\n"
        'srun bash -c \'echo "rank=$SLURM_PROCID of $SLURM_NTASKS"\'\n'
        "exit 3\n")
    job = slurm.run("sbatch", "--parsable", str(script)).stdout.strip().split(";")[0]
    info = slurm.wait_job(job, timeout=60)
    assert info["JobState"] == "FAILED"  # the script's own `exit 3` must surface as the job's exit code
    assert info["ExitCode"].startswith("3:")
    lines = sorted(out.read_text().split())
    assert lines == ["2", "2", "of", "of", "rank=0", "rank=1"]

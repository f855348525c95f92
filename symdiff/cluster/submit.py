"""Submit a rendered batch script with sbatch and record the job in the run directory."""
from __future__ import annotations

import json
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from symdiff.cluster.render import Rendered
from symdiff.errors import UserError
from symdiff.io.atomic import atomic_write_text


def submit(rendered: Rendered, meta: Optional[dict[str, Any]] = None, sbatch: str = "sbatch") -> str:
    """Write the frozen config and the script into ``RUN_DIR/slurm/``, submit it, record the job; return its id.

    The job id goes to ``RUN_DIR/slurm/job_id`` (the latest) and one JSON line per submission to
    ``RUN_DIR/slurm/jobs.jsonl`` (the history across resubmissions).
    """
    exe = shutil.which(sbatch)
    if exe is None:
        raise UserError(f"'{sbatch}' not found on PATH: submit from a SLURM login node, or use --dry-run")
    slurm_dir = rendered.run_dir / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    if rendered.config_path is not None and rendered.config_text is not None:
        if not rendered.config_path.exists():
            atomic_write_text(rendered.config_path, rendered.config_text)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    script_path = slurm_dir / f"{rendered.job_name}-{stamp}.sbatch"
    atomic_write_text(script_path, rendered.script)
    res = subprocess.run([exe, "--parsable", str(script_path)], capture_output=True, text=True)
    if res.returncode != 0:
        raise UserError(f"sbatch {script_path} failed (exit {res.returncode}): {res.stderr.strip()}")
    # --parsable prints "jobid" or "jobid;cluster"
    job_id = res.stdout.strip().splitlines()[-1].split(";")[0] if res.stdout.strip() else ""
    if not job_id.isdigit():
        raise UserError(f"sbatch {script_path}: unexpected output {res.stdout!r}")
    record = {"job_id": job_id, "submitted_utc": stamp, "script": str(script_path),
              "config": str(rendered.config_path) if rendered.config_path else None, **(meta or {})}
    with open(slurm_dir / "jobs.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    atomic_write_text(slurm_dir / "job_id", job_id + "\n")
    return job_id

"""Render the sbatch scripts of ``slurm/`` for one config and a set of cluster options.

The scripts in ``slurm/`` are complete batch scripts that also work by hand (``sbatch slurm/train.sbatch ...``).
Rendering keeps their body as it is and replaces their ``#SBATCH`` block with one built from the options, then
adds the settings the body reads (checkout, virtual environment, requeue exit code) and the command's arguments.
Nothing secret is ever written: site settings and keys come from the job's environment or ``--env-file``.
"""
from __future__ import annotations

import hashlib
import re
import shlex
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig

from symdiff.config import to_yaml
from symdiff.errors import UserError

# Exit code with which `symdiff train` reports "checkpointed on every rank after SIGUSR1/SIGTERM, not finished".
from symdiff.train.launch import EXIT_REQUEUE

REPO_ROOT = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO_ROOT / "slurm"


@dataclass(frozen=True)
class JobKind:
    script: str
    requeue: bool  # preemptible: --signal + --requeue + resume
    default_gpus: int
    default_tasks_per_node: Optional[int]  # None: one task per GPU (one if no GPU)
    default_cpus_per_task: int


JOBS: dict[str, JobKind] = {
    "train": JobKind("train.sbatch", True, 8, None, 8),
    "sample": JobKind("sample_eval.sbatch", False, 1, 1, 8),
    "data": JobKind("build_shards.sbatch", False, 0, 16, 1),
    "profile": JobKind("profile.sbatch", False, 1, 1, 8),
}

_TIME = re.compile(r"^(?:(\d+)-)?(\d{1,3}):(\d{2}):(\d{2})$")
# Values that end up on #SBATCH lines: sbatch does not unquote them, so allow only what needs no quoting.
_SAFE = re.compile(r"^[A-Za-z0-9_.,:@+=/%-]+$")


@dataclass
class SubmitOptions:
    job: str = "train"
    nodes: int = 1
    gpus_per_node: Optional[int] = None
    tasks_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None
    time: str = "24:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    mem: Optional[str] = None
    exclusive: bool = False
    signal_seconds: int = 300
    max_restarts: int = 50
    job_name: Optional[str] = None
    env_file: Optional[str] = None
    sbatch_args: list[str] = field(default_factory=list)
    # train: config overrides (already applied to the frozen config); data/profile: the subcommand's arguments
    args: list[str] = field(default_factory=list)
    n_samples: Optional[int] = None
    protocol: str = "edm"


def time_to_seconds(text: str) -> int:
    """``HH:MM:SS`` or ``D-HH:MM:SS`` -> seconds; anything else is a UserError."""
    m = _TIME.match(text)
    if not m:
        raise UserError(f"--time '{text}': expected HH:MM:SS or D-HH:MM:SS")
    d, h, mi, s = (int(g) if g else 0 for g in m.groups())
    if mi >= 60 or s >= 60:
        raise UserError(f"--time '{text}': minutes and seconds must be below 60")
    return ((d * 24 + h) * 60 + mi) * 60 + s


def _safe(name: str, value: str) -> str:
    if not _SAFE.match(value):
        raise UserError(f"{name} '{value}': only letters, digits and _.,:@+=/%- are allowed in SBATCH values")
    return value


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


@dataclass
class Rendered:
    """A rendered batch script and the files submitting it needs in the run directory."""

    script: str
    run_dir: Path
    config_text: Optional[str]  # the frozen, resolved config the job reads
    config_path: Optional[Path]
    job_name: str


def frozen_config_path(run_dir: Path, config_text: str) -> Path:
    # Content-addressed: a later submission with other settings never rewrites the file a queued job will read.
    digest = hashlib.sha256(config_text.encode()).hexdigest()[:12]
    return run_dir / "slurm" / f"config-{digest}.yaml"


def sbatch_options(opts: SubmitOptions, kind: JobKind, run_dir: Path, workdir: Path, job_name: str) -> list[str]:
    if opts.nodes < 1:
        raise UserError(f"--nodes must be >= 1, got {opts.nodes}")
    gpus = kind.default_gpus if opts.gpus_per_node is None else opts.gpus_per_node
    if gpus < 0:
        raise UserError(f"--gpus-per-node must be >= 0, got {gpus}")
    tasks = opts.tasks_per_node
    if tasks is None:
        tasks = kind.default_tasks_per_node or max(gpus, 1)
    if tasks < 1:
        raise UserError(f"--tasks-per-node must be >= 1, got {tasks}")
    if kind.default_tasks_per_node == 1 and (tasks != 1 or opts.nodes != 1):
        raise UserError(f"--job {opts.job} runs as one task on one node")
    cpus = kind.default_cpus_per_task if opts.cpus_per_task is None else opts.cpus_per_task
    if cpus < 1:
        raise UserError(f"--cpus-per-task must be >= 1, got {cpus}")
    limit = time_to_seconds(opts.time)
    for p in (run_dir, workdir):
        _safe("path", str(p))
    out = [
        f"--job-name={_safe('--job-name', job_name)}",
        f"--nodes={opts.nodes}",
        f"--ntasks-per-node={tasks}",
    ]
    if gpus > 0:
        out.append(f"--gpus-per-node={gpus}")
    out += [f"--cpus-per-task={cpus}", f"--time={opts.time}"]
    for flag, value in (("partition", opts.partition), ("account", opts.account), ("qos", opts.qos),
                        ("mem", opts.mem)):
        if value:
            out.append(f"--{flag}={_safe('--' + flag, value)}")
    if opts.exclusive:
        out.append("--exclusive")
    if kind.requeue:
        if not 0 <= opts.signal_seconds < limit:
            raise UserError(f"--signal-seconds {opts.signal_seconds} must be between 0 and the time limit "
                            f"({limit} s): it is how long before the limit the job is told to checkpoint")
        if opts.signal_seconds > 0:
            # To the tasks (no "B:"), so every rank gets it directly, exactly like `scancel --signal=USR1`.
            out.append(f"--signal=USR1@{opts.signal_seconds}")
        out.append("--requeue")
    # Append: a requeued job keeps the same id and log file, and must not wipe the log of its first start.
    out += ["--open-mode=append", f"--output={run_dir}/slurm/%x-%j.out", f"--chdir={workdir}"]
    for extra in opts.sbatch_args:
        if not extra.startswith("--") or "\n" in extra:
            raise UserError(f"--sbatch-arg '{extra}': give one long option such as --constraint=h100")
        out.append(extra)
    return out


def _job_arguments(opts: SubmitOptions, cfg: Optional[DictConfig], config_path: Optional[Path],
                   run_dir: Path) -> list[str]:
    if opts.job == "train":
        return ["--config", str(config_path), "--run-dir", str(run_dir)]
    if opts.job == "sample":
        assert cfg is not None
        n = opts.n_samples if opts.n_samples is not None else int(cfg.sample.n_samples)
        # The run's own config describes the model; the submitted config's sample section says how to sample.
        s = cfg.sample
        return [str(run_dir), str(n), str(cfg.data.dataset), opts.protocol, str(cfg.data.root),
                "--steps", str(s.steps), "--batch-size", str(s.batch_size), "--seed", str(s.seed),
                "--sampler", str(s.sampler), "--ddim-eta", str(float(s.ddim_eta)),
                *([] if s.use_ema else ["--no-ema"])]
    if opts.job == "profile":
        return [str(run_dir / "profile" / "kernels.json"), *opts.args]
    return list(opts.args)  # data: the arguments of `symdiff data build`


def render(opts: SubmitOptions, cfg: Optional[DictConfig], run_dir: Path, workdir: Optional[Path] = None,
           venv: Optional[Path] = None) -> Rendered:
    """Build the batch script for ``opts.job``; ``cfg`` is the fully resolved config (overrides applied)."""
    if opts.job not in JOBS:
        raise UserError(f"--job '{opts.job}': choose one of {', '.join(JOBS)}")
    kind = JOBS[opts.job]
    if cfg is None and opts.job in ("train", "sample"):
        raise UserError(f"--job {opts.job} needs --config")
    template = SLURM_DIR / kind.script
    if not template.is_file():
        raise UserError(f"{template}: batch script missing (symdiff submit needs a source checkout)")
    workdir = (workdir or Path.cwd()).resolve()
    run_dir = (workdir / run_dir).resolve()
    venv = Path(venv or sys.prefix).resolve()
    config_text = config_path = None
    if cfg is not None:
        config_text = to_yaml(cfg)
        config_path = frozen_config_path(run_dir, config_text)
    default_name = f"symdiff-{opts.job}-{cfg.name}" if cfg is not None else f"symdiff-{opts.job}"
    job_name = opts.job_name or re.sub(r"[^A-Za-z0-9_.-]", "_", default_name)
    header = [f"#SBATCH {o}" for o in sbatch_options(opts, kind, run_dir, workdir, job_name)]

    env_file = None
    if opts.env_file:
        env_file = Path(opts.env_file).resolve()
        if _inside(env_file, REPO_ROOT) or _inside(env_file, run_dir):
            raise UserError(f"--env-file {opts.env_file}: keep secrets outside the repository and the run "
                            "directory (they would be committed or archived with the run)")
    settings = [
        "# ---- settings written by `symdiff submit` ----",
        f"export SYMDIFF_ROOT={shlex.quote(str(REPO_ROOT))}",
        f"export SYMDIFF_VENV={shlex.quote(str(venv))}",
    ]
    if kind.requeue:
        settings += [f"export SYMDIFF_PREEMPT_EXIT={EXIT_REQUEUE}",
                     f"export SYMDIFF_MAX_RESTARTS={int(opts.max_restarts)}"]
    if env_file:
        settings.append(f"export SYMDIFF_ENV_FILE={shlex.quote(str(env_file))}")
    args = _job_arguments(opts, cfg, config_path, run_dir)
    settings.append("set -- " + " ".join(shlex.quote(a) for a in args))
    settings.append("# ---- end of settings ----")

    lines = template.read_text().splitlines()
    idx = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    if not idx or idx[-1] - idx[0] + 1 != len(idx):
        raise UserError(f"{template}: its #SBATCH lines must form one block")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    origin = [f"# Rendered from slurm/{kind.script} by `symdiff submit --job {opts.job}` at {stamp}."]
    out = lines[: idx[0]] + origin + header + [""] + settings + lines[idx[-1] + 1:]
    return Rendered("\n".join(out) + "\n", run_dir, config_text, config_path, job_name)

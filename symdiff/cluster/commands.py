"""`symdiff submit`: render a batch script of ``slurm/`` for a config (print it with --dry-run) and sbatch it."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from symdiff.cluster.render import JOBS, SubmitOptions, render
from symdiff.cluster.submit import submit
from symdiff.config import load_config
from symdiff.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment YAML (required for train and sample jobs)")
    p.add_argument("--job", choices=sorted(JOBS), default="train",
                   help="train (default; preemptible, requeues itself), sample (sample + evaluate), "
                        "data (MPI shard build), profile (kernel profiling)")
    p.add_argument("--run-dir", help="run directory (default runs/<config name>, or runs/slurm-<job> without a "
                                     "config); the job id, script and log go to RUN_DIR/slurm/")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node (default 8 for train, 1 for sample/profile, 0 for data); 0 = CPU job")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="tasks per node (default: one per GPU, 1 without GPUs; 16 for data)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--time", default="24:00:00", help="time limit, HH:MM:SS or D-HH:MM:SS (default 24:00:00)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--mem", help="memory per node as sbatch takes it (e.g. 0 = all, 480G)")
    p.add_argument("--exclusive", action="store_true", help="whole nodes (recommended for multi-node GPU runs)")
    p.add_argument("--signal-seconds", type=int, default=300,
                   help="train: seconds before the time limit at which SLURM sends USR1 (checkpoint + requeue); "
                        "0 = no warning: the job checkpoints on SIGTERM at the limit and ends TIMEOUT, resumable")
    p.add_argument("--max-restarts", type=int, default=50, help="train: stop requeueing after this many")
    p.add_argument("--job-name")
    p.add_argument("--env-file", help="file sourced at job start for site settings/secrets (outside the repo)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="--OPTION=VALUE",
                   help="extra sbatch option, repeatable (e.g. --sbatch-arg=--constraint=h100)")
    p.add_argument("--n", dest="n_samples", type=int, help="sample: molecules to draw (default sample.n_samples)")
    p.add_argument("--protocol", default="edm", choices=["edm", "revised"], help="sample: evaluation protocol")
    p.add_argument("--dry-run", action="store_true", help="print the rendered script; write and submit nothing")
    p.add_argument("rest", nargs="*", metavar="ARG",
                   help="train/sample: config overrides key.sub=value; data/profile: arguments of that "
                        "subcommand (put them after --)")


def run(args: argparse.Namespace) -> int:
    cfg = None
    overrides: list[str] = []
    passthrough: list[str] = []
    if args.job in ("train", "sample"):
        if not args.config:
            raise UserError(f"--job {args.job} needs --config")
        overrides = list(args.rest)
    else:
        passthrough = list(args.rest)
    if args.config:
        cfg = load_config(args.config, overrides)
    default_run = Path("runs") / (cfg.name if cfg is not None else f"slurm-{args.job}")
    run_dir = Path(args.run_dir) if args.run_dir else default_run
    opts = SubmitOptions(
        job=args.job, nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task, time=args.time, partition=args.partition, account=args.account,
        qos=args.qos, mem=args.mem, exclusive=args.exclusive, signal_seconds=args.signal_seconds,
        max_restarts=args.max_restarts, job_name=args.job_name, env_file=args.env_file,
        sbatch_args=list(args.sbatch_arg), args=passthrough, n_samples=args.n_samples, protocol=args.protocol)
    rendered = render(opts, cfg, run_dir)
    if args.dry_run:
        sys.stdout.write(rendered.script)
        return 0
    job_id = submit(rendered, meta={"job": args.job, "nodes": args.nodes, "config_source": args.config,
                                    "overrides": overrides})
    print(f"submitted job {job_id}: {rendered.run_dir}/slurm/job_id, log {rendered.run_dir}/slurm/"
          f"{rendered.job_name}-{job_id}.out")
    return 0

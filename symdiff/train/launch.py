"""Process launch: who am I (rank, world size) under srun / mpirun / torchrun, and `--nproc N` local spawning.

DeepSpeed reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Without them it falls back to MPI
discovery, which aborts under a plain `srun` (STACK.md §6), so we translate each launcher's variables into that
standard set *before* anything initialises torch.distributed.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

log = logging.getLogger(__name__)

# Exit code of a run that stopped on SIGUSR1/SIGTERM after writing a complete checkpoint on every rank.
# 75 is EX_TEMPFAIL ("try again later") in sysexits.h; the SLURM script requeues the job on it.
EXIT_REQUEUE = 75
# Exit code when training stopped because too many steps in a row had a non-finite loss or gradient.
EXIT_NONFINITE = 3

_CHILD_FLAG = "SYMDIFF_LAUNCH_CHILD"


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # single | env (torchrun/--nproc) | slurm | mpi


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _first_slurm_host(env: Mapping[str, str]) -> str:
    # The launch node of a batch step is the first node of the allocation, i.e. where SLURM_PROCID 0 runs.
    if env.get("SLURM_LAUNCH_NODE_IPADDR"):
        return env["SLURM_LAUNCH_NODE_IPADDR"]
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
    if nodelist:
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 check=True, timeout=30)
            return out.stdout.split()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return "127.0.0.1"


def discover(env: dict[str, str] | None = None) -> DistEnv:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT in ``env`` (default os.environ) from the launcher.

    Precedence: variables already set (torchrun, `--nproc`, the deepspeed launcher) > SLURM (srun) > Open MPI /
    MPICH (mpirun) > a single process.
    """
    env = os.environ if env is None else env
    launcher = "env"
    if "RANK" in env and "WORLD_SIZE" in env:
        pass
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        env["RANK"] = env["SLURM_PROCID"]
        # A step may use fewer tasks than the allocation (`srun -n 1` inside an 8-task job): the step's count wins.
        env["WORLD_SIZE"] = env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"])
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", _first_slurm_host(env))
        # Same port on every task without talking to each other: derive it from the job id.
        env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    elif "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        launcher = "mpi"
        if "OMPI_COMM_WORLD_RANK" in env:
            env["RANK"] = env["OMPI_COMM_WORLD_RANK"]
            env["WORLD_SIZE"] = env["OMPI_COMM_WORLD_SIZE"]
            env["LOCAL_RANK"] = env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
        else:
            env["RANK"] = env["PMI_RANK"]
            env["WORLD_SIZE"] = env["PMI_SIZE"]
            env["LOCAL_RANK"] = env.get("MPI_LOCALRANKID", "0")
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            # mpirun does not tell us where rank 0 is: ask it over MPI once.
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
            addr_port = comm.bcast((socket.gethostname(), free_port()) if comm.Get_rank() == 0 else None, root=0)
            env.setdefault("MASTER_ADDR", addr_port[0])
            env.setdefault("MASTER_PORT", str(addr_port[1]))
    else:
        launcher = "single"
        env["RANK"] = "0"
        env["WORLD_SIZE"] = "1"
        env["LOCAL_RANK"] = "0"
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")
    if env.get(_CHILD_FLAG):
        launcher = "nproc"
    return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), launcher)


def is_launch_child() -> bool:
    return bool(os.environ.get(_CHILD_FLAG))


def spawn_local(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m symdiff.cli <argv>`` as ``nproc`` local ranks (gloo on CPU) and wait for all of them.

    SIGTERM/SIGUSR1 sent to this parent are forwarded so every rank checkpoints and exits (Ctrl-C reaches the
    ranks directly through the terminal's process group).
    If a rank dies with an error the others are killed at once: they would otherwise block in a collective.
    Returns 0 if all ranks succeeded, EXIT_REQUEUE if all stopped for preemption, else the first failure's code.
    """
    if nproc < 1:
        from symdiff.errors import UserError

        raise UserError(f"--nproc must be >= 1, got {nproc}")
    port = free_port()
    procs: list[subprocess.Popen] = []
    for rank in range(nproc):
        env = dict(os.environ)
        for key in [k for k in env if k.startswith(("SLURM_", "OMPI_", "PMI_"))]:
            env.pop(key)  # the children are our ranks, not the outer launcher's
        env.update({"RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                    "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    _CHILD_FLAG: "1"})
        procs.append(subprocess.Popen([sys.executable, "-m", "symdiff.cli", *argv], env=env))

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        codes: dict[int, int] = {}
        while len(codes) < nproc:
            for i, p in enumerate(procs):
                if i in codes:
                    continue
                rc = p.poll()
                if rc is None:
                    continue
                codes[i] = rc
                if rc not in (0, EXIT_REQUEUE):
                    log.error("rank %d exited with code %d; stopping the other ranks", i, rc)
                    for q in procs:
                        if q.poll() is None:
                            q.kill()
            time.sleep(0.05)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    bad = [codes[i] for i in range(nproc) if codes[i] not in (0, EXIT_REQUEUE)]
    if bad:
        # A killed rank shows up negative (-9); a shell would report 128+9.
        first = bad[0]
        return 128 - first if first < 0 else first
    if any(codes[i] == EXIT_REQUEUE for i in range(nproc)):
        return EXIT_REQUEUE
    return 0

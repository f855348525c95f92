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
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

log = logging.getLogger(__name__)

# Exit code of a run that stopped on SIGUSR1/SIGTERM after writing a complete checkpoint on every rank.
# 75 is EX_TEMPFAIL ("try again later") in sysexits.h; the SLURM script requeues the job on it.
EXIT_REQUEUE = 75
# Exit code when training stopped because too many steps in a row had a non-finite loss or gradient.
EXIT_NONFINITE = 3

_CHILD_FLAG = "SYMDIFF_LAUNCH_CHILD"
_PARENT_PID = "SYMDIFF_LAUNCH_PARENT"  # the --nproc launcher's pid, which its ranks must not outlive
# A folder where each rank leaves its one-line error instead of printing it: ranks usually fail on the same bad
# input, and the launcher prints each distinct line once rather than once per rank.
ERRORS_DIR = "SYMDIFF_LAUNCH_ERRORS"
# After one rank fails, the others get this long to exit by themselves (they usually hit the same error) before
# they are killed: a rank killed while it reports its own error would hide that error behind "-9".
_FAIL_GRACE_S = 10.0
# Ctrl-C, SLURM's --signal and scancel: forwarded to every rank, each of which checkpoints and exits.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


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


def die_with_parent() -> None:
    """Make this rank die when its `--nproc` launcher dies, however it dies (SIGKILL included).

    The kernel's parent-death signal (Linux prctl PR_SET_PDEATHSIG) does it at once; a thread that watches the
    parent pid is the fallback where prctl is not available. Without either, SIGKILL of the launcher left its ranks
    training as orphans.
    """
    parent = int(os.environ.get(_PARENT_PID, "0") or 0)
    if parent <= 0:
        return
    _set_parent_death_signal()
    if os.getppid() != parent:  # the launcher died before the signal was armed
        os.kill(os.getpid(), signal.SIGKILL)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="symdiff-parent-watch", daemon=True).start()


def _set_parent_death_signal() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def spawn_local(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m symdiff.cli <argv>`` as ``nproc`` local ranks (gloo on CPU) and wait for all of them.

    SIGINT/SIGTERM/SIGUSR1 sent to this parent are forwarded so every rank checkpoints and exits (a terminal's
    Ctrl-C also reaches the ranks directly; a rank takes a repeated signal as one request). The ranks die with this
    process if it is killed (``die_with_parent``).
    If a rank fails, the others are given a few seconds to exit and then killed: they would otherwise block in a
    collective. Returns 0 if all ranks succeeded, EXIT_REQUEUE if all stopped for preemption, else the code of the
    first rank that failed by itself.
    """
    if nproc < 1:
        from symdiff.errors import UserError

        raise UserError(f"--nproc must be >= 1, got {nproc}")
    with tempfile.TemporaryDirectory(prefix="symdiff-ranks-") as errors:
        return _spawn(nproc, argv, Path(errors))


def _spawn(nproc: int, argv: Sequence[str], errors: Path) -> int:
    port = free_port()
    procs: list[subprocess.Popen] = []
    for rank in range(nproc):
        env = dict(os.environ)
        for key in [k for k in env if k.startswith(("SLURM_", "OMPI_", "PMI_"))]:
            env.pop(key)  # the children are our ranks, not the outer launcher's
        env.update({"RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                    "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    _CHILD_FLAG: "1", _PARENT_PID: str(os.getpid()), ERRORS_DIR: str(errors)})
        procs.append(subprocess.Popen([sys.executable, "-m", "symdiff.cli", *argv], env=env))

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    # A signal the launcher was started to ignore (`cmd &` in a script ignores SIGINT) stays ignored.
    old = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        codes, failed = _wait_all(procs, errors)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    _print_rank_errors(errors, nproc)
    if failed:
        # A killed rank shows up negative (-9); a shell would report 128+9.
        first = codes[failed[0]]
        return 128 - first if first < 0 else first
    if any(codes[i] == EXIT_REQUEUE for i in range(nproc)):
        return EXIT_REQUEUE
    return 0


def rank_error_file(errors: Path, rank: int) -> Path:
    return errors / f"rank{rank}.txt"


def _print_rank_errors(errors: Path, nproc: int) -> None:
    """Each distinct error line of the ranks once, naming the ranks unless all of them said it."""
    said: dict[str, list[int]] = {}
    for rank in range(nproc):
        f = rank_error_file(errors, rank)
        if f.is_file():
            said.setdefault(f.read_text().rstrip("\n"), []).append(rank)
    for line, ranks in said.items():
        who = "" if len(ranks) == nproc else f" (rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})"
        print(line + who, file=sys.stderr)


def _wait_all(procs: list[subprocess.Popen], errors: Path) -> tuple[dict[int, int], list[int]]:
    """Exit codes of all ranks, and the ranks that failed by themselves (not killed by us), in the order they ended."""
    codes: dict[int, int] = {}
    failed: list[int] = []
    killed: set[int] = set()
    kill_at: float | None = None
    while len(codes) < len(procs):
        for i, p in enumerate(procs):
            if i in codes or (rc := p.poll()) is None:
                continue
            codes[i] = rc
            if rc not in (0, EXIT_REQUEUE) and i not in killed:
                failed.append(i)
                if not rank_error_file(errors, i).is_file():  # a rank that said why is reported by its line
                    log.error("rank %d exited with code %d", i, rc)
                if kill_at is None:
                    kill_at = time.monotonic() + _FAIL_GRACE_S
        if kill_at is not None and time.monotonic() >= kill_at:
            for i, p in enumerate(procs):
                if i not in codes and p.poll() is None:
                    log.error("rank %d still running after rank %d failed: stopping it", i, failed[0])
                    killed.add(i)
                    p.kill()
            kill_at = float("inf")
        time.sleep(0.05)
    return codes, failed

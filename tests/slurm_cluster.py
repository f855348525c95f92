"""A real one-node SLURM cluster for tests: munged, slurmctld and slurmd as child processes of the test run.

Everything (munge key and socket, slurm.conf, state, spool, logs) lives in one temporary directory, with its
own munge socket and its own ports, so it never talks to or disturbs a system-wide munge/SLURM that may also be
running. Teardown cancels the cluster's own jobs and then stops exactly the three daemon processes it started,
by process id. Recipe and gotchas: ../shared/STACK.md sections 5-6.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Iterator, Optional

import pytest

_APT_PACKAGES = ("slurm-wlm", "munge")
_DAEMONS = ("munged", "slurmctld", "slurmd")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be brought up on this machine; the message says which step failed and why."""


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_installed() -> None:
    """Install Debian's slurm-wlm and munge when a daemon is missing (root + apt-get only)."""
    if all(shutil.which(d) or Path("/usr/sbin", d).exists() for d in _DAEMONS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("slurmctld/slurmd/munged not installed and no root apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *_APT_PACKAGES]):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed (rc {res.returncode}): {res.stderr[-2000:]}")


def _bin(name: str) -> str:
    found = shutil.which(name) or (f"/usr/sbin/{name}" if Path("/usr/sbin", name).exists() else None)
    if not found:
        raise SlurmUnavailable(f"{name} not found on PATH or in /usr/sbin")
    return found


class SlurmCluster:
    """One node named after this host, partition ``debug``, all CPUs; jobs run as the current user.

    With ``nodes`` (names other than the hostname and localhost, which slurmctld refuses for a second slurmd) it
    runs one slurmd per name on this host (SLURM's multiple-slurmd mode: its own port, spool, log and pid file
    each), the CPUs shared out, so that a job can span several "nodes"."""

    def __init__(self, root: Path, cpus: Optional[int] = None, nodes: Optional[list[str]] = None) -> None:
        self.root = root
        self.cpus = cpus or os.cpu_count() or 1
        self.node = socket.gethostname().split(".")[0]
        self.nodes = nodes or [self.node]
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}

    # ----- environment -------------------------------------------------------------------------------------
    def env(self, base: Optional[dict[str, str]] = None) -> dict[str, str]:
        """Environment for client commands (sbatch, squeue, ...) and, through inheritance, for the jobs."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        res = subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} -> rc {res.returncode}\n{res.stdout}\n{res.stderr}")
        return res

    # ----- start / stop ------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        r = self.root
        for sub in ("munge", "state", "spool", "log", "run"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        # munged insists that the directories above its socket are not writable by others and are traversable.
        os.chmod(r, 0o711)
        os.chmod(r / "munge", 0o755)
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        mem_mb = 1024
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    # Declare a little less than the machine has: slurmd drains a node that reports less than
                    # its configured RealMemory.
                    mem_mb = max(256, int(line.split()[1]) // 1024 - 512)
        except OSError:
            pass
        lines = [
            "ClusterName=symdifftest",
            f"SlurmctldHost={self.node}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            f"SlurmUser={_user()}",
            f"SlurmdUser={_user()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # Short credential lifetime: a requeued job waits this long before it can start again (default 120 s).
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "JobRequeue=1",
            "KillWait=5",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={r / 'log' / 'jobcomp.log'}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd.pid'}{self._per_node}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}{self._per_node}",
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
        ]
        if len(self.nodes) == 1:
            lines.append(f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={mem_mb} State=UNKNOWN")
        else:
            cpus, mem = max(1, self.cpus // len(self.nodes)), max(256, mem_mb // len(self.nodes))
            lines[lines.index(f"SlurmdSpoolDir={r / 'spool'}")] = f"SlurmdSpoolDir={r / 'spool'}/%n"
            lines += [f"NodeName={n} NodeHostname={self.node} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={cpus} "
                      f"RealMemory={mem} State=UNKNOWN" for n in self.nodes]
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                            stdin=subprocess.DEVNULL)
        log.close()

    def _check_alive(self, name: str) -> None:
        p = self.procs[name]
        if p.poll() is not None:
            tail = (self.root / "log" / f"{name}.stdout").read_text(errors="replace")[-3000:]
            raise SlurmUnavailable(f"{name} exited with rc {p.returncode} right after start:\n{tail}")

    def start(self, timeout: float = 30) -> "SlurmCluster":
        self._write_config()
        r = self.root
        self._spawn("munged", [_bin("munged"), "-F", "-f", f"--socket={self.munge_socket}",
                               f"--key-file={r / 'munge.key'}", f"--log-file={r / 'log' / 'munged.log'}",
                               f"--pid-file={r / 'run' / 'munged.pid'}", f"--seed-file={r / 'munge' / 'seed'}"])
        self._wait_for(lambda: self.munge_socket.exists(), "munged socket", timeout, "munged")
        # -D keeps the daemons in the foreground, so the processes we started are the daemons themselves.
        self._spawn("slurmctld", [_bin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait_for(lambda: self.run("sinfo", "-h", check=False, timeout=10).returncode == 0,
                       "slurmctld answering sinfo", timeout, "slurmctld")
        if len(self.nodes) == 1:
            self._spawn("slurmd", [_bin("slurmd"), "-D", "-f", str(self.conf)])
        else:
            for n in self.nodes:
                self._spawn(f"slurmd-{n}", [_bin("slurmd"), "-D", "-N", n, "-f", str(self.conf)])
        for name in [k for k in self.procs if k.startswith("slurmd")]:
            self._wait_for(self._node_ready, f"nodes {', '.join(self.nodes)} idle", timeout, name)
        return self

    @property
    def _per_node(self) -> str:
        return "" if len(self.nodes) == 1 else ".%n"

    def _node_ready(self) -> bool:
        res = self.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10)
        states = [s.rstrip("*") for s in res.stdout.split()]
        return (res.returncode == 0 and len(states) == len(self.nodes)
                and all(s in ("idle", "mixed", "allocated") for s in states))

    def _wait_for(self, pred, what: str, timeout: float, daemon: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._check_alive(daemon)
            if pred():
                return
            time.sleep(0.2)
        logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                         for p in sorted((self.root / "log").glob("*")) if p.is_file())
        raise SlurmUnavailable(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop exactly the daemons started here (slurmd, slurmctld, munged)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--user", _user(), check=False, timeout=20)
            end = time.monotonic() + 30
            while time.monotonic() < end:
                res = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10)
                if res.returncode != 0 or not res.stdout.strip():
                    break
                time.sleep(0.5)
        for name in [k for k in self.procs if k.startswith("slurmd")] + ["slurmctld", "munged"]:
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)

    # ----- job helpers -------------------------------------------------------------------------------------
    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...); {} once the job is forgotten."""
        res = self.run("scontrol", "-o", "show", "job", job_id, check=False, timeout=10)
        if res.returncode != 0:
            return {}
        info: dict[str, str] = {}
        for tok in res.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                info.setdefault(k, v)
        return info

    def wait_job(self, job_id: str, timeout: float) -> dict[str, str]:
        """Block until the job reaches a final state (accounting is off, so poll scontrol) and return its info."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED"}
        end = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < end:
            info = self.job_info(job_id)
            if info.get("JobState") in final:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not finished after {timeout:.0f}s: {info}")


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def cluster_fixture(nodes: Optional[list[str]] = None) -> Iterator[SlurmCluster]:
    """Body of the pytest fixture: skip (saying exactly what failed) when SLURM cannot run here."""
    try:
        ensure_installed()
    except SlurmUnavailable as exc:
        pytest.skip(f"SLURM unavailable: {exc}")
    root = Path(tempfile.mkdtemp(prefix="symdiff-slurm-"))
    cluster = SlurmCluster(root, nodes=nodes)
    # A test run stopped with SIGTERM (a CI timeout, kill PID) would otherwise die without teardown and leave the
    # three daemons running: turn it into an exception so that the `finally` below stops them.
    previous = signal.getsignal(signal.SIGTERM)

    def _terminate(signum, _frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        # Installed but not starting is a real failure (with the daemons' logs), not a skip.
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
        if os.environ.get("SYMDIFF_KEEP_SLURM_DIR") != "1":
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    yield from cluster_fixture()

"""The rendered 8-node x 8-GPU training job, run by bash against a stand-in srun/scontrol that play SLURM's part:
one task per GPU (64), each finding its rank, local rank, world size and the rendezvous from SLURM's variables
through the trainer's own `discover`, and the requeue after a preemption (no SLURM daemons needed). Then a real
2-"node" job: two slurmd on this host, one task on each, meeting in one torch.distributed group."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from slurm_cluster import SlurmCluster, cluster_fixture

from symdiff.cluster.render import SubmitOptions, render
from symdiff.config import load_config
from symdiff.train.launch import EXIT_REQUEUE, discover

REPO = Path(__file__).resolve().parents[1]
NODES, GPUS = 8, 8
HOSTS = [f"gpu{n:02d}" for n in range(1, NODES + 1)]

# srun of a batch step: every task of the allocation, NODES x ntasks-per-node, with the variables SLURM gives it.
FAKE_SRUN = """#!/bin/bash
while [ "${1#--}" != "$1" ]; do shift; done   # srun's own options (--cpus-per-task=...)
procid=0; rc=0; node=0
for host in $(scontrol show hostnames "$SLURM_JOB_NODELIST"); do
    for ((l = 0; l < SLURM_NTASKS_PER_NODE; l++)); do
        SLURM_PROCID=$procid SLURM_LOCALID=$l SLURM_NODEID=$node SLURMD_NODENAME=$host "$@" || rc=$?
        procid=$((procid + 1))
    done
    node=$((node + 1))
done
exit $rc
"""
FAKE_SCONTROL = f"""#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then printf '%s\\n' {' '.join(HOSTS)}; exit 0; fi
echo "$*" >> "$SCONTROL_LOG"
"""
# The trainer's stand-in records each task's environment and arguments; the test then runs the trainer's own
# `discover` on them (a Python start per task would make 64 tasks take minutes on a 2-core machine).
FAKE_TRAIN = """#!/bin/bash
{ env -0; printf 'ARGV=%s\\0' "$*"; } > "$TASK_DIR/task-$SLURM_PROCID.env"
exit "${FAKE_EXIT:-0}"
"""


def _tool(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _run_job(tmp_path: Path, exit_code: int) -> tuple[subprocess.CompletedProcess, list[dict], str, str]:
    cfg = tmp_path / "geom.yaml"
    cfg.write_text("name: geom8x8\ndata:\n  root: shards/geom\n")
    r = render(SubmitOptions(job="train", nodes=NODES, gpus_per_node=GPUS), load_config(cfg), tmp_path / "run",
               workdir=tmp_path, venv=tmp_path / "venv")
    bin_dir, venv_bin = tmp_path / "bin", tmp_path / "venv" / "bin"
    bin_dir.mkdir(exist_ok=True)
    venv_bin.mkdir(parents=True, exist_ok=True)
    _tool(bin_dir / "srun", FAKE_SRUN)
    _tool(bin_dir / "scontrol", FAKE_SCONTROL)
    _tool(venv_bin / "symdiff", FAKE_TRAIN)
    log = tmp_path / "scontrol.log"
    log.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE",
                                                                     "LOCAL_RANK", "OMPI_", "PMI_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SCONTROL_LOG=str(log), FAKE_EXIT=str(exit_code),
               SLURM_JOB_ID="123456", SLURM_JOB_NODELIST="gpu[01-08]", SLURM_JOB_NUM_NODES=str(NODES),
               SLURM_NTASKS=str(NODES * GPUS), SLURM_NTASKS_PER_NODE=str(GPUS), SLURM_CPUS_PER_TASK="8",
               SLURM_GPUS_ON_NODE=str(GPUS), SLURM_RESTART_COUNT="0")
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir(exist_ok=True)
    env["TASK_DIR"] = str(tasks_dir)
    res = subprocess.run(["bash", "-c", r.script], env=env, capture_output=True, text=True, timeout=120)
    tasks = []
    for f in sorted(tasks_dir.glob("task-*.env")):
        task_env = dict(item.split("=", 1) for item in f.read_text().split("\0") if "=" in item)
        d = discover(task_env)
        tasks.append({"rank": d.rank, "world": d.world_size, "local": d.local_rank, "addr": task_env["MASTER_ADDR"],
                      "port": task_env["MASTER_PORT"], "node": task_env["SLURM_NODEID"],
                      "host": task_env["SLURMD_NODENAME"], "argv": task_env["ARGV"].split()})
    return res, tasks, log.read_text(), r.script


def test_eight_nodes_render_one_task_per_gpu_with_a_shared_rendezvous(tmp_path: Path) -> None:
    res, tasks, scontrol, script = _run_job(tmp_path, 0)
    assert res.returncode == 0, res.stderr
    header = [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")]
    for opt in ("--nodes=8", "--ntasks-per-node=8", "--gpus-per-node=8", "--signal=USR1@300", "--requeue",
                "--open-mode=append"):
        assert opt in header
    assert len(tasks) == NODES * GPUS
    assert sorted(t["rank"] for t in tasks) == list(range(NODES * GPUS))
    assert {t["world"] for t in tasks} == {NODES * GPUS}
    # One rendezvous for all 64: the first host of the node list, one port derived from the job id.
    assert {(t["addr"], t["port"]) for t in tasks} == {("gpu01", str(29500 + 123456 % 20000))}
    for t in tasks:  # per-node ranks: local rank = the GPU on its node, global rank = node * GPUs + local
        assert t["host"] == HOSTS[int(t["node"])]
        assert 0 <= t["local"] < GPUS and t["rank"] == int(t["node"]) * GPUS + t["local"]
        assert t["argv"][:1] == ["train"] and "--run-dir" in t["argv"]
    assert "requeue" not in scontrol


def test_preempted_eight_node_job_requeues_itself_once(tmp_path: Path) -> None:
    res, tasks, scontrol, _ = _run_job(tmp_path, EXIT_REQUEUE)
    assert res.returncode == 0, res.stderr
    assert len(tasks) == NODES * GPUS
    assert scontrol.splitlines() == ["requeue 123456"]
    assert "requeueing job 123456" in res.stderr


# ----------------------------------------------------------------------------------------------- a real 2-node job
# Two slurmd on this host (SLURM's multiple-slurmd mode), named so that both names resolve here: the rendered
# train script runs one task per node, and the tasks rendezvous over torch.distributed (gloo) as on two machines.
TWO_NODES = ["node1", "node2"]  # not the hostname, nor localhost: slurmctld refuses those for a second slurmd
RENDEZVOUS_TRAIN = """#!{python}
import json, os, subprocess, sys
sys.path.insert(0, {repo!r})
import torch
import torch.distributed as dist
from symdiff.train.launch import discover
# Name resolution is the one thing this host cannot play: the node names are SLURM's alone, so ask SLURM for the
# rendezvous node's address as a cluster's DNS would answer.
master = os.environ["MASTER_ADDR"]
info = subprocess.run(["scontrol", "-o", "show", "node", master], capture_output=True, text=True).stdout
addr = next(t.split("=", 1)[1] for t in info.split() if t.startswith("NodeAddr="))
env = dict(os.environ, MASTER_ADDR=addr)
d = discover(env)
dist.init_process_group("gloo", init_method=f"tcp://{{addr}}:{{env['MASTER_PORT']}}", rank=d.rank,
                        world_size=d.world_size)
total = torch.tensor([float(d.rank + 1)])
dist.all_reduce(total)
out = {{"rank": d.rank, "world": d.world_size, "local": d.local_rank, "node": os.environ["SLURM_NODEID"],
        "host": os.environ["SLURMD_NODENAME"], "addr": master, "sum": total.item()}}
with open(os.path.join(os.environ["TASK_DIR"], f"task-{{d.rank}}.json"), "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def slurm2() -> Iterator[SlurmCluster]:
    yield from cluster_fixture(nodes=TWO_NODES)


def test_two_node_job_through_real_slurm_rendezvous_across_nodes(slurm2: SlurmCluster, tmp_path: Path) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("name: twonode\ndata:\n  root: shards/qm9\n")
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    _tool(venv_bin / "symdiff", RENDEZVOUS_TRAIN.format(python=sys.executable, repo=str(REPO)))
    r = render(SubmitOptions(job="train", nodes=2, gpus_per_node=0, tasks_per_node=1, cpus_per_task=1,
                             time="00:05:00", signal_seconds=0), load_config(cfg), tmp_path / "run",
               workdir=tmp_path, venv=tmp_path / "venv")
    (tmp_path / "run" / "slurm").mkdir(parents=True)
    script = tmp_path / "job.sbatch"
    script.write_text(r.script)
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    env = slurm2.env()
    env["TASK_DIR"] = str(tasks_dir)
    res = subprocess.run(["sbatch", "--parsable", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    info = slurm2.wait_job(job, timeout=240)
    log = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "run" / "slurm").glob("*.out"))
    assert info["JobState"] == "COMPLETED", log
    tasks = sorted((json.loads(p.read_text()) for p in tasks_dir.glob("task-*.json")), key=lambda t: t["rank"])
    assert [t["rank"] for t in tasks] == [0, 1] and {t["world"] for t in tasks} == {2}
    assert [t["host"] for t in tasks] == TWO_NODES and [t["node"] for t in tasks] == ["0", "1"]
    assert {t["local"] for t in tasks} == {0}  # one task per node
    assert {t["addr"] for t in tasks} == {TWO_NODES[0]}  # the first node of the allocation
    assert {t["sum"] for t in tasks} == {3.0}  # both ranks took part in one all_reduce

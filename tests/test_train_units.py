"""Training pieces that need no process group: DeepSpeed JSON from the config, launcher discovery, shard split."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from symdiff.config import load_config
from symdiff.errors import UserError
from symdiff.train.engine import deepspeed_config
from symdiff.train.launch import discover
from symdiff.train.trainer import seed_of, split_batch


def _cfg(*overrides: str):
    return load_config(None, ["data.root=/nonexistent", *overrides])


def test_deepspeed_json_is_generated_from_train_section():
    cfg = _cfg("train.zero_stage=2", "train.lr=3e-4", "train.clip_grad_norm=2.0", "train.amsgrad=true",
               "train.weight_decay=1e-12", "data.batch_size=64", "train.grad_shards=4")
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["gradient_clipping"] == 2.0
    opt = ds["optimizer"]
    assert opt["type"] == "AdamW" and opt["params"]["amsgrad"] is True and opt["params"]["torch_adam"] is True
    assert opt["params"]["lr"] == 3e-4 and opt["params"]["weight_decay"] == 1e-12
    # 4 shards over 2 ranks = 2 accumulation steps; the product is the global batch
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * 2 * 2 == 64
    assert ds["bf16"]["enabled"] is (torch.cuda.is_available())
    assert "scheduler" not in ds
    warm = deepspeed_config(_cfg("train.warmup_steps=100", "train.lr=1e-3"), world_size=1)
    assert warm["scheduler"]["params"] == {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 100,
                                           "warmup_type": "linear"}
    assert deepspeed_config(cfg, world_size=2, load_universal=True)["checkpoint"]["load_universal"] is True
    # bf16 keeps fp32 master weights: stage 0 runs as ZeRO-1, with DeepSpeed's overflow check on
    bf16 = deepspeed_config(_cfg("train.zero_stage=0", "train.precision=bf16"), world_size=1)
    assert bf16["zero_optimization"]["stage"] == 1 and bf16["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert bf16["data_types"] == {"grad_accum_dtype": "fp32"}
    assert deepspeed_config(_cfg("train.zero_stage=0", "train.precision=fp32"), 1)["zero_optimization"]["stage"] == 0


@pytest.mark.parametrize("bad", ["train.zero_stage=4", "train.grad_shards=3", "train.precision=fp16"])
def test_deepspeed_json_rejects_bad_settings(bad):
    with pytest.raises(UserError):
        deepspeed_config(_cfg(bad), world_size=2)


def test_launcher_discovery_maps_each_launcher_to_the_standard_variables():
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
             "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.7"}
    d = discover(slurm)
    assert (d.rank, d.world_size, d.local_rank, d.launcher) == (3, 8, 1, "slurm")
    assert slurm["RANK"] == "3" and slurm["WORLD_SIZE"] == "8" and slurm["MASTER_ADDR"] == "10.0.0.7"
    assert slurm["MASTER_PORT"] == str(29500 + 1234)
    step = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "1", "SLURM_JOB_ID": "1"}
    assert discover(step).world_size == 1  # `srun -n 1` inside a bigger allocation
    ompi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "MASTER_ADDR": "h0", "MASTER_PORT": "4000"}
    d = discover(ompi)
    assert (d.rank, d.world_size, d.local_rank, d.launcher) == (1, 2, 1, "mpi")
    torchrun = {"RANK": "5", "WORLD_SIZE": "6", "LOCAL_RANK": "1", "MASTER_ADDR": "h1", "MASTER_PORT": "1",
                "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}  # torchrun inside a SLURM job: its variables win
    d = discover(torchrun)
    assert (d.rank, d.world_size, d.launcher) == (5, 6, "env")
    single: dict[str, str] = {}
    d = discover(single)
    assert (d.rank, d.world_size, d.launcher) == (0, 1, "single") and int(single["MASTER_PORT"]) > 0


def test_step_seeds_are_reproducible_and_distinct():
    assert seed_of(0, 5, 1) == seed_of(0, 5, 1)
    seeds = {seed_of(s, st, sh) for s in range(2) for st in range(50) for sh in range(4)}
    assert len(seeds) == 2 * 50 * 4
    assert all(0 <= x < 2**63 for x in seeds)


def test_micro_batch_shards_do_not_depend_on_world_size(tmp_path):
    """Shard k of a global batch holds the same molecules whether 1 rank cuts it into 4 or 2 ranks into 2."""
    from symdiff.data.bundled import ensure_bundled_shards
    from symdiff.data.loader import ShardLoader

    root = ensure_bundled_shards(tmp_path / "shards")
    for kw in ({"batch_size": 24}, {"batch_size": 0, "max_atoms_per_batch": 400}):
        by_size = "max_atoms_per_batch" in kw
        one = ShardLoader(root, "train", seed=3, **kw)
        two = [ShardLoader(root, "train", seed=3, rank=r, world_size=2, **kw) for r in range(2)]
        its = [iter(x) for x in two]
        for _, batch in zip(range(3), one):
            mine = [next(it) for it in its]
            shards_one = split_batch(batch, 4, by_size)  # shard k = micro k
            for r in range(2):
                for j, micro in enumerate(split_batch(mine[r], 2, by_size)):  # shard r + j * 2
                    ref = shards_one[r + 2 * j]
                    assert torch.equal(micro.mol_ids, ref.mol_ids)
                    assert torch.equal(micro.positions, ref.positions)
                    assert torch.equal(micro.mask, ref.mask)
                    # trimmed to its own largest molecule
                    assert micro.positions.shape[1] == int(micro.n_atoms.max())
            assert np.array_equal(np.sort(torch.cat([m.mol_ids for m in shards_one]).numpy()),
                                  np.sort(batch.mol_ids.numpy()))


def test_batch_select_takes_molecules_in_order_and_trims_only_when_asked():
    from symdiff.data.batch import Batch

    n = torch.tensor([2, 5, 3])
    mask = torch.arange(5)[None] < n[:, None]
    z = torch.where(mask, 6, 0)
    batch = Batch(positions=torch.randn(3, 5, 3), atomic_numbers=z, mask=mask, formal_charges=None,
                  mol_ids=torch.tensor([10, 11, 12]), n_atoms=n)
    two = batch.select(torch.tensor([2, 0]), trim=True)
    assert two.mol_ids.tolist() == [12, 10] and two.n_atoms.tolist() == [3, 2] and two.formal_charges is None
    assert two.positions.shape == (2, 3, 3) and two.positions.is_contiguous()
    assert torch.equal(two.positions, batch.positions[[2, 0], :3]) and torch.equal(two.mask, mask[[2, 0], :3])
    head = batch.select(slice(0, 2))  # split_nll's max_molecules: padding kept, a view
    assert head.positions.shape == (2, 5, 3) and head.positions.data_ptr() == batch.positions.data_ptr()
    assert torch.equal(head.atomic_numbers, z[:2])


def test_launcher_reports_the_failing_ranks_code_not_the_kill_of_the_others(tmp_path, monkeypatch):
    """Every rank hits the same bad input; the first to exit must not get the others SIGKILLed while they report
    it (the launcher answered 137 instead of 1). A rank that hangs after a failure is still stopped."""
    import os
    import stat
    import sys

    from symdiff.train import launch

    fake = tmp_path / "rank.sh"  # stands in for `python -m symdiff.cli ...`: rank 1 fails first, rank 0 a bit later
    fake.write_text('#!/bin/sh\nif [ "$RANK" = 0 ]; then sleep 1; exit 1; fi\nexit 1\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(sys, "executable", str(fake))
    assert launch.spawn_local(2, ["train"]) == 1

    fake.write_text('#!/bin/sh\nif [ "$RANK" = 0 ]; then exec sleep 600; fi\nexit 4\n')
    monkeypatch.setattr(launch, "_FAIL_GRACE_S", 0.5)
    assert launch.spawn_local(2, ["train"]) == 4  # the hanging rank 0 was killed; rank 1's code is the answer
    assert os.environ.get("SYMDIFF_LAUNCH_PARENT") is None


def test_run_dir_lock_names_its_holder_and_is_released_when_the_holder_dies(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys

    from symdiff.train.runlock import RunDirLock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from symdiff.train.runlock import RunDirLock\n"
                               f"RunDirLock(Path({str(tmp_path)!r})).acquire()\nprint('held', flush=True)\n"
                               "time.sleep(600)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        info = json.loads((tmp_path / "train.lock").read_text())
        assert info["pid"] == holder.pid
        with pytest.raises(UserError, match=rf"another training is running .*pid {holder.pid}, started "
                                            rf"{info['started']}"):
            RunDirLock(tmp_path).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with RunDirLock(tmp_path):  # the kernel dropped the dead holder's lock: nothing stale to clean up
        assert json.loads((tmp_path / "train.lock").read_text())["pid"] == os.getpid()
        with pytest.raises(UserError, match=f"pid {os.getpid()},"):
            RunDirLock(tmp_path).acquire()  # a second lock in the same process is refused too


def test_a_file_system_error_in_rank0s_preflight_is_one_user_error_for_every_rank():
    import torch.distributed as dist

    from symdiff.train.launch import free_port
    from symdiff.train.trainer import _on_rank0

    def fails():
        raise PermissionError(13, "Permission denied", "/runs/x/train.lock")

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(UserError, match=r"^/runs/x/train.lock: Permission denied$"):
            _on_rank0(fails, 0)
        assert _on_rank0(lambda: 42, 0) == 42
    finally:
        dist.destroy_process_group()

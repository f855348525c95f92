"""The faults tests inject into training runs, by monkeypatching symdiff (see sitecustomize.py beside this file).

SYMDIFF_TRAIN_TEST_HOOKS is a JSON object with any of:
- "nan_loss": [steps]   rank 0's loss of these 1-based steps is NaN (a finite forward, a non-finite loss);
- "nan_grad": [steps]   rank 0's loss is finite but its gradient is NaN;
- "step_sleep": s       every micro-batch sleeps s seconds (widens the windows signals and kills aim at);
- "save_sleep": s       every checkpoint write pauses s seconds after the files are written, before publishing;
- "save_fail": {"step": N, "error": "enospc" | "enforce"}   the write of step N's checkpoint fails on every rank
  after DeepSpeed's files are on disk, as a full disk makes it fail (OSError ENOSPC, or torch.save's
  "enforce fail ... unexpected pos" RuntimeError).
"""
from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any

ENV = "SYMDIFF_TRAIN_TEST_HOOKS"
DIR = Path(__file__).resolve().parent


def env(**spec: Any) -> dict[str, str]:
    """Environment variables that make a `symdiff train` subprocess run with ``spec``'s faults."""
    path = os.environ.get("PYTHONPATH", "")
    return {ENV: json.dumps(spec), "PYTHONPATH": os.pathsep.join(p for p in (str(DIR), path) if p)}


def install_from_env() -> None:
    install(json.loads(os.environ[ENV]))


def install(spec: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    from symdiff.train import checkpoint, trainer

    nan_loss = {int(s) for s in spec.get("nan_loss", [])}
    nan_grad = {int(s) for s in spec.get("nan_grad", [])}
    step_sleep = float(spec.get("step_sleep", 0))
    compute_loss = trainer.compute_loss

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[override]
            return x.clone()

        @staticmethod
        def backward(ctx, g):  # type: ignore[override]
            return g * float("nan")

    def faulty_loss(engine, micro, step):
        loss, stats = compute_loss(engine, micro, step)
        if step_sleep:
            time.sleep(step_sleep)
        if dist.get_rank() == 0:
            if step in nan_loss:
                loss = loss * float("nan")
            if step in nan_grad:
                loss = NanGrad.apply(loss)
        return loss, stats

    trainer.compute_loss = faulty_loss

    save_sleep = float(spec.get("save_sleep", 0))
    fail = spec.get("save_fail")
    write_parts = checkpoint._write_parts

    def faulty_write(engine, ckpt_dir, tmp, rank, common, per_rank):
        if fail and tmp.name == f".tmp-{checkpoint.tag_for(int(fail['step']))}":
            engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, save_latest=False)  # the disk fills up after these
            if fail.get("error") == "enforce":
                raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1216 vs 1114")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / checkpoint.rank_file(rank)))
        write_parts(engine, ckpt_dir, tmp, rank, common, per_rank)
        if save_sleep:
            time.sleep(save_sleep)

    checkpoint._write_parts = faulty_write

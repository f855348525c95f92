"""DeepSpeed set-up. The DeepSpeed JSON is *generated* from ``cfg.train`` here, so there is one source of truth."""
from __future__ import annotations

import datetime
import json
import logging
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from symdiff.errors import UserError

log = logging.getLogger(__name__)


def use_bf16(cfg: DictConfig) -> bool:
    prec = str(cfg.train.precision)
    if prec not in ("auto", "bf16", "fp32"):
        raise UserError(f"train.precision: expected auto|bf16|fp32, got '{prec}'")
    if prec == "auto":
        return torch.cuda.is_available()
    # bf16 on CPU is allowed when asked for (slow, but it exercises the GPU code path on a CPU machine).
    return prec == "bf16"


def grad_shards(cfg: DictConfig, world_size: int) -> int:
    """Number of micro-batches one global batch is cut into (>= world size, a multiple of it).

    Randomness is drawn per (step, shard), not per rank, so a fixed ``train.grad_shards`` makes the maths of a
    step independent of how many processes share it: that is what lets a run resume on another world size and
    continue the same loss trajectory. 0 means one shard per rank.
    """
    shards = int(cfg.train.grad_shards) or world_size
    if shards % world_size:
        raise UserError(f"train.grad_shards={shards} is not a multiple of the world size {world_size}")
    return shards


def effective_zero_stage(cfg: DictConfig) -> int:
    """The ZeRO stage the engine runs. bf16 at stage 0 becomes stage 1: DeepSpeed 0.19.8 keeps fp32 master
    weights for bf16 only under ZeRO (its stage-0 bf16 mode updates the bf16 weights directly, where small
    updates vanish). On one process ZeRO-1 partitions nothing, so this costs nothing there."""
    stage = int(cfg.train.zero_stage)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"train.zero_stage: expected 0, 1, 2 or 3, got {stage}")
    return 1 if stage == 0 and use_bf16(cfg) else stage


def deepspeed_config(cfg: DictConfig, world_size: int, *, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON for this run (also written to RUN_DIR/deepspeed_config.json for the record)."""
    t = cfg.train
    stage = effective_zero_stage(cfg)
    gas = grad_shards(cfg, world_size) // world_size
    # DeepSpeed wants a nominal per-rank micro batch; ours vary (token budget), it only uses it for counters.
    micro = max(1, int(cfg.data.batch_size) // (world_size * gas))
    ds: dict[str, Any] = {
        "train_batch_size": micro * gas * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": float(t.clip_grad_norm),
        "optimizer": {
            "type": "AdamW",
            # torch_adam: the plain torch AdamW (amsgrad supported, no JIT-built fused op on CPU; STACK.md §3)
            "params": {"lr": float(t.lr), "betas": [0.9, 0.999], "eps": 1e-8,
                       "weight_decay": float(t.weight_decay), "amsgrad": bool(t.amsgrad), "torch_adam": True},
        },
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": use_bf16(cfg)},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": bool(load_universal)},
    }
    if ds["bf16"]["enabled"]:
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
        # bf16 has no loss scaler to notice inf/NaN gradients; ask for the check so the guard can skip them
        ds["bf16"]["check_grad_overflow"] = True
    if stage == 3:
        # overlap_comm off on CPU: with it on, ZeRO-3 gradients differed run to run in the last bits (measured), which
        # breaks bitwise resume; there is no copy stream to overlap with on CPU anyway.
        ds["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": False,
                                        "overlap_comm": torch.cuda.is_available()})
    scheduler = lr_scheduler(t)
    if scheduler is not None:
        ds["scheduler"] = scheduler
    return ds


def lr_scheduler(t: DictConfig) -> dict[str, Any] | None:
    """DeepSpeed's scheduler section for train.warmup_steps / lr_schedule / lr_min_ratio (None: constant lr).

    A linear warm-up from 0, then constant (the paper), a cosine to lr * lr_min_ratio, or a linear decay to 0, both
    reached at train.max_steps.
    """
    warmup, schedule = int(t.warmup_steps), str(getattr(t, "lr_schedule", "constant"))
    if schedule == "constant":
        if warmup == 0:
            return None
        return {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": float(t.lr),
                                               "warmup_num_steps": warmup, "warmup_type": "linear"}}
    if schedule == "cosine":
        # WarmupCosineLR refuses 0 warm-up steps, and both it and WarmupDecayLR stretch any warm-up to at least 2
        # steps (deepspeed/runtime/lr_schedules.py): with train.warmup_steps=0 the first step runs at lr 0 and the
        # second at lr / 2, for cosine and linear alike
        return {"type": "WarmupCosineLR", "params": {
            "total_num_steps": int(t.max_steps), "warmup_num_steps": max(1, warmup), "warmup_min_ratio": 0.0,
            "cos_min_ratio": float(getattr(t, "lr_min_ratio", 0.01)), "warmup_type": "linear"}}
    if schedule == "linear":
        return {"type": "WarmupDecayLR", "params": {
            "total_num_steps": int(t.max_steps), "warmup_min_lr": 0.0, "warmup_max_lr": float(t.lr),
            "warmup_num_steps": warmup, "warmup_type": "linear"}}
    raise UserError(f"train.lr_schedule: expected constant|cosine|linear, got '{schedule}'")


def init_distributed(timeout_min: float = 30.0) -> None:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU). Env must be set (launch.py)."""
    import deepspeed

    if torch.cuda.is_available():
        import os

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(timeout=datetime.timedelta(minutes=timeout_min))


class TrainStep(nn.Module):
    """What DeepSpeed drives: forward(batch) = model.training_loss(batch).

    The engine must call a module's forward (ZeRO-3 gathers parameters in forward hooks, and the engine keeps its
    own bookkeeping there), while the model's API is ``training_loss``. Parameter names gain a ``model.`` prefix.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):  # noqa: D401
        return self.model.training_loss(batch)


class _GuardedStep:
    """Stage 0 fp32 runs torch's AdamW directly, which would happily apply NaN gradients. This wraps its ``step``
    to skip non-finite gradients and expose ``overflow`` the way DeepSpeed's own optimizers do, so the engine
    counts the skip (``engine.skipped_steps``) exactly as under ZeRO."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.inner = optimizer.step
        optimizer.overflow = False  # type: ignore[attr-defined]

    def __call__(self, *args, **kwargs):
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        self.optimizer.overflow = not finite  # type: ignore[attr-defined]
        if not finite:
            return None
        return self.inner(*args, **kwargs)


def build_engine(cfg: DictConfig, model: nn.Module, world_size: int, *, load_universal: bool = False):
    """Wrap ``model`` into a DeepSpeed engine configured from cfg.train. Returns (engine, ds_config)."""
    import deepspeed

    ds_cfg = deepspeed_config(cfg, world_size, load_universal=load_universal)
    step_module = TrainStep(model)
    engine, optimizer, _, _ = deepspeed.initialize(model=step_module, model_parameters=step_module.parameters(),
                                                   config=ds_cfg)
    if ds_cfg["zero_optimization"]["stage"] == 0:
        base = engine.optimizer
        if isinstance(base, torch.optim.Optimizer) and not hasattr(base, "overflow"):
            base.step = _GuardedStep(base)  # type: ignore[method-assign]
            from deepspeed.runtime.utils import clip_grad_norm_

            def clip_and_record() -> None:
                # DeepSpeed's stage-0 fp32 clipping drops the norm; keep it so get_global_grad_norm() reports it.
                base._global_grad_norm = float(clip_grad_norm_(parameters=engine.module.parameters(),
                                                               max_norm=engine.gradient_clipping(), mpu=engine.mpu))

            engine.clip_fp32_gradients = clip_and_record  # type: ignore[method-assign]
    log.debug("DeepSpeed config: %s", json.dumps(ds_cfg))
    return engine, ds_cfg


def release_engine(engine) -> None:
    """Undo what the engine hooked into torch and DeepSpeed, so that it can be collected while the process group
    still exists (``trainer._leave_process_group`` says why that matters)."""
    engine.destroy()
    # DeepSpeed 0.19.8's ZeRO-3 keeps the whole engine reachable from module-level state that destroy() leaves:
    # the wrapped module on a forward stack, and its submodules in a class-wide lru_cache of the coordinator.
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    ours = {id(m) for m in engine.module.modules()}
    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if id(m) not in ours]
    cached = vars(PartitionedParameterCoordinator).get("_PartitionedParameterCoordinator__params_to_release")
    for cell in getattr(cached, "__closure__", None) or ():  # the lru_cache sits inside an NVTX wrapper
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()


def is_stage3(engine) -> bool:
    return int(engine.zero_optimization_stage()) == 3

"""The training loop, top to bottom: set up, resume, step, log, checkpoint, stop.

Exactness rules that everything here follows (so a resumed run is bitwise the uninterrupted one):
- all randomness of a step comes from ``torch.manual_seed(seed_of(train.seed, step, shard))`` set right before
  each micro-batch, so it depends on the step and the data shard only (not on the world size or on history);
- the loader's order is a pure function of (data.seed, epoch) and its state is (epoch, next global batch);
- everything else (weights, optimizer, scheduler, EMA, counters) is in the checkpoint.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import resource
import signal
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from symdiff.config import config_hash, to_dict, to_yaml
from symdiff.data.batch import Batch
from symdiff.errors import UserError
from symdiff.io.atomic import atomic_write_text
from symdiff.train import checkpoint as ckpt
from symdiff.train.ema import EMA
from symdiff.train.engine import (build_engine, effective_zero_stage, grad_shards, init_distributed, is_stage3,
                                  release_engine, use_bf16)
from symdiff.train.launch import EXIT_NONFINITE, EXIT_REQUEUE, FORWARDED_SIGNALS, DistEnv, discover
from symdiff.train.prefetch import Prefetcher
from symdiff.train.step_stats import PendingStats, reduce_stats
from symdiff.train.runlock import RunDirLock

log = logging.getLogger("symdiff.train")


def seed_of(seed: int, step: int, shard: int) -> int:
    """Independent, reproducible 63-bit seed for (global seed, step, data shard)."""
    return int(np.random.SeedSequence([seed, step, shard]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def split_batch(batch: Batch, n: int, by_size: bool = False) -> list[Batch]:
    """Cut a rank's batch into ``n`` micro-batches: micro j takes every n-th molecule starting at j.

    The loader gives rank r molecules r, r+W, r+2W... of the global batch (first sorted by decreasing size when
    batches are cut by a token budget: ``by_size``), so micro j of rank r is global shard r + j*W = every S-th
    molecule from it (S = n*W): the same molecules whatever W is, for a fixed S.
    Padding is trimmed to each micro-batch's largest molecule.
    """
    if n == 1:
        return [batch]
    order = torch.arange(len(batch))
    if by_size:  # stable, as the loader's own sort; a no-op on a rank's share, which is already sorted
        order = torch.from_numpy(np.argsort(-batch.n_atoms.numpy(), kind="stable"))
    out = []
    for j in range(n):
        idx = order[j::n]
        if len(idx) == 0:
            idx = order[[j % len(batch)]]  # never hand the model an empty batch
        out.append(batch.select(idx, trim=True))
    return out


def compute_loss(engine, micro: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one micro-batch of ``step`` (the seeds are set by the caller) and the process's detached step
    statistics. A non-finite loss is made NaN so that its gradients are non-finite too and the optimizer's overflow
    check skips the step."""
    loss, stats = engine(micro)
    # A factor of 1 or NaN chosen on the device: `if not torch.isfinite(loss)` would stop the host every step.
    return loss * torch.where(torch.isfinite(loss), loss.new_ones(()), loss.new_full((), float("nan"))), stats


# Keys of the process's statistics that the log has already (from the data) or that are the loss itself.
_LOGGED_ELSEWHERE = frozenset({"loss", "padding_fraction", "atoms_per_mol"})


class _StopFlag:
    """SIGUSR1/SIGTERM (SLURM preemption, `scancel --signal`, the --nproc parent) and SIGINT (Ctrl-C) ask for
    checkpoint-and-exit.

    The handler only sets a flag; the loop acts on it after the current step, once all ranks agree. A signal this
    process was started to ignore (a script's `cmd &` ignores SIGINT) stays ignored. ``restore()`` puts the previous
    handlers back.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old = {s: signal.signal(s, self._handle) for s in FORWARDED_SIGNALS
                     if signal.getsignal(s) is not signal.SIG_IGN}

    def _handle(self, signum, _frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


# Optimizer and schedule keys a resume takes from the new config (train.amsgrad is refused: check_compatible).
APPLIED_ON_RESUME = ("lr", "weight_decay", "warmup_steps", "clip_grad_norm")


def apply_optimizer_changes(engine, old_train: dict[str, Any], cfg: DictConfig, ds_cfg: dict[str, Any],
                            rank: int) -> dict[str, tuple[Any, Any]]:
    """Make the resumed optimizer and scheduler follow ``cfg.train``, not the checkpoint's values; say so loudly.

    DeepSpeed restores each param group's lr/weight_decay/betas/eps from the checkpoint, and its ZeRO-1/2 and bf16
    optimizers their clipping norm too, so without this a new ``train.lr`` would be recorded in config.yaml and
    silently not used. Warmup is counted in applied optimizer steps since the start of the run. Returns
    {key: (old, new)} of what changed.
    """
    t = cfg.train
    changed = {k: (old_train.get(k), t[k]) for k in APPLIED_ON_RESUME if k in old_train and old_train[k] != t[k]}
    params = ds_cfg["optimizer"]["params"]
    opt = engine.optimizer
    groups = opt.param_groups
    if getattr(opt, "clip_grad", None) not in (None, float(ds_cfg["gradient_clipping"])):
        opt.clip_grad = float(ds_cfg["gradient_clipping"])  # stage 0 and ZeRO-3 read the engine's config instead
    for key in ("weight_decay", "betas", "eps"):
        want = tuple(params[key]) if key == "betas" else params[key]
        for g in groups:
            if key in g and g[key] != want:
                changed.setdefault(key, (g[key], want))
                g[key] = want
    if "lr" in changed or "warmup_steps" in changed:
        sched = engine.lr_scheduler
        if sched is not None:
            if not int(old_train.get("warmup_steps", 0)) > 0:  # no scheduler state was saved: rebuild it
                sched.last_batch_iteration = int(engine.global_steps) - int(engine.skipped_steps) - 1
            lrs = sched.get_lr()
        else:
            lrs = [float(t.lr)] * len(groups)
        for g, lr in zip(groups, lrs):
            g["lr"] = lr
    if rank == 0 and changed:
        log.warning("resume: applying the new optimizer/schedule settings: %s (learning rate now %g)",
                    ", ".join(f"{'train.' if k in APPLIED_ON_RESUME else 'optimizer '}{k} {a!r} -> {b!r}"
                              for k, (a, b) in changed.items()),
                    float(groups[0]["lr"]))
    return changed


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, this process


def _rewind_metrics(path: Path, step: int) -> None:
    """Drop log lines of steps after the checkpoint we resume from (they will be redone), atomically."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


@torch.no_grad()
def validation_nll(cfg: DictConfig, ema: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], step: int,
                   device: torch.device) -> dict[str, float]:
    """Mean per-molecule NLL (the paper's bound, EMA weights) on the first ``train.eval_samples`` molecules of the
    validation split, on this process alone. Its randomness comes from a private generator seeded by the step, so
    it is repeatable and leaves the training streams (torch's global RNG) alone."""
    from symdiff.data.loader import ShardLoader
    from symdiff.models import build_model

    model = build_model(cfg)
    model.load_state_dict({**{k: v.cpu() for k, v in ema.items()}, **buffers})
    model.to(device).eval()
    loader = ShardLoader(cfg.data.root, cfg.data.val_split, batch_size=int(cfg.sample.batch_size), shuffle=False)
    gen = torch.Generator(device=device).manual_seed(seed_of(int(cfg.train.seed), step, 1 << 30))
    total, count = 0.0, 0
    for batch in loader:
        take = min(len(batch), int(cfg.train.eval_samples) - count)
        nll = model.nll(batch.to(device), generator=gen)[:take]
        total += float(nll.double().sum())
        count += take
        if count >= int(cfg.train.eval_samples):
            break
    return {"val_nll": total / max(count, 1), "val_molecules": count}


def train(cfg: DictConfig, run_dir: str | Path, resume: str = "auto") -> int:
    """Train ``cfg`` in ``run_dir`` on this process's rank. Returns the process exit code (0, 75 requeue, 3)."""
    env = discover()
    init_distributed()
    stop = _StopFlag()
    lock = RunDirLock(Path(run_dir))
    try:
        with contextlib.ExitStack() as teardown:
            code = _train(cfg, Path(run_dir), resume, env, stop, lock, teardown)
    except UserError:
        # Every rank raises the same error (rank 0 decides and broadcasts). Leave the process group first: gloo
        # torn down at interpreter exit with the group still live aborts ("terminate called ...", exit 134).
        _leave_process_group()
        raise
    finally:
        lock.release()
        stop.restore()
    _leave_process_group()
    return code


def _leave_process_group() -> None:
    # The engine's hooks make reference cycles through autograd that only release_engine (run by the teardown
    # stack) breaks; collect them now, so that the subgroups the engine holds die with the live interpreter and not
    # in its finalisation, where gloo aborted a rank now and then ("terminate called without an active exception",
    # exit 134 instead of 75 after a preemption).
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _preflight(cfg: DictConfig, run_dir: Path, resume: str, lock: RunDirLock) -> Optional[Path]:
    """Rank 0, before any rank does work: take the run directory, check the data, pick the checkpoint.

    Raises UserError; nothing in the run directory is changed before the lock is held.
    """
    from symdiff.data.shards import read_manifest
    from symdiff.train.datacheck import check_config_matches, verify_shards

    t = cfg.train
    if int(t.max_steps) < 1:
        raise UserError(f"train.max_steps={int(t.max_steps)}: must be >= 1 (the number of steps to train)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, no permission
        raise UserError(f"{run_dir}: cannot make the run directory ({exc.strerror})") from None
    lock.acquire()
    root = Path(cfg.data.root)
    manifest = read_manifest(root)
    check_config_matches(manifest, cfg.data, root)
    splits = [cfg.data.train_split] + ([cfg.data.val_split] if int(t.eval_every) > 0 else [])
    level = str(cfg.data.get("verify", "full"))
    t0 = time.perf_counter()
    n = verify_shards(manifest, root, splits, level)
    if n:
        log.info("data.verify=%s: %d shards of %s match the manifest (%.2f s)", level, n, "+".join(splits),
                 time.perf_counter() - t0)
    ckpt.clean_stale(run_dir / ckpt.CKPT_DIR)
    return ckpt.find_resume(run_dir, resume)


def _on_rank0(fn, rank: int) -> Any:
    """``fn()`` on rank 0, its result (or its UserError, re-raised) on every rank.

    A file-system error (permissions, a full disk) becomes a UserError too: raised on rank 0 alone it would leave
    the other ranks waiting in the broadcast until the process-group timeout."""
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except UserError as exc:
            box[0] = ("error", str(exc))
        except OSError as exc:
            box[0] = ("error", f"{exc.filename or 'run directory'}: {exc.strerror or exc}")
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "error":
        raise UserError(box[0][1])
    return box[0][1]


def _train(cfg: DictConfig, run_dir: Path, resume: str, env: DistEnv, stop: _StopFlag, lock: RunDirLock,
           teardown: contextlib.ExitStack) -> int:
    # ---------------------------------------------------------------- processes and devices
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{env.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    ckpt_dir = run_dir / ckpt.CKPT_DIR
    t = cfg.train

    # ---------------------------------------------------------------- run dir, data, checkpoint (rank 0 for all)
    resume_dir: Optional[Path] = _on_rank0(lambda: _preflight(cfg, run_dir, resume, lock), rank)
    shards_total = grad_shards(cfg, world)
    n_local = shards_total // world

    # ---------------------------------------------------------------- model (same initial weights on every rank)
    from symdiff.data.loader import ShardLoader
    from symdiff.data.shards import read_manifest
    from symdiff.models import build_model

    torch.manual_seed(int(t.seed))
    model = build_model(cfg)
    manifest = read_manifest(cfg.data.root)
    hist = manifest.get("n_atoms_histogram", {}).get(cfg.data.train_split)
    if hist:
        model.set_n_atoms_histogram({int(k): int(v) for k, v in hist.items()})
    model.to(device)
    shapes = {k: tuple(p.shape) for k, p in model.named_parameters()}

    plan = None
    if resume_dir is not None:
        plan = ckpt.plan_resume(resume_dir, world, effective_zero_stage(cfg), ckpt_dir, bf16=use_bf16(cfg))
        ckpt.check_compatible(plan.state, cfg, shapes, resume_dir)  # raises before anything is written
        if plan.universal:
            err: list[Any] = [None]
            if rank == 0:
                log.info("world size/ZeRO layout changed (%s -> %d ranks, stage %s -> %d): converting %s to "
                         "DeepSpeed's universal format", plan.meta["world_size"], world, plan.meta["zero_stage"],
                         effective_zero_stage(cfg), resume_dir.name)
                try:
                    ckpt.convert_to_universal(resume_dir, ckpt_dir)
                except UserError as exc:
                    err[0] = str(exc)
            dist.broadcast_object_list(err, src=0)
            if err[0]:
                raise ckpt.CheckpointError(err[0])

    # ---------------------------------------------------------------- engine, EMA, data
    engine, ds_cfg = build_engine(cfg, model, world, load_universal=bool(plan and plan.universal))
    teardown.callback(release_engine, engine)
    named = [(k, p) for k, p in engine.module.model.named_parameters()]
    ema = EMA(named, float(t.ema_decay), stage3=is_stage3(engine), bf16=use_bf16(cfg))
    loader = ShardLoader(cfg.data.root, cfg.data.train_split, batch_size=int(cfg.data.batch_size),
                         max_atoms_per_batch=int(cfg.data.max_atoms_per_batch), n_buckets=int(cfg.data.n_buckets),
                         shuffle=True, seed=int(cfg.data.seed), rank=rank, world_size=world,
                         chunk_size=int(cfg.data.chunk_size), window_chunks=int(cfg.data.window_chunks))

    step, nonfinite_total, nonfinite_row = 0, 0, 0
    if plan is not None:
        old_train = dict(plan.state["config"].get("train", {}))
        # A checkpoint written without warmup has no scheduler state for the WarmupLR that this config adds.
        ckpt.load_engine(engine, plan, scheduler=int(old_train.get("warmup_steps", 0)) > 0)
        apply_optimizer_changes(engine, old_train, cfg, ds_cfg, rank)
        ema.load_state_dict(plan.state["ema"])
        step = int(plan.state["step"])
        nonfinite_total = int(plan.state.get("nonfinite_total", 0))
        nonfinite_row = int(plan.state.get("nonfinite_in_a_row", 0))
        mine = ckpt.load_rank_state(plan.tag_dir, rank) if plan.meta["world_size"] == world else None
        if mine is not None:
            ckpt.set_rng_state(mine["rng"])
        # The loader state is global (epoch, next global batch): rank 0's is valid on any world size.
        loader.load_state_dict((mine or ckpt.load_rank_state(plan.tag_dir, 0))["loader"])
        if rank == 0:
            log.info("resumed from %s at step %d (epoch %d)", plan.tag_dir, step, loader.epoch)
            if step >= int(t.max_steps):
                log.warning("the checkpoint is at step %d, train.max_steps=%d: nothing to train (raise "
                            "train.max_steps to continue)", step, int(t.max_steps))
    else:
        # Per-rank streams for anything outside a step's seeded region, derived from the one global seed.
        torch.manual_seed(seed_of(int(t.seed), 0, 1_000_000 + rank))

    metrics_path = run_dir / "metrics.jsonl"
    writer = None
    if rank == 0:
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        atomic_write_text(run_dir / "deepspeed_config.json", json.dumps(ds_cfg, indent=1) + "\n")
        _rewind_metrics(metrics_path, step)
        _rewind_metrics(run_dir / "eval.jsonl", step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1)
        except ImportError:  # tensorboard is in requirements.txt; stay usable without it
            writer = None
    from tqdm import tqdm

    bar = tqdm(total=int(t.max_steps), initial=step, disable=None if rank == 0 else True, desc="train",
               dynamic_ncols=True)

    def save() -> Path:
        common = {"format": ckpt.FORMAT_VERSION, "step": step, "epoch": cur.loader_state["epoch"],
                  "config": to_dict(cfg),
                  "config_hash": config_hash(cfg), "param_shapes": shapes, "ema": ema.state_dict(),
                  "buffers": {k: v.detach().cpu() for k, v in engine.module.model.state_dict().items()
                              if k not in shapes},
                  "world_size": world, "grad_shards": shards_total,
                  "nonfinite_total": nonfinite_total, "nonfinite_in_a_row": nonfinite_row}
        return ckpt.save(engine, ckpt_dir, step, common, {"rng": ckpt.rng_state(), "loader": cur.loader_state},
                         keep_last=int(t.keep_last))

    # ---------------------------------------------------------------- the loop
    engine.train()
    seed = int(t.seed)
    by_size = int(cfg.data.max_atoms_per_batch) > 0
    window = {"t0": time.perf_counter(), "steps": 0, "mols": 0.0, "atoms": 0.0, "slots": 0.0}
    exit_code = 0
    fetch = Prefetcher(loader, device, lambda b: split_batch(b, n_local, by_size=by_size))
    ahead = None
    unread: Optional[PendingStats] = None  # the previous step's statistics, not yet read on the host
    stat_keys: Optional[list[str]] = None  # the process statistics logged beside the loss
    last: Optional[torch.Tensor] = None  # the newest statistics read

    def absorb(res: torch.Tensor) -> None:
        window["steps"] += 1
        window["mols"] += float(res[2])
        window["atoms"] += float(res[3])
        window["slots"] += float(res[4])

    while step < int(t.max_steps):
        cur = ahead if ahead is not None else fetch.next()
        ahead = None
        batch = cur.batch
        step += 1
        skipped_before = engine.skipped_steps
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        stat_sums: Optional[torch.Tensor] = None
        for j, micro in enumerate(cur.micros):
            torch.manual_seed(seed_of(seed, step, rank + j * world))
            loss, micro_stats = compute_loss(engine, micro, step)
            if stat_keys is None:  # fixed by the process and its config: the same on every rank and step
                stat_keys = sorted(k for k in micro_stats if k not in _LOGGED_ELSEWHERE)
            vals = torch.stack([micro_stats[k].detach().double() for k in stat_keys]) if stat_keys else None
            stat_sums = vals if stat_sums is None else stat_sums + vals
            if j == 0 and step < int(t.max_steps):
                # the host draws and sends the next batch while the device runs this forward (no torch RNG used)
                ahead = fetch.next()
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().double()
        skipped = engine.skipped_steps != skipped_before
        if not skipped:
            ema.update()

        # One small all-reduce per step: global loss, data counts, the data-order check, and the stop request. It is
        # read on the host a step late, or at once on the steps that log (the same on every rank: all decide alike).
        counts = [n_local, len(batch), float(batch.n_atoms.sum()), float(batch.mask.numel()),
                  float(batch.mol_ids.sum()), float((batch.mol_ids.double() ** 2).sum()),
                  1.0 if stop.signum is not None else 0.0]
        pending = reduce_stats(loss_sum, counts, device, stat_sums)
        if unread is not None:
            last = unread.result()
            absorb(last)
            unread = None
        log_now = step % int(t.log_every) == 0 or step == int(t.max_steps) or skipped
        if log_now:
            last = pending.result()
            absorb(last)
        else:
            unread = pending
        bar.update(1)

        if skipped:
            nonfinite_total += 1
            nonfinite_row += 1
            log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row, %d in total)", step,
                        nonfinite_row, nonfinite_total)
        else:
            nonfinite_row = 0

        if rank == 0 and log_now:
            stats = last
            g_loss = float(stats[0] / stats[1])
            dt = max(time.perf_counter() - window["t0"], 1e-9)
            gn = engine.get_global_grad_norm()
            rec = {"step": step, "epoch": cur.loader_state["epoch"], "loss": g_loss,
                   "grad_norm": None if gn is None else float(gn), "lr": float(engine.get_lr()[0]),
                   "it_per_s": window["steps"] / dt, "molecules_per_s": window["mols"] / dt,
                   "tokens_per_s": window["atoms"] / dt,
                   "padding_fraction": 1.0 - window["atoms"] / max(window["slots"], 1.0),
                   "memory_gb": _memory_gb(device), "skipped": skipped, "nonfinite_total": nonfinite_total,
                   "mol_id_sum": float(stats[5]), "mol_id_sqsum": float(stats[6]), "time": time.time()}
            # the process's own statistics (e.g. l2_x, l2_h), averaged over the step's micro-batches like the loss
            rec.update({k: float(stats[1 + len(counts) + i] / stats[1]) for i, k in enumerate(stat_keys or [])})
            # json writes floats with repr(): the shortest text that reads back to the same double.
            with open(metrics_path, "a") as f:
                f.write(json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                                    for k, v in rec.items()}) + "\n")
            if writer is not None:
                for k in ("loss", "grad_norm", "lr", "it_per_s", "molecules_per_s", "tokens_per_s",
                          "padding_fraction", "memory_gb", *(stat_keys or [])):
                    if isinstance(rec[k], float) and math.isfinite(rec[k]):
                        writer.add_scalar(f"train/{k}", rec[k], step)
            bar.set_postfix(loss=f"{g_loss:.4f}")
            window = {"t0": time.perf_counter(), "steps": 0, "mols": 0.0, "atoms": 0.0, "slots": 0.0}

        if nonfinite_row > int(t.max_nonfinite_in_a_row):
            if rank == 0:
                log.error("stopping: %d steps in a row had a non-finite loss or gradient (limit "
                          "train.max_nonfinite_in_a_row=%d); %d skipped in total. Last complete checkpoint: %s. "
                          "Lower train.lr, check the data, or raise the limit.", nonfinite_row,
                          int(t.max_nonfinite_in_a_row), nonfinite_total, ckpt.newest_complete(ckpt_dir))
            exit_code = EXIT_NONFINITE
            break
        if int(t.eval_every) > 0 and step % int(t.eval_every) == 0 and not skipped:
            if rank == 0:  # no collective needed: every rank holds the full EMA
                ema_state = ema.state_dict()
                buffers = {k: v.detach().cpu() for k, v in engine.module.model.state_dict().items() if k not in shapes}
                val = validation_nll(cfg, ema_state, buffers, step, device)
                with open(run_dir / "eval.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, **val}) + "\n")
                if writer is not None:
                    writer.add_scalar("val/nll", val["val_nll"], step)
                log.info("step %d: validation NLL %.4f over %d molecules (EMA weights)", step, val["val_nll"],
                         val["val_molecules"])
        preempted = last is not None and float(last[7]) > 0
        if step % int(t.ckpt_every) == 0 or step == int(t.max_steps) or preempted:
            path = save()
            if rank == 0:
                log.info("checkpoint %s", path)
        if preempted:
            if rank == 0:
                name = signal.Signals(stop.signum).name if stop.signum is not None else "a signal on another rank"
                log.warning("%s received: checkpointed at step %d, exiting with code %d (requeue; running the same "
                            "command again resumes)", name, step, EXIT_REQUEUE)
            exit_code = EXIT_REQUEUE
            break

    bar.close()
    if writer is not None:
        writer.close()
    dist.barrier()
    return exit_code

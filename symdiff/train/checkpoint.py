"""Sharded DeepSpeed checkpoints that are published atomically and resumed exactly.

Layout of ``RUN_DIR/checkpoints``::

    step_00000500/            one complete checkpoint (DeepSpeed's sharded files + ours)
        mp_rank_00_model_states.pt, *optim_states.pt ...   DeepSpeed (model, optimizer, scheduler)
        symdiff_state.pt      step, epoch, EMA, config (+ hash), parameter shapes, world size, guard counters
        rank_00000.pt ...     per rank: RNG states and loader state
        COMPLETE.json         written last: size + sha256 of every file above
    latest                    name of the newest complete checkpoint (replaced atomically)
    .tmp-step_00000600/       a checkpoint being written (never chosen; removed at the next save/start)
    universal/step_00000500/  DeepSpeed universal conversion, made when resuming on another world size

A checkpoint directory only appears under its final name after every rank has written its part and rank 0 has
written COMPLETE.json inside it, so a crash at any moment leaves either the old or the new checkpoint, never a
half one. Resume additionally re-verifies the checksums.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig

from symdiff.data.shards import sha256_file
from symdiff.errors import CheckpointError
from symdiff.io.atomic import atomic_write_text
from symdiff.train import safe_load

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
MARKER = "COMPLETE.json"
STATE_FILE = "symdiff_state.pt"
FORMAT_VERSION = 1
_TAG_RE = re.compile(r"^step_(\d{8,})$")
_RANK_RE = re.compile(r"^rank_\d{5,}\.pt$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


# ----------------------------------------------------------------------------------------------- integrity


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # some file systems cannot fsync directories; the rename is still atomic


def _files_of(tag_dir: Path) -> list[Path]:
    return sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MARKER)


def verify(tag_dir: Path, checksums: bool = True) -> Optional[dict[str, Any]]:
    """The marker of a complete, intact checkpoint, or None (the reason is logged)."""
    marker = tag_dir / MARKER
    if not marker.is_file():
        log.warning("%s: no %s (checkpoint incomplete), skipped", tag_dir, MARKER)
        return None
    try:
        meta = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("%s: unreadable marker (%s), skipped", tag_dir, exc)
        return None
    for rel, info in meta.get("files", {}).items():
        f = tag_dir / rel
        if not f.is_file() or f.stat().st_size != info["size"]:
            log.warning("%s: file %s missing or truncated, skipped", tag_dir, rel)
            return None
        if checksums and sha256_file(f) != info["sha256"]:
            log.warning("%s: checksum mismatch in %s, skipped", tag_dir, rel)
            return None
    return meta


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every checkpoint that has a completion marker, oldest first (checksums not verified)."""
    out = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = _TAG_RE.match(p.name)
            if m and p.is_dir() and (p / MARKER).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def newest_complete(ckpt_dir: Path) -> Optional[Path]:
    """The newest checkpoint that verifies; a corrupt newest one falls back to the one before."""
    for _, path in reversed(complete_checkpoints(ckpt_dir)):
        if verify(path) is not None:
            return path
    return None


def find_resume(run_dir: Path, resume: str) -> Optional[Path]:
    """Checkpoint directory to resume from, or None for a fresh start. ``resume`` is auto | never | PATH."""
    ckpt_dir = run_dir / CKPT_DIR
    if resume == "never":
        if complete_checkpoints(ckpt_dir):
            raise CheckpointError(f"{run_dir}: has checkpoints but --resume never was given; use a new run "
                                  f"directory (nothing is overwritten)")
        return None
    if resume == "auto":
        found = newest_complete(ckpt_dir)
        if found is None and complete_checkpoints(ckpt_dir):
            raise CheckpointError(f"{ckpt_dir}: no checkpoint passes its checksum check")
        return found
    return resolve_checkpoint(Path(resume))


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory from a checkpoint directory, a run directory or its checkpoints/ directory."""
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if (path / MARKER).is_file():
        if verify(path) is None:
            raise CheckpointError(f"{path}: checkpoint fails its completeness/checksum check")
        return path
    for cand in (path / CKPT_DIR, path):
        if cand.is_dir() and complete_checkpoints(cand):
            found = newest_complete(cand)
            if found is None:
                raise CheckpointError(f"{cand}: no checkpoint passes its checksum check")
            return found
    raise CheckpointError(f"{path}: not a checkpoint or a run directory with complete checkpoints")


def _expect_keys(blob: Any, keys: tuple[str, ...], where: Path, what: str) -> dict[str, Any]:
    if not isinstance(blob, dict) or any(k not in blob for k in keys):
        raise CheckpointError(f"{where}: not {what} (expected a dict with keys {', '.join(keys)})")
    return blob


def read_state(tag_dir: Path, trust_pickle: bool = False) -> dict[str, Any]:
    """symdiff_state.pt: tensors and plain data only (weights-only load, nothing allowed beyond)."""
    f = tag_dir / STATE_FILE
    keys = ("step", "config", "param_shapes", "ema", "buffers")
    return _expect_keys(safe_load.load(f, trust_pickle=trust_pickle), keys, f, "a symdiff checkpoint state")


# ----------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain numbers, so that rank files load with the weights-only unpickler."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": {"kind": str(kind), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    npst = st["numpy"]
    if isinstance(npst, dict):
        npst = (npst["kind"], npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                npst["cached_gaussian"])
    np.random.set_state(npst)  # a tuple with a numpy key array in rank files written before this format
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


# ----------------------------------------------------------------------------------------------- compatibility


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def recipe_defaults() -> dict[str, Any]:
    """The recipe keys of issue 18 (dotted) at their defaults, the paper's: what a checkpoint without them ran."""
    from omegaconf import OmegaConf

    from symdiff.config import Config

    d = OmegaConf.to_container(OmegaConf.structured(Config))
    keys = ("model.time_input", "model.self_condition", "diffusion.t_sampling", "diffusion.t_low_noise_power",
            "diffusion.loss_weight", "diffusion.loss_weight_min", "diffusion.loss_weight_max", "train.lr_schedule",
            "train.lr_min_ratio")
    return {k: d[k.split(".")[0]][k.split(".")[1]] for k in keys}


def check_compatible(state: dict[str, Any], cfg: DictConfig, shapes: dict[str, tuple[int, ...]],
                     where: Path) -> None:
    """Raise CheckpointError naming every mismatched config key and parameter (name, shapes)."""
    from symdiff.config import to_dict

    problems = []
    old = _flatten({k: state["config"][k] for k in ("model", "diffusion")})
    new = _flatten({k: to_dict(cfg)[k] for k in ("model", "diffusion")})
    # Checkpoints written before diffusion.process existed are all of the one process there was then.
    old.setdefault("diffusion.process", "vdm")
    # ... and those written before the recipe options (issue 18) with the paper's recipe, their defaults.
    for key, value in recipe_defaults().items():
        if key.startswith(("model.", "diffusion.")):
            old.setdefault(key, value)
    # kernel_backend and linear_backend pick an implementation of the same maths; switching them is allowed (and
    # checkpoints written before linear_backend existed lack the key).
    for key in sorted(set(old) | set(new)):
        if key.endswith("kernel_backend") or key.endswith("linear_backend"):
            continue
        if old.get(key) != new.get(key):
            problems.append(f"config {key}: checkpoint {old.get(key)!r} vs now {new.get(key)!r}")
    # train.amsgrad changes what the optimizer state holds (max_exp_avg_sq), train.lr_schedule which scheduler's
    # state was saved: refused. The other optimizer and schedule keys (lr, weight_decay, warmup_steps,
    # clip_grad_norm) are applied on resume (trainer.py).
    stored_all = {**recipe_defaults(), **_flatten(state["config"])}
    for key in ("data.dataset", "data.include_charges", "train.amsgrad", "train.lr_schedule"):
        a, b = stored_all.get(key), _flatten(to_dict(cfg)).get(key)
        if a != b:
            problems.append(f"config {key}: checkpoint {a!r} vs now {b!r}")
    stored = {k: tuple(v) for k, v in state["param_shapes"].items()}
    for k in sorted(set(stored) - set(shapes)):
        problems.append(f"parameter {k} {stored[k]} is in the checkpoint but not in the model")
    for k in sorted(set(shapes) - set(stored)):
        problems.append(f"parameter {k} {shapes[k]} is in the model but not in the checkpoint")
    for k in sorted(set(shapes) & set(stored)):
        if stored[k] != tuple(shapes[k]):
            problems.append(f"parameter {k}: checkpoint shape {stored[k]} vs model shape {tuple(shapes[k])}")
    if problems:
        shown = "\n  ".join(problems[:30]) + (f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else "")
        raise CheckpointError(f"{where} does not match this config/model (nothing was changed):\n  {shown}")


# ----------------------------------------------------------------------------------------------- save


def _describe(exc: BaseException) -> str:
    """One line for a failed write. torch.save reports a full disk as "[enforce fail ...] unexpected pos"."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}{f': {exc.filename}' if exc.filename else ''}"
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return f"{line}: a short write, is the disk full?" if "unexpected pos" in line else line


def _free_space(path: Path) -> str:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return f"{shutil.disk_usage(p).free / 2**20:.0f} MiB free there"
            except OSError:
                return "free space unknown"
    return "free space unknown"


def _attempt(action) -> Optional[str]:
    """Run ``action``; a write failure (full disk, quota, I/O error) becomes its one-line description."""
    try:
        action()
        return None
    except (OSError, RuntimeError) as exc:
        return _describe(exc)


def _agree(error: Optional[str]) -> Optional[str]:
    """The first rank's error (collective), so that every rank takes the same branch after a failed write."""
    import torch.distributed as dist

    errors: list[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((f"rank {r}: {e}" if len(errors) > 1 else e for r, e in enumerate(errors) if e), None)


def _write_parts(engine, ckpt_dir: Path, tmp: Path, rank: int, common: dict[str, Any],
                 per_rank: dict[str, Any]) -> None:
    """Every rank's share of a checkpoint, into the temporary directory ``tmp``."""
    engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, save_latest=False)
    torch.save(per_rank, tmp / rank_file(rank))
    if rank == 0:
        torch.save(common, tmp / STATE_FILE)


def _publish(engine, ckpt_dir: Path, tmp: Path, final: Path, step: int, keep_last: int) -> None:
    """Rank 0: checksum the files, write the marker, move the directory to its final name, update ``latest``."""
    import torch.distributed as dist

    files = {}
    for f in _files_of(tmp):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        files[str(f.relative_to(tmp))] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    marker = {"format": FORMAT_VERSION, "tag": final.name, "step": step, "world_size": dist.get_world_size(),
              "zero_stage": int(engine.zero_optimization_stage()), "bf16": bool(engine.bfloat16_enabled()),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}
    atomic_write_text(tmp / MARKER, json.dumps(marker, indent=1))
    _fsync_dir(tmp)
    if final.exists():
        # A directory of this step from an earlier pass: one found corrupt at resume (the run restarted from an
        # older checkpoint), or one the run went past. The new one replaces it; older checkpoints stay meanwhile.
        aside = ckpt_dir / f".tmp-replaced-{final.name}"
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
        os.rename(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
        log.warning("%s: replaced the directory of the same step left by an earlier pass", final)
    else:
        os.rename(tmp, final)
    _fsync_dir(ckpt_dir)
    atomic_write_text(ckpt_dir / "latest", final.name)
    _prune(ckpt_dir, keep_last)


def save(engine, ckpt_dir: Path, step: int, common: dict[str, Any], per_rank: dict[str, Any], *,
         keep_last: int) -> Path:
    """Write a checkpoint for ``step`` on every rank (collective) and publish it. Returns its directory.

    A failed write (full disk, quota, I/O error) on any rank raises CheckpointError on every rank, naming the
    checkpoint; the temporary directory is removed and the previous checkpoints are left as they were.
    """
    import torch.distributed as dist

    rank = dist.get_rank()
    final = ckpt_dir / tag_for(step)
    tmp = ckpt_dir / f".tmp-{final.name}"

    def prepare() -> None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)

    error = _agree(_attempt(prepare) if rank == 0 else None)
    if error is None:
        error = _agree(_attempt(lambda: _write_parts(engine, ckpt_dir, tmp, rank, common, per_rank)))
    if error is None:
        error = _agree(_attempt(lambda: _publish(engine, ckpt_dir, tmp, final, step, keep_last))
                       if rank == 0 else None)
    if error is not None:
        previous = [p.name for _, p in complete_checkpoints(ckpt_dir) if p != final]
        free = _free_space(ckpt_dir)  # before the partial files are removed: what the write ran into
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()  # nobody goes on before the temporary directory is gone
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "there is no earlier checkpoint"
        raise CheckpointError(f"{final}: cannot write the checkpoint ({error}; {free}); removed the partial files; "
                              f"{kept}")
    return final


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    done = complete_checkpoints(ckpt_dir)
    for _, path in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(ckpt_dir / "universal" / path.name, ignore_errors=True)


def clean_stale(ckpt_dir: Path) -> None:
    """Remove half-written checkpoints left by a crash (rank 0 only, before training starts)."""
    if ckpt_dir.is_dir():
        for p in ckpt_dir.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- load


@dataclass
class ResumePlan:
    tag_dir: Path
    meta: dict[str, Any]
    state: dict[str, Any]
    universal: bool
    ckpt_dir: Path  # this run's checkpoint directory (the universal conversion is written there)


def plan_resume(tag_dir: Path, world_size: int, zero_stage: int, ckpt_dir: Path,
                bf16: Optional[bool] = None) -> ResumePlan:
    meta = verify(tag_dir, checksums=False)
    if meta is None:
        raise CheckpointError(f"{tag_dir}: incomplete checkpoint")
    state = read_state(tag_dir)
    # Every file is checked before anything is built: DeepSpeed's before ds_to_universal or engine.load_checkpoint
    # unpickle them freely, the rank files before the engine exists (they are read once it has loaded).
    check_deepspeed_files(tag_dir)
    safe_load.check_files(sorted(tag_dir.glob("rank_*.pt")), allow=safe_load.NUMPY_ARRAY)
    old_ws, old_stage = int(meta["world_size"]), int(meta["zero_stage"])
    # Stages 1 and 2 share a layout; DeepSpeed 0.19.8 cannot load stage 0 or 1/2 files into stage 3 or back
    # (measured: its loader looks for the other stage's model-state files), even through universal format.
    family = {0: "0", 1: "1/2", 2: "1/2", 3: "3"}
    if family.get(old_stage) != family.get(zero_stage):
        raise CheckpointError(f"{tag_dir}: saved with ZeRO stage {old_stage}, now train.zero_stage={zero_stage}; "
                              f"DeepSpeed can only resume stage 1 <-> 2 or the same stage. Resume with "
                              f"train.zero_stage={old_stage}, or export the weights with tools/convert_checkpoint.py "
                              f"and start a new run")
    # DeepSpeed's bf16 and fp32 ZeRO optimizers write differently named and shaped files; the universal format
    # (fp32 master weights + optimizer states per parameter) is the common ground, so a change of precision
    # resumes through it like a change of world size.
    same_precision = bf16 is None or bool(meta.get("bf16", False)) == bool(bf16)
    same_layout = old_ws == world_size and same_precision
    universal = zero_stage > 0 and not same_layout
    return ResumePlan(tag_dir, meta, state, universal, ckpt_dir)


def check_deepspeed_files(folder: Path) -> None:
    """Refuse (CheckpointError, one line) a checkpoint whose DeepSpeed files need anything beyond tensors, plain
    data and DeepSpeed's own checkpoint classes: DeepSpeed 0.19 loads them with torch's full unpickler
    (TorchCheckpointEngine.load, zero_to_fp32, ds_to_universal, the universal loader), which would run a crafted
    file's payload. Our own files (symdiff_state.pt, rank_*.pt) are checked where they are read."""
    ours = {STATE_FILE}
    files = [f for f in sorted(folder.rglob("*.pt")) if f.name not in ours and not _RANK_RE.match(f.name)]
    safe_load.check_files(files, allow=safe_load.deepspeed_classes())


def universal_dir(tag_dir: Path, ckpt_dir: Path) -> Path:
    return ckpt_dir / "universal" / tag_dir.name


def convert_to_universal(tag_dir: Path, ckpt_dir: Path) -> Path:
    """DeepSpeed's ds_to_universal on ``tag_dir`` (rank 0 only), cached in this run's checkpoint directory."""
    out = universal_dir(tag_dir, ckpt_dir)
    source = {"source": str(tag_dir.resolve()), "marker_sha256": sha256_file(tag_dir / MARKER)}
    if (out / MARKER).is_file() and json.loads((out / MARKER).read_text()) == source:
        return out
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise CheckpointError(f"{tag_dir}: universal checkpoint conversion failed:\n{res.stderr[-3000:]}")
    _add_extra_optimizer_states(tag_dir, tmp)
    (tmp / MARKER).write_text(json.dumps(source))
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out


# ds_to_universal (DeepSpeed 0.19.8) converts only exp_avg and exp_avg_sq; AdamW(amsgrad=True), the paper's
# optimiser, also keeps max_exp_avg_sq. Without it a resumed run would silently restart the amsgrad maximum. We
# rebuild such extra states from the original ZeRO shards and store them in the universal folder like the rest.
_CONVERTED = ("exp_avg", "exp_avg_sq", "step")


def _by_rank(paths) -> list[Path]:
    # zero_pp_rank_<dp>_mp_rank_00_... (bf16 ZeRO-1 files carry a "bf16_" prefix)
    return sorted(paths, key=lambda p: int(re.search(r"zero_pp_rank_(\d+)_", p.name).group(1)))


def _optim_files(tag_dir: Path) -> list[Path]:
    return _by_rank(tag_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))


def _ds_load(f: Path, trust_pickle: bool = False) -> Any:
    return safe_load.load(f, allow=safe_load.deepspeed_classes(), trust_pickle=trust_pickle)


def _stage12_fp32_weights(tag_dir: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32 master weights of a ZeRO-1/2 checkpoint (also DeepSpeed's bf16 ZeRO-1 files, which its own
    zero_to_fp32 rejects): each rank's flat fp32 partition holds consecutive fragments of the parameters."""
    pieces: dict[str, list[torch.Tensor]] = {}
    for f in _optim_files(tag_dir):
        osd = _ds_load(f, trust_pickle)["optimizer_state_dict"]
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            flat = osd["single_partition_of_fp32_groups"][g]
            for name, frag in mapping.items():
                pieces.setdefault(name, []).append(flat[frag.start:frag.start + frag.numel])
    shapes = _ds_load(tag_dir / "mp_rank_00_model_states.pt", trust_pickle)["module"]
    return {name: torch.cat(p).reshape(shapes[name].shape).float().clone() for name, p in pieces.items()}


def _extra_optimizer_states(tag_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{param name: {state key: full flat tensor}} for optimizer states ds_to_universal does not convert."""
    optim_files = _optim_files(tag_dir)
    if not optim_files:
        return {}
    parts: dict[str, dict[str, list[torch.Tensor]]] = {}
    model_files = _by_rank(tag_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
    stage3 = bool(model_files)
    dp = len(optim_files)
    numels: dict[str, int] = {}
    for rank, f in enumerate(optim_files):
        osd = _ds_load(f)["optimizer_state_dict"]
        if stage3:
            states = osd["optimizer_state_dict"]["state"]
            shapes = _ds_load(model_files[rank])["param_shapes"]
            for g, group_shapes in enumerate(shapes):
                extra = {k: v for k, v in states[g].items() if k not in _CONVERTED and torch.is_tensor(v)
                         and v.dim() == 1}
                offset = 0
                for name, shape in group_shapes.items():
                    numel = int(np.prod(shape))
                    part = -(-numel // dp)  # ZeRO-3 pads every parameter to dp equal parts
                    numels[name] = numel
                    for key, flat in extra.items():
                        parts.setdefault(name, {}).setdefault(key, []).append(flat[offset:offset + part])
                    offset += part
        else:
            states = osd["base_optimizer_state"]["state"]
            for g, mapping in enumerate(osd["param_slice_mappings"]):
                extra = {k: v for k, v in states[g].items() if k not in _CONVERTED and torch.is_tensor(v)
                         and v.dim() == 1}
                for name, frag in mapping.items():
                    for key, flat in extra.items():
                        parts.setdefault(name, {}).setdefault(key, []).append(
                            flat[frag.start:frag.start + frag.numel])
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, by_key in parts.items():
        for key, pieces in by_key.items():
            full = torch.cat(pieces)
            out.setdefault(name, {})[key] = full[:numels[name]] if stage3 else full
    return out


def _add_extra_optimizer_states(tag_dir: Path, universal: Path) -> None:
    for name, by_key in _extra_optimizer_states(tag_dir).items():
        pdir = universal / "zero" / name
        template = _ds_load(pdir / "exp_avg.pt")
        for key, full in by_key.items():
            # Same layout as DeepSpeed's own files: {"param": tensor, ...} for ZeRO 1/2, a bare tensor for ZeRO-3.
            if isinstance(template, dict):
                blob: Any = dict(template)
                blob["param"] = full.reshape(template["param"].shape).clone()
            else:
                blob = full.reshape(template.shape).clone()
            torch.save(blob, pdir / f"{key}.pt")


def _restore_extra_states_stage3(engine, universal: Path) -> None:
    # DeepSpeed's ZeRO-3 universal loader reads only fp32/exp_avg/exp_avg_sq; set the others from our files.
    from deepspeed.utils import safe_set_full_optimizer_state

    z3 = engine.optimizer
    keys = {f.stem for f in (universal / "zero").glob("*/*.pt")} - {"fp32", *_CONVERTED}
    for flat in z3.fp32_partitioned_groups_flat:  # the loader rebuilt the state without these keys
        for key in keys:
            z3.optimizer.state[flat].setdefault(key, torch.zeros_like(flat))
    for name, p in engine.module.named_parameters():
        pdir = universal / "zero" / name
        for f in sorted(pdir.glob("*.pt")):
            key = f.stem
            if key in ("fp32", *_CONVERTED):
                continue
            full = _ds_load(f)
            full = full["param"] if isinstance(full, dict) else full
            safe_set_full_optimizer_state(p, full.to(p.device).float(), key)


def load_engine(engine, plan: ResumePlan, scheduler: bool = True) -> None:
    """Load model, optimizer and (unless ``scheduler`` is False) scheduler state into ``engine`` (collective)."""
    if plan.universal:
        load_dir = universal_dir(plan.tag_dir, plan.ckpt_dir).parent
        check_deepspeed_files(load_dir / plan.tag_dir.name)  # a cached conversion may come with the run dir
    else:
        load_dir = plan.tag_dir.parent
    path, _ = engine.load_checkpoint(str(load_dir), tag=plan.tag_dir.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=scheduler)
    if path is None:
        raise CheckpointError(f"{plan.tag_dir}: DeepSpeed could not load the checkpoint")
    if plan.universal and int(engine.zero_optimization_stage()) == 3:
        _restore_extra_states_stage3(engine, universal_dir(plan.tag_dir, plan.ckpt_dir))


def load_rank_state(tag_dir: Path, rank: int) -> Optional[dict[str, Any]]:
    f = tag_dir / rank_file(rank)
    if not f.is_file():
        return None
    # numpy arrays are allowed for the numpy RNG state of rank files written before it was stored as a tensor
    return _expect_keys(safe_load.load(f, allow=safe_load.NUMPY_ARRAY), ("rng", "loader"), f, "a symdiff rank state")


# ----------------------------------------------------------------------------------------------- inference


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Parameters are named through engine.TrainStep ("model." prefix) inside DeepSpeed files.
    return {(k[len("model."):] if k.startswith("model.") else k): v for k, v in sd.items()}


def fp32_weights(tag_dir: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Plain fp32 (non-EMA) weights of a checkpoint, whatever its ZeRO stage or world size."""
    meta = verify(tag_dir, checksums=False)
    if meta is None:
        raise CheckpointError(f"{tag_dir}: incomplete checkpoint")
    if int(meta["zero_stage"]) == 0:
        sd = _ds_load(tag_dir / "mp_rank_00_model_states.pt", trust_pickle)["module"]
    elif int(meta["zero_stage"]) in (1, 2):
        module = _ds_load(tag_dir / "mp_rank_00_model_states.pt", trust_pickle)["module"]
        # buffers (not optimised) from the module state, parameters from the fp32 master partitions
        sd = {**{k: v for k, v in module.items()}, **_stage12_fp32_weights(tag_dir, trust_pickle)}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        if not trust_pickle:
            check_deepspeed_files(tag_dir)  # zero_to_fp32 unpickles without restrictions
        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return {k: v.float() for k, v in _strip(sd).items()}


def _load_weights(model: torch.nn.Module, sd: dict[str, Any], where: str) -> None:
    """Every parameter and buffer (p(N) included) from ``sd``, same names and shapes, or CheckpointError."""
    own = dict(model.state_dict())
    problems = [f"{k} is not a tensor" for k in sorted(sd) if not torch.is_tensor(sd[k])]
    problems += [f"missing {k} {tuple(own[k].shape)}" for k in sorted(set(own) - set(sd))]
    problems += [f"unexpected {k} {tuple(sd[k].shape)}" for k in sorted(set(sd) - set(own)) if torch.is_tensor(sd[k])]
    problems += [f"{k}: stored {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in sorted(set(sd) & set(own)) if torch.is_tensor(sd[k]) and sd[k].shape != own[k].shape]
    if problems:
        raise CheckpointError(f"{where}: weights do not match the model: " + "; ".join(problems[:20]))
    model.load_state_dict(sd, strict=True)


def _exported_weights(path: Path, use_ema: bool, trust_pickle: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config dict, state dict) of a file written by tools/convert_checkpoint.py (tensors and plain data)."""
    blob = _expect_keys(safe_load.load(path, trust_pickle=trust_pickle), ("config", "weights"), path,
                        "an exported checkpoint (tools/convert_checkpoint.py)")
    if not isinstance(blob["config"], dict) or not isinstance(blob["weights"], dict):
        raise CheckpointError(f"{path}: 'config' or 'weights' is not a mapping")
    if not use_ema:
        return blob["config"], blob["weights"]
    if not isinstance(blob.get("ema"), dict) or not blob["ema"]:
        raise CheckpointError(f"{path}: holds no EMA weights; use the raw weights explicitly (sample --no-ema, "
                              f"load_for_inference(use_ema=False))")
    return blob["config"], blob["ema"]


def load_for_inference(path_or_run_dir: str | Path, use_ema: bool = True, trust_pickle: bool = False):
    """(cfg, model) with plain weights (EMA by default) from a run dir, a checkpoint dir or an exported .pt.

    Files are read with the weights-only unpickler; ``trust_pickle=True`` lifts that for a file whose source you
    trust. A missing EMA, a missing p(N) buffer or any other missing or extra tensor is an error."""
    from symdiff.config import from_dict
    from symdiff.models import build_model

    path = Path(path_or_run_dir)
    if path.is_file():
        config, sd = _exported_weights(path, use_ema, trust_pickle)
    else:
        tag_dir = resolve_checkpoint(path)
        state = read_state(tag_dir, trust_pickle)
        config = state["config"]
        sd = {**(state["ema"] if use_ema else fp32_weights(tag_dir, trust_pickle)), **state["buffers"]}
        path = tag_dir
    cfg = from_dict(config)
    model = build_model(cfg)
    _load_weights(model, sd, str(path))
    model.eval()
    return cfg, model

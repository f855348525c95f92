"""Typed experiment configuration: YAML files in configs/ validated against a structured schema.

OmegaConf structured configs give us type checking and struct mode (unknown keys rejected); this module only
adds the error messages users need: which key, which file, and what was wrong.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


from symdiff.data.roots import anchor_layer, resolve_config
from symdiff.errors import UserError


class ConfigError(UserError):
    """A config file or override that does not fit the schema."""


@dataclass
class DataConfig:
    dataset: str = "qm9"  # qm9 | geom
    # Directory holding manifest.json + HDF5 shards (built by `symdiff data build`).
    root: str = MISSING
    train_split: str = "train"
    val_split: str = "valid"
    test_split: str = "test"
    # GLOBAL molecules per optimiser step (all processes together; each rank gets its share), used when
    # max_atoms_per_batch == 0. Global semantics keep the data order identical whatever the world size.
    batch_size: int = 64
    # Token budget: maximum real atoms per GLOBAL batch. 0 = fixed molecule count.
    max_atoms_per_batch: int = 0
    # Size buckets used with the token budget (molecules of similar atom count batched together).
    n_buckets: int = 8
    # Streaming window: shards are cut into chunks of chunk_size consecutive molecules; the epoch shuffles
    # chunks, and window_chunks chunks at a time are held in memory and shuffled together (memory is bounded by
    # chunk_size * window_chunks molecules, not by the dataset). Part of the data order: keep fixed within a run.
    chunk_size: int = 256
    window_chunks: int = 64
    seed: int = 0
    include_charges: bool = True  # QM9: integer atomic-number feature Z/10 (EDM "charges")
    remove_h: bool = False


@dataclass
class ModelConfig:
    # dit | dit_aug | symdiff_haar | symdiff
    kind: str = "symdiff"
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    xh_hidden_size: int = 184  # n_z: width of the W_I feature projection
    num_gaussians: int = 184  # K: Gaussian distance kernels
    # gamma (f_theta) network
    gamma_hidden_size: int = 128  # m
    gamma_depth: int = 8
    gamma_num_heads: int = 4
    gamma_mlp_ratio: float = 4.0
    gamma_dec_hidden: int = 64  # m'
    gamma_noise_dims: int = 3
    # Final adaLN-modulated LayerNorm on gamma's DiT features before pooling (uses the official class's otherwise
    # idle final-layer parameters, so parameter counts match SPEC §3.5). False pools the raw residual stream.
    gamma_final_norm: bool = True
    # Which implementation of the geometric ops: auto (Triton on CUDA) | triton | torch
    kernel_backend: str = "auto"
    # Dense layers on CPU: auto (oneDNN for float32 on CPU: 2x MKL's AVX2 path on AMD, docs/kernels.md) | aten
    linear_backend: str = "auto"


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    schedule: str = "polynomial_2"
    precision: float = 1e-5
    normalize_factors: list[float] = field(default_factory=lambda: [1.0, 4.0, 10.0])
    # eps (the paper) | score | flow (appendix D forms)
    parameterization: str = "eps"


@dataclass
class TrainConfig:
    max_steps: int = 1000
    lr: float = 2e-4
    warmup_steps: int = 0
    weight_decay: float = 1e-12
    amsgrad: bool = True
    clip_grad_norm: float = 2.0
    ema_decay: float = 0.9999
    seed: int = 0
    zero_stage: int = 0
    # auto = bf16 on GPU, fp32 on CPU
    precision: str = "auto"
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3
    max_nonfinite_in_a_row: int = 20
    # Periodic evaluation during training (0 = off)
    eval_every: int = 0
    eval_samples: int = 100
    # Micro-batches per global batch (a multiple of the world size; 0 = one per process). Randomness is drawn per
    # micro-batch, so fixing this makes a run resume on another world size with the same loss trajectory.
    grad_shards: int = 0


@dataclass
class SampleConfig:
    n_samples: int = 100
    batch_size: int = 100
    # Number of reverse steps; < timesteps uses a strided (fewer-step) ancestral sampler.
    steps: int = 1000
    use_ema: bool = True
    seed: int = 0


@dataclass
class Config:
    name: str = "unnamed"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    where = f"key '{key}'" if key else "config"
    return ConfigError(f"{source}: {where}: {msg}")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a YAML config over the schema defaults and apply dotted overrides (``train.lr=2e-4``).

    A file may name another as ``base: other.yaml`` (relative to itself); its values are applied first.
    Unknown keys and wrongly typed values raise :class:`ConfigError` naming the key and the file.
    """
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    if path is not None:
        for layer in _file_chain(Path(path)):
            try:
                raw = OmegaConf.load(layer)
            except Exception as exc:  # yaml syntax errors
                raise ConfigError(f"{layer}: cannot parse YAML: {exc}") from exc
            if "base" in raw:
                raw.pop("base")
            anchor_layer(raw, layer.parent)  # a relative data.root is relative to the file that sets it
            try:
                cfg = OmegaConf.merge(cfg, raw)
            except OmegaConfBaseException as exc:
                raise _explain(exc, str(layer)) from exc
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override '{item}' is not of the form key.sub=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _explain(exc, f"command-line override '{item}'") from exc
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{path or 'config'}: required keys not set: {', '.join(missing)}")
    resolve_config(cfg, Path.cwd())  # bundled:NAME -> its built cache dir; a relative override -> from the cwd
    return cfg


def _file_chain(path: Path) -> list[Path]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    chain = [path]
    seen = {path.resolve()}
    while True:
        raw = OmegaConf.load(chain[0])
        base = raw.get("base") if isinstance(raw, DictConfig) else None
        if not base:
            return chain
        nxt = (chain[0].parent / str(base)).resolve()
        if nxt in seen:
            raise ConfigError(f"{chain[0]}: circular 'base' reference to {nxt}")
        if not nxt.is_file():
            raise ConfigError(f"{chain[0]}: base config {nxt} not found")
        seen.add(nxt)
        chain.insert(0, nxt)


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def config_hash(cfg: DictConfig, sections: Sequence[str] = ("model", "diffusion")) -> str:
    """Hash of the parts of a config that must match a checkpoint (architecture and diffusion)."""
    d = to_dict(cfg)
    blob = json.dumps({k: d[k] for k in sections}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def from_dict(d: dict[str, Any]) -> DictConfig:
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    try:
        cfg = OmegaConf.merge(cfg, d)
    except OmegaConfBaseException as exc:
        raise _explain(exc, "stored config") from exc
    resolve_config(cfg, Path.cwd())
    return cfg

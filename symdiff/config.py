"""Typed experiment configuration: YAML files in configs/ validated against a structured schema.

OmegaConf structured configs give us type checking and struct mode (unknown keys rejected); this module only
adds the error messages users need: which key, which file, and what was wrong.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

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
    # Shard check at the start of training: full (sha256 + lengths; 0.16 s on full QM9) | size (lengths) | off
    verify: str = "full"


@dataclass
class EGNNConfig:
    """EDM's EGNN (model.kind egnn, symdiff/models/egnn.py); the defaults are EDM's QM9 model (EDM+, 5.34M)."""

    nf: int = 256  # hidden width
    n_layers: int = 9  # equivariant blocks
    inv_sublayers: int = 1  # invariant message-passing layers per block
    attention: bool = True  # sigmoid gate on each message
    tanh: bool = True  # coordinate steps tanh(.) * coords_range
    coords_range: float = 15.0
    norm_constant: float = 1.0  # c in (x_i - x_j) / (d_ij + c)
    sin_embedding: bool = False  # sinusoidal distance features instead of d_ij^2
    normalization_factor: float = 1.0  # neighbour sums are divided by it (aggregation sum)
    aggregation: str = "sum"  # sum | mean (over the n - 1 neighbours)


@dataclass
class ModelConfig:
    # dit | dit_aug | symdiff_haar | symdiff | egnn
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
    # Attention over the packed atoms: auto (varlen on CUDA: jagged tensors, no mask, flash/efficient SDPA; padded
    # on CPU, today's exact numerics) | padded (boolean key mask) | varlen (symdiff/models/dit.py)
    attention: str = "auto"
    # What the time embedder's sinusoid is fed (symdiff/models/time_input.py): t_over_T = t / T in [0, 1], the
    # paper's and the official code's (SPEC D9); t_int = the integer step t; log_snr = -gamma(t), the schedule's
    # log-SNR (vdm only). Between t = 0 and 100 t / T barely moves the 256-d feature (issue 18); the others do.
    time_input: str = "t_over_T"
    # Self-conditioning (SemlaFlow, ADiT): the DiT also takes the previous estimate x-hat_0 of the positions,
    # rotated like z_t (R^T x-hat). False = the paper's network, with the paper's parameters (no extra input layer).
    self_condition: bool = False
    # kind egnn only: the E(n)-equivariant GNN of EDM (the DiT and gamma keys above are unused by it)
    egnn: EGNNConfig = field(default_factory=EGNNConfig)


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    schedule: str = "polynomial_2"
    precision: float = 1e-5
    normalize_factors: list[float] = field(default_factory=lambda: [1.0, 4.0, 10.0])
    # eps (the paper) | score | flow (appendix D forms)
    parameterization: str = "eps"
    # The generative process (symdiff/diffusion/): vdm = EDM's discrete-time variational diffusion (SPEC §2),
    # vpsde = the continuous-time VP score model (paper App. D.1), flow = flow matching (paper App. D.2); for
    # both, timesteps is only the largest sampler step count
    process: str = "vdm"
    # flow only: how the prior draw is paired with the data molecule before the path is built (none = independent;
    # hungarian = optimal atom permutation; hungarian_kabsch = that, then the O(3) Kabsch map; diffusion/flow.py)
    flow_align: str = "none"
    # The eps target of the Gaussian processes (vdm, vpsde; symdiff/diffusion/quotient.py, docs/quotient.md):
    # standard = the drawn eps; mcmc | hungarian | exact = the quotient-space (permutation-symmetrised) target of the
    # second seed, estimated by the swap chain, the most likely atom labelling, or all n! labellings (n <= 8)
    target: str = "standard"
    # target=mcmc only: chain length, burn-in steps, and K, the states averaged (evenly spaced after the burn-in)
    mcmc_steps: int = 64
    mcmc_burn_in: int = 16
    mcmc_samples: int = 8
    # vdm only. How training times are drawn: uniform = t ~ U{0..T} (the paper); low_noise = t = floor((T + 1) u^p),
    # u ~ U(0, 1), p = t_low_noise_power > 1 puts more draws at low noise (the density of t/T is u^(1/p - 1) / p)
    t_sampling: str = "uniform"
    t_low_noise_power: float = 2.0
    # vdm only. Per-molecule weight of the eps error: uniform = 1 (the paper); snr_clamped = clamp(SNR(t), min, max),
    # a truncated SNR weight in the manner of EQGAT-diff and TABASCO (which apply it to an x0 error), here on eps:
    # it puts the weight at low noise and caps it there
    loss_weight: str = "uniform"
    loss_weight_min: float = 0.05
    loss_weight_max: float = 1.5


@dataclass
class TrainConfig:
    max_steps: int = 1000
    lr: float = 2e-4
    warmup_steps: int = 0
    # After the warm-up: constant (the paper) | cosine (DeepSpeed WarmupCosineLR, to lr * lr_min_ratio at
    # max_steps) | linear (DeepSpeed WarmupDecayLR, to 0 at max_steps)
    lr_schedule: str = "constant"
    lr_min_ratio: float = 0.01
    weight_decay: float = 1e-12
    amsgrad: bool = True  # Adam with amsgrad (the paper's); false = plain AdamW
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
    # auto = the process's default (vdm: ancestral, vpsde: em, flow: heun); PROCESS_SAMPLERS lists each
    # process's samplers
    sampler: str = "auto"
    # DDIM's noise scale: 0 = deterministic, 1 = the ancestral step's variance (symdiff/diffusion/vdm_samplers.py)
    ddim_eta: float = 0.0
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


# ------------------------------------------------------------------------------------------------ value ranges
# One table of what each numeric or enum-like key may hold, checked after every file and override is merged (and
# for configs stored in checkpoints), so a nonsense value stops before any work instead of training on it.
Check = Callable[[Any], bool]


def _int_at_least(lo: int) -> tuple[Check, str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo), f"an integer >= {lo}"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive() -> tuple[Check, str]:
    return (lambda v: _finite(v) and v > 0), "a finite number > 0"


def _non_negative() -> tuple[Check, str]:
    return (lambda v: _finite(v) and v >= 0), "a finite number >= 0"


def _open_interval(lo: float, hi: float) -> tuple[Check, str]:
    return (lambda v: _finite(v) and lo < v < hi), f"a number in ({lo:g}, {hi:g})"


def _one_of(*values: Any) -> tuple[Check, str]:
    return (lambda v: v in values), "one of " + "|".join(str(x) for x in values)


def _matches(pattern: str, human: str) -> tuple[Check, str]:
    return (lambda v: isinstance(v, str) and re.fullmatch(pattern, v) is not None), human


# Kept literal rather than imported from the model/kernel modules: importing those pulls in torch, and `symdiff
# data`/`submit` validate configs without it. tests/test_config.py checks the lists against the modules.
DATASETS = ("qm9", "geom")
MODEL_KINDS = ("dit", "dit_aug", "symdiff_haar", "symdiff", "egnn")
EGNN_AGGREGATIONS = ("sum", "mean")
KERNEL_BACKENDS = ("auto", "triton", "torch")
LINEAR_BACKENDS = ("auto", "onednn", "aten")
ATTENTIONS = ("auto", "padded", "varlen")  # symdiff/models/dit.py ATTENTIONS (kept here: config imports no torch)
PRECISIONS = ("auto", "bf16", "fp32")
PARAMETERIZATIONS = ("eps", "score", "flow")
# Each process's samplers, the default first (symdiff/diffusion/ implements them).
PROCESS_SAMPLERS = {"vdm": ("ancestral", "ddim", "dpmpp2m"), "vpsde": ("em", "heun"), "flow": ("heun", "euler")}
# The processes whose likelihood is an ODE's (hundreds of network calls a molecule, symdiff/diffusion/
# ode_likelihood.py): scored after training by `symdiff eval --nll`, not as a validation NLL during it.
PROCESSES_WITHOUT_VALIDATION_NLL = ("vpsde", "flow")

# diffusion.target (symdiff/diffusion/quotient.py TARGETS) and the processes whose forward kernel is Gaussian, the
# ones a quotient target applies to.
TARGETS = ("standard", "exact", "hungarian", "mcmc")
GAUSSIAN_PROCESSES = ("vdm", "vpsde")

# diffusion.flow_align (symdiff/diffusion/flow.py ALIGNS): the flow process's prior-data coupling.
FLOW_ALIGNS = ("none", "hungarian", "hungarian_kabsch")

# The recipe options of issue 18; symdiff/models/time_input.py and symdiff/diffusion/vdm.py check against these.
TIME_INPUTS = ("t_over_T", "t_int", "log_snr")
T_SAMPLINGS = ("uniform", "low_noise")
LOSS_WEIGHTS = ("uniform", "snr_clamped")
LR_SCHEDULES = ("constant", "cosine", "linear")

RULES: dict[str, tuple[Check, str]] = {
    "data.dataset": _one_of(*DATASETS),
    "data.batch_size": _int_at_least(1),
    "data.max_atoms_per_batch": _int_at_least(0),
    "data.n_buckets": _int_at_least(1),
    "data.chunk_size": _int_at_least(1),
    "data.window_chunks": _int_at_least(1),
    "data.seed": _int_at_least(0),
    "data.verify": _one_of("full", "size", "off"),
    "model.kind": _one_of(*MODEL_KINDS),
    "model.hidden_size": _int_at_least(1),
    "model.depth": _int_at_least(1),
    "model.num_heads": _int_at_least(1),
    "model.mlp_ratio": _positive(),
    "model.xh_hidden_size": _int_at_least(1),
    "model.num_gaussians": _int_at_least(1),
    "model.gamma_hidden_size": _int_at_least(1),
    "model.gamma_depth": _int_at_least(1),
    "model.gamma_num_heads": _int_at_least(1),
    "model.gamma_mlp_ratio": _positive(),
    "model.gamma_dec_hidden": _int_at_least(1),
    "model.gamma_noise_dims": _int_at_least(1),
    "model.kernel_backend": _one_of(*KERNEL_BACKENDS),
    "model.linear_backend": _one_of(*LINEAR_BACKENDS),
    "model.attention": _one_of(*ATTENTIONS),
    "model.time_input": _one_of(*TIME_INPUTS),
    "model.self_condition": _one_of(False, True),
    "model.egnn.nf": _int_at_least(1),
    "model.egnn.n_layers": _int_at_least(1),
    "model.egnn.inv_sublayers": _int_at_least(1),
    "model.egnn.coords_range": _positive(),
    "model.egnn.norm_constant": _non_negative(),
    "model.egnn.normalization_factor": _positive(),
    "model.egnn.aggregation": _one_of(*EGNN_AGGREGATIONS),
    "diffusion.timesteps": _int_at_least(1),
    "diffusion.schedule": _matches(r"polynomial_\d+(\.\d+)?", "polynomial_<power>, e.g. polynomial_2"),
    "diffusion.precision": _open_interval(0.0, 0.5),
    "diffusion.normalize_factors": ((lambda v: len(v) == 3 and all(_finite(x) and x > 0 for x in v)),
                                    "exactly 3 finite numbers > 0 (positions, categories, charges)"),
    "diffusion.parameterization": _one_of(*PARAMETERIZATIONS),
    "diffusion.process": _one_of(*PROCESS_SAMPLERS),
    "diffusion.flow_align": _one_of(*FLOW_ALIGNS),
    "diffusion.target": _one_of(*TARGETS),
    "diffusion.mcmc_steps": _int_at_least(1),
    "diffusion.mcmc_burn_in": _int_at_least(0),
    "diffusion.mcmc_samples": _int_at_least(1),
    "diffusion.t_sampling": _one_of(*T_SAMPLINGS),
    "diffusion.t_low_noise_power": ((lambda v: _finite(v) and v >= 1), "a finite number >= 1"),
    "diffusion.loss_weight": _one_of(*LOSS_WEIGHTS),
    "diffusion.loss_weight_min": _positive(),
    "diffusion.loss_weight_max": _positive(),
    "train.max_steps": _int_at_least(1),
    "train.lr": _positive(),
    "train.warmup_steps": _int_at_least(0),
    "train.lr_schedule": _one_of(*LR_SCHEDULES),
    "train.lr_min_ratio": ((lambda v: _finite(v) and 0 <= v <= 1), "a number in [0, 1]"),
    "train.weight_decay": _non_negative(),
    "train.clip_grad_norm": _positive(),
    "train.ema_decay": ((lambda v: _finite(v) and 0 <= v < 1), "a number in [0, 1)"),
    "train.seed": _int_at_least(0),
    "train.zero_stage": _one_of(0, 1, 2, 3),
    "train.precision": _one_of(*PRECISIONS),
    "train.log_every": _int_at_least(1),
    "train.ckpt_every": _int_at_least(1),
    "train.keep_last": _int_at_least(0),
    "train.max_nonfinite_in_a_row": _int_at_least(0),
    "train.eval_every": _int_at_least(0),
    "train.eval_samples": _int_at_least(1),
    "train.grad_shards": _int_at_least(0),
    "sample.n_samples": _int_at_least(1),
    "sample.batch_size": _int_at_least(1),
    "sample.steps": _int_at_least(1),
    "sample.sampler": _one_of("auto", *sorted({s for v in PROCESS_SAMPLERS.values() for s in v})),
    "sample.seed": _int_at_least(0),
    "sample.ddim_eta": ((lambda v: _finite(v) and 0 <= v <= 1), "a number in [0, 1]"),
}


def _cross_checks(d: dict[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """Rules between keys: (the keys involved, the problem) for each one broken."""
    out = []
    steps, T = d["sample"]["steps"], d["diffusion"]["timesteps"]
    if steps > T:
        out.append((("sample.steps", "diffusion.timesteps"),
                    f"sample.steps {steps} exceeds diffusion.timesteps {T}: set sample.steps <= {T} "
                    "(a sampler takes at most T steps)"))
    process, sampler = d["diffusion"]["process"], d["sample"]["sampler"]
    if sampler != "auto" and sampler not in PROCESS_SAMPLERS.get(process, (sampler,)):
        out.append((("sample.sampler", "diffusion.process"),
                    f"sample.sampler '{sampler}' is not a sampler of the {process} process "
                    f"({', '.join(PROCESS_SAMPLERS[process])})"))
    if process != "flow" and d["diffusion"]["flow_align"] != "none":
        out.append((("diffusion.flow_align", "diffusion.process"),
                    f"diffusion.flow_align '{d['diffusion']['flow_align']}' applies to the flow process only "
                    f"(diffusion.process is {process})"))
    target = d["diffusion"]["target"]
    if target != "standard" and process not in GAUSSIAN_PROCESSES:
        out.append((("diffusion.target", "diffusion.process"),
                    f"diffusion.target '{target}' needs a Gaussian forward kernel ({', '.join(GAUSSIAN_PROCESSES)}); "
                    f"the {process} process has none: use diffusion.target=standard"
                    + (" (or diffusion.flow_align=hungarian for its permutation pairing)" if process == "flow"
                       else "")))
    steps, burn, k = (d["diffusion"][f"mcmc_{n}"] for n in ("steps", "burn_in", "samples"))
    if target == "mcmc" and not (burn < steps and k <= steps - burn):
        out.append((("diffusion.mcmc_samples", "diffusion.mcmc_burn_in", "diffusion.mcmc_steps"),
                    f"diffusion.mcmc_burn_in {burn} and diffusion.mcmc_samples {k} do not fit in diffusion.mcmc_steps "
                    f"{steps}: need mcmc_burn_in < mcmc_steps and mcmc_samples <= mcmc_steps - mcmc_burn_in"))
    if process in PROCESSES_WITHOUT_VALIDATION_NLL and d["train"]["eval_every"] > 0:
        out.append((("train.eval_every", "diffusion.process"),
                    f"train.eval_every > 0 evaluates the validation NLL during training; the {process} process's "
                    "likelihood is an ODE's, too costly there: set train.eval_every=0 and score the run with "
                    "`symdiff eval --nll`"))
    out.extend(_recipe_checks(d))
    return out


def _recipe_checks(d: dict[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """The recipe options (issue 18) that only some processes or denoisers implement."""
    out = []
    m, dc = d["model"], d["diffusion"]
    process = dc["process"]
    vdm_only = {"diffusion.t_sampling": dc["t_sampling"] != "uniform",
                "diffusion.loss_weight": dc["loss_weight"] != "uniform",
                "model.time_input": m["time_input"] == "log_snr", "model.self_condition": bool(m["self_condition"])}
    for key in (k for k, used in vdm_only.items() if used and process != "vdm"):
        out.append(((key, "diffusion.process"), f"{key} {_get(d, key)!r} is implemented for the vdm process only "
                    f"(diffusion.process is {process})"))
    for key, used in (("model.self_condition", m["self_condition"]), ("model.time_input", m["time_input"] != "t_over_T")):
        if used and m["kind"] == "egnn":
            out.append(((key, "model.kind"), f"{key} {_get(d, key)!r} applies to the DiT denoisers (dit, dit_aug, "
                        "symdiff_haar, symdiff), not to egnn"))
    if dc["loss_weight_min"] > dc["loss_weight_max"]:
        out.append((("diffusion.loss_weight_min", "diffusion.loss_weight_max"),
                    f"diffusion.loss_weight_min {dc['loss_weight_min']} exceeds diffusion.loss_weight_max "
                    f"{dc['loss_weight_max']}"))
    return out


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d[part]
    return d


def _resolve_interpolations(cfg: DictConfig, origin: dict[str, str], default_source: str) -> None:
    """Resolve ``${...}`` in place once, so a bad one is reported here (by key and source), not where read."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        key = str(getattr(exc, "full_key", "") or "")
        raise _explain(exc, origin.get(key, default_source)) from None


def validate(cfg: DictConfig, origin: Optional[dict[str, str]] = None, default_source: str = "config") -> None:
    """Raise :class:`ConfigError` for the first value outside its range, naming the key and where it was set.

    ``origin`` maps dotted keys to the file or override that set them last (keys left at the schema default are
    reported against ``default_source``).
    """
    origin = origin or {}
    _resolve_interpolations(cfg, origin, default_source)
    d = OmegaConf.to_container(cfg, resolve=True)
    for key, (check, expected) in RULES.items():
        value = _get(d, key)
        if not check(value):
            raise ConfigError(f"{origin.get(key, default_source)}: key '{key}': expected {expected}, got {value!r}")
    for keys, problem in _cross_checks(d):
        source = next((origin[k] for k in keys if k in origin), default_source)
        raise ConfigError(f"{source}: {problem}")


# ----------------------------------------------------------------------------------------------------- loading
SECTIONS = tuple(f.name for f in fields(Config) if f.name != "name")


def _check_sections(raw: DictConfig, source: str) -> None:
    """A section given as a scalar or list (``data: 5``): OmegaConf's merge error would not name the key."""
    plain = OmegaConf.to_container(raw, resolve=False)
    for key in SECTIONS:
        if key in plain and not isinstance(plain[key], dict):
            raise ConfigError(f"{source}: key '{key}': expected a section (a mapping of keys), got {plain[key]!r}")


def _dotted_keys(raw: DictConfig) -> list[str]:
    """The leaf keys a file or override sets, dotted (``train.lr``), without resolving interpolations."""
    def walk(node: Any, prefix: str) -> list[str]:
        if isinstance(node, dict):
            return [k for key, value in node.items() for k in walk(value, f"{prefix}{key}.")]
        return [prefix[:-1]]
    return walk(OmegaConf.to_container(raw, resolve=False), "")


def _yaml_problem(exc: Exception) -> str:
    """One line from a YAML parser error: where, then what."""
    import yaml

    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = " ".join(x for x in (exc.problem, exc.context) if x)
        return f"{where}{what}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _yaml_kind(data: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(data),
                                                                                          type(data).__name__)


def _read_layer(path: Path) -> DictConfig:
    """One config file as a mapping; every way a file can fail to be one is a one-line ConfigError."""
    import yaml

    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)  # the shape only: OmegaConf.load below reads the values
        # OmegaConf's own (safe) loader: it reads 1e-5 as a float, where plain PyYAML gives a string.
        raw = OmegaConf.load(io.StringIO(text)) if isinstance(data, dict) else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: cannot parse YAML: {_yaml_problem(exc)}") from None
    except (OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(f"{path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if data is None:  # an empty file (or only comments) sets nothing
        return OmegaConf.create({})
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: top level is a {_yaml_kind(data)}, expected a mapping of sections "
                          "(data:, model:, ...)")
    return raw


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), *, data: bool = True) -> DictConfig:
    """Load a YAML config over the schema defaults and apply dotted overrides (``train.lr=2e-4``).

    A file may name another as ``base: other.yaml`` (relative to itself); its values are applied first.
    Unknown keys, wrongly typed values and values out of range (:data:`RULES`) raise :class:`ConfigError` naming
    the key and the file or override that set it. ``data=False`` is for commands that never read the data
    (``symdiff info``): ``bundled:NAME`` stays a name instead of being built into the cache.
    """
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    origin: dict[str, str] = {}
    if path is not None:
        for layer, raw in _file_chain(Path(path)):
            if "base" in raw:
                raw.pop("base")
            _check_sections(raw, str(layer))
            try:
                anchor_layer(raw, layer.parent)  # a relative data.root is relative to the file that sets it
                cfg = OmegaConf.merge(cfg, raw)
            except OmegaConfBaseException as exc:
                raise _explain(exc, str(layer)) from exc
            origin.update({k: str(layer) for k in _dotted_keys(raw)})
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override '{item}' is not of the form key.sub=value")
        label = f"command-line override '{item}'"
        try:
            raw = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as exc:
            raise _explain(exc, label) from exc
        except Exception as exc:  # yaml errors in the value part, e.g. train.lr=[1
            raise ConfigError(f"{label}: cannot parse the value: {_yaml_problem(exc)}") from None
        _check_sections(raw, label)
        try:
            cfg = OmegaConf.merge(cfg, raw)
        except OmegaConfBaseException as exc:
            raise _explain(exc, label) from exc
        origin.update({k: label for k in _dotted_keys(raw)})
    source = str(path) if path is not None else "config"
    _resolve_interpolations(cfg, origin, source)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{source}: required keys not set: {', '.join(missing)}")
    validate(cfg, origin, source)
    if data:
        resolve_config(cfg, Path.cwd())  # bundled:NAME -> its built cache dir; a relative override -> from the cwd
    return cfg


def _file_chain(path: Path) -> list[tuple[Path, DictConfig]]:
    """The files of a ``base:`` chain, base first, each with its parsed contents."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found" if not path.exists() else f"{path}: not a file")
    chain = [(path, _read_layer(path))]
    seen = {path.resolve()}
    while True:
        here, raw = chain[0]
        base = raw.get("base")
        if base is None or base == "":
            return chain
        if not isinstance(base, str):
            raise ConfigError(f"{here}: key 'base': expected a file name, got {base!r}")
        nxt = (here.parent / base).resolve()
        if nxt in seen:
            raise ConfigError(f"{here}: circular 'base' reference to {nxt}")
        if not nxt.is_file():
            raise ConfigError(f"{here}: base config {nxt} not found")
        seen.add(nxt)
        chain.insert(0, (nxt, _read_layer(nxt)))


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def config_hash(cfg: DictConfig, sections: Sequence[str] = ("model", "diffusion")) -> str:
    """Hash of the parts of a config that must match a checkpoint (architecture and diffusion)."""
    d = to_dict(cfg)
    blob = json.dumps({k: d[k] for k in sections}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def from_dict(d: dict[str, Any], source: str = "stored config") -> DictConfig:
    """A config stored as a plain dict (a run's config.yaml, a checkpoint's), checked like a file: ``source``
    names it in errors."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of config sections, got {type(d).__name__}")
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    try:
        cfg = OmegaConf.merge(cfg, d)
    except OmegaConfBaseException as exc:
        raise _explain(exc, source) from exc
    validate(cfg, default_source=source)
    resolve_config(cfg, Path.cwd())
    return cfg

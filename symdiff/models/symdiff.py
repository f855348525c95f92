"""SymDiffModel: the module the engine trains, a denoiser (networks + symmetrisation) and a process (the maths).

* the **denoiser** (:mod:`symdiff.models.denoiser`): Gaussian embedding, DiT eps'-network and, for kind
  ``symdiff``, the learned gamma; ``model.kind`` in dit | dit_aug | symdiff_haar | symdiff picks its symmetry;
* the **process** (:mod:`symdiff.diffusion`, ``diffusion.process``): loss, NLL, samplers (``vdm``,
  ``vpsde``, ``flow``).

The model maps batches to the diffusion's normalised state z = [x, onehot/4, Z/10] (SPEC §1.3), holds p(N), and
keeps the README's API (``gamma``, ``denoise``, ``reverse_step``, ``sample``, ``nll``, ...) by delegating. The
denoiser's submodules are registered on the model itself (``embedding``, ``eps_net``, ``gamma_net``), so state
dicts keep the names checkpoints written before the split carry.

Conventions: positions are rows [B, N, 3] with a boolean mask [B, N]; a rotation acts as x_i -> R x_i, i.e.
``X @ R.T``.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from symdiff.kernels.linear import set_linear_backend
from symdiff.models.dit import set_attention
from symdiff.config import ConfigError
from symdiff.data.elements import alphabet as get_alphabet
from symdiff.diffusion import build_process, edm
from symdiff.diffusion.schedule import NoiseSchedule
from symdiff.diffusion.vdm import VDM, Features
from symdiff.errors import DataError
from symdiff.models.denoiser import KINDS as DIT_KINDS, Denoiser, EpsNet
from symdiff.models.dit import Packing
from symdiff.models.egnn import EGNNDenoiser
from symdiff.models.embedding import GaussianEmbedding
from symdiff.models.gamma import GammaNet
from symdiff.models.time_input import TimeInput

__all__ = ["KINDS", "EpsNet", "SymDiffModel", "default_n_hist"]

log = logging.getLogger(__name__)

KINDS = DIT_KINDS + ("egnn",)

# Training-split atom-count histograms of SPEC §1.4 / Appendix A: the default p(N) until a run sets its own.
QM9_N_HIST = {3: 1, 4: 4, 5: 5, 6: 9, 7: 16, 8: 49, 9: 124, 10: 362, 11: 807, 12: 1689, 13: 3060, 14: 5136,
              15: 7796, 16: 10644, 17: 13025, 18: 13364, 19: 13832, 20: 9482, 21: 9970, 22: 3393, 23: 4848,
              24: 539, 25: 1506, 26: 48, 27: 266, 29: 25}
QM9_NOH_N_HIST = {1: 2, 2: 5, 3: 7, 4: 25, 5: 91, 6: 475, 7: 2404, 8: 13625, 9: 83366}
GEOM_N_HIST_TEXT = (
    "3:1 4:3 5:9 6:2 7:8 8:23 9:23 10:50 11:109 12:168 13:280 14:402 15:583 16:597 17:949 18:1284 19:1862 "
    "20:2674 21:3599 22:6109 23:8693 24:13604 25:17419 26:25672 27:31647 28:43809 29:56697 30:70400 31:82655 "
    "32:104100 33:122776 34:140834 35:164888 36:185451 37:194541 38:218549 39:231232 40:243300 41:253349 "
    "42:268341 43:272081 44:276917 45:276839 46:274747 47:272126 48:262709 49:250157 50:244781 51:228898 "
    "52:215338 53:203728 54:191697 55:180518 56:163843 57:152055 58:136536 59:120393 60:107292 61:94635 "
    "62:83179 63:68384 64:61517 65:48867 66:37685 67:32859 68:27367 69:20981 70:18699 71:14791 72:11921 "
    "73:9933 74:9037 75:6538 76:6374 77:4036 78:4189 79:3842 80:3277 81:2925 82:1843 83:2060 84:1394 85:1514 "
    "86:1357 87:1346 88:999 89:300 90:390 91:510 92:510 93:240 94:721 95:360 96:360 97:390 98:330 99:540 "
    "100:258 101:210 102:60 103:180 104:206 105:60 106:390 107:180 108:180 109:150 110:120 111:360 112:120 "
    "113:210 114:60 115:30 116:210 117:270 118:450 119:240 120:228 121:120 122:30 123:420 124:240 125:210 "
    "126:158 127:180 128:60 129:30 130:120 131:30 132:120 133:60 134:240 135:169 136:240 137:30 138:270 "
    "139:180 140:270 141:150 142:60 143:60 144:240 145:180 146:150 147:150 148:90 149:90 151:30 152:60 155:90 "
    "159:30 160:60 165:30 171:30 175:30 176:60 181:30")
GEOM_N_HIST = {int(a): int(b) for a, b in (p.split(":") for p in GEOM_N_HIST_TEXT.split())}


def default_n_hist(dataset: str, remove_h: bool = False) -> dict[int, int]:
    if dataset == "qm9":
        return QM9_NOH_N_HIST if remove_h else QM9_N_HIST
    if dataset == "geom":
        return GEOM_N_HIST
    raise ValueError(f"no default atom-count histogram for dataset '{dataset}'")


class SymDiffModel(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        mc, dc = cfg.model, cfg.diffusion
        if mc.kind not in KINDS:
            raise ConfigError(f"model.kind '{mc.kind}' is not one of {', '.join(KINDS)}")
        self.kind = str(mc.kind)
        self.backend = str(mc.kernel_backend)
        try:
            self.alphabet = get_alphabet(cfg.data.dataset)
        except ValueError as exc:
            raise ConfigError(f"data.dataset: {exc}") from None
        self.include_charges = bool(cfg.data.include_charges)
        self.num_classes = self.alphabet.num_classes
        self.d = self.num_classes + (1 if self.include_charges else 0)
        # three positive factors [x, one-hot, integer]: checked by the config schema (symdiff.config.RULES)
        self.norm_x, self.norm_cat, self.norm_int = (float(v) for v in dc.normalize_factors)
        if dc.parameterization != "eps":
            raise ConfigError(f"diffusion.parameterization '{dc.parameterization}' is not implemented (only 'eps')")
        if not str(dc.schedule).startswith("polynomial_"):
            raise ConfigError(f"diffusion.schedule '{dc.schedule}' is not supported (polynomial_<power>)")
        if self.kind == "egnn":
            self._build_egnn(mc)
        else:
            self._build_dit(mc)
        try:
            set_linear_backend(self, str(getattr(mc, "linear_backend", "auto")))
        except ValueError as exc:
            raise ConfigError(f"model.linear_backend: {exc}") from None
        try:
            set_attention(self, str(getattr(mc, "attention", "auto")))
        except ValueError as exc:
            raise ConfigError(f"model.attention: {exc}") from None
        try:
            self.process = build_process(cfg, d=self.d, num_classes=self.num_classes, backend=self.backend)
        except ValueError as exc:
            raise ConfigError(f"diffusion.process: {exc}") from None
        if isinstance(self.process, VDM):
            _check_sigma0(self.schedule, self.norm_cat, self.norm_int)
        self._set_time_input(str(getattr(mc, "time_input", "t_over_T")))
        # Map Z -> class index on device; -1 marks elements outside the alphabet.
        lut = torch.full((128,), -1, dtype=torch.long)
        lut[list(self.alphabet.atomic_numbers)] = torch.arange(self.num_classes)
        self.register_buffer("z_to_class", lut, persistent=False)
        self.register_buffer("class_to_z", torch.tensor(self.alphabet.atomic_numbers, dtype=torch.long),
                             persistent=False)
        max_n = max(self.alphabet.max_atoms, max(default_n_hist(cfg.data.dataset, bool(cfg.data.remove_h))))
        # p(N) travels with the weights (persistent buffer) so a checkpoint alone can sample and score. Integer
        # counts: casting the model to another float dtype (bf16 engines, .double()) leaves them exact.
        self.register_buffer("n_atoms_hist", torch.zeros(max_n + 1, dtype=torch.long))
        self.set_n_atoms_histogram(default_n_hist(cfg.data.dataset, bool(cfg.data.remove_h)))

    def _build_dit(self, mc: Any) -> None:
        """The DiT eps'-network, the Gaussian embedding and (kind symdiff) gamma, under their checkpoint names."""
        for width, heads, key in ((mc.hidden_size, mc.num_heads, "model.hidden_size/num_heads"),
                                  (mc.gamma_hidden_size, mc.gamma_num_heads, "model.gamma_hidden_size/gamma_num_heads")):
            if int(heads) < 1 or int(width) % int(heads):
                raise ConfigError(f"{key}: {width} is not divisible into {heads} attention heads")
        n_emb = int(mc.hidden_size) - int(mc.xh_hidden_size)
        if n_emb <= 0:
            raise ConfigError(f"model.hidden_size ({mc.hidden_size}) must exceed model.xh_hidden_size "
                             f"({mc.xh_hidden_size}): the rest is the distance embedding")
        embedding = GaussianEmbedding(int(mc.num_gaussians), n_emb, backend=self.backend)
        eps_net = EpsNet(3 + self.d, int(mc.xh_hidden_size), int(mc.hidden_size), int(mc.depth),
                         int(mc.num_heads), float(mc.mlp_ratio), bool(getattr(mc, "self_condition", False)))
        gamma_net: Optional[GammaNet] = None
        if self.kind == "symdiff":
            gamma_net = GammaNet(n_emb, int(mc.gamma_hidden_size), int(mc.gamma_depth),
                                 int(mc.gamma_num_heads), float(mc.gamma_mlp_ratio), int(mc.gamma_dec_hidden),
                                 int(mc.gamma_noise_dims), bool(getattr(mc, "gamma_final_norm", True)),
                                 backend=self.backend)
        # The networks are registered here under their old names (state dicts unchanged); the denoiser is a
        # view of the same submodules, kept out of the module tree so nothing is registered twice.
        self.embedding, self.eps_net, self.gamma_net = embedding, eps_net, gamma_net
        object.__setattr__(self, "denoiser", Denoiser(self.kind, embedding, eps_net, gamma_net, self.backend))

    def _set_time_input(self, mode: str) -> None:
        """model.time_input: the DiT embedders' input, from the process's schedule for log_snr."""
        if mode == "t_over_T":
            return
        if self.kind == "egnn" or (mode == "log_snr" and not isinstance(self.process, VDM)):
            raise ConfigError(f"model.time_input '{mode}' needs a DiT denoiser"
                              + (" and the vdm process" if mode == "log_snr" else ""))
        table = self.process.schedule.gamma64 if mode == "log_snr" else None
        self.denoiser.time_input = TimeInput(mode, self.process.timesteps, table)

    def _build_egnn(self, mc: Any) -> None:
        """EDM's EGNN (symdiff/models/egnn.py): registered as ``egnn``, and the denoiser itself."""
        e = mc.egnn
        self.embedding = self.eps_net = self.gamma_net = None
        self.egnn = EGNNDenoiser(self.d, int(e.nf), int(e.n_layers), int(e.inv_sublayers), bool(e.attention),
                                 bool(e.tanh), float(e.coords_range), float(e.norm_constant), bool(e.sin_embedding),
                                 float(e.normalization_factor), str(e.aggregation), backend=self.backend)
        object.__setattr__(self, "denoiser", self.egnn)

    # ------------------------------------------------------------------ sizes and p(N)
    @property
    def schedule(self) -> NoiseSchedule:
        """vdm's discrete noise schedule (vpsde's continuous one is ``model.process.gamma(t)``; flow has none)."""
        if not isinstance(self.process, VDM):
            raise NotImplementedError(f"the {self.process.name} process has no discrete noise schedule (vpsde: "
                                      "model.process.gamma(t) in continuous time)")
        return self.process.schedule

    @property
    def timesteps(self) -> int:
        return self.process.timesteps

    @property
    def dtype(self) -> torch.dtype:
        """The diffusion state's dtype: float32 (float64 for a model cast to double), whatever the weights are.

        DeepSpeed's bf16 mode casts every parameter to bf16; positions, noise, z_t, the schedule quantities, R, the
        CoM projection and the loss must not follow (SPEC §2.6), or the low-noise steps are learnt from rounding.
        """
        return self.denoiser.dtype

    @property
    def net_dtype(self) -> torch.dtype:
        """The dtype the network body computes in (the parameters' dtype: bf16 under DeepSpeed's bf16 mode)."""
        return self.denoiser.net_dtype

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def set_n_atoms_histogram(self, counts: dict[int, int] | np.ndarray | torch.Tensor) -> None:
        """Set p(N) (used to draw sizes at sampling and for -log p(N) in the NLL) from atom-count counts."""
        if isinstance(counts, dict):
            arr = torch.zeros(max(max(counts) + 1, self.n_atoms_hist.numel()), dtype=torch.long)
            for n, c in counts.items():
                arr[int(n)] = int(c)
        else:
            arr = torch.as_tensor(np.rint(np.asarray(counts, dtype=np.float64)).astype(np.int64)).flatten()
        if arr.sum() <= 0 or (arr < 0).any():
            raise ValueError("atom-count histogram must be non-negative with a positive total")
        if arr.numel() != self.n_atoms_hist.numel():
            # Resize in place of the buffer; keeps the registered name so state dicts stay compatible.
            self.n_atoms_hist = arr.to(self.n_atoms_hist.device)
        else:
            self.n_atoms_hist.copy_(arr)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        key = prefix + "n_atoms_hist"
        if key in state_dict and state_dict[key].shape != self.n_atoms_hist.shape:
            self.n_atoms_hist = torch.zeros_like(state_dict[key], device=self.n_atoms_hist.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def log_p_n_atoms(self, n_atoms: torch.Tensor) -> torch.Tensor:
        hist = self.n_atoms_hist.double()
        p = hist / hist.sum()
        n = n_atoms.long().clamp(0, p.numel() - 1)
        lp = torch.log(p[n] + 1e-30)
        return torch.where(n_atoms.long() < p.numel(), lp, torch.full_like(lp, math.log(1e-30)))

    def sample_n_atoms(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        hist = self.n_atoms_hist.double().cpu()
        p = hist / hist.sum()
        return torch.multinomial(p, n, replacement=True, generator=generator)

    # ------------------------------------------------------------------ features
    def features(self, batch: Any) -> Features:
        """Batch -> (x centred [B,N,3], h normalised [B,N,d], mask, one-hot [B,N,C], integer feature or None)."""
        dtype, device = self.dtype, self.device
        mask = batch.mask.to(device).bool()
        Z = batch.atomic_numbers.to(device).long()
        cls = self.z_to_class[Z.clamp(0, 127)]
        bad = mask & ((cls < 0) | (Z > 127))
        if bool(bad.any()):
            b = int(bad.any(1).nonzero()[0, 0])
            mol = int(batch.mol_ids[b]) if getattr(batch, "mol_ids", None) is not None else b
            z_bad = int(Z[b][bad[b]][0])
            raise DataError(f"molecule {mol}: element Z={z_bad} is not in the {self.alphabet.name} alphabet "
                            f"{list(self.alphabet.atomic_numbers)}")
        m = mask.to(dtype).unsqueeze(-1)
        onehot = torch.nn.functional.one_hot(cls.clamp_min(0), self.num_classes).to(dtype) * m
        x = edm.remove_mean(batch.positions.to(device=device, dtype=dtype), mask, self.backend) / self.norm_x
        parts = [onehot / self.norm_cat]
        integer = None
        if self.include_charges:
            integer = Z.to(dtype).unsqueeze(-1) * m
            parts.append(integer / self.norm_int)
        return Features(x, torch.cat(parts, dim=-1), mask, onehot, integer)

    # ------------------------------------------------------------------ the denoiser
    def haar(self, batch: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.denoiser.haar(batch, generator)

    def gamma(self, x: torch.Tensor, mask: torch.Tensor, t: torch.Tensor, R0: Optional[torch.Tensor] = None,
              eta: Optional[torch.Tensor] = None, _psi: Optional[torch.Tensor] = None,
              _pk: Optional[Packing] = None, generator: Optional[torch.Generator] = None) -> Optional[torch.Tensor]:
        """R ~ gamma(. | x, t) [B, 3, 3], or None for dit/dit_aug: the denoiser's (:meth:`Denoiser.gamma`)."""
        return self.denoiser.gamma(x, mask, t, R0=R0, eta=eta, _psi=_psi, _pk=_pk, generator=generator)

    def denoise(self, z: torch.Tensor, mask: torch.Tensor, t: torch.Tensor, R: Optional[torch.Tensor] = None,
                R0: Optional[torch.Tensor] = None, eta: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None, **cond: Any) -> torch.Tensor:
        """The symmetrised eps_hat(z_t, t) = [R pi(eps'_x(R^T x, h)), eps'_h(R^T x, h)] (SPEC §2.7).

        z: [B, N, 3 + d] normalised state, t: [B] (or scalar) in [0, 1]. R is drawn from gamma unless given
        (pass R=None with R0/eta to fix gamma's randomness instead). Unsymmetrised kinds use R = identity.
        z and the result are in the state dtype; only the eps-network's body runs in ``net_dtype``.
        ``cond``: ``x_self`` [B, N, 3], the previous x-hat_0, for a self-conditioned denoiser (model.self_condition).
        """
        return self.denoiser(z, mask, t, R=R, R0=R0, eta=eta, generator=generator, **cond)

    # ------------------------------------------------------------------ training
    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.training_loss(batch)

    def training_loss(self, batch: Any, generator: Optional[torch.Generator] = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The process's training loss (vdm: Algorithm 1, SPEC §2.3) on the batch, ``dit_aug`` rotating it first.

        Returns the mean over molecules (the only term with a gradient) and detached statistics. All randomness
        comes from ``generator`` when given, else from torch's global RNG.
        """
        f = self.features(batch)
        f = f._replace(x=self.denoiser.augment(f.x, generator))
        # self.denoise, looked up at call time: a wrapper set on the instance (a spy, a test oracle) is honoured.
        return self.process.loss(self.denoise, f, generator=generator)

    # ------------------------------------------------------------------ likelihood
    def nll(self, batch: Any, t_int: Optional[torch.Tensor] = None, return_terms: bool = False,
            generator: Optional[torch.Generator] = None, **options: Any
            ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-molecule test NLL in nats: vdm's is the paper's Jensen bound (SPEC §2.4), one gamma draw per term;
        vpsde's and flow's are through their ODE (docs/model.md, "Likelihoods by process").

        ``t_int`` ([B] in 1..T) fixes vdm's diffusion term's time (for variance-reduced checks); by default it is
        drawn uniformly. ``options`` go to the process's ``nll`` (vpsde, flow: ``ode=ODEOptions(...)`` and fixed
        ``R0``, ``eta``, ``noise``, ``probes``). With ``return_terms`` also returns the components. Randomness from
        ``generator`` when given, else torch's global RNG.
        """
        if not isinstance(self.process, VDM) and self.net_dtype not in (torch.float32, torch.float64):
            # The divergence is a derivative of the network: bf16 rounding would be differentiated with it.
            raise ValueError(f"the {self.process.name} ODE likelihood needs float32 or float64 weights, not "
                             f"{self.net_dtype} (model.float())")
        f = self.features(batch)
        total, terms = self.process.nll(self.denoise, f, self.log_p_n_atoms(f.mask.sum(1)), t_int=t_int,
                                        generator=generator, **options)
        return (total, terms) if return_terms else total

    # ------------------------------------------------------------------ sampling
    def reverse_step(self, z_t: torch.Tensor, mask: torch.Tensor, t_int: int | torch.Tensor,
                     s_int: int | torch.Tensor, R: Optional[torch.Tensor] = None, R0: Optional[torch.Tensor] = None,
                     eta: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One ancestral step z_t -> z_s (s < t) of Algorithm 2 with the squared sigma_{t|s} (SPEC §2.5).

        ``noise`` ([B, N, 3 + d], CoM-free in x) and gamma's ``R``/``R0``/``eta`` may be fixed; otherwise drawn
        (from ``generator`` when given).
        """
        if not isinstance(self.process, VDM):
            raise NotImplementedError(f"reverse_step is the vdm process's ancestral step; the {self.process.name} "
                                      f"process steps with model.process's own samplers ({self.process.samplers})")
        return self.process.reverse_step(self.denoise, z_t.to(self.dtype), mask, t_int, s_int, R=R, R0=R0,
                                         eta=eta, noise=noise, generator=generator)

    def decode(self, z0: torch.Tensor, mask: torch.Tensor, R: Optional[torch.Tensor] = None,
               R0: Optional[torch.Tensor] = None, eta: Optional[torch.Tensor] = None,
               noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """p(x, h | z_0): positions (Angstrom) from the denoised x-hat_0 plus sigma_0/alpha_0 noise; types from z_0."""
        mask = mask.bool()
        x, cls = self.process.decode(self.denoise, z0.to(self.dtype), mask, R=R, R0=R0, eta=eta, noise=noise,
                                     generator=generator)
        return self._to_molecules(x, cls, mask)

    def _to_molecules(self, x: torch.Tensor, cls: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
        Z = torch.where(mask, self.class_to_z[cls], torch.zeros_like(cls))
        return x * self.norm_x, Z

    @torch.inference_mode()
    def sample(self, n_atoms: torch.Tensor, steps: Optional[int] = None, progress: Any = None,
               generator: Optional[torch.Generator] = None, sampler: Optional[str] = None,
               **options: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample molecules of the given sizes with the process's ``sampler`` (its default when None).

        ``steps`` < T strides the time grid. Returns positions [B, N, 3] (Angstrom, centred), atomic numbers
        [B, N] (0 at padding) and the mask, with N = max(n_atoms). ``progress`` (e.g. a tqdm bar) gets
        ``update(1)`` per network call. Noise comes from ``generator`` (on the model's device) when given, else
        from torch's global RNG. ``options`` go to the sampler (see the process's ``sample``).
        """
        n_atoms = torch.as_tensor(n_atoms, dtype=torch.long, device=self.device).flatten()
        if n_atoms.numel() == 0 or int(n_atoms.min()) < 1:
            raise ValueError("every molecule needs at least one atom")
        N = int(n_atoms.max())
        mask = torch.arange(N, device=self.device).unsqueeze(0) < n_atoms.unsqueeze(1)
        x, cls = self.process.sample(self.denoise, mask, self.dtype, sampler=sampler, steps=steps,
                                     progress=progress, generator=generator, **options)
        x, Z = self._to_molecules(x, cls, mask)
        return x, Z, mask


def _check_sigma0(schedule: NoiseSchedule, norm_cat: float, norm_int: float) -> None:
    """EDM's construction check (SPEC §1.3): 8 sigma_0 < 1 / max(one-hot, integer factor).

    The types are read off z_0 by rounding on the unnormalised scale; with more noise than this at t = 0 the
    discrete likelihood of h and the sampler's argmax no longer see the data's integer grid.
    """
    sigma0 = float(schedule.sigma(schedule.gamma(torch.zeros(1, dtype=torch.long)))[0])
    limit = 1.0 / max(norm_cat, norm_int)
    if 8.0 * sigma0 >= limit:
        raise ConfigError(f"diffusion.precision/normalize_factors: 8 * sigma_0 = {8 * sigma0:.4g} must be below "
                          f"1 / max(normalize_factors[1:]) = {limit:.4g} (EDM's check; lower diffusion.precision or "
                          f"the one-hot/integer factors)")

"""The denoiser: the networks and their symmetrisation, and nothing of schedules or losses.

One code path for the four variants of ``model.kind`` (SPEC §3.7):

* ``dit``          out = f(z): no symmetry at all;
* ``dit_aug``      as ``dit``; a process rotates each training molecule by a Haar-random g first (:meth:`augment`);
* ``symdiff_haar`` out = R f(R^T z) with R ~ Haar(O(3)) at every call (training, NLL, sampling);
* ``symdiff``      the same with R = R0 Qf from the learned gamma_theta (paper §3, SPEC §2.7).

The fifth kind, ``egnn`` (EDM's equivariant GNN, symdiff/models/egnn.py), is its own denoiser class on the same
call and the same :class:`DenoiserBase`: equivariant by construction, it needs no R.

f is the S_N-equivariant DiT over [W_I z, Psi] with Psi the pooled Gaussian distance embedding. What the output
means (eps for vdm, a velocity for flow) is the process's business: the denoiser only maps a state
[x, h] of shape [B, N, 3 + d] to one of the same shape, with the x channels rotated back and CoM-free.

Conventions: positions are rows [B, N, 3] with a boolean mask [B, N]; a rotation acts as x_i -> R x_i, i.e.
``X @ R.T``.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch
from torch import nn

from symdiff import kernels
from symdiff.kernels.linear import Linear
from symdiff.models.dit import DiT, Packing
from symdiff.models.embedding import GaussianEmbedding
from symdiff.models.gamma import GammaNet, haar_o3
from symdiff.models.time_input import TimeInput

KINDS = ("dit", "dit_aug", "symdiff_haar", "symdiff")


class DenoiseFn(Protocol):
    """What a process calls: ``denoise(z, mask, t, R=None, R0=None, eta=None, generator=None) -> out``.

    A self-conditioned denoiser (``model.self_condition``) also takes ``x_self``, the previous x-hat_0 [B, N, 3];
    the process passes it only to such a denoiser.
    """

    def __call__(self, z: torch.Tensor, mask: torch.Tensor, t: torch.Tensor, R: Optional[torch.Tensor] = None,
                 R0: Optional[torch.Tensor] = None, eta: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor: ...


class EpsNet(nn.Module):
    """f_theta (SPEC §3.2): tokens [W_I [x, h], Psi] -> DiT -> 3 + d channels."""

    def __init__(self, in_features: int, xh_hidden: int, hidden: int, depth: int, num_heads: int,
                 mlp_ratio: float, self_condition: bool = False) -> None:
        super().__init__()
        self.inp = Linear(in_features, xh_hidden)
        self.dit = DiT(hidden, depth, num_heads, mlp_ratio, out_channels=in_features)
        # Self-conditioning adds x-hat_0 through its own layer (absent otherwise: the paper's state dict). Zero at
        # initialisation, so a new self-conditioned network starts as the plain one.
        self.self_in = Linear(3, xh_hidden) if self_condition else None
        if self.self_in is not None:
            nn.init.zeros_(self.self_in.weight)
            nn.init.zeros_(self.self_in.bias)

    def forward(self, xh: torch.Tensor, psi: torch.Tensor, t: torch.Tensor, pk: Packing,
                x_self: Optional[torch.Tensor] = None) -> torch.Tensor:
        w = self.inp.weight.dtype
        feat = self.inp(pk.pack(xh).to(w))
        if self.self_in is not None:  # no estimate yet (first pass, first sampling step): x-hat = 0
            feat = feat + self.self_in(pk.pack(x_self if x_self is not None else xh[..., :3] * 0).to(w))
        tokens = torch.cat([feat, psi.to(w)], dim=-1)
        return self.dit(tokens, t, pk)


class DenoiserBase(nn.Module):
    """What every denoiser shares: the state and network dtypes, read off one of its parameters, and Haar draws."""

    def _weight(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """The state's dtype: float32 (float64 for a model cast to double) whatever the weights are (SPEC §2.6)."""
        w = self._weight().dtype
        return w if w in (torch.float32, torch.float64) else torch.float32

    @property
    def net_dtype(self) -> torch.dtype:
        """The dtype the network body computes in (the parameters' dtype: bf16 under DeepSpeed's bf16 mode)."""
        return self._weight().dtype

    @property
    def device(self) -> torch.device:
        return self._weight().device

    def haar(self, batch: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return haar_o3(batch, dtype=self.dtype, device=self.device, backend=self.backend, generator=generator)


class Denoiser(DenoiserBase):
    """out = denoiser(z, mask, t, R=None, R0=None, eta=None, generator=None): the symmetrised R f(R^T x, h)."""

    def __init__(self, kind: str, embedding: GaussianEmbedding, eps_net: EpsNet, gamma_net: Optional[GammaNet],
                 backend: str = "auto") -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"denoiser kind '{kind}' is not one of {', '.join(KINDS)}")
        if (gamma_net is not None) != (kind == "symdiff"):
            raise ValueError("a learned gamma network belongs to kind 'symdiff' and to no other kind")
        self.kind = kind
        self.backend = backend
        self.embedding = embedding
        self.eps_net = eps_net
        self.gamma_net = gamma_net
        # model.time_input: what the time embedders see (set by the model, which owns the process's schedule)
        self.time_input = TimeInput()

    def _weight(self) -> torch.Tensor:
        return self.embedding.mu

    def augment(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Training-time data augmentation: a Haar-random g x per molecule for ``dit_aug``, x itself otherwise."""
        if self.kind != "dit_aug":
            return x
        g = self.haar(x.shape[0], generator)
        return x @ g.transpose(1, 2)

    def gamma(self, x: torch.Tensor, mask: torch.Tensor, t: torch.Tensor, R0: Optional[torch.Tensor] = None,
              eta: Optional[torch.Tensor] = None, _psi: Optional[torch.Tensor] = None,
              _pk: Optional[Packing] = None, generator: Optional[torch.Generator] = None) -> Optional[torch.Tensor]:
        """Draw R ~ gamma(. | x, t): [B, 3, 3] in O(3), or None for the unsymmetrised kinds (dit, dit_aug).

        x: [B, N, 3] positions (centred here), t: [B] in [0, 1]. ``R0`` (Haar) and ``eta`` ([B, N, noise_dims])
        are drawn when not given (from ``generator``, else the global RNG); fixing them makes the draw a
        deterministic, equivariant function of x.
        """
        if self.kind in ("dit", "dit_aug"):
            return None
        B = x.shape[0]
        if R0 is None:
            R0 = self.haar(B, generator)
        if self.kind == "symdiff_haar":
            return R0
        assert self.gamma_net is not None
        mask = mask.bool()
        x = kernels.com_project_rotate(x, mask, None, backend=self.backend)
        pk = _pk if _pk is not None else Packing.from_mask(mask)
        psi = _psi if _psi is not None else self.embedding(x, mask)
        if eta is None:
            eta = torch.randn(B, x.shape[1], self.gamma_net.noise_dims, dtype=x.dtype, device=x.device,
                              generator=generator)
        eta = eta * mask.to(x.dtype).unsqueeze(-1)
        return self.gamma_net(x, psi, self.time_input(as_time(t, B, x)), pk, R0.to(x.dtype), eta)

    def forward(self, z: torch.Tensor, mask: torch.Tensor, t: torch.Tensor, R: Optional[torch.Tensor] = None,
                R0: Optional[torch.Tensor] = None, eta: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None, x_self: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[R pi(f_x(R^T x, h)), f_h(R^T x, h)] (SPEC §2.7) at state z [B, N, 3 + d] and time t [B] (or scalar).

        R is drawn from gamma unless given (pass R=None with R0/eta to fix gamma's randomness instead).
        ``x_self`` (self-conditioning, [B, N, 3]) is a position: f sees R^T x_self, as it sees R^T x.
        Unsymmetrised kinds use R = identity. z and the result are in the state dtype; only the network body
        runs in ``net_dtype``.
        """
        z = z.to(self.dtype)
        mask = mask.bool()
        B = z.shape[0]
        m = mask.to(z.dtype).unsqueeze(-1)
        z = z * m
        t = as_time(t, B, z)
        x = kernels.com_project_rotate(z[..., :3], mask, None, backend=self.backend)
        pk = Packing.from_mask(mask)
        # Psi is rotation-invariant: computed once from the unrotated x and shared by gamma and f.
        psi = self.embedding(x, mask)
        if R is None:
            R = self.gamma(x, mask, t, R0=R0, eta=eta, _psi=psi, _pk=pk, generator=generator)
        x_in = x if R is None else kernels.com_project_rotate(x, mask, R.to(z.dtype), backend=self.backend,
                                                              transpose=True)
        if x_self is not None:
            x_self = kernels.com_project_rotate(x_self.to(z.dtype), mask, None if R is None else R.to(z.dtype),
                                                backend=self.backend, transpose=R is not None)
        out = pk.unpack(self.eps_net(torch.cat([x_in, z[..., 3:]], dim=-1), psi, self.time_input(t), pk,
                                     x_self=x_self).to(z.dtype))
        out_x = kernels.com_project_rotate(out[..., :3], mask, None if R is None else R.to(z.dtype),
                                           backend=self.backend)
        return torch.cat([out_x, out[..., 3:]], dim=-1) * m


def as_time(t: torch.Tensor | float, B: int, like: torch.Tensor) -> torch.Tensor:
    """t as a [B] tensor in ``like``'s dtype and device (a scalar is broadcast)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.expand(B) if t.dim() == 0 else t.to(like.dtype)

"""The learned O(3) kernel gamma_theta (SPEC §2.7, §3.4): R = R0 Qf with R0 ~ Haar(O(3)).

Qf = QR(f(R0^T x, eta, Psi, t)) where f is an invariant DiT, a masked mean over atoms and an MLP to 3x3. Because
f only sees R0^T x, replacing (x, R0) by (g x, g R0) leaves Qf unchanged, so R(g x) = g R(x) pathwise (the paper's
composition order; the official code's Qf R0^T is not equivariant, SPEC D2).
"""
from __future__ import annotations

import torch
from torch import nn

from symdiff import kernels
from symdiff.kernels.linear import Linear
from symdiff.models.dit import DiT, Packing


def haar_o3(batch: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
            backend: str = "auto", generator: torch.Generator | None = None) -> torch.Tensor:
    """[batch, 3, 3] Haar-distributed members of O(3): sign-fixed QR of a Gaussian matrix (Mezzadri 2006)."""
    G = torch.randn(batch, 3, 3, dtype=dtype, device=device, generator=generator)
    return kernels.batched_qr(G, backend=backend)


class GammaNet(nn.Module):
    """f_theta: [R0^T x, eta, Psi] -> W_G -> DiT(t) -> masked mean -> MLP -> 3x3 -> QR."""

    def __init__(self, emb_features: int, hidden: int = 128, depth: int = 8, num_heads: int = 4,
                 mlp_ratio: float = 4.0, dec_hidden: int = 64, noise_dims: int = 3, final_norm: bool = True,
                 backend: str = "auto") -> None:
        super().__init__()
        self.noise_dims = noise_dims
        self.backend = backend
        self.inp = Linear(3 + noise_dims + emb_features, hidden)
        nn.init.xavier_uniform_(self.inp.weight)
        nn.init.zeros_(self.inp.bias)
        self.dit = DiT(hidden, depth, num_heads, mlp_ratio, out_channels=0, final_norm=final_norm)
        self.dec = nn.Sequential(Linear(hidden, dec_hidden), nn.GELU(), Linear(dec_hidden, 9))

    def forward(self, x: torch.Tensor, psi: torch.Tensor, t: torch.Tensor, pk: Packing, R0: torch.Tensor,
                eta: torch.Tensor) -> torch.Tensor:
        """x: [B, N, 3] centred positions, psi: [T, n_emb] packed, t: [B], R0: [B, 3, 3], eta: [B, N, noise]."""
        xr = x @ R0  # rows R0^T x_i
        # Only the network body runs in the weights' dtype (bf16 under DeepSpeed); R0, the QR and R stay in x's.
        w = self.inp.weight.dtype
        tokens = torch.cat([pk.pack(xr).to(w), pk.pack(eta).to(w), psi.to(w)], dim=-1)
        feats = self.dit(self.inp(tokens), t, pk)
        counts = pk.mask.sum(1).clamp_min(1).to(feats.dtype).unsqueeze(1)
        pooled = feats.new_zeros(pk.batch, feats.shape[-1]).index_add_(0, pk.mol, feats) / counts
        M = self.dec(pooled).view(-1, 3, 3).to(x.dtype)  # row-major: M_ab = out[3a + b]
        Qf = kernels.batched_qr(M, backend=self.backend)
        return R0 @ Qf

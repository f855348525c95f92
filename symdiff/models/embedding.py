"""Gaussian pairwise-distance embedding Psi (SPEC §3.3), pooled over real atoms before the linear map (D6).

Pooling first means Psi_i = W_D (mean over real j of psi_ij) + b_D: the bias is counted once per real atom, so
the embedding does not depend on how much padding the batch carries, and the [B, N, N, n_emb] block is never
formed. The pooled [B, N, K] part comes from ``symdiff.kernels.gaussian_embedding`` (fused where available).
"""
from __future__ import annotations

import torch
from torch import nn

from symdiff import kernels


class GaussianEmbedding(nn.Module):
    def __init__(self, num_gaussians: int, out_features: int, backend: str = "auto") -> None:
        super().__init__()
        self.num_gaussians = int(num_gaussians)
        self.out_features = int(out_features)
        self.backend = backend
        self.mu = nn.Parameter(torch.empty(num_gaussians).uniform_(0.0, 3.0))
        self.sigma = nn.Parameter(torch.empty(num_gaussians).uniform_(0.0, 3.0))
        self.proj = nn.Linear(num_gaussians, out_features)
        nn.init.zeros_(self.proj.bias)

    def pooled(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, N, 3], [B, N] -> [B, N, K] mean over real j of the Gaussian kernels of d_ij (zero rows for padding)."""
        return kernels.gaussian_embedding(x, mask, self.mu, self.sigma, backend=self.backend)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Psi for the real atoms only, packed in mask order: [n_real_atoms, out_features]."""
        return self.proj(self.pooled(x, mask)[mask])

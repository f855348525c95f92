"""Gaussian pairwise-distance embedding Psi (SPEC §3.3), pooled over real atoms before the linear map (D6).

Pooling first means Psi_i = W_D (mean over real j of psi_ij) + b_D: the bias is counted once per real atom, so
the embedding does not depend on how much padding the batch carries, and the [B, N, N, n_emb] block is never
formed. The pooled [B, N, K] part comes from ``symdiff.kernels.gaussian_embedding`` (fused where available).
"""
from __future__ import annotations

import torch
from torch import nn

from symdiff import kernels
from symdiff.kernels.linear import Linear


class GaussianEmbedding(nn.Module):
    def __init__(self, num_gaussians: int, out_features: int, backend: str = "auto") -> None:
        super().__init__()
        self.num_gaussians = int(num_gaussians)
        self.out_features = int(out_features)
        self.backend = backend
        self.mu = nn.Parameter(torch.empty(num_gaussians).uniform_(0.0, 3.0))
        self.sigma = nn.Parameter(torch.empty(num_gaussians).uniform_(0.0, 3.0))
        self.proj = Linear(num_gaussians, out_features)
        nn.init.zeros_(self.proj.bias)

    def pooled(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, N, 3], [B, N] -> [B, N, K] mean over real j of the Gaussian kernels of d_ij (zero rows for padding)."""
        groups = self._size_groups(x, mask)
        # Distances and kernels in the positions' dtype (float32 state) even when the parameters are bf16.
        mu, sigma = self.mu.to(x.dtype), self.sigma.to(x.dtype)
        if groups is None:
            return kernels.gaussian_embedding(x, mask, mu, sigma, backend=self.backend)
        out = x.new_zeros(*mask.shape, self.num_gaussians)
        for idx, n in groups:
            part = kernels.gaussian_embedding(x[idx, :n], mask[idx, :n], mu, sigma, backend=self.backend)
            out = out.index_put((idx[:, None], torch.arange(n, device=x.device)[None, :]), part)
        return out

    def _size_groups(self, x: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, int]] | None:
        """Molecules grouped by size, each group cut to its own largest molecule, or None to run in one piece.

        The reference path costs B * N_pad^2 * K whatever the real sizes; a batch of mixed sizes (QM9: 3-29 atoms)
        wastes most of that on padding pairs. The fused GPU kernel skips padded tiles itself, so only the
        reference path is split. Needs real atoms first in each row (the loader's and the sampler's layout).
        """
        if kernels._use_triton(self.backend, x) or x.shape[0] < 8:
            return None
        n = mask.sum(1)
        N = mask.shape[1]
        if not bool((mask == (torch.arange(N, device=mask.device)[None] < n[:, None])).all()):
            return None
        n_sorted, order = torch.sort(n)
        sizes = n_sorted.tolist()
        B = len(sizes)
        # Cut the sorted sizes into at most 4 runs of equal molecule count; keep the split only when it saves
        # at least a quarter of the pair work.
        cuts = sorted({round(B * q / 4) for q in range(1, 4)} | {B})
        groups, start, cost = [], 0, 0
        for end in cuts:
            if end <= start:
                continue
            nmax = max(int(sizes[end - 1]), 1)
            groups.append((order[start:end], nmax))
            cost += (end - start) * nmax * nmax
            start = end
        if cost > 0.75 * B * N * N:
            return None
        return groups

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Psi for the real atoms only, packed in mask order: [n_real_atoms, out_features], in the weights' dtype."""
        return self.proj(self.pooled(x, mask)[mask].to(self.proj.weight.dtype))

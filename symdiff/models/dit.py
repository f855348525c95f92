"""S_N-equivariant Diffusion Transformer over atoms (SPEC §3.1): adaLN-Zero blocks, SwiGLU MLP, masked SDPA.

Tokens are atoms with no index embedding, so the only cross-token operation is attention and the network is
permutation-equivariant. Per-token work (all the linear layers) runs on the real atoms only, packed into a
[n_real, H] matrix: padding costs nothing there, and padded atoms cannot influence anything. Attention either
unpacks to the padded [B, heads, N, hd] layout and masks padded keys (``padded``), or runs on the packed tokens as
a jagged (variable-length) nested tensor with no mask (``varlen``). A boolean mask rules out the flash kernel and
costs the padded slots' work; the jagged form is what the flash and memory-efficient SDPA kernels take on a GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from symdiff.kernels.linear import Linear

# model.attention: auto = varlen on CUDA tensors, padded elsewhere (the CPU keeps the padded path's exact numerics)
ATTENTIONS = ("auto", "padded", "varlen")


@dataclass
class Packing:
    """Where the real atoms of a padded [B, N] batch sit: flat index b*N + i and molecule index b, mask order."""

    mask: torch.Tensor  # [B, N] bool
    flat: torch.Tensor  # [T] long
    mol: torch.Tensor  # [T] long

    @staticmethod
    def from_mask(mask: torch.Tensor) -> "Packing":
        mask = mask.bool()
        flat = mask.reshape(-1).nonzero().squeeze(1)
        return Packing(mask=mask, flat=flat, mol=torch.div(flat, mask.shape[1], rounding_mode="floor"))

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def n_max(self) -> int:
        return self.mask.shape[1]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [T, C]."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.flat)

    def offsets(self) -> torch.Tensor:
        """[B + 1] start of each molecule's tokens in the packed order (molecule-major, as ``flat``)."""
        counts = self.mask.sum(1)
        return torch.cat([counts.new_zeros(1), counts.cumsum(0)])

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[T, C] -> [B, N, C] with zeros at padding."""
        out = x.new_zeros(self.batch * self.n_max, x.shape[-1])
        return out.index_copy(0, self.flat, x).view(self.batch, self.n_max, x.shape[-1])


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[B] continuous times in [0, 1] -> [B, dim] sinusoid features [cos, sin] (SPEC §3.1, D9)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    args = t.unsqueeze(1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(Linear(freq_dim, hidden), nn.SiLU(), Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # The sinusoid is formed in (at least) float32 and only then cast to the weights' dtype: bf16 keeps 8 bits
        # of t/T, which would merge neighbouring diffusion steps.
        if t.dtype not in (torch.float32, torch.float64):
            t = t.float()
        return self.mlp(timestep_features(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class SwiGLU(nn.Module):
    """fc1: H -> 2*hidden split as (a, b); SiLU(a) * b; fc2: hidden -> H (timm's packed SwiGLU layout)."""

    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden // 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(a) * b)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, x, 1 + scale)


class Block(nn.Module):
    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {num_heads} attention heads")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = Linear(hidden, 3 * hidden)
        self.proj = Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = SwiGLU(hidden, mlp_ratio)
        self.adaLN = nn.Sequential(nn.SiLU(), Linear(hidden, 6 * hidden))
        self.attention_impl = "auto"

    def attention(self, x: torch.Tensor, pk: Packing, key_mask: torch.Tensor) -> torch.Tensor:
        impl = self.attention_impl
        if impl == "varlen" or (impl == "auto" and x.is_cuda):
            return self._attention_varlen(x, pk)
        B, N, H = pk.batch, pk.n_max, x.shape[-1]
        hd = H // self.num_heads
        qkv = pk.unpack(self.qkv(x)).view(B, N, 3, self.num_heads, hd).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=key_mask)
        return self.proj(pk.pack(out.transpose(1, 2).reshape(B, N, H)))

    def _attention_varlen(self, x: torch.Tensor, pk: Packing) -> torch.Tensor:
        T, H = x.shape
        hd = H // self.num_heads
        # [3, T, heads, hd], each of q, k, v contiguous: the jagged SDPA wants contiguous values once transposed
        qkv = self.qkv(x).view(T, 3, self.num_heads, hd).permute(1, 0, 2, 3).contiguous()
        offsets = pk.offsets()
        # seqlen bounds given, so that nothing reads them back from the device (a host synchronisation per layer)
        q, k, v = (torch.nested.nested_tensor_from_jagged(t, offsets, min_seqlen=1, max_seqlen=pk.n_max)
                   .transpose(1, 2) for t in qkv)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).values().reshape(T, H))

    def forward(self, x: torch.Tensor, c: torch.Tensor, pk: Packing, key_mask: torch.Tensor) -> torch.Tensor:
        # Modulation is per molecule: compute it on [B, H] and gather per atom (cheaper than per token).
        mod = self.adaLN(c).index_select(0, pk.mol)
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=-1)
        x = torch.addcmul(x, g1, self.attention(_modulate(self.norm1(x), sh1, sc1), pk, key_mask))
        return torch.addcmul(x, g2, self.mlp(_modulate(self.norm2(x), sh2, sc2)))


def set_attention(module: nn.Module, impl: str) -> None:
    """Choose every DiT block's attention: auto | padded | varlen (see the module docstring)."""
    if impl not in ATTENTIONS:
        raise ValueError(f"unknown attention '{impl}' (choose from {', '.join(ATTENTIONS)})")
    for m in module.modules():
        if isinstance(m, Block):
            m.attention_impl = impl


class DiT(nn.Module):
    """Transformer over packed atom tokens [T, H] conditioned on per-molecule time t [B].

    ``out_channels > 0``: the usual adaLN final layer (norm, modulate, zero-initialised linear).
    ``out_channels == 0``: returns [T, H] features (used by gamma's f): after the final adaLN-modulated norm
    with ``final_norm`` (default), or the last block's residual stream as in the official code without it.
    """

    def __init__(self, hidden: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 out_channels: int = 0, final_norm: bool = True) -> None:
        super().__init__()
        self.hidden = hidden
        self.t_embedder = TimestepEmbedder(hidden)
        self.blocks = nn.ModuleList(Block(hidden, num_heads, mlp_ratio) for _ in range(depth))
        self.use_final = out_channels > 0 or final_norm
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), Linear(hidden, 2 * hidden)) if self.use_final else None
        self.final_linear = Linear(hidden, out_channels) if out_channels > 0 else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN[-1].weight)
            nn.init.zeros_(blk.adaLN[-1].bias)
            # SwiGLU starts as SiLU(a): the multiplicative branch is ~1 (SPEC §3.1 initialisation).
            half = blk.mlp.fc1.out_features // 2
            with torch.no_grad():
                blk.mlp.fc1.weight[half:].normal_(std=1e-6)
                blk.mlp.fc1.bias[half:].fill_(1.0)
        if self.final_adaLN is not None:
            nn.init.zeros_(self.final_adaLN[-1].weight)
            nn.init.zeros_(self.final_adaLN[-1].bias)
        if self.final_linear is not None:
            nn.init.zeros_(self.final_linear.weight)
            nn.init.zeros_(self.final_linear.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, pk: Packing) -> torch.Tensor:
        """x: [T, H] packed tokens, t: [B] -> [T, out_channels] (or [T, H] features when out_channels == 0)."""
        c = self.t_embedder(t)
        key_mask = pk.mask[:, None, None, :]
        for blk in self.blocks:
            x = blk(x, c, pk, key_mask)
        if self.final_adaLN is None:
            return x
        shift, scale = self.final_adaLN(c).index_select(0, pk.mol).chunk(2, dim=-1)
        x = _modulate(self.final_norm(x), shift, scale)
        return self.final_linear(x) if self.final_linear is not None else x

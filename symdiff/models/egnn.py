"""EDM's E(n)-equivariant graph network as a denoiser (kind ``egnn``): the intrinsically equivariant baseline.

Written from the equations of Satorras et al. 2021 (EGNN, eqs. 3-6) with the changes of Hoogeboom et al. 2022 (EDM,
App. B): equivariant blocks of ``inv_sublayers`` invariant message-passing layers followed by one coordinate
update; edge features [d_ij^2 at the block's input, d_ij^2 at the network's input] (optionally sinusoidal
features of d_ij); coordinate steps (x_i - x_j) / (d_ij + c) scaled by tanh(.) * coords_range; attention
gates e_ij = sigmoid(phi_inf(m_ij)); sums over neighbours divided by ``normalization_factor``. With
h = [z_h, t] in and eps = [x_L - x_0 (CoM-free), h_L without its time channel] out, as EDM's dynamics do.
The layer sizes follow EDM's so the parameter counts equal the official code's (tests/test_egnn.py).

Messages run over the real ordered atom pairs (i != j) of each molecule only: an edge list built from the padding
mask in O(edges), node features packed to [n_real, nf] (symdiff.models.dit.Packing) and sums over neighbours as
segment sums (the edges are sorted by receiver).
Memory is linear in the number of real pairs; no padded [B, N_max, N_max] block is ever formed. The first layer of
each edge MLP acts on [h_i, h_j, e_ij]; it is applied as W_a h_i + W_b h_j + W_e e_ij with the two node products
computed once per atom and gathered, the same arithmetic as the concatenated form at a fraction of its cost.

The coordinate stream (x, differences, distances, updates) stays in the state dtype (float32, SPEC §2.6); only
the MLPs run in the weights' dtype (bf16 under DeepSpeed's bf16 mode).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import nn

from symdiff.kernels.linear import Linear, linear
from symdiff.models.denoiser import DenoiserBase, as_time
from symdiff.models.dit import Packing

AGGREGATIONS = ("sum", "mean")


class Edges(NamedTuple):
    """The ordered real pairs (i, j), i != j, of a packed batch: messages flow j -> i and are summed at i.

    Edges are sorted by i, each atom's in one run of ``degree[i]`` = n_b - 1: gathers of h_i repeat rows and sums
    over j are segment sums, both several times faster on CPU than index_select / index_add over E rows.
    """

    row: torch.Tensor  # [E] long, packed index of i (the receiver), non-decreasing
    col: torch.Tensor  # [E] long, packed index of j
    n_nodes: int  # packed atoms
    degree: torch.Tensor  # [n_nodes] long, n_b - 1 for each atom of molecule b
    inv_degree: torch.Tensor  # [n_nodes, 1] 1 / (n_b - 1) (1 for a lone atom)
    transpose: torch.Tensor  # [E] long, the index of edge (j, i) for each edge (i, j)

    def at_row(self, a: torch.Tensor) -> torch.Tensor:
        """[n_nodes, C] -> [E, C]: a_i for every edge (i, j)."""
        return _Gather.apply(a, self.row, None, self.degree)

    def at_col(self, a: torch.Tensor) -> torch.Tensor:
        """[n_nodes, C] -> [E, C]: a_j for every edge (i, j)."""
        return _Gather.apply(a, self.col, self.transpose, self.degree)


class _Gather(torch.autograd.Function):
    """a[index] whose backward is a segment sum instead of index_add's zero-filled scatter.

    Edges are sorted by receiver, so the gradient of a[row] sums runs of ``degree`` rows; that of a[col] is the same
    sum over the edges reordered by transposition (the edges with j as sender are the transposes of j's own run).
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, index: torch.Tensor, back: Optional[torch.Tensor],  # type: ignore[override]
                degree: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(back, degree)
        return a.index_select(0, index)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        back, degree = ctx.saved_tensors
        if back is not None:
            g = g.index_select(0, back)
        return torch.segment_reduce(g.contiguous(), "sum", lengths=degree, axis=0), None, None, None


def real_pairs(mask: torch.Tensor) -> Edges:
    """All ordered pairs of distinct real atoms per molecule, in packed (mask) order, built in O(edges).

    Molecule b with n_b atoms owns packed rows off_b .. off_b + n_b - 1 and n_b (n_b - 1) edges; edge l of it is
    (i, j) with i = l // (n_b - 1) and j the (l mod (n_b - 1))-th atom other than i.
    """
    n = mask.bool().sum(1)
    dev = n.device
    node_off = torch.cumsum(n, 0) - n
    per_mol = n * (n - 1)
    mol = torch.repeat_interleave(torch.arange(n.numel(), device=dev), per_mol)
    edge_off = (torch.cumsum(per_mol, 0) - per_mol)[mol]
    local = torch.arange(int(per_mol.sum()), device=dev) - edge_off
    others = (n - 1)[mol]
    i = torch.div(local, others, rounding_mode="floor")
    j = local - i * others
    j = j + (j >= i).long()
    base = node_off[mol]
    deg = torch.repeat_interleave(n - 1, n)
    # (j, i) is edge j (n_b - 1) + (i - [i > j]) of molecule b
    transpose = edge_off + j * others + i - (i > j).long()
    return Edges(base + i, base + j, int(n.sum()), deg, 1.0 / deg.clamp_min(1).unsqueeze(1), transpose)


def distance_sinusoids(d2: torch.Tensor, max_res: float = 15.0, min_res: float = 15.0 / 2000.0,
                       div: float = 4.0) -> torch.Tensor:
    """[E, 1] squared distances -> [E, 2F] [sin, cos](2 pi d div^k / max_res), k = 0..F-1 (EDM's distance features:
    wavelengths from max_res down to min_res in steps of div, F = floor(log_div(max_res / min_res)) + 1)."""
    n_freq = int(math.log(max_res / min_res, div)) + 1
    freqs = 2 * math.pi * div ** torch.arange(n_freq, dtype=d2.dtype, device=d2.device) / max_res
    arg = torch.sqrt(d2 + 1e-8) * freqs
    return torch.cat([arg.sin(), arg.cos()], dim=-1)


def n_distance_features(sin_embedding: bool) -> int:
    """Width of one distance feature (the edge features hold two: the block's input and the network's input)."""
    return 2 * (int(math.log(2000.0, 4.0)) + 1) if sin_embedding else 1


class PairMLP(nn.Module):
    """phi(h_i, h_j, e_ij) -> [E, hidden]: Linear(2 nf + n_edge) -> SiLU -> Linear -> SiLU.

    The first layer is one weight [hidden, 2 nf + n_edge] (EDM's size) applied in parts: per atom W_a h and W_b h,
    gathered to the edges, plus W_e e_ij.
    """

    def __init__(self, nf: int, n_edge: int, hidden: int) -> None:
        super().__init__()
        self.nf = nf
        self.fc1 = Linear(2 * nf + n_edge, hidden)
        self.fc2 = Linear(hidden, hidden)
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor, e: torch.Tensor, edges: Edges) -> torch.Tensor:
        w, nf = self.fc1.weight, self.nf
        # one GEMM for both node parts: [n, nf] x [nf, 2 hidden]
        ab = linear(h, torch.cat([w[:, :nf], w[:, nf:2 * nf]], 0), None, self.fc1.backend)
        a, b = ab.chunk(2, dim=-1)
        # F.linear for the few edge-feature columns: oneDNN on this strided [hidden, 2] slice is ~50x slower
        pre = edges.at_row(a) + edges.at_col(b) + torch.nn.functional.linear(e, w[:, 2 * nf:], self.fc1.bias)
        return self.act(self.fc2(self.act(pre)))


def aggregate(messages: torch.Tensor, edges: Edges, normalization_factor: float, aggregation: str) -> torch.Tensor:
    """sum_j m_ij at each atom i: / normalization_factor ('sum') or / (n_b - 1) ('mean')."""
    out = torch.segment_reduce(messages, "sum", lengths=edges.degree, axis=0)
    if aggregation == "mean":
        return out * edges.inv_degree.to(out.dtype)
    return out / normalization_factor


class InvariantLayer(nn.Module):
    """h_i <- h_i + phi_h(h_i, sum_j e_ij m_ij), m_ij = phi_e(h_i, h_j, e_ij), e_ij = sigmoid(phi_inf(m_ij))."""

    def __init__(self, nf: int, n_edge: int, attention: bool, normalization_factor: float, aggregation: str) -> None:
        super().__init__()
        self.edge_mlp = PairMLP(nf, n_edge, nf)
        # plain nn.Linear for the one-output heads: oneDNN is ~4x slower than aten there (E rows, one column)
        self.att = nn.Linear(nf, 1) if attention else None
        self.node_mlp = nn.Sequential(Linear(2 * nf, nf), nn.SiLU(), Linear(nf, nf))
        self.normalization_factor = normalization_factor
        self.aggregation = aggregation

    def forward(self, h: torch.Tensor, e: torch.Tensor, edges: Edges) -> torch.Tensor:
        m = self.edge_mlp(h, e, edges)
        if self.att is not None:
            m = m * torch.sigmoid(self.att(m))
        agg = aggregate(m, edges, self.normalization_factor, self.aggregation)
        return h + self.node_mlp(torch.cat([h, agg], dim=-1))


class CoordinateUpdate(nn.Module):
    """x_i <- x_i + sum_j (x_i - x_j) / (d_ij + c) * tanh(phi_x(h_i, h_j, e_ij)) * coords_range."""

    def __init__(self, nf: int, n_edge: int, tanh: bool, coords_range: float, normalization_factor: float,
                 aggregation: str) -> None:
        super().__init__()
        self.mlp = PairMLP(nf, n_edge, nf)
        self.out = nn.Linear(nf, 1, bias=False)
        # Near-zero steps at initialisation (EDM's choice): the network starts close to eps_x = 0.
        nn.init.xavier_uniform_(self.out.weight, gain=0.001)
        self.tanh, self.coords_range = tanh, coords_range
        self.normalization_factor, self.aggregation = normalization_factor, aggregation

    def forward(self, h: torch.Tensor, x: torch.Tensor, unit: torch.Tensor, e: torch.Tensor,
                edges: Edges) -> torch.Tensor:
        s = self.out(self.mlp(h, e, edges)).to(x.dtype)
        if self.tanh:
            s = torch.tanh(s) * self.coords_range
        return x + aggregate(unit * s, edges, self.normalization_factor, self.aggregation)


class EquivariantBlock(nn.Module):
    def __init__(self, nf: int, n_edge: int, inv_sublayers: int, attention: bool, tanh: bool, coords_range: float,
                 norm_constant: float, sin_embedding: bool, normalization_factor: float, aggregation: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(InvariantLayer(nf, n_edge, attention, normalization_factor, aggregation)
                                    for _ in range(inv_sublayers))
        self.coord = CoordinateUpdate(nf, n_edge, tanh, coords_range, normalization_factor, aggregation)
        self.norm_constant, self.sin_embedding = norm_constant, sin_embedding

    def forward(self, h: torch.Tensor, x: torch.Tensor, e0: torch.Tensor, edges: Edges
                ) -> tuple[torch.Tensor, torch.Tensor]:
        diff = edges.at_row(x) - edges.at_col(x)
        d2 = (diff * diff).sum(-1, keepdim=True)
        unit = diff / (torch.sqrt(d2 + 1e-8) + self.norm_constant)
        dist = distance_sinusoids(d2) if self.sin_embedding else d2
        e = torch.cat([dist, e0], dim=-1).to(h.dtype)
        for layer in self.layers:
            h = layer(h, e, edges)
        return h, self.coord(h, x, unit, e, edges)


class EGNNDenoiser(DenoiserBase):
    """out = denoiser(z, mask, t, ...): [x_L - x (CoM-free), h_L] of EDM's EGNN on h = [z_h, t].

    The Denoiser call of symdiff.models.denoiser: R, R0, eta and generator are accepted and ignored, since the
    network is equivariant by construction (there is no gamma); ``gamma`` returns None, ``augment`` is the identity.
    """

    kind = "egnn"

    def __init__(self, d: int, nf: int, n_layers: int, inv_sublayers: int = 1, attention: bool = True,
                 tanh: bool = True, coords_range: float = 15.0, norm_constant: float = 1.0,
                 sin_embedding: bool = False, normalization_factor: float = 1.0, aggregation: str = "sum",
                 backend: str = "auto") -> None:
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation '{aggregation}' is not one of {', '.join(AGGREGATIONS)}")
        self.d = d
        self.backend = backend
        self.sin_embedding = sin_embedding
        n_edge = 2 * n_distance_features(sin_embedding)
        self.inp = Linear(d + 1, nf)
        self.blocks = nn.ModuleList(
            EquivariantBlock(nf, n_edge, inv_sublayers, attention, tanh, coords_range, norm_constant, sin_embedding,
                             normalization_factor, aggregation) for _ in range(n_layers))
        self.out = Linear(nf, d + 1)  # EDM's size: the time channel is produced, then dropped

    def _weight(self) -> torch.Tensor:
        return self.inp.weight

    def augment(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return x

    def gamma(self, x: torch.Tensor, mask: torch.Tensor, t: torch.Tensor, R0: Optional[torch.Tensor] = None,
              eta: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
              **_: object) -> None:
        return None

    def forward(self, z: torch.Tensor, mask: torch.Tensor, t: torch.Tensor, R: Optional[torch.Tensor] = None,
                R0: Optional[torch.Tensor] = None, eta: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        z = z.to(self.dtype)
        mask = mask.bool()
        B = z.shape[0]
        t = as_time(t, B, z)
        pk = Packing.from_mask(mask)
        edges = real_pairs(mask)
        zp = pk.pack(z)
        x0 = zp[:, :3]
        w = self.net_dtype
        h = self.inp(torch.cat([zp[:, 3:], t.index_select(0, pk.mol).unsqueeze(1)], dim=-1).to(w))
        diff = edges.at_row(x0) - edges.at_col(x0)
        e0 = (diff * diff).sum(-1, keepdim=True)
        e0 = distance_sinusoids(e0) if self.sin_embedding else e0
        x = x0
        for block in self.blocks:
            h, x = block(h, x, e0, edges)
        h = self.out(h)[:, :self.d].to(z.dtype)
        v = x - x0
        n = mask.sum(1, keepdim=True).clamp_min(1).to(z.dtype)
        mean = v.new_zeros(B, 3).index_add_(0, pk.mol, v) / n
        v = v - mean.index_select(0, pk.mol)
        return pk.unpack(torch.cat([v, h], dim=-1))

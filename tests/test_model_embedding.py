"""The Gaussian distance embedding: size-grouped evaluation equals the one-piece reference, values and grads."""
from __future__ import annotations

import math

import torch

from symdiff.kernels import gaussian_embedding_ref
from symdiff.models.embedding import GaussianEmbedding


def test_grouped_embedding_matches_reference_and_gradients():
    torch.manual_seed(0)
    sizes = torch.tensor([3, 29, 5, 12, 18, 7, 4, 9, 21, 6, 3, 11])
    B, N = len(sizes), int(sizes.max())
    mask = torch.arange(N)[None] < sizes[:, None]
    x = (torch.randn(B, N, 3, dtype=torch.float64) * 1.5 * mask.unsqueeze(-1)).requires_grad_(True)
    emb = GaussianEmbedding(16, 8, backend="torch").double()
    assert emb._size_groups(x, mask) is not None  # this batch takes the grouped path
    got = emb.pooled(x, mask)
    want = gaussian_embedding_ref(x, mask, emb.mu, emb.sigma)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    w = torch.randn_like(want)
    g_got = torch.autograd.grad((got * w).sum(), [x, emb.mu, emb.sigma])
    g_want = torch.autograd.grad((want * w).sum(), [x, emb.mu, emb.sigma])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_embedding_of_two_atoms_by_hand():
    """One molecule, two atoms 1.5 A apart: Psi_i = mean over j in {i, other} of the Gaussian densities."""
    emb = GaussianEmbedding(2, 3, backend="torch").double()
    with torch.no_grad():
        emb.mu.copy_(torch.tensor([0.0, 1.5], dtype=torch.float64))
        emb.sigma.copy_(torch.tensor([0.49, 0.99], dtype=torch.float64))
    x = torch.tensor([[[0.0, 0.0, 0.0], [1.5, 0.0, 0.0], [9.0, 9.0, 9.0]]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])

    def g(d, mu, s):
        return math.exp(-0.5 * ((d - mu) / s) ** 2) / (math.sqrt(2 * math.pi) * s)

    want = [0.5 * (g(0.0, mu, s) + g(1.5, mu, s)) for mu, s in ((0.0, 0.5), (1.5, 1.0))]
    got = emb.pooled(x, mask)[0]
    torch.testing.assert_close(got[0], torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], got[0], atol=1e-12, rtol=0)
    assert got[2].abs().max() == 0
    # SPEC D6: Psi_i = W_D (mean over real j of psi_ij) + b_D, the bias once per real atom; the official code's
    # sum over padded j would give W_D mean + b_D N_pad / N, which depends on the padding.
    with torch.no_grad():
        emb.proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]], dtype=torch.float64))
        emb.proj.bias.copy_(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    g0, g1 = want
    psi = torch.tensor([g0 + 0.5, 2 * g1 - 1.0, g0 - g1 + 2.0], dtype=torch.float64)
    for n_pad in (2, 3, 7):  # the same molecule with 0, 1 and 5 padding atoms
        xp = torch.cat([x[:, :2], torch.full((1, n_pad - 2, 3), 4.0, dtype=torch.float64)], 1)
        mp = torch.arange(n_pad)[None] < 2
        out = emb(xp, mp)
        assert out.shape == (2, 3)
        torch.testing.assert_close(out, psi.expand(2, 3), atol=1e-5, rtol=0)
        torch.testing.assert_close(out, emb(x[:, :2], mask[:, :2]), atol=1e-12, rtol=0)

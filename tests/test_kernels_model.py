"""The model with the fused ops switched on (Triton via the interpreter) gives the reference path's loss and grads."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from symdiff.config import load_config

models = pytest.importorskip("symdiff.models")

SMALL = ["data.root=unused", "model.hidden_size=32", "model.xh_hidden_size=16", "model.num_gaussians=10",
         "model.depth=1", "model.num_heads=2", "model.gamma_hidden_size=16", "model.gamma_depth=1",
         "model.gamma_num_heads=2", "model.gamma_dec_hidden=16"]

# ammonia and formaldehyde (Angstrom), padded to a common width with two extra empty slots
AMMONIA = ([7, 1, 1, 1], [[0.0, 0.0, 0.116], [0.0, 0.939, -0.271], [0.813, -0.470, -0.271], [-0.813, -0.470, -0.271]])
FORMALDEHYDE = ([6, 8, 1, 1], [[0.0, 0.0, -0.53], [0.0, 0.0, 0.68], [0.0, 0.94, -1.11], [0.0, -0.94, -1.11]])


def _batch(mols, pad=2):
    B, N = len(mols), max(len(z) for z, _ in mols) + pad
    pos = torch.zeros(B, N, 3)
    Z = torch.zeros(B, N, dtype=torch.long)
    for i, (z, x) in enumerate(mols):
        pos[i, :len(z)] = torch.tensor(x) + torch.tensor([1.0, -2.0, 0.5])  # not centred, like the loader's
        Z[i, :len(z)] = torch.tensor(z)
    mask = Z > 0
    return SimpleNamespace(positions=pos, atomic_numbers=Z, mask=mask, formal_charges=None,
                           mol_ids=torch.arange(B), n_atoms=mask.sum(1))


def _loss_and_grads(backend, state, batch):
    torch.manual_seed(0)
    model = models.build_model(load_config(None, SMALL + [f"model.kernel_backend={backend}"]))
    model.load_state_dict(state)
    torch.manual_seed(123)  # the loss draws t, noise, R0 and eta from the global RNG
    loss, _ = model.training_loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_training_loss_and_grads_equal_with_triton_and_torch_backends():
    torch.manual_seed(0)
    ref_model = models.build_model(load_config(None, SMALL + ["model.kernel_backend=torch"]))
    with torch.no_grad():  # move off the zero-initialised output layer so every op gets a gradient
        for p in ref_model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    state = {k: v.clone() for k, v in ref_model.state_dict().items()}
    batch = _batch([AMMONIA, FORMALDEHYDE, AMMONIA])
    loss_t, grads_t = _loss_and_grads("torch", state, batch)
    loss_f, grads_f = _loss_and_grads("triton", state, batch)
    assert torch.isfinite(loss_t)
    torch.testing.assert_close(loss_f, loss_t, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_t.keys()
    # gradients reach the Gaussian embedding (fused backward) and gamma (QR backward)
    assert any("mu" in n for n in grads_t) and any(n.startswith("gamma") for n in grads_t)
    for name in grads_t:
        scale = grads_t[name].abs().max().item()
        torch.testing.assert_close(grads_f[name], grads_t[name], rtol=1e-4, atol=1e-5 * (1 + scale),
                                   msg=lambda m, name=name: f"{name}: {m}")

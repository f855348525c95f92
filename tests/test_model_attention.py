"""model.attention: the jagged (varlen) attention over packed atoms gives the padded, masked attention's values and
gradients, calls SDPA without a mask (what the flash and efficient kernels need on a GPU), and is refused by name."""
from __future__ import annotations

import pytest
import torch

from symdiff.config import ConfigError, load_config
from symdiff.models import build_model
from symdiff.models import dit as dit_mod
from symdiff.models.dit import DiT, Packing, set_attention

SMALL = ["data.root=unused", "model.hidden_size=32", "model.xh_hidden_size=16", "model.num_gaussians=10",
         "model.depth=2", "model.num_heads=2", "model.gamma_hidden_size=16", "model.gamma_depth=1",
         "model.gamma_num_heads=2", "model.gamma_dec_hidden=16", "model.kernel_backend=torch"]


def _packed(seed: int, sizes=(7, 3, 1, 5), H=32):
    g = torch.Generator().manual_seed(seed)
    N = max(sizes) + 2  # padding beyond the widest molecule too
    mask = torch.arange(N)[None] < torch.tensor(sizes)[:, None]
    pk = Packing.from_mask(mask)
    x = torch.randn(int(mask.sum()), H, generator=g, requires_grad=True)
    t = torch.rand(len(sizes), generator=g)
    return x, t, pk


def _run(net: DiT, impl: str, x, t, pk):
    set_attention(net, impl)
    out = net(x, t, pk)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    grads = torch.autograd.grad((out * gout).sum(), [x, *net.parameters()])
    return out, grads


@pytest.mark.parametrize("seed", [0, 1])
def test_varlen_matches_padded_values_and_gradients(seed):
    torch.manual_seed(seed)
    net = DiT(32, depth=2, num_heads=2, out_channels=5)
    with torch.no_grad():  # adaLN-Zero starts as the identity: give every block a real contribution
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t, pk = _packed(seed)
    ref, gref = _run(net, "padded", x, t, pk)
    out, gvar = _run(net, "varlen", x, t, pk)
    assert ref.abs().max() > 1e-2  # a real signal, not zeros on both sides
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(gvar, gref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_varlen_calls_sdpa_on_jagged_tensors_without_a_mask(monkeypatch):
    calls = []
    real = dit_mod.F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.is_nested, kwargs.get("attn_mask", args[0] if args else None)))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(dit_mod.F, "scaled_dot_product_attention", spy)
    net = DiT(32, depth=1, num_heads=2, out_channels=5)
    x, t, pk = _packed(3)
    for impl in ("varlen", "padded", "auto"):  # auto on a CPU tensor is the padded path
        set_attention(net, impl)
        net(x, t, pk)
    assert [(nested, mask is None) for nested, mask in calls] == [(True, True), (False, False), (False, False)]


def test_model_loss_equal_under_both_attentions_and_auto_is_padded_on_cpu():
    from test_kernels_model import AMMONIA, FORMALDEHYDE, _batch

    batch = _batch([AMMONIA, FORMALDEHYDE, ([6, 1, 1, 1, 1], [[0, 0, 0], [0.6, 0.6, 0.6], [-0.6, -0.6, 0.6],
                                                               [-0.6, 0.6, -0.6], [0.6, -0.6, -0.6]])])
    torch.manual_seed(0)
    # adaLN-Zero gates start at zero, which would make attention irrelevant to the loss: perturb every weight
    state = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in build_model(load_config(None, SMALL)).state_dict().items()}
    losses = {}
    for impl in ("padded", "varlen", "auto"):
        model = build_model(load_config(None, SMALL + [f"model.attention={impl}"]))
        model.load_state_dict(state)
        torch.manual_seed(5)
        losses[impl] = model.training_loss(batch)[0]
    assert torch.equal(losses["auto"], losses["padded"])  # bitwise: the CPU default is unchanged
    torch.testing.assert_close(losses["varlen"], losses["padded"], rtol=1e-5, atol=1e-6)


def test_unknown_attention_is_a_config_error():
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(None, SMALL + ["model.attention=flash"])

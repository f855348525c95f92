"""Dense layers through oneDNN on CPU: same values and gradients as F.linear, deterministic, correct fallbacks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from symdiff.config import ConfigError, load_config
from symdiff.kernels import linear as L

models = pytest.importorskip("symdiff.models")

pytestmark = pytest.mark.skipif(not L.onednn_available(), reason="torch built without oneDNN")


def _fwd_bwd(fn, x, w, b, gy):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    y = fn(x, w, b)
    y.backward(gy)
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("shape", [(300, 37), (4, 9, 37), (1, 37)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_values_and_gradients_match_f_linear(shape, with_bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(53, 37, generator=g)
    b = torch.randn(53, generator=g) if with_bias else None
    gy = torch.randn(*shape[:-1], 53, generator=g)
    ours = _fwd_bwd(lambda *a: L.linear(*a, backend="onednn"), x, w, b, gy)
    ref = _fwd_bwd(F.linear, x, w, b, gy)
    for a, r in zip(ours, ref):
        if r is None:
            assert a is None
            continue
        assert a.shape == r.shape and a.dtype == torch.float32
        # float32 products of length 37..300: only the summation order differs
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5 * r.abs().max().item())


def test_strided_input_and_weight_views():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 64, generator=g)[:, ::2]  # non-contiguous rows
    w = torch.randn(32, 24, generator=g).t()  # transposed weight view [24, 32]
    torch.testing.assert_close(L.linear(x, w, None, "onednn"), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_bitwise_deterministic():
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(257, 96, generator=g), torch.randn(200, 96, generator=g), torch.randn(200, generator=g)
    gy = torch.randn(257, 200, generator=g)
    first = _fwd_bwd(lambda *a: L.linear(*a, backend="onednn"), x, w, b, gy)
    second = _fwd_bwd(lambda *a: L.linear(*a, backend="onednn"), x, w, b, gy)
    for a, r in zip(first, second):
        assert torch.equal(a, r)


def test_fallbacks_take_f_linear_exactly():
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(10, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
    # float64 (the equivariance tests), the aten switch, autocast and empty inputs all use F.linear bit for bit
    assert torch.equal(L.linear(x.double(), w.double(), b.double()), F.linear(x.double(), w.double(), b.double()))
    assert torch.equal(L.linear(x, w, b, "aten"), F.linear(x, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(L.linear(x, w, b), F.linear(x, w, b))
    assert L.linear(x[:0], w, b).shape == (0, 6)
    # DeepSpeed ZeRO-3 partitions weights and patches F.linear: such weights are left to it
    w_ds = w.clone()
    w_ds.ds_id = 0
    assert not L.use_onednn(x, w_ds, "auto")
    assert L.use_onednn(x, w, "auto")
    with pytest.raises(ValueError, match="unknown linear backend 'mkl'"):
        L.linear(x, w, b, "mkl")


SMALL = ["data.root=unused", "model.hidden_size=48", "model.xh_hidden_size=24", "model.num_gaussians=12",
         "model.depth=2", "model.num_heads=2", "model.gamma_hidden_size=16", "model.gamma_depth=1",
         "model.gamma_num_heads=2", "model.gamma_dec_hidden=16"]


def _model_loss_and_grads(backend: str, state: dict, batch):
    model = models.build_model(load_config(None, SMALL + [f"model.linear_backend={backend}"]))
    model.load_state_dict(state)
    torch.manual_seed(7)
    loss, _ = model.training_loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_model_loss_and_grads_equal_with_onednn_and_aten():
    from test_kernels_model import AMMONIA, FORMALDEHYDE, _batch

    torch.manual_seed(0)
    ref = models.build_model(load_config(None, SMALL + ["model.linear_backend=aten"]))
    with torch.no_grad():  # leave the zero-initialised output layers so every layer gets a gradient
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    batch = _batch([AMMONIA, FORMALDEHYDE, AMMONIA, FORMALDEHYDE])
    loss_a, grads_a = _model_loss_and_grads("aten", state, batch)
    loss_o, grads_o = _model_loss_and_grads("auto", state, batch)
    torch.testing.assert_close(loss_o, loss_a, rtol=1e-5, atol=1e-7)
    for name, ga in grads_a.items():
        go = grads_o[name]
        assert (ga is None) == (go is None), name
        if ga is not None:
            torch.testing.assert_close(go, ga, rtol=1e-4, atol=1e-5 * max(ga.abs().max().item(), 1e-6),
                                       msg=lambda m, n=name: f"{n}: {m}")


def test_unknown_linear_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="model.linear_backend"):
        models.build_model(load_config(None, SMALL + ["model.linear_backend=blas"]))

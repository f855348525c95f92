"""The diffusion state is float32 whatever the network's precision (SPEC §2.6).

DeepSpeed's bf16 mode casts every parameter (and floating buffer) of the module to bf16. The model must then
still form positions, one-hot features, noise, z_t, the schedule quantities, R and the loss in float32; only the
network body computes in bf16. The unit tests here cast the model exactly as DeepSpeed does (``.bfloat16()``);
the run-level tests train through `symdiff train` with DeepSpeed's bf16 engine on CPU.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from symdiff.diffusion import edm
from test_diffusion_model import METHANE, WATER, batch_of, model_of, randomize


def _bf16_model(kind: str = "symdiff"):
    model = model_of(kind)
    randomize(model)
    return model.bfloat16()  # what deepspeed.initialize does to the module in bf16 mode


class _Spy:
    """Records z_t and t of every denoiser call and the noise drawn, and answers with a chosen eps-hat."""

    def __init__(self, model, monkeypatch, answer=None):
        self.z, self.t, self.noise = [], [], []
        real_denoise, real_noise = model.denoise, edm.sample_noise

        def denoise(z, mask, t, **kw):
            self.z.append(z)
            self.t.append(t)
            return answer(z, mask, t) if answer is not None else real_denoise(z, mask, t, **kw)

        def noise(*a, **kw):
            out = real_noise(*a, **kw)
            self.noise.append(out)
            return out

        monkeypatch.setattr(model, "denoise", denoise)
        monkeypatch.setattr(edm, "sample_noise", noise)


@pytest.mark.parametrize("kind", ["symdiff", "dit_aug"])
def test_bf16_weights_leave_the_diffusion_state_float32(kind, monkeypatch):
    model = _bf16_model(kind)
    batch = batch_of([WATER, METHANE], repeat=3)
    x, h, mask, onehot, integer = model.features(batch)
    assert x.dtype == h.dtype == onehot.dtype == integer.dtype == torch.float32
    assert model.net_dtype == torch.bfloat16 and model.dtype == torch.float32
    spy = _Spy(model, monkeypatch)
    loss, stats = model.training_loss(batch)
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in stats.values())
    assert spy.z[0].dtype == spy.t[0].dtype == spy.noise[0].dtype == torch.float32
    # the network output comes back as float32 too, and the gradient reaches the bf16 weights
    monkeypatch.undo()
    z = spy.z[0]
    eps_hat = model.denoise(z, mask, spy.t[0])
    assert eps_hat.dtype == torch.float32
    R = model.gamma(z[..., :3], mask, spy.t[0])
    if kind == "symdiff":
        assert R.dtype == torch.float32
        eye = torch.eye(3).expand(R.shape[0], 3, 3)
        # orthogonal to float32 accuracy, not bf16's 4e-3
        assert float((R @ R.transpose(1, 2) - eye).detach().abs().max()) < 1e-5
    loss.backward()
    assert model.eps_net.dit.final_linear.weight.grad.dtype == torch.bfloat16


def test_oracle_recovers_the_noise_at_t0_under_bf16(monkeypatch):
    """An oracle that knows the clean x recovers eps from z_0 = alpha_0 x + sigma_0 eps (sigma_0 = 0.0032).

    With bf16 positions and z_t (the defect) the recovery error is about 0.3 per coordinate at t = 0; float32
    leaves about 1e-10."""
    model = _bf16_model()
    batch = batch_of([WATER, METHANE], repeat=4)
    x, h, mask, _, _ = model.features(batch)
    xh = torch.cat([x, h], dim=-1)
    g0 = model.schedule.gamma(torch.zeros(1, dtype=torch.long))
    a0, s0 = float(model.schedule.alpha(g0)), float(model.schedule.sigma(g0))

    def oracle(z, mask_, t):
        return (z.double() - a0 * xh.double()) / s0

    spy = _Spy(model, monkeypatch, answer=oracle)
    monkeypatch.setattr(torch, "randint", lambda lo, hi, size, **kw: torch.zeros(size, dtype=torch.long))
    model.training_loss(batch)
    m = mask.unsqueeze(-1).expand_as(xh)
    err = (oracle(spy.z[0], mask, None) - spy.noise[0].double())[m]
    assert float((err ** 2).mean()) < 1e-8


def test_bf16_loss_equals_float32_loss_up_to_network_rounding():
    """Same weights, same randomness: bf16 weights change the loss only through the network body's rounding.

    A zero network (fresh adaLN-Zero init outputs eps-hat = 0) makes the loss a pure function of the state, so
    the two precisions must agree to float32 accuracy there."""
    model32 = model_of()
    model16 = model_of().bfloat16()
    batch = batch_of([WATER, METHANE], repeat=4)
    g32, g16 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    l32, _ = model32.training_loss(batch, generator=g32)
    l16, _ = model16.training_loss(batch, generator=g16)
    assert l16.dtype == torch.float32
    assert abs(float(l16) - float(l32)) <= 1e-6 * float(l32)


def test_generator_makes_library_calls_reproducible_without_touching_the_global_rng():
    from symdiff.eval.nll import split_nll
    from symdiff.sampling import sample_molecules

    from symdiff.data.batch import Batch

    model = model_of()
    randomize(model)
    batch = Batch(**vars(batch_of([WATER, METHANE], repeat=2)))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = sample_molecules(model, 3, batch_size=2, steps=5, seed=7, progress=False)
    b = sample_molecules(model, 3, batch_size=2, steps=5, seed=7, progress=False)
    r1 = split_nll(model, lambda p: [batch], passes=2, seed=5)
    r2 = split_nll(model, lambda p: [batch], passes=2, seed=5)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's stream is untouched
    assert all((za == zb).all() and (xa == xb).all() for (za, xa), (zb, xb) in zip(a, b))
    assert r1["nll_per_pass"] == r2["nll_per_pass"] and r1["nll_per_pass"][0] != r1["nll_per_pass"][1]
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(model.nll(batch, generator=g1), model.nll(batch, generator=g2))


@pytest.mark.parametrize("factors,ok", [([1.0, 4.0, 10.0], True), ([1.0, 4.0, 40.0], False), ([1.0, 4.0], False)])
def test_normalize_factors_are_checked_at_construction(factors, ok):
    from symdiff.config import ConfigError

    extra = [f"diffusion.normalize_factors=[{','.join(map(str, factors))}]"]
    if ok:
        model_of(extra=extra)
    else:
        # 8 sigma_0 = 0.0253 >= 1/40: EDM's construction check (SPEC §1.3); two factors: the length check
        with pytest.raises(ConfigError, match="normalize_factors"):
            model_of(extra=extra)


# ------------------------------------------------------------------------------------------- through `symdiff train`
from test_train_distributed import metrics, shards, train  # noqa: E402,F401  (shards: the bundled-QM9 fixture)

RUN_STEPS = 200


def _losses(run) -> dict[int, float]:
    return {s: r["loss"] for s, r in metrics(run).items()}


def _rel(a: dict[int, float], b: dict[int, float], steps) -> list[float]:
    return sorted(abs(a[s] - b[s]) / abs(b[s]) for s in steps)


def test_bf16_run_tracks_float32_and_checkpoints_move_between_them(tmp_path, shards):
    """Both precisions through DeepSpeed (ZeRO-1, one process), same seed and data.

    Tolerance: bf16 rounds only the network body, so the trajectories separate slowly: the median per-step
    relative difference over 200 steps stays below 2% and the mean loss of steps 101-200 within 2% (measured on
    2026-12-01: 0.3% and 0.2%). A checkpoint of either precision resumes in the other (through DeepSpeed's universal
    format) and continues its own trajectory: within 0.5% of the source run (measured: at most 0.1%), while the
    two source runs are 1-2% apart by then."""
    common = ("train.zero_stage=1", "train.ckpt_every=100", f"train.max_steps={RUN_STEPS}")
    runs = {p: tmp_path / p for p in ("fp32", "bf16")}
    for p, run in runs.items():
        train(run, shards, 1, *common, f"train.precision={p}")
    l32, l16 = _losses(runs["fp32"]), _losses(runs["bf16"])
    assert sorted(l32) == sorted(l16) == list(range(1, RUN_STEPS + 1))
    assert abs(l16[1] - l32[1]) / l32[1] < 1e-4  # same weights, same batch: only the network body differs
    rel = _rel(l16, l32, range(1, RUN_STEPS + 1))
    assert rel[len(rel) // 2] < 0.02
    late32 = sum(l32[s] for s in range(101, RUN_STEPS + 1)) / 100
    late16 = sum(l16[s] for s in range(101, RUN_STEPS + 1)) / 100
    assert abs(late16 - late32) / late32 < 0.02

    for src, dst in (("bf16", "fp32"), ("fp32", "bf16")):
        run = tmp_path / f"{src}_to_{dst}"
        train(run, shards, 1, "train.zero_stage=1", "train.max_steps=110", f"train.precision={dst}",
              resume=str(runs[src] / "checkpoints" / "step_00000100"))
        cont = _losses(run)
        assert sorted(cont) == list(range(101, 111))
        source, other = (l16, l32) if src == "bf16" else (l32, l16)
        to_source, to_other = _rel(cont, source, cont), _rel(cont, other, cont)
        assert to_source[len(to_source) // 2] < 0.005
        assert sum(to_source) < sum(to_other)

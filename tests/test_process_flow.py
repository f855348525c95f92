"""The flow process (paper App. D.2): straight-path loss, Euler and Heun samplers, symmetry, CLI end to end."""
from __future__ import annotations

import pytest
import torch

from symdiff.config import ConfigError, load_config
from symdiff.diffusion import edm
from symdiff.diffusion.flow import Flow
from symdiff.models import build_model
from symdiff.models.gamma import haar_o3
from test_diffusion_model import METHANE, WATER, batch_of
from test_model_equivariance import TINY, act, rotation, state


def process_model(process: str, kind: str = "symdiff", scale: float = 0.3):
    """A tiny float64 model of ``process`` with weights drawn away from the zero-output init (which is trivially
    equivariant); shared by the tests of each process."""
    torch.manual_seed(0)
    model = build_model(load_config(None, TINY + [f"model.kind={kind}", f"diffusion.process={process}"])).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.2, 2.5) if name.endswith(("mu", "sigma")) else p.normal_(0.0, scale)
    return model.eval()


def flow_model(kind: str = "symdiff", scale: float = 0.3):
    return process_model("flow", kind, scale)


def _integrate(proc: Flow, field, sampler: str, z: torch.Tensor, mask: torch.Tensor, K: int) -> list[torch.Tensor]:
    grid = torch.linspace(0.0, 1.0, K + 1, dtype=torch.float64).tolist()
    path = [z]
    step = proc.euler_step if sampler == "euler" else proc.heun_step
    for t, s in zip(grid[:-1], grid[1:]):
        path.append(step(field, path[-1], mask, t, s))
    return path


def test_euler_integrates_linear_fields_exactly_and_heun_is_second_order():
    proc = Flow(6, 5, 1.0, 4.0, 10.0, backend="torch")
    z0, mask = state()
    z1, _ = state(seed=4)
    # A constant field c: z_1 = z_0 + c for any step count, with both samplers.
    c = z1 - z0
    for sampler in ("euler", "heun"):
        for K in (1, 3, 7):
            out = _integrate(proc, lambda z, m, t, **_: c, sampler, z0, mask, K)[-1]
            torch.testing.assert_close(out, z1, atol=1e-12, rtol=0)
    # v = t c: z_1 = z_0 + c / 2. Heun (the trapezoid rule) is exact for a field linear in t; Euler is short by
    # exactly c / (2K).
    for K in (1, 4):
        field = lambda z, m, t, **_: t.view(-1, 1, 1) * c  # noqa: E731
        torch.testing.assert_close(_integrate(proc, field, "heun", z0, mask, K)[-1], z0 + c / 2, atol=1e-12, rtol=0)
        torch.testing.assert_close(_integrate(proc, field, "euler", z0, mask, K)[-1], z0 + c / 2 - c / (2 * K),
                                   atol=1e-12, rtol=0)
    # The conditional field of a point mass at z_1, (z_1 - z) / (1 - t): Euler walks the straight line exactly.
    K = 5
    path = _integrate(proc, lambda z, m, t, **_: (z1 - z) / (1 - t).view(-1, 1, 1), "euler", z0, mask, K)
    for i, z in enumerate(path):
        torch.testing.assert_close(z, (1 - i / K) * z0 + (i / K) * z1, atol=1e-12, rtol=0)
    # dz/dt = -z: z_1 = e^-1 z_0. Euler's error halves with twice the steps, Heun's falls four-fold.
    exact = z0 * torch.exp(torch.tensor(-1.0, dtype=torch.float64))
    err = {(s, k): float((_integrate(proc, lambda z, m, t, **_: -z, s, z0, mask, k)[-1] - exact).abs().max())
           for s in ("euler", "heun") for k in (10, 20)}
    assert 1.8 < err["euler", 10] / err["euler", 20] < 2.2
    assert 3.6 < err["heun", 10] / err["heun", 20] < 4.4 and err["heun", 10] < 0.05 * err["euler", 10]


def recorded_loss(model, monkeypatch, batch):
    """The training loss at seed 3 with its draws recorded: ``noise`` (edm.sample_noise's draw), and the network's
    input ``z_t``, time ``t`` and output ``out`` (shared by the tests of each process)."""
    seen = {}
    real_noise, real_denoise = edm.sample_noise, model.denoise

    def noise(*a, **kw):
        seen["noise"] = real_noise(*a, **kw)
        return seen["noise"]

    def denoise(z, mask, t, **kw):
        seen["z_t"], seen["t"] = z, t
        seen["out"] = real_denoise(z, mask, t, **kw)
        return seen["out"]

    monkeypatch.setattr(edm, "sample_noise", noise)
    monkeypatch.setattr(model, "denoise", denoise)
    loss, stats = model.training_loss(batch, generator=torch.Generator().manual_seed(3))
    return loss, stats, seen


def test_flow_loss_regresses_the_straight_path_velocity(monkeypatch):
    """z_t = (1 - t) z_0 + t z_1 with z_0 the CoM-free prior draw, target z_1 - z_0, mean over molecules."""
    model = flow_model("symdiff", scale=0.05).float()
    batch = batch_of([WATER, METHANE], repeat=3)
    loss, stats, seen = recorded_loss(model, monkeypatch, batch)
    seen["z0"], seen["v"] = seen["noise"], seen["out"]
    x, h, mask, _, _ = model.features(batch)
    z1, z0, t = torch.cat([x, h], -1), seen["z0"], seen["t"]
    assert 0.0 < float(t.min()) and float(t.max()) < 1.0 and t.unique().numel() == t.numel()
    torch.testing.assert_close(seen["z_t"], (1 - t.view(-1, 1, 1)) * z0 + t.view(-1, 1, 1) * z1, atol=1e-6, rtol=0)
    expected = (((seen["v"] - (z1 - z0)) ** 2).sum((1, 2)) / ((3 + model.d) * mask.shape[1])).mean()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    assert float(stats["l2_x"] + stats["l2_h"]) == pytest.approx(float(loss.detach()), rel=1e-5)
    loss.backward()
    assert model.gamma_net.dec[-1].weight.grad.abs().max() > 0


def check_step_symmetry(step, g_kind: str) -> None:
    """``step(z, mask, R0s, etas, rot)``, one sampler update with gamma's two draws fixed (R0s[i] -> rot R0s[i],
    any step noise -> rot noise), is pathwise O(3) equivariant (1e-6, float64), translation-free and CoM-free
    with zero padding; shared by the tests of each process."""
    z, mask = state()
    B, N = mask.shape
    g, eye = rotation(g_kind), torch.eye(3, dtype=torch.float64)
    R0s = [haar_o3(B, dtype=torch.float64) for _ in range(2)]
    etas = [torch.randn(B, N, 3, dtype=torch.float64) for _ in range(2)]
    with torch.no_grad():
        out, out_g = step(z, mask, R0s, etas, eye), step(act(g, z), mask, R0s, etas, g)
    assert (out - z).abs().max() > 1e-3
    torch.testing.assert_close(out_g, act(g, out), atol=1e-6, rtol=0)
    # Translation: a shifted state steps to the same CoM-free result.
    shift = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) * mask.unsqueeze(-1)
    with torch.no_grad():
        out_t = step(torch.cat([z[..., :3] + shift, z[..., 3:]], -1), mask, R0s, etas, eye)
    torch.testing.assert_close(out_t, out, atol=1e-9, rtol=0)
    m = mask.unsqueeze(-1).double()
    assert float((out[..., :3] * m).sum(1).abs().max()) < 1e-9 and float((out * (1 - m)).abs().max()) == 0.0


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("g_kind", ["rotation", "reflection"])
def test_flow_steps_are_pathwise_o3_equivariant(sampler, g_kind):
    model = flow_model()
    proc, den = model.process, model.denoise

    def step(z, mask, R0s, etas, rot):
        R0a, R0b = (rot @ R for R in R0s)
        if sampler == "euler":
            return proc.euler_step(den, z, mask, 0.3, 0.55, R0=R0a, eta=etas[0])
        return proc.heun_step(den, z, mask, 0.3, 0.55, R0=R0a, eta=etas[0], R0_2=R0b, eta_2=etas[1])

    check_step_symmetry(step, g_kind)


def check_samples_and_refusals(model, process: str, samplers: tuple[str, ...], foreign: str) -> None:
    """Each sampler's molecules are centred with zero padding; another process's sampler ``foreign``, vdm's t_int
    for the NLL (an ODE likelihood here: tests/test_ode_likelihood.py), train.eval_every > 0 (the validation NLL,
    too costly through an ODE) and sample.sampler=<foreign> are refused (shared by vpsde and flow)."""
    for sampler in samplers:
        x, Z, mask = model.sample(torch.tensor([3, 6]), steps=4, sampler=sampler,
                                  generator=torch.Generator().manual_seed(1))
        m = mask.unsqueeze(-1).float()
        assert float(((x * m).sum(1) / m.sum(1)).abs().max()) < 1e-5 and bool((Z[mask] > 0).all())
        assert float((x * (1 - m)).abs().max()) == 0.0 and bool((Z[~mask] == 0).all())
    with pytest.raises(ValueError, match=foreign):
        model.sample(torch.tensor([3]), steps=2, sampler=foreign)
    with pytest.raises(ValueError, match=f"the {process} likelihood integrates over every t"):
        model.nll(batch_of([WATER]), t_int=torch.tensor([3]))
    with pytest.raises(ConfigError, match="train.eval_every"):
        load_config(None, ["data.root=unused", f"diffusion.process={process}", "train.eval_every=10"])
    with pytest.raises(ConfigError, match="sample.sampler"):
        load_config(None, ["data.root=unused", f"diffusion.process={process}", f"sample.sampler={foreign}"])


def test_flow_samples_are_centred_and_the_process_refuses_what_it_lacks():
    check_samples_and_refusals(flow_model(scale=0.05).float(), "flow", ("euler", "heun"), "ddim")


def train_and_sample(tmp_path, config: str, sampler: str, steps: int) -> None:
    """``symdiff train --config configs/<config>`` for 3 steps, then ``symdiff sample --sampler S --steps K`` of
    the run: three molecules written (shared by the tests of each process)."""
    import json

    from symdiff.data.bundled import ensure_bundled_shards
    from symdiff.io.molfiles import read_molecules
    from test_checkpoint_safety import REPO, TINY as TINY_RUN, _symdiff

    shards = ensure_bundled_shards(tmp_path / "qm9_bundled")
    run_dir = tmp_path / "run"
    res = _symdiff("train", "--config", str(REPO / "configs" / config), "--run-dir", str(run_dir),
                   f"data.root={shards}", *TINY_RUN, "train.max_steps=3", "train.ckpt_every=3", "train.log_every=1")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(logged) == 3 and all(0.0 < r["loss"] < 10.0 for r in logged)
    out = tmp_path / "samples.xyz"
    res = _symdiff("sample", "--run", str(run_dir), "--n", "3", "--steps", str(steps), "--sampler", sampler,
                   "--out", str(out), "--no-progress")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert len(read_molecules(out)) == 3


def test_flow_trains_through_symdiff_train_and_samples_through_symdiff_sample(tmp_path):
    train_and_sample(tmp_path, "qm9_tiny_flow.yaml", "euler", 3)

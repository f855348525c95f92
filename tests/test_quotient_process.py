"""diffusion.target (issue 14) wired into the Gaussian processes: config keys and refusals, the vdm and vpsde losses
regress the quotient target, every denoiser kind trains on it, and `symdiff train` / `sample` run it end to end."""
from __future__ import annotations

import json

import pytest
import torch

from symdiff.config import TARGETS as CONFIG_TARGETS, ConfigError, load_config
from symdiff.diffusion import permutation_target, quotient
from symdiff.models import build_model
from test_diffusion_model import METHANE, WATER, batch_of
from test_model_equivariance import TINY
from test_process_flow import recorded_loss


def quotient_model(process: str, target: str, kind: str = "symdiff", *extra: str):
    torch.manual_seed(0)
    cfg = load_config(None, TINY + [f"model.kind={kind}", f"diffusion.process={process}", f"diffusion.target={target}",
                                    *extra])
    model = build_model(cfg).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.2, 2.5) if name.endswith(("mu", "sigma")) else p.normal_(0.0, 0.05)
    return model


def test_config_keys_default_to_todays_target_and_refuse_what_does_not_fit():
    assert CONFIG_TARGETS == quotient.TARGETS
    cfg = load_config(None, ["data.root=x"])
    assert cfg.diffusion.target == "standard" and quotient.target_options(cfg.diffusion) == {}
    cfg = load_config(None, ["data.root=x", "diffusion.target=mcmc", "diffusion.mcmc_steps=40"])
    assert quotient.target_options(cfg.diffusion) == {"steps": 40, "burn_in": 16, "samples": 8}
    with pytest.raises(ConfigError, match="diffusion.target 'mcmc' needs a Gaussian forward kernel"):
        load_config(None, ["data.root=x", "diffusion.process=flow", "diffusion.target=mcmc"])
    with pytest.raises(ConfigError, match="key 'diffusion.target': expected one of standard"):
        load_config(None, ["data.root=x", "diffusion.target=sinkhorn"])
    with pytest.raises(ConfigError, match="do not fit in diffusion.mcmc_steps 10"):
        load_config(None, ["data.root=x", "diffusion.target=mcmc", "diffusion.mcmc_steps=10",
                           "diffusion.mcmc_burn_in=8", "diffusion.mcmc_samples=4"])
    for name in ("qm9_tiny_quotient", "qm9_symdiff_s_quotient", "geom_symdiff_s_quotient"):
        cfg = load_config(f"{quotient.__file__.rsplit('/symdiff/', 1)[0]}/configs/{name}.yaml", ["data.root=x"])
        assert cfg.diffusion.target == "mcmc" and cfg.name == name


@pytest.mark.parametrize("process", ["vdm", "vpsde"])
def test_the_loss_regresses_the_exact_quotient_target(monkeypatch, process):
    """Water's two hydrogens and methane's four are interchangeable: the exact target differs from the drawn eps,
    and the loss is the same l2 as today's with that target in eps's place."""
    model = quotient_model(process, "exact")
    batch = batch_of([WATER, METHANE], repeat=3, dtype=torch.float64)
    loss, stats, seen = recorded_loss(model, monkeypatch, batch)
    x, h, mask, _, _ = model.features(batch)
    xh, proc = torch.cat([x, h], -1), model.process
    if process == "vdm":
        t_int = torch.round(seen["t"] * proc.timesteps).long()
        gam = proc.schedule.gamma(t_int)
        alpha, sigma = proc.schedule.alpha(gam), proc.schedule.sigma(gam)
    else:
        t_int = torch.ones_like(seen["t"], dtype=torch.long)  # vpsde: t > 0, both parts Gaussian
        alpha, sigma = proc.alpha(seen["t"].double()), proc.sigma(seen["t"].double())
    target = permutation_target(seen["z_t"], xh, mask, alpha.to(xh.dtype), sigma.to(xh.dtype), "exact")
    assert float((target - seen["noise"]).abs().max()) > 1e-2
    err = (target - seen["out"]) ** 2
    ex, eh = err[..., :3].sum((1, 2)), err[..., 3:].sum((1, 2))
    denom = (3 + model.d) * mask.shape[1]
    expected = (0.5 * torch.where(t_int == 0, ex, ex + eh) / denom).mean()
    torch.testing.assert_close(loss, expected, atol=1e-10, rtol=1e-10)
    assert float(stats["l2_target_shift"]) > 0
    loss.backward()


@pytest.mark.parametrize("kind", ["dit", "dit_aug", "symdiff_haar", "symdiff"])
@pytest.mark.parametrize("process,target", [("vdm", "mcmc"), ("vpsde", "hungarian")])
def test_every_denoiser_kind_trains_on_a_quotient_target(kind, process, target):
    model = quotient_model(process, target, kind, "diffusion.mcmc_steps=12", "diffusion.mcmc_burn_in=4",
                           "diffusion.mcmc_samples=4").float()
    batch = batch_of([WATER, METHANE], repeat=2)
    loss, stats = model.training_loss(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and "l2_target_shift" in stats and loss.dtype == torch.float32
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters())


def test_standard_target_keeps_todays_loss_and_logs_no_shift():
    model = quotient_model("vdm", "standard")
    batch = batch_of([WATER, METHANE], repeat=2, dtype=torch.float64)
    _, stats = model.training_loss(batch, generator=torch.Generator().manual_seed(0))
    assert "l2_target_shift" not in stats


def _symdiff(*args: str):
    from test_checkpoint_safety import _symdiff as run

    return run(*args)


def test_symdiff_train_on_the_quotient_config_lowers_the_loss_and_samples(tmp_path):
    """30 steps of `symdiff train --config configs/qm9_tiny_quotient.yaml` at tiny widths on bundled QM9: the mean
    loss of the last 10 steps is 10% below that of the first 10; then `symdiff sample` writes molecules that
    `symdiff eval` scores."""
    from symdiff.data.bundled import ensure_bundled_shards
    from test_checkpoint_safety import REPO, TINY as TINY_RUN

    shards = ensure_bundled_shards(tmp_path / "qm9_bundled")
    run = tmp_path / "run"
    res = _symdiff("train", "--config", str(REPO / "configs" / "qm9_tiny_quotient.yaml"), "--run-dir", str(run),
                   f"data.root={shards}", *TINY_RUN, "train.max_steps=30", "train.ckpt_every=30", "train.log_every=1",
                   "train.lr=2e-3", "diffusion.mcmc_steps=24", "diffusion.mcmc_burn_in=8", "diffusion.mcmc_samples=4")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 30
    assert sum(losses[-10:]) < 0.9 * sum(losses[:10]), losses
    # the process's statistics are logged beside the loss: the vdm loss is l2_x plus l2_h off t = 0, and the
    # quotient target moved away from the drawn noise
    for r in rows:
        assert r["l2_x"] * (1 - 1e-6) <= r["loss"] <= (r["l2_x"] + r["l2_h"]) * (1 + 1e-6), r
        assert r["l2_target_shift"] > 0, r
    sdf, js = tmp_path / "x.sdf", tmp_path / "m.json"
    res = _symdiff("sample", "--run", str(run), "--n", "10", "--steps", "10", "--out", str(sdf), "--no-progress")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    res = _symdiff("eval", "--samples", str(sdf), "--dataset", "qm9", "--data-root", "bundled:qm9", "--json", str(js))
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    scores = json.loads(js.read_text())
    assert scores["n_molecules"] == 10 and 0.0 <= scores["atom_stability"] <= 1.0


def test_exact_target_on_molecules_over_8_atoms_is_a_one_line_user_error():
    """Ethane (8 atoms) trains on the exact target; propane (11) stops with a UserError naming the key, which the
    CLI prints as one line (exit 1)."""
    import numpy as np

    from symdiff.errors import UserError

    model = quotient_model("vdm", "exact").float()
    ethane = (np.array([6, 6, 1, 1, 1, 1, 1, 1]), np.random.default_rng(0).normal(size=(8, 3)))
    propane = (np.array([6, 6, 6] + [1] * 8), np.random.default_rng(1).normal(size=(11, 3)))
    loss, _ = model.training_loss(batch_of([ethane, WATER]), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    with pytest.raises(UserError, match=r"diffusion.target=exact .* at most 8 atoms; this batch has one of 11"):
        model.training_loss(batch_of([propane, WATER]), generator=torch.Generator().manual_seed(0))

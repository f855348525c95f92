"""The vpsde process (paper App. D.1): continuous gamma(t), eps-matching loss, Euler-Maruyama and probability-flow
Heun samplers on Gaussian data with the exact score, pathwise symmetry, CoM, CLI end to end."""
from __future__ import annotations

import pytest
import torch

from symdiff.config import load_config
from symdiff.diffusion.schedule import NoiseSchedule
from symdiff.diffusion.vpsde import T_MIN, VPSDE
from test_diffusion_model import METHANE, WATER, batch_of
from test_model_equivariance import act, state
from test_process_flow import (check_samples_and_refusals, check_step_symmetry, process_model, recorded_loss,
                               train_and_sample)


def vpsde_model(kind: str = "symdiff", scale: float = 0.3):
    return process_model("vpsde", kind, scale)


def test_continuous_gamma_is_vdms_table_at_the_grid_points_except_the_clipped_last():
    T = 1000
    proc, sched = VPSDE(6, 5, 1.0, 4.0, 10.0, timesteps=T), NoiseSchedule(T, "polynomial_2", 1e-5)
    t = torch.arange(T + 1, dtype=torch.float64) / T
    g = proc.gamma(t)
    assert g.dtype == torch.float64
    torch.testing.assert_close(g[:-1], sched.table[:-1], atol=1e-10, rtol=0)
    # vdm clips the last step ratio alpha^2_T / alpha^2_{T-1} at 0.001; the closed form does not.
    assert 1e-4 < float((g[-1] - sched.table[-1]).abs()) < 1e-3
    torch.testing.assert_close(proc.alpha(t[:-1]), sched.alpha(sched.table[:-1]), atol=1e-12, rtol=0)
    torch.testing.assert_close(proc.sigma(t[:-1]), sched.sigma(sched.table[:-1]), atol=1e-12, rtol=0)
    # beta = -d log alpha^2 / dt (central differences, second order).
    u = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    fd = -(torch.log(proc.alpha2(u + 1e-6)) - torch.log(proc.alpha2(u - 1e-6))) / 2e-6
    torch.testing.assert_close(proc.beta(u), fd, atol=1e-5, rtol=1e-6)


def _oracle(proc: VPSDE, mean: torch.Tensor, var: float):
    """The exact eps-predictor for data ~ N(mean, var I): eps_hat = sigma (z - alpha mean) / (alpha^2 var + sigma^2)."""
    def denoise(z, mask, t, **_):
        a, s = proc.alpha(t).view(-1, 1, 1), proc.sigma(t).view(-1, 1, 1)
        return s * (z - a * mean) / (a * a * var + s * s) * mask.unsqueeze(-1)
    return denoise


def _run(proc: VPSDE, denoise, sampler: str, z: torch.Tensor, mask: torch.Tensor, K: int,
         generator=None) -> torch.Tensor:
    grid = torch.linspace(1.0, 0.0, K + 1, dtype=torch.float64).tolist()
    for t, s in zip(grid[:-1], grid[1:]):
        if sampler == "em":
            z = proc.em_step(denoise, z, mask, t, s, generator=generator)
        else:
            z = proc.heun_step(denoise, z, mask, t, s)
    return z


def test_probability_flow_heun_transports_the_prior_to_gaussian_data_at_second_order():
    """With data N(0, var I) the probability-flow solution is z_t = std_t / std_1 z_1, std_t^2 = alpha_t^2 var +
    sigma_t^2; Heun's error at t = 0 falls four-fold per doubling of the steps."""
    proc = VPSDE(6, 5, 1.0, 4.0, 10.0, backend="torch")
    z1, mask = state()
    var = 0.09

    def std(t):
        return torch.sqrt(proc.alpha2(t) * var + proc.sigma(t) ** 2)

    exact = z1 * std(0.0) / std(1.0)
    den = _oracle(proc, torch.zeros(()), var)
    err = {K: float((_run(proc, den, "heun", z1, mask, K) - exact).abs().max()) for K in (10, 20, 40)}
    assert err[40] < 2e-3 * float(exact.abs().max())
    assert 3.5 < err[10] / err[20] < 4.5 and 3.5 < err[20] / err[40] < 4.5, err


def test_euler_maruyama_samples_have_the_data_mean_and_variance():
    """Data: h ~ N(m, var) per channel (m = 1.5), x ~ N(0, var) on the CoM-free subspace; the exact score.
    1,000 EM steps from the N(0, I) prior: 8,000 molecules x 5 atoms x 4 channels of h (n = 160,000) and 3 of x.
    The sample mean is within 0.01 of m (standard error 0.0013) and the variances within 2.5% of the exact ones
    (statistical sd ~0.4%; EM's O(1/K) bias is smaller still at K = 1000: measured +0.7% for h, +0.6% for x)."""
    proc = VPSDE(4, 3, 1.0, 4.0, 10.0, backend="torch")
    B, N, var, m = 8000, 5, 0.25, 1.5
    mask = torch.ones(B, N, dtype=torch.bool)
    gen = torch.Generator().manual_seed(7)
    mean = torch.cat([torch.zeros(3), torch.full((4,), m)]).double()
    z = proc.prior(mask, torch.float64, gen)
    z0 = _run(proc, _oracle(proc, mean, var), "em", z, mask, 1000, generator=gen)
    a0, s0 = float(proc.alpha(0.0)), float(proc.sigma(0.0))
    want_var = a0 ** 2 * var + s0 ** 2
    h = z0[..., 3:]
    assert abs(float(h.mean()) - a0 * m) < 0.01
    assert abs(float(h.var()) / want_var - 1) < 0.025, float(h.var())
    # x lives in the CoM-free subspace: per coordinate the variance is (1 - 1/N) of the isotropic one.
    x = z0[..., :3]
    assert float(x.sum(1).abs().max()) < 1e-9
    assert abs(float((x ** 2).mean()) / (want_var * (1 - 1 / N)) - 1) < 0.025
    # The tolerance sees a score 10% off: the exact score of var * 0.9 data gives a variance ~10% short.
    off = _run(proc, _oracle(proc, mean, 0.9 * var), "em", proc.prior(mask, torch.float64, gen), mask, 1000,
               generator=gen)
    assert float(off[..., 3:].var()) / want_var - 1 < -0.05


@pytest.mark.parametrize("sampler", ["em", "heun"])
@pytest.mark.parametrize("g_kind", ["rotation", "reflection"])
def test_vpsde_steps_are_pathwise_o3_equivariant_and_translation_free(sampler, g_kind):
    model = vpsde_model()
    proc, den = model.process, model.denoise
    noise, _ = state(seed=9)

    def step(z, mask, R0s, etas, rot):
        R0a, R0b = (rot @ R for R in R0s)
        if sampler == "em":
            return proc.em_step(den, z, mask, 0.55, 0.3, R0=R0a, eta=etas[0], noise=act(rot, noise))
        return proc.heun_step(den, z, mask, 0.55, 0.3, R0=R0a, eta=etas[0], R0_2=R0b, eta_2=etas[1])

    check_step_symmetry(step, g_kind)


def test_vpsde_loss_is_eq26_eps_matching_on_the_recorded_draw(monkeypatch):
    """sigma_t^2 |s_theta - grad log p(z_t | x)|^2 = |eps_hat - eps|^2, z_t = alpha_t x + sigma_t eps, t in
    (t_min, 1]; halved and over (3 + d) N_pad as vdm's, mean over molecules."""
    model = vpsde_model("symdiff", scale=0.05).float()
    batch = batch_of([WATER, METHANE], repeat=3)
    loss, stats, seen = recorded_loss(model, monkeypatch, batch)
    seen["eps"], seen["eps_hat"] = seen["noise"], seen["out"]
    x, h, mask, _, _ = model.features(batch)
    xh, eps, t = torch.cat([x, h], -1), seen["eps"], seen["t"].double()
    proc = model.process
    assert T_MIN < float(t.min()) and float(t.max()) <= 1.0 and t.unique().numel() == t.numel()
    a, s = proc.alpha(t).view(-1, 1, 1).float(), proc.sigma(t).view(-1, 1, 1).float()
    torch.testing.assert_close(seen["z_t"], a * xh + s * eps, atol=1e-6, rtol=0)
    # Eq. 26 written with the score: s_theta = -eps_hat / sigma, the conditional score -(z_t - alpha x) / sigma^2.
    score_hat, score = -seen["eps_hat"] / s, -(seen["z_t"] - a * xh) / s ** 2
    per_mol = (s.view(-1) ** 2) * ((score_hat - score) ** 2).sum((1, 2))
    expected = (0.5 * per_mol / ((3 + model.d) * mask.shape[1])).mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-4)
    assert float(stats["l2_x"] + stats["l2_h"]) == pytest.approx(float(loss.detach()), rel=1e-5)
    loss.backward()
    assert model.gamma_net.dec[-1].weight.grad.abs().max() > 0


def test_vpsde_samples_are_centred_and_the_process_refuses_what_it_lacks():
    check_samples_and_refusals(vpsde_model(scale=0.05).float(), "vpsde", ("em", "heun"), "euler")
    cfg = load_config(None, ["data.root=unused", "diffusion.process=vpsde", "sample.sampler=heun"])
    assert cfg.diffusion.process == "vpsde" and cfg.sample.sampler == "heun"


def test_vpsde_trains_through_symdiff_train_and_samples_through_symdiff_sample(tmp_path):
    train_and_sample(tmp_path, "qm9_tiny_vpsde.yaml", "em", 5)

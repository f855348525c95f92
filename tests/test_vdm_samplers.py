"""The vdm process's samplers (ancestral, DDIM, DPM-Solver++(2M)): their limits, exactness, symmetry and CoM."""
from __future__ import annotations

import pytest
import torch

from symdiff.diffusion import edm
from symdiff.diffusion import vdm_samplers as vs
from symdiff.diffusion.vdm import VDM
from symdiff.models.gamma import haar_o3
from test_model_equivariance import act, make_model, rotation, state


def _step(model, sampler, z, mask, t, s, noise, history=None, **gamma):
    """One step of ``sampler`` with gamma's randomness (R0, eta) and the step noise fixed."""
    proc, den = model.process, model.denoise
    if sampler == "ancestral":
        return model.reverse_step(z, mask, t, s, noise=noise, **gamma), None
    if sampler.startswith("ddim"):
        return vs.ddim_step(proc, den, z, mask, t, s, ddim_eta=float(sampler[4:]), noise=noise, **gamma), None
    return vs.dpmpp2m_step(proc, den, z, mask, t, s, history, **gamma)


@pytest.mark.parametrize("t", [1000, 600, 37, 1])
def test_ddim_with_eta_one_is_the_ancestral_step_mean_and_variance(t):
    """ddim_eta = 1 in the convention c = eta sigma_s sigma_{t|s} / sigma_t is the posterior q(z_s | z_t, x-hat_0)."""
    model = make_model("symdiff")
    z, mask = state()
    B, N = mask.shape
    gamma = {"R0": haar_o3(B, dtype=torch.float64), "eta": torch.randn(B, N, 3, dtype=torch.float64)}
    noise, _ = state(seed=9)
    zero = torch.zeros_like(noise)
    with torch.no_grad():
        mean_a, _ = _step(model, "ancestral", z, mask, t, t - 1, zero, **gamma)
        mean_d, _ = _step(model, "ddim1", z, mask, t, t - 1, zero, **gamma)
        full_a, _ = _step(model, "ancestral", z, mask, t, t - 1, noise, **gamma)
        full_d, _ = _step(model, "ddim1", z, mask, t, t - 1, noise, **gamma)
    assert (mean_a - z).abs().max() > 1e-4  # the step moves the state
    torch.testing.assert_close(mean_d, mean_a, atol=1e-12, rtol=1e-12)
    # The noise enters linearly: its coefficient is the step's standard deviation, sigma_q of SPEC §2.5.
    sched = model.schedule
    g_t, g_s = sched.gamma(torch.tensor(t)), sched.gamma(torch.tensor(t - 1))
    sigma_q = float(torch.sqrt(sched.sigma2_t_given_s(g_t, g_s)) * sched.sigma(g_s) / sched.sigma(g_t))
    m = mask.unsqueeze(-1).expand_as(z)
    for full, mean in ((full_a, mean_a), (full_d, mean_d)):
        torch.testing.assert_close((full - mean)[m], sigma_q * noise[m], atol=1e-12, rtol=1e-9)


def test_ddim_eta_one_over_all_steps_reproduces_the_ancestral_chain():
    """Same generator, all 1000 steps: the two samplers draw the same numbers and land on the same molecules."""
    model = make_model("symdiff", scale=0.1)
    sizes = torch.tensor([3, 5])
    a = model.sample(sizes, generator=torch.Generator().manual_seed(4))
    d = model.sample(sizes, sampler="ddim", ddim_eta=1.0, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(d[0], a[0], atol=1e-9, rtol=0)
    assert torch.equal(d[1], a[1])
    det = model.sample(sizes, sampler="ddim", ddim_eta=0.0, generator=torch.Generator().manual_seed(4))
    assert (det[0] - a[0]).abs().max() > 1e-2  # eta = 0 is another sampler


def _gaussian_oracle(proc: VDM, var: float):
    """The exact eps-predictor for data ~ N(0, var I): x-hat_0 = alpha var z / (alpha^2 var + sigma^2)."""
    def denoise(z, mask, t, **_):
        g = proc.schedule.gamma(torch.round(t * proc.timesteps).long())
        a, s = proc.schedule.alpha(g).view(-1, 1, 1), proc.schedule.sigma(g).view(-1, 1, 1)
        return (z - a * (a * var * z / (a * a * var + s * s))) / s
    return denoise


def _integrate(proc, denoise, sampler, z, mask, steps):
    times = edm.strided_times(proc.timesteps, steps)
    history = None
    for i, (t, s) in enumerate(zip(times[:-1], times[1:])):
        if sampler == "ddim":
            z = vs.ddim_step(proc, denoise, z, mask, t, s)
        else:
            z, history = vs.dpmpp2m_step(proc, denoise, z, mask, t, s, None if i == len(times) - 2 else history)
    return z


def test_deterministic_samplers_follow_the_probability_flow_of_gaussian_data():
    """For N(0, var I) data the flow is z_t = std_t / std_T z_T with std_t^2 = alpha_t^2 var + sigma_t^2.

    A point mass (var -> 0 limit, x-hat_0 constant) is integrated exactly by both; for var = 0.09 DDIM is first
    order (error halves with twice the steps) and DPM-Solver++(2M) is far more accurate at 20 steps."""
    proc = VDM(6, 5, 1.0, 4.0, 10.0, backend="torch")
    z, mask = state()
    zT = edm.sample_noise(mask, 6, torch.float64, "torch", torch.Generator().manual_seed(2))
    sched = proc.schedule

    def std(t, var):
        g = sched.gamma(torch.tensor(t))
        return torch.sqrt(sched.alpha(g) ** 2 * var + sched.sigma(g) ** 2)

    for sampler in ("ddim", "dpmpp2m"):  # var = 0: x-hat_0 = 0 at every step, z_0 = sigma_0 / sigma_T z_T
        out = _integrate(proc, _gaussian_oracle(proc, 0.0), sampler, zT, mask, 5)
        torch.testing.assert_close(out, zT * std(0, 0.0) / std(1000, 0.0), atol=1e-12, rtol=0)
    var = 0.09
    exact = zT * std(0, var) / std(1000, var)
    err = {(s, k): float((_integrate(proc, _gaussian_oracle(proc, var), s, zT, mask, k) - exact).abs().max())
           for s in ("ddim", "dpmpp2m") for k in (20, 40)}
    scale = float(exact.abs().max())
    assert 1.8 < err["ddim", 20] / err["ddim", 40] < 2.2
    assert err["dpmpp2m", 20] < 0.1 * err["ddim", 20] and err["dpmpp2m", 20] < 0.01 * scale


@pytest.mark.parametrize("sampler", ["ancestral", "ddim0", "ddim0.5", "dpmpp2m"])
@pytest.mark.parametrize("g_kind", ["rotation", "reflection"])
def test_each_samplers_update_is_pathwise_o3_equivariant(sampler, g_kind):
    """Two steps (the second one of DPM-Solver++ uses the first's x-hat_0) with R0 -> g R0, the same eta and
    g-rotated noise give g times the unrotated path, to 1e-6 in float64."""
    model = make_model("symdiff")
    z, mask = state()
    B, N = mask.shape
    g = rotation(g_kind)
    R0s = [haar_o3(B, dtype=torch.float64) for _ in range(2)]
    etas = [torch.randn(B, N, 3, dtype=torch.float64) for _ in range(2)]
    noises = [state(seed=9 + i)[0] for i in range(2)]
    path, path_g = z, act(g, z)
    hist = hist_g = None
    with torch.no_grad():
        for (t, s), R0, eta, noise in zip(((700, 500), (500, 300)), R0s, etas, noises):
            path, hist = _step(model, sampler, path, mask, t, s, noise, hist, R0=R0, eta=eta)
            path_g, hist_g = _step(model, sampler, path_g, mask, t, s, act(g, noise), hist_g, R0=g @ R0, eta=eta)
    assert (path - z).abs().max() > 1e-3
    torch.testing.assert_close(path_g, act(g, path), atol=1e-6, rtol=0)


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "dpmpp2m"])
def test_samples_are_centred_with_zero_padding_and_translation_free(sampler):
    model = make_model("symdiff", scale=0.1).float()
    sizes = torch.tensor([3, 6, 4])
    x, Z, mask = model.sample(sizes, steps=8, sampler=sampler, ddim_eta=0.5,
                              generator=torch.Generator().manual_seed(1))
    m = mask.unsqueeze(-1).float()
    assert float(((x * m).sum(1) / m.sum(1)).abs().max()) < 1e-5
    assert float((x * (1 - m)).abs().max()) == 0.0 and bool((Z[~mask] == 0).all()) and bool((Z[mask] > 0).all())
    # A step maps a translated state to the same result: only the CoM-free part of x enters.
    z, mk = state()
    zs = torch.cat([z[..., :3] + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) * mk.unsqueeze(-1), z[..., 3:]], -1)
    model = make_model("dit")
    noise, _ = state(seed=9)
    with torch.no_grad():
        a, _ = _step(model, sampler if sampler != "ddim" else "ddim0.5", z, mk, 400, 300, noise)
        b, _ = _step(model, sampler if sampler != "ddim" else "ddim0.5", zs, mk, 400, 300, noise)
    assert (a - z).abs().max() > 1e-3
    torch.testing.assert_close(b, a, atol=1e-9, rtol=0)
    assert float(b[..., :3].sum(1).abs().max()) < 1e-9


def test_ddim_eta_zero_ignores_the_noise_and_unknown_samplers_are_refused():
    model = make_model("dit")
    z, mask = state()
    with torch.no_grad():
        a = vs.ddim_step(model.process, model.denoise, z, mask, 500, 400, noise=state(seed=3)[0])
        b = vs.ddim_step(model.process, model.denoise, z, mask, 500, 400, noise=state(seed=4)[0])
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="heun"):
        model.sample(torch.tensor([3]), steps=2, sampler="heun")
    with pytest.raises(ValueError, match="ddim_eta"):
        model.sample(torch.tensor([3]), steps=2, sampler="ddim", ddim_eta=1.5)


def test_sample_command_takes_the_sampler_and_its_steps(tmp_path, monkeypatch, capsys):
    from symdiff.cli import main
    from symdiff.io.molfiles import read_molecules
    from test_model_sample_command import export

    ckpt = export(tmp_path)
    calls = {"ddim": [], "dpmpp2m": []}
    for name, fn in (("ddim", vs.ddim_step), ("dpmpp2m", vs.dpmpp2m_step)):
        def spy(*a, _fn=fn, _name=name, **kw):
            calls[_name].append(kw.get("ddim_eta"))
            return _fn(*a, **kw)
        monkeypatch.setattr(vs, f"{name}_step", spy)
    base = ["sample", "--ckpt", str(ckpt), "--n", "3", "--batch-size", "3", "--no-progress", "--seed", "2"]
    for sampler, extra in (("ddim", ["--ddim-eta", "0.3"]), ("dpmpp2m", [])):
        out = tmp_path / f"{sampler}.xyz"
        assert main(base + ["--sampler", sampler, "--steps", "6", "--out", str(out), *extra]) == 0
        assert len(read_molecules(out)) == 3
    assert calls == {"ddim": [0.3] * 6, "dpmpp2m": [None] * 6}
    assert main(base + ["--sampler", "heun", "--out", str(tmp_path / "x.xyz")]) == 1
    assert "--sampler" in capsys.readouterr().err
    assert main(base + ["--sampler", "ddim", "--ddim-eta", "2", "--out", str(tmp_path / "x.xyz")]) == 1
    assert "--ddim-eta 2" in capsys.readouterr().err

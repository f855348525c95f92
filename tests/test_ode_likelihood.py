"""The ODE likelihood of vpsde and flow (symdiff/diffusion/ode_likelihood.py): exact on Gaussian data with the oracle
field, an unbiased Hutchinson divergence on the CoM-free subspace, invariance of the symmetrised model's NLL to
rotations, reflections and permutations, and `symdiff eval --nll` end to end on 3-step runs."""
from __future__ import annotations

import json
import math

import pytest
import torch

from symdiff.diffusion import edm
from symdiff.diffusion.flow import Flow
from symdiff.diffusion.ode_likelihood import ODEOptions, _helmert, draw_probes, hutchinson_divergence
from symdiff.diffusion.vpsde import VPSDE
from symdiff.models.gamma import haar_o3
from test_diffusion_model import METHANE, WATER, batch_of
from test_model_equivariance import TINY, act, rotation, state
from test_process_vpsde import _oracle


def _gaussian_log_density(z: torch.Tensor, mask: torch.Tensor, var: float) -> torch.Tensor:
    """log N(z; 0, var I) on the CoM-free x ((N - 1) 3 dimensions) and on h (N d)."""
    n = mask.sum(1).double()
    dof = (n - 1) * 3 + n * (z.shape[-1] - 3)
    return -0.5 * (z ** 2).sum((1, 2)) / var - 0.5 * dof * math.log(2 * math.pi * var)


@pytest.mark.parametrize("ode", [ODEOptions(rtol=1e-8, atol=1e-8), ODEOptions(solver="rk4", steps=60)],
                         ids=["dopri5", "rk4"])
def test_vpsde_ode_likelihood_of_gaussian_data_is_the_exact_density(ode):
    """Data N(0, var I): the marginal at t = 0 is N(0, (alpha_0^2 var + sigma_0^2) I), the exact eps predictor is
    linear. The prior N(0, I) differs from the exact t = 1 marginal by s (var - 1) in variance (s = 1e-5), which
    moves log p by < 1e-4 here; the tolerance is 2e-3 nats on log densities of about -20 to -70."""
    proc = VPSDE(6, 5, 1.0, 4.0, 10.0, backend="torch")
    var = 0.09
    z, mask = state()
    z0 = z * math.sqrt(var)
    logp, terms = proc.ode_log_density(_oracle(proc, torch.zeros(()), var), z0, mask, ode=ode)
    exact = _gaussian_log_density(z0, mask, float(proc.alpha2(0.0)) * var + float(proc.sigma(0.0)) ** 2)
    torch.testing.assert_close(logp, exact, atol=2e-3, rtol=0)
    assert float(terms["divergence_integral"].abs().min()) > 10  # the divergence carries most of it


@pytest.mark.parametrize("ode", [ODEOptions(rtol=1e-8, atol=1e-8), ODEOptions(solver="rk4", steps=40)],
                         ids=["dopri5", "rk4"])
def test_flow_ode_likelihood_of_gaussian_data_is_the_exact_density(ode):
    """Data z_1 ~ N(0, var I), prior z_0 ~ N(0, I), independent: z_t ~ N(0, ((1 - t)^2 + t^2 var) I) and the exact
    velocity E[z_1 - z_0 | z_t] = (t var - (1 - t)) / ((1 - t)^2 + t^2 var) z_t. log p_1 is N(0, var I)'s."""
    proc = Flow(6, 5, 1.0, 4.0, 10.0, backend="torch")
    var = 0.09

    def velocity(z, mask, t, **_):
        t = t.view(-1, 1, 1)
        return (t * var - (1 - t)) / ((1 - t) ** 2 + t ** 2 * var) * z * mask.unsqueeze(-1)

    z, mask = state()
    z1 = z * math.sqrt(var)
    logp, _ = proc.ode_log_density(velocity, z1, mask, ode=ode)
    torch.testing.assert_close(logp, _gaussian_log_density(z1, mask, var), atol=2e-3, rtol=0)


def _subspace_basis(mask: torch.Tensor, d: int) -> torch.Tensor:
    """[B * N * (3 + d), k]: an orthonormal basis of CoM-free x and real h, over the flattened batch."""
    B, N = mask.shape
    C = 3 + d
    cols = []
    for b in range(B):
        idx = mask[b].nonzero().flatten()
        H = _helmert(idx.numel(), torch.float64, mask.device)
        for c in range(C):
            rows = H if c < 3 else torch.eye(idx.numel(), dtype=torch.float64)
            for r in rows:
                e = torch.zeros(B, N, C, dtype=torch.float64)
                e[b, idx, c] = r
                cols.append(e.flatten())
    return torch.stack(cols, 1)


def test_hutchinson_divergence_is_unbiased_for_the_divergence_on_the_com_free_subspace():
    """The symmetrised vpsde field (kind symdiff, gamma fixed) at one state: the Jacobian by autograd.functional,
    the exact divergence tr(Q^T J Q) over an orthonormal basis Q of the subspace. Each probe's v^T J v by
    vector-Jacobian products equals the one from J; over 20,000 probes of either kind the mean is within 4 standard
    errors of the exact trace, which differs from the trace over the full space (the unprojected answer)."""
    from test_process_flow import process_model

    model = process_model("vpsde", scale=0.1)  # weights whose Jacobian keeps 20,000 probes' error below 0.5
    proc = model.process
    z, mask = state(B=2, N=4, sizes=(4, 3))
    R0, eta = haar_o3(2, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)

    def field(zz):
        return proc._ode_field(model.denoise, zz, mask, 0.6, R0, eta, None)[0]

    J = torch.autograd.functional.jacobian(field, z).reshape(z.numel(), z.numel())
    Q = _subspace_basis(mask, 6)
    exact = float(torch.trace(Q.T @ J @ Q))
    real = mask.unsqueeze(-1).expand(2, 4, 9).flatten()
    full = float(torch.trace(J[real][:, real]))
    gen = torch.Generator().manual_seed(0)
    for probe in ("rademacher", "gaussian"):
        few = draw_probes(mask, 6, 3, probe, torch.float64, gen)
        zz = z.clone().requires_grad_(True)
        by_vjp = hutchinson_divergence(field(zz), zz, few)  # per molecule; the molecules do not interact
        from_j = torch.einsum("ki,ij,kj->k", few.flatten(1), J, few.flatten(1))
        torch.testing.assert_close(by_vjp.sum(), from_j.mean(), atol=1e-9, rtol=1e-9)
        v = draw_probes(mask, 6, 20000, probe, torch.float64, gen).flatten(1)
        est = torch.einsum("ki,ij,kj->k", v, J, v)
        se = float(est.std()) / math.sqrt(est.numel())
        assert abs(float(est.mean()) - exact) < 4 * se, (probe, float(est.mean()), exact, se)
        assert abs(full - exact) > 20 * se, (full, exact, se)


def _symmetric_model(process: str, kind: str = "symdiff"):
    from test_process_flow import process_model

    return process_model(process, kind, scale=0.2)


def _draws(model, f, gen):
    B, N = f.mask.shape
    R0 = haar_o3(B, dtype=torch.float64, generator=gen)
    eta = torch.randn(B, N, 3, dtype=torch.float64, generator=gen)
    noise = edm.sample_noise(f.mask, model.d, torch.float64, "torch", gen)
    probes = draw_probes(f.mask, model.d, 1, "rademacher", torch.float64, gen)
    return R0, eta, noise, probes


def _nll(model, f, R0, eta, noise, probes):
    with torch.no_grad():
        return model.process.nll(model.denoise, f, model.log_p_n_atoms(f.mask.sum(1)), R0=R0, eta=eta, noise=noise,
                                 probes=probes, ode=ODEOptions(solver="rk4", steps=1))[0]


@pytest.mark.parametrize("process", ["vpsde", "flow"])
def test_nll_is_invariant_to_rotations_reflections_and_permutations(process):
    """Pathwise (float64, 1e-8): the molecule g x with gamma's R0 -> g R0, the same eta, and the dequantisation
    noise and probes rotated with it has the NLL of x; likewise a permutation of the atoms moving eta, noise and
    probes along. R0 ~ Haar is g R0 in law, so the likelihood is invariant in distribution. The plain DiT is not
    invariant: the same rotation moves its NLL."""
    model = _symmetric_model(process)
    batch = batch_of([WATER, METHANE])
    f = model.features(batch)
    R0, eta, noise, probes = _draws(model, f, torch.Generator().manual_seed(3))
    base = _nll(model, f, R0, eta, noise, probes)
    assert bool(torch.isfinite(base).all())
    for kind in ("rotation", "reflection"):
        g = rotation(kind)
        fg = f._replace(x=f.x @ g.T)
        out = _nll(model, fg, g @ R0, eta, act(g, noise), torch.cat([probes[..., :3] @ g.T, probes[..., 3:]], -1))
        torch.testing.assert_close(out, base, atol=1e-8, rtol=0)
    gen = torch.Generator().manual_seed(4)
    perms = []
    for b in range(f.mask.shape[0]):  # the real atoms among themselves, the padding left in place
        idx = f.mask[b].nonzero().flatten()
        perm = torch.arange(f.mask.shape[1])
        perm[idx] = idx[torch.randperm(idx.numel(), generator=gen)]
        assert not torch.equal(perm, torch.arange(f.mask.shape[1]))
        perms.append(perm)

    def p(t):
        return torch.stack([t[b, perms[b]] for b in range(len(perms))])

    fp = f._replace(x=p(f.x), h=p(f.h), onehot=p(f.onehot), integer=None if f.integer is None else p(f.integer))
    out = _nll(model, fp, R0, p(eta), p(noise), torch.stack([p(v) for v in probes]))
    torch.testing.assert_close(out, base, atol=1e-8, rtol=0)
    dit = _symmetric_model(process, "dit")
    g = rotation("rotation")
    moved = _nll(dit, f._replace(x=f.x @ g.T), R0, eta, act(g, noise),
                 torch.cat([probes[..., :3] @ g.T, probes[..., 3:]], -1))
    assert float((moved - _nll(dit, f, R0, eta, noise, probes)).abs().max()) > 1e-4


def test_nll_terms_add_up_and_fix_gamma_along_the_ode():
    """The total is the sum of its terms (the dequantised bound); two calls from one generator seed agree; the
    field's gamma randomness is one draw for the whole ODE: every evaluation draws the same R0 (Haar) from a
    generator replaying one seed (so eta, drawn next from it, is the same too)."""
    model = _symmetric_model("flow")
    batch = batch_of([WATER, METHANE])
    seen = []
    real = model.denoiser.haar

    def spy(*a, **kw):
        seen.append(real(*a, **kw))
        return seen[-1]

    model.denoiser.haar = spy
    ode = ODEOptions(solver="rk4", steps=2)
    with torch.no_grad():
        total, t = model.nll(batch, return_terms=True, generator=torch.Generator().manual_seed(1), ode=ode)
        again = model.nll(batch, generator=torch.Generator().manual_seed(1), ode=ode)
        other = model.nll(batch, generator=torch.Generator().manual_seed(2), ode=ode)
    assert len(seen) == 3 * 8 and all(torch.equal(R, seen[0]) for R in seen[:8])
    assert not torch.equal(seen[0], seen[16]) and not torch.equal(other, total)
    torch.testing.assert_close(again, total, atol=0, rtol=0)
    parts = -t["log_p_prior"] - t["divergence_integral"] + t["x_decoder"] - t["log_p_h"] - t["entropy_h"] \
        - t["log_p_n"] + t["x_scale"]
    torch.testing.assert_close(total, parts, atol=1e-9, rtol=0)
    assert bool((t["nfe"] == 8).all())
    with pytest.raises(ValueError, match="t_int"):
        model.nll(batch, t_int=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="bfloat16"):
        model.to(torch.bfloat16).nll(batch)


def test_ode_options_are_checked():
    for bad, match in (({"solver": "euler"}, "solver"), ({"probe": "normal"}, "probe"), ({"n_probes": 0}, "probes"),
                       ({"rtol": 0.0}, "tolerances")):
        with pytest.raises(ValueError, match=match):
            ODEOptions(**bad)


@pytest.mark.parametrize("process", ["vpsde", "flow"])
def test_symdiff_eval_nll_scores_a_three_step_run(tmp_path, process):
    """`symdiff train` (3 steps) then `symdiff eval --nll` of the run: finite NLLs, the fields vdm's NLL reports, the
    likelihood named; a bad option is one line, exit 1."""
    from symdiff.data.bundled import ensure_bundled_shards
    from test_checkpoint_safety import REPO, TINY as TINY_RUN, _symdiff

    shards = ensure_bundled_shards(tmp_path / "qm9_bundled")
    run = tmp_path / "run"
    res = _symdiff("train", "--config", str(REPO / "configs" / f"qm9_tiny_{process}.yaml"), "--run-dir", str(run),
                   f"data.root={shards}", *TINY_RUN, "train.max_steps=3", "train.ckpt_every=3")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    out = tmp_path / "nll.json"
    res = _symdiff("eval", "--nll", str(run), "--dataset", "qm9", "--max-molecules", "6", "--batch-size", "4",
                   "--ode-solver", "rk4", "--ode-steps", "2", "--passes", "2", "--json", str(out))
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    r = json.loads(out.read_text())
    assert r["n_molecules"] == 6 and r["passes"] == 2 and r["process"] == process
    assert all(math.isfinite(v) for v in r["nll_per_pass"]) and r["nll_per_pass"][0] != r["nll_per_pass"][1]
    assert {"nll", "nll_unlabelled", "log_labellings", "nll_std_over_passes", "split", "weights"} <= set(r)
    assert "rk4 2 steps" in r["likelihood"] and "rademacher" in r["likelihood"]
    assert r["ode_evaluations_per_batch"] == 8  # RK4: four field evaluations a step
    res = _symdiff("eval", "--nll", str(run), "--dataset", "qm9", "--probes", "0")
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "probes" in res.stderr, res.stderr

"""The polynomial_2 schedule against the values of SPEC §2.2, and the transition quantities."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from symdiff.diffusion import edm
from symdiff.diffusion.schedule import NoiseSchedule

# t: (alpha^2_t, gamma(t)) from SPEC §2.2
SPEC_VALUES = {0: (0.99999, -11.5129), 1: (0.999988, -11.3306), 10: (0.99979, -8.468), 100: (0.98009, -3.896),
               250: (0.87890, -1.982), 500: (0.56250, -0.2513), 750: (0.19141, 1.4409), 900: (0.036109, 3.2844),
               990: (4.06e-4, 7.809), 999: (1.3996e-5, 11.1767), 1000: (1.0004e-5, 11.5125)}


@pytest.mark.parametrize("t", sorted(SPEC_VALUES))
def test_schedule_matches_spec_table(t):
    s = NoiseSchedule(1000, "polynomial_2", 1e-5)
    a2, gamma = SPEC_VALUES[t]
    g = s.gamma(torch.tensor(t))
    assert float(torch.sigmoid(-g)) == pytest.approx(a2, rel=2e-4)
    assert float(g) == pytest.approx(gamma, abs=6e-4)


def test_endpoint_alpha_sigma_and_monotone():
    s = NoiseSchedule()
    g0, gT = s.gamma(torch.tensor(0)), s.gamma(torch.tensor(1000))
    assert float(s.alpha(g0)) == pytest.approx(0.999995, abs=1e-6)
    assert float(s.sigma(g0)) == pytest.approx(0.0031623, rel=1e-4)
    assert float(s.alpha(gT)) == pytest.approx(0.0031629, rel=1e-4)
    assert float(torch.exp(g0 / 2)) == pytest.approx(0.0031623, rel=1e-4)
    assert bool((s.table[1:] > s.table[:-1]).all())
    assert s.table.dtype == torch.float64


def test_transition_quantities_are_consistent():
    """alpha_{t|s}^2 + sigma_{t|s}^2 / ... : q(z_t|z_s) composes q(z_s|x) into q(z_t|x)."""
    s = NoiseSchedule()
    t_int, s_int = torch.tensor([1, 10, 500, 1000]), torch.tensor([0, 3, 250, 999])
    gt, gs = s.gamma(t_int), s.gamma(s_int)
    a_ts, s2_ts = s.alpha_t_given_s(gt, gs), s.sigma2_t_given_s(gt, gs)
    torch.testing.assert_close(a_ts * s.alpha(gs), s.alpha(gt), rtol=1e-12, atol=0)
    torch.testing.assert_close(a_ts ** 2 * s.sigma(gs) ** 2 + s2_ts, s.sigma(gt) ** 2, rtol=1e-10, atol=0)


def test_strided_times():
    assert edm.strided_times(1000, 1000) == list(range(1000, -1, -1))
    assert edm.strided_times(1000, 4) == [1000, 750, 500, 250, 0]
    assert edm.strided_times(10, 3) == [10, 7, 3, 0]
    with pytest.raises(ValueError):
        edm.strided_times(1000, 0)


def test_noise_is_com_free_and_masked():
    torch.manual_seed(0)
    mask = torch.arange(9)[None] < torch.tensor([9, 3, 6])[:, None]
    eps = edm.sample_noise(mask, 6, torch.float64)
    assert eps.shape == (3, 9, 9)
    torch.testing.assert_close(eps[..., :3].sum(1), torch.zeros(3, 3, dtype=torch.float64), atol=1e-12, rtol=0)
    assert eps[~mask].abs().max() == 0
    assert eps[mask].std() > 0.5


def test_x_constant_matches_spec():
    """-log-constants of p(x|z_0) per x degree of freedom: 1/2 gamma_0 + 1/2 log 2 pi = -4.8375 (SPEC §2.4c)."""
    s = NoiseSchedule()
    per_dof = 0.5 * float(s.gamma(torch.tensor(0))) + 0.5 * math.log(2 * math.pi)
    assert per_dof == pytest.approx(-4.8375, abs=1e-4)


def test_table_stays_float64_when_the_model_is_cast():
    """Mixed-precision engines call module.bfloat16(); the gamma table must not be rounded with the weights."""
    s = NoiseSchedule().bfloat16()
    assert s.table.dtype == torch.float64
    torch.testing.assert_close(s.table, NoiseSchedule().table, atol=0, rtol=0)


def test_gamma64_is_the_float64_table_and_a_copy():
    """model.time_input keeps the array it gets: editing it must not move the schedule the process samples with."""
    s = NoiseSchedule().bfloat16()
    g = s.gamma64
    assert g.dtype == np.float64
    np.testing.assert_array_equal(g, s.table.numpy())
    g[:] = 0.0
    np.testing.assert_array_equal(s.gamma64, NoiseSchedule().table.numpy())
    assert float(s.gamma(torch.tensor(0))) == pytest.approx(-11.5129, abs=6e-4)

import itertools
import math

import pytest
import torch

import learnsteps as ls
from learnsteps.core.grids import AYS_SIGMAS, cheapest_path, loglinear_interp
from learnsteps.core.schedules import EDM, DiscreteDDPM, VPCosine, VPLinear
from learnsteps.teachers.gmm import toy_mixture

from helpers import F64, noise

SCHEDULES = [VPLinear(), VPCosine(), DiscreteDDPM(), EDM()]
SIMPLE = ["time_uniform", "time_quadratic", "logsnr", "edm"]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.kind)
@pytest.mark.parametrize("kind", SIMPLE)
@pytest.mark.parametrize("to_zero", [False, True])
def test_grids_span_the_schedule(schedule, kind, to_zero):
    for steps in (1, 2, 7):
        t = ls.grids.make(kind, steps, schedule, to_zero=to_zero)
        assert t.dtype == F64 and len(t) == steps + 1
        assert (t[1:] < t[:-1]).all()
        assert t[0] == schedule.t_max
        assert t[-1] == (schedule.t_zero if to_zero else schedule.t_min)
        if to_zero and steps > 1:
            assert t[-2] == schedule.t_min


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.kind)
def test_each_kind_is_uniform_in_its_own_variable(schedule):
    n = 9
    def equal_gaps(v):
        gaps = v[1:] - v[:-1]
        torch.testing.assert_close(gaps, gaps.mean().expand_as(gaps), rtol=1e-8, atol=1e-10)
    equal_gaps(ls.grids.make("time_uniform", n, schedule))
    equal_gaps(ls.grids.make("time_quadratic", n, schedule).sqrt())
    equal_gaps(schedule.lambda_(ls.grids.make("logsnr", n, schedule)))
    equal_gaps(schedule.sigma_tilde(ls.grids.make("edm", n, schedule, rho=7.0)) ** (1 / 7))


def test_edm_grid_is_karras_sigmas():
    """k-diffusion's get_sigmas_karras(n, 0.002, 80, rho=7), with its appended zero."""
    n = 18
    ramp = torch.linspace(0, 1, n, dtype=F64)
    karras = (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    t = ls.grids.make("edm", n, EDM(), to_zero=True)
    torch.testing.assert_close(t, torch.cat([karras, torch.zeros(1, dtype=F64)]), rtol=1e-12, atol=1e-12)


def test_ays_interpolation_keeps_the_published_points():
    sd15 = torch.tensor(AYS_SIGMAS["sd15"], dtype=F64)
    torch.testing.assert_close(loglinear_interp(sd15, 11), sd15, rtol=1e-12, atol=0)
    torch.testing.assert_close(loglinear_interp(sd15, 21)[::2], sd15, rtol=1e-12, atol=0)
    mid = loglinear_interp(sd15, 21)[1::2]
    torch.testing.assert_close(mid, (sd15[:-1] * sd15[1:]).sqrt(), rtol=1e-12, atol=0)  # geometric means
    schedule = DiscreteDDPM("scaled_linear")
    t = ls.grids.make("ays", 10, schedule, sigmas="sd15")
    torch.testing.assert_close(schedule.sigma_tilde(t), sd15, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        loglinear_interp([1.0, 2.0, 0.5], 4)


def test_explicit_grid():
    t = ls.grids.make("explicit", 3, VPLinear(), times=[1.0, 0.5, 0.1, 0.001])
    assert t.tolist() == [1.0, 0.5, 0.1, 0.001]
    with pytest.raises(ValueError, match="3 steps need 4"):
        ls.grids.make("explicit", 3, VPLinear(), times=[1.0, 0.1, 0.001])


def test_cheapest_path_is_the_brute_force_optimum():
    torch.manual_seed(0)
    m, jumps, coeff = 9, 3, 1.15
    cost = torch.rand(m, m, dtype=F64).triu(1) + torch.full((m, m), math.inf, dtype=F64).tril()
    def value(path):
        v = 0.0
        for i, j in zip(path[:-1], path[1:]):
            v = coeff * v + float(cost[i, j])
        return v
    best = min((value([0, *mid, m - 1]), [0, *mid, m - 1]) for mid in itertools.combinations(range(1, m - 1), jumps - 1))
    path = cheapest_path(cost, jumps, coeff)
    assert path == best[1]


def test_gits_grid_beats_its_fine_grid_subsampled_for_ddim():
    teacher = toy_mixture()
    s = teacher.noise_schedule
    x_T = noise((64, 6))
    t = ls.grids.make("gits", 5, s, teacher=teacher, x_T=x_T, fine_steps=40)
    fine = ls.grids.make("edm", 40, s)
    assert len(t) == 6 and t[0] == fine[0] and t[-1] == fine[-1]
    assert all(any(torch.isclose(v, fine)) for v in t)
    x_ref = ls.reference_solve(teacher, noise((64, 6), seed=9), torch.tensor([s.t_max, s.t_min], dtype=F64)).x
    def error(grid):
        return float((ls.sample(teacher, noise((64, 6), seed=9), grid, "euler") - x_ref).pow(2).mean().sqrt())
    assert error(t) < error(fine[::8])
    t0 = ls.grids.make("gits", 5, s, teacher=teacher, x_T=x_T, fine_steps=40, to_zero=True)
    assert len(t0) == 6 and t0[-1] == s.t_zero


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="cosine", steps=4), "unknown grid kind"),
    (dict(kind="logsnr", steps=0), "at least 1 step"),
    (dict(kind="logsnr", steps=4, t_max=0.1, t_min=0.5), "must exceed"),
    (dict(kind="ays", steps=4), "needs sigmas"),
    (dict(kind="gits", steps=4), "needs the teacher"),
    (dict(kind="explicit", steps=4), "needs times"),
])
def test_bad_grid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ls.grids.make(schedule=VPLinear(), **kwargs)

import math
import os

import pytest
import torch

from learnsteps.core.schedules import EDM, VPCosine, VPLinear, DiscreteDDPM, make_schedule, _vp_lambda_from_log_alpha

F64 = torch.float64
SCHEDULES = [VPLinear(), VPCosine(), DiscreteDDPM("linear"), DiscreteDDPM("scaled_linear"),
             DiscreteDDPM("squaredcos_cap_v2"), EDM()]


def interior_times(s, n=50, dtype=F64):
    return torch.linspace(s.t_max, s.t_min, n, dtype=dtype)[1:-1]


def test_vp_linear_matches_its_closed_form():
    s = VPLinear(0.1, 20.0)
    t = torch.linspace(1e-4, 1, 101, dtype=F64)
    log_alpha = -(19.9) * t**2 / 4 - 0.1 * t / 2
    torch.testing.assert_close(s.alpha(t), log_alpha.exp(), rtol=1e-12, atol=0)
    torch.testing.assert_close(s.sigma(t), torch.sqrt(1 - log_alpha.exp() ** 2), rtol=1e-10, atol=0)


def test_vp_cosine_matches_its_closed_form():
    s = VPCosine()
    t = torch.linspace(1e-3, 0.99, 101, dtype=F64)
    f = lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2)
    torch.testing.assert_close(s.alpha(t) ** 2, f(t) ** 2 / f(torch.zeros((), dtype=F64)) ** 2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("betas", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_discrete_tables_match_diffusers(betas):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(beta_schedule=betas, **({"beta_start": 0.00085, "beta_end": 0.012}
                                                        if betas == "scaled_linear" else {}))
    s = DiscreteDDPM(betas)
    # diffusers keeps its tables in float32; ours are float64
    torch.testing.assert_close(s.alphas_cumprod.float(), ref.alphas_cumprod, rtol=2e-5, atol=1e-7)
    t = torch.arange(0, 1000, dtype=F64)
    sigma_tilde = ((1 - s.alphas_cumprod) / s.alphas_cumprod).sqrt()
    torch.testing.assert_close(s.sigma_tilde(t), sigma_tilde, rtol=1e-12, atol=0)


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: repr(s))
def test_alpha_sigma_lambda_are_consistent(s):
    t = interior_times(s)
    lam = s.lambda_(t)
    assert (lam[1:] > lam[:-1]).all(), "lambda must increase as t decreases"
    torch.testing.assert_close(s.log_alpha(t) - s.log_sigma(t), lam, rtol=1e-12, atol=1e-12)
    if s.path == "vp":
        torch.testing.assert_close(s.alpha(t) ** 2 + s.sigma(t) ** 2, torch.ones_like(t), rtol=1e-12, atol=1e-12)
    elif s.path == "flow":
        torch.testing.assert_close(s.alpha(t) + s.sigma(t), torch.ones_like(t), rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(s.sigma(t), t)


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: repr(s))
def test_inverse_round_trip(s):
    t = interior_times(s)
    torch.testing.assert_close(s.t_of_lambda(s.lambda_(t)), t, rtol=1e-10, atol=1e-10)
    lam = torch.linspace(float(s.lambda_(torch.tensor(s.t_max, dtype=F64))),
                         float(s.lambda_(torch.tensor(s.t_min, dtype=F64))), 37, dtype=F64)
    torch.testing.assert_close(s.lambda_(s.t_of_lambda(lam)), lam, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: repr(s))
def test_float32_is_finite_and_accurate_at_both_ends(s):
    t32 = torch.tensor([s.t_max, s.t_min] + interior_times(s, 10).tolist(), dtype=torch.float32)
    for fn in (s.lambda_, s.alpha, s.sigma, s.sigma_tilde):
        v32 = fn(t32)
        assert torch.isfinite(v32).all()
        torch.testing.assert_close(v32.double(), fn(t32.double()), rtol=1e-5, atol=1e-6)
    back = s.t_of_lambda(s.lambda_(t32))
    torch.testing.assert_close(back, t32, rtol=1e-4, atol=1e-4 * s.t_max)


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: repr(s))
def test_the_clean_end_has_sigma_zero(s):
    t0 = torch.tensor(s.t_zero, dtype=F64)
    assert s.sigma(t0) == 0 and s.lambda_(t0) == math.inf
    assert s.alpha(t0) == 1


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: repr(s))
def test_maps_are_differentiable(s):
    t = interior_times(s, 7).requires_grad_()
    # keep discrete schedules off their knots, where the piecewise-linear map has kinks
    if isinstance(s, DiscreteDDPM):
        t = (t.detach().round() + 0.37).requires_grad_()
    assert torch.autograd.gradcheck(s.lambda_, (t,))
    lam = s.lambda_(t).detach().requires_grad_()
    assert torch.autograd.gradcheck(s.t_of_lambda, (lam,))


def test_make_schedule_round_trips_its_config():
    for s in SCHEDULES:
        again = make_schedule(**s.config())
        assert again.config() == s.config()
    with pytest.raises(ValueError, match="unknown noise schedule"):
        make_schedule("vp_quadratic")


# ------------------------------------------------------------------------------------------- the end points
# Every schedule at t_zero, t_min and t_max and within 2 ulp of them, in float32 and float64: a formula that
# cancels to +1e-20 instead of 0 where two math libraries (or two CPU code paths) round differently shows up
# here as a NaN or as lambda increasing with t, whatever this machine's libm happens to do.
def ulp_neighbourhood(t: float, dtype) -> torch.Tensor:
    """t and its 2 nearest representable neighbours on each side, increasing."""
    x = torch.tensor(t, dtype=dtype)
    up, down = [x], [x]
    for _ in range(2):
        up.append(torch.nextafter(up[-1], torch.tensor(math.inf, dtype=dtype)))
        down.append(torch.nextafter(down[-1], torch.tensor(-math.inf, dtype=dtype)))
    return torch.stack(down[:0:-1] + up)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("where", ["t_zero", "t_min", "t_max"])
@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: repr(s))
def test_end_points_within_two_ulps_are_finite_and_monotone(s, where, dtype):
    t = ulp_neighbourhood(getattr(s, where), dtype)
    lam = s.lambda_(t)
    assert not lam.isnan().any(), f"lambda{t.tolist()} = {lam.tolist()}"
    assert (lam[1:] <= lam[:-1]).all(), f"lambda must not increase with t: {lam.tolist()}"
    # +inf only at the clean end (just after it a time of a few denormal ulps has alpha = 1 in floating point)
    assert torch.isfinite(lam).all() or (where == "t_zero" and (lam > 0).all())
    alpha, sigma = s.alpha(t), s.sigma(t)
    assert torch.isfinite(alpha).all() and torch.isfinite(sigma).all()
    assert (sigma >= 0).all() and (alpha > 0).all()
    assert (sigma[1:] >= sigma[:-1]).all() and (alpha[1:] <= alpha[:-1]).all()
    assert (s.sigma_tilde(t) >= 0).all()
    back = s.t_of_lambda(lam)
    assert not back.isnan().any() and (back[1:] >= back[:-1]).all()


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: repr(s))
def test_the_clean_end_is_exact_both_ways(s, dtype):
    t0 = torch.tensor(s.t_zero, dtype=dtype)
    assert s.lambda_(t0) == math.inf and s.sigma(t0) == 0 and s.alpha(t0) == 1 and s.sigma_tilde(t0) == 0
    assert s.t_of_lambda(torch.tensor(math.inf, dtype=dtype)) == s.t_zero


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: repr(s))
def test_lambda_is_monotone_over_the_whole_range(s, dtype):
    t = torch.linspace(s.t_zero, s.t_max, 20001, dtype=dtype)
    lam = s.lambda_(t)
    assert not lam.isnan().any() and (lam[1:] <= lam[:-1]).all()
    back = s.t_of_lambda(lam[1:])
    assert not back.isnan().any() and (back[1:] >= back[:-1]).all()


def test_a_log_alpha_rounded_above_zero_is_still_the_clean_end():
    """The VP lambda of a log alpha that came out +1e-20 (one ulp of a cancelling difference) is +inf, not NaN."""
    for log_alpha in (1e-20, 2.2e-16, 0.0, -0.0):
        assert _vp_lambda_from_log_alpha(torch.tensor(log_alpha, dtype=F64)) == math.inf


def test_the_requested_cpu_kernel_path_is_the_one_running():
    """`make test` reruns these tests under each ATEN_CPU_CAPABILITY; make sure torch really switched."""
    want = os.environ.get("ATEN_CPU_CAPABILITY")
    if not want:
        pytest.skip("ATEN_CPU_CAPABILITY is not set: the native kernel path")
    assert torch.backends.cpu.get_cpu_capability().lower() == want.lower()

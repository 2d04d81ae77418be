"""Flow matching (rectified flow) in the core: the schedule in closed form, velocity prediction, the shifted grid,
the start at t = 1 (alpha = 0: every data-form solver takes the exact limit of its formula there, the noise-form
ones refuse), convergence orders on an exact flow-matching mixture, and step-by-step parity with diffusers' flow
schedulers.

diffusers' flow schedulers take `sigmas` = our native time t (alpha = 1 - t) and call the model at timestep t * n.
We hand them the float64 times of our grid after set_timesteps (set_timesteps(sigmas=...) would shift them once
more, diffusers #14013), so that what is compared is the solvers' algebra. FlowMatchEulerDiscreteScheduler and
DPMSolverMultistepScheduler cast the sample to float32 inside `step`, so their agreement is float32 rounding
(measured 6e-8 to 2e-7 relative, asserted 1e-6); UniPCMultistepScheduler stays in float64 (measured <= 1e-15,
asserted 1e-12). The issue's 1e-5 holds for all three.
"""
import math

import numpy as np
import pytest
import torch

import learnsteps as ls
from learnsteps.core.sample import start_time, starts_at_noise
from learnsteps.core.schedules import FlowMatching, NoiseSchedule, dynamic_shift_mu, make_schedule, shift_sigma, \
    unshift_sigma
from learnsteps.teachers.gmm import gaussian, toy_mixture

from helpers import DETERMINISTIC, F64, ident, noise, reexpressed

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def mixture():
    return toy_mixture(noise_schedule=FlowMatching(shift=3.0))


@pytest.fixture(scope="module")
def velocity(mixture):
    """The exact mixture as a velocity (v = eps - x0) network: what an SD3/FLUX transformer predicts."""
    return reexpressed(mixture, "flow")


# ------------------------------------------------------------------------------------------------ the schedule
def test_flow_schedule_in_closed_form():
    s = FlowMatching()
    t = torch.tensor([1e-6, 1e-3, 0.1, 0.5, 0.9, 0.999], dtype=F64)
    torch.testing.assert_close(s.alpha(t), 1 - t, rtol=1e-14, atol=0)
    torch.testing.assert_close(s.sigma(t), t, rtol=1e-14, atol=0)
    torch.testing.assert_close(s.lambda_(t), torch.log((1 - t) / t), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(s.t_of_lambda(s.lambda_(t)), t, rtol=1e-14, atol=0)
    torch.testing.assert_close(s.sigma_tilde(t), t / (1 - t), rtol=1e-14, atol=0)
    zero, one = torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64)
    assert s.lambda_(zero) == math.inf and s.alpha(zero) == 1 and s.sigma(zero) == 0
    # the pipelines' start, pure noise: alpha = 0, lambda = -inf, exactly, in float32 too
    for dtype in (F64, torch.float32):
        assert s.lambda_(one.to(dtype)) == -math.inf and s.alpha(one.to(dtype)) == 0 and s.sigma(one.to(dtype)) == 1
    assert s.t_max == 1 and s.init_noise_std() == 1 and s.t_min == pytest.approx(0.001)
    assert s.t_cap == pytest.approx(0.999) and FlowMatching(shift=3.0).t_cap == pytest.approx(shift_sigma(0.999, 3.0))
    # the previous release's default end, as its files record it, is kept as it is
    old = FlowMatching(shift=3.0, t_max=shift_sigma(0.999, 3.0))
    assert old.t_max == old.t_cap < 1 and old.init_noise_std() == pytest.approx(old.t_max)


def test_shift_is_diffusers_and_a_constant_log_snr_offset():
    sigma = torch.linspace(0.01, 0.99, 50, dtype=F64)
    shifted = shift_sigma(sigma, 3.0)
    torch.testing.assert_close(unshift_sigma(shifted, 3.0), sigma, rtol=1e-14, atol=0)
    s = FlowMatching()
    torch.testing.assert_close(s.lambda_(shifted), s.lambda_(sigma) - math.log(3.0), rtol=0, atol=1e-13)
    # diffusers' own formulas: the static shift, and the exponential dynamic shift with mu (FLUX) is shift = e^mu
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert np.allclose(sched.time_shift(math.log(3.0), 1.0, sigma.numpy()), shifted.numpy(), rtol=1e-12)
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert dynamic_shift_mu(1024) == pytest.approx(calculate_shift(1024), rel=1e-12)


def test_shifted_grid_is_the_flow_models_default():
    """FlowMatchEulerDiscreteScheduler.set_timesteps(N) with shift s: N points shift(linspace(...)), then 0."""
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(8)
    theirs = sched.sigmas.to(F64)
    # their ends: t = 1 (our t_max) and the training table's last sigma, shifted once more inside set_timesteps
    t_min = float(theirs[-2])
    assert theirs[0] == 1.0
    ours = ls.grids.make("shifted", 8, FlowMatching(shift=3.0, t_min=t_min), to_zero=True)
    assert len(ours) == len(theirs) and ours[0] == 1
    torch.testing.assert_close(ours, theirs, rtol=2e-7, atol=1e-7)  # theirs are float32
    with pytest.raises(ValueError, match="flow-matching schedule"):
        ls.grids.make("shifted", 8, make_schedule("vp_linear"))
    assert ls.grids.make("shifted", 4, FlowMatching()).tolist() == ls.grids.make("time_uniform", 4, FlowMatching()).tolist()


@pytest.mark.parametrize("kwargs, match", [(dict(shift=0.0), "shift"), (dict(n=1), "n="), (dict(t_max=1.5), "t_max"),
                                           (dict(t_min=0.5, t_max=0.4), "t_min < t_max"),
                                           (dict(n=2), "below t_cap")])
def test_bad_flow_parameters_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlowMatching(**kwargs)


def test_flow_schedule_round_trips_through_its_config():
    s = FlowMatching(shift=3.0, n=1000)
    assert make_schedule(**s.config()).config() == s.config()


# ------------------------------------------------------------------------------------ velocity as a prediction
def test_velocity_converts_exactly(mixture, velocity):
    x, t = noise((5, 6)), torch.tensor([0.9, 0.5, 0.2, 0.05, 0.999], dtype=F64)
    torch.testing.assert_close(velocity.x0(x, t), mixture.x0(x, t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(velocity.eps(x, t), mixture.eps(x, t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver", ["euler", "dpm_solver++", "dpm_solver", "unipc", "deis", "ipndm", "heun"])
def test_every_solver_runs_a_velocity_model_as_the_exact_one(solver, mixture, velocity):
    s = mixture.noise_schedule
    grid = ls.grids.make("shifted", 8, s, to_zero=solver != "dpm_solver", t_max=start_time(s, solver))
    x_T = noise((4, 6)) * mixture.noise_schedule.init_noise_std()
    torch.testing.assert_close(ls.sample(velocity, x_T, grid, solver), ls.sample(mixture, x_T, grid, solver),
                               rtol=1e-9, atol=1e-9)


def test_euler_on_a_velocity_model_is_the_flow_euler_step(velocity):
    """DDIM in the data form is x_s = x_t + (s - t) v exactly on the flow path."""
    s = velocity.noise_schedule
    grid = torch.tensor([0.8, 0.3], dtype=F64)
    x = noise((3, 6))
    v = velocity(x, grid[0].expand(3))
    torch.testing.assert_close(ls.sample(velocity, x, grid, "euler"), x + (grid[1] - grid[0]) * v, rtol=1e-13, atol=1e-13)
    assert s.path == "flow"


# ------------------------------------------------------------------------------------------ the start at t = 1
def run_or_refusal(teacher, x_T, grid, solver, order, **opts):
    """The samples, or the refusal's message."""
    try:
        return ls.sample(teacher, x_T, grid, solver, order, **opts)
    except ValueError as err:
        return str(err)


@pytest.mark.parametrize("case", DETERMINISTIC, ids=ident)
def test_every_solver_starts_at_t_1_or_refuses_with_one_line(case, velocity):
    """From alpha = 0 the data-form solvers run (finite samples); the noise-form ones, Heun and UniPC bh1 with its
    corrector refuse with one line naming themselves and a solver that can; `starts_at_noise` says which in advance."""
    solver, order, opts = case
    s = velocity.noise_schedule
    grid = ls.grids.make("shifted", max(order, 4), s, to_zero=True)
    assert grid[0] == 1
    out = run_or_refusal(velocity, noise((3, 6)), grid, solver, order, **opts)
    if starts_at_noise(solver, opts):
        assert isinstance(out, torch.Tensor) and torch.isfinite(out).all(), out
    else:
        assert isinstance(out, str) and "\n" not in out and out.startswith(solver) and "t = 1.0 (alpha = 0" in out
        assert "dpm_solver++" in out or "data=True" in out or "data form" in out
        assert start_time(s, solver, opts) == s.t_cap  # where such a solver starts instead
    assert start_time(s, solver, opts) == (s.t_max if starts_at_noise(solver, opts) else s.t_cap)


def test_an_epsilon_model_is_refused_at_alpha_zero(mixture):
    """x0 = (x - sigma eps) / alpha has no value at alpha = 0: an epsilon network cannot start there."""
    eps_net = reexpressed(mixture, "epsilon")
    with pytest.raises(ValueError, match="epsilon-prediction model has no data prediction where alpha = 0"):
        ls.sample(eps_net, noise((2, 6)), ls.grids.make("logsnr", 4, mixture.noise_schedule), "dpm_solver++", 2)
    for prediction in ("x0", "flow"):  # the flow path's other parameterizations are finite there and sample the same
        torch.testing.assert_close(
            ls.sample(reexpressed(mixture, prediction), noise((2, 6)), ls.grids.make("logsnr", 4, mixture.noise_schedule),
                      "unipc", 3),
            ls.sample(mixture, noise((2, 6)), ls.grids.make("logsnr", 4, mixture.noise_schedule), "unipc", 3),
            rtol=1e-10, atol=1e-10)


class ResolvedNoise(NoiseSchedule):
    """A flow-path schedule whose time resolves lambda near the noisy end, lambda = 1/t - 1/(1 - t): t = 1 - d has
    lambda ~ -1/d, so a start at 1 - 1e-7 is lambda = -1e7 (flow's own t cannot get below lambda = -37 in float64).
    Its t = 1 is alpha = 0, where the solvers' limits apply."""

    kind, path = "resolved", "flow"
    t_max, t_min, t_zero = 1.0, 0.01, 0.0

    def lambda_(self, t):
        t = t.clamp(0, 1)
        return 1 / t - 1 / (1 - t)

    def t_of_lambda(self, lam):  # the root in (0, 1) of lam t^2 - (lam + 2) t + 1 = 0, without cancellation
        return 2 / (lam + 2 + torch.sqrt(lam**2 + 4))

    def config(self):
        return dict(kind=self.kind)


LIMIT_CASES = [c for c in DETERMINISTIC if starts_at_noise(c[0], c[2]) and c[1] > 1]


@pytest.mark.parametrize("case", LIMIT_CASES, ids=ident)
def test_the_start_at_alpha_zero_is_the_limit_of_starts_just_below(case):
    """The solvers' values at t = 1 are the limits of their formulas: from 1 - d (lambda_0 ~ -1/d) a solver's
    result tends to its result from 1 as d -> 0, at the rate 1/|lambda_0| of a dropped interpolation node (or
    faster), so the error shrinks at least 30x over d = 1e-4 ... 1e-6."""
    solver, order, opts = case
    s = ResolvedNoise()
    teacher = toy_mixture(noise_schedule=s)
    x_T = noise((4, 6))
    inner = s.t_of_lambda(torch.linspace(-2.0, 3.0, 5, dtype=F64))
    at_one = ls.sample(teacher, x_T, torch.cat([torch.ones(1, dtype=F64), inner, torch.zeros(1, dtype=F64)]),
                       solver, order, **opts)
    assert torch.isfinite(at_one).all()
    errors = [float((ls.sample(teacher, x_T, torch.cat([torch.full((1,), 1 - d, dtype=F64), inner,
                                                          torch.zeros(1, dtype=F64)]), solver, order, **opts)
                     - at_one).abs().max()) for d in (1e-4, 1e-6)]
    assert errors[1] <= errors[0] / 30 + 1e-12, errors
    assert errors[1] <= 1e-4 * float(at_one.abs().max()), errors


@pytest.mark.parametrize("case", [c for c in DETERMINISTIC if starts_at_noise(c[0], c[2])], ids=ident)
def test_gradcheck_through_a_start_at_t_1(case, velocity):
    """Gradients with respect to every other grid point and evaluation time stay finite and exact from alpha = 0."""
    solver, order, opts = case
    s = velocity.noise_schedule
    steps = max(order, 4)
    grid = ls.grids.make("logsnr", steps, s, t_min=0.05)
    assert grid[0] == 1
    x_T = noise((2, 6))

    def run(inner, inner_eval):
        g = torch.cat([grid[:1], inner, grid[-1:]])
        e = torch.cat([grid[:1], inner_eval, grid[-1:]])
        return ls.sample(velocity, x_T, torch.cat([g, torch.zeros(1, dtype=F64)]), solver, order,
                         eval_grid=torch.cat([e, torch.zeros(1, dtype=F64)]), **opts)

    inner = grid[1:-1].clone().requires_grad_()
    inner_eval = (grid[1:-1] * 0.99).requires_grad_()
    assert torch.autograd.gradcheck(run, (inner, inner_eval), eps=1e-7, atol=1e-6, rtol=1e-4)


def test_the_reference_solver_starts_at_t_1_on_the_closed_form():
    """From alpha = 0 the reference integrates y = x / sigma over u = e^lambda up to lambda = 0, then x~ over
    lambda: the exact Gaussian flow from t = 1 at every requested time, with its error estimate bounding the error."""
    teacher = gaussian(8, noise_schedule=FlowMatching(shift=3.0))
    x_T = torch.randn(16, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    times = torch.tensor([1.0, 0.97, 0.6, 0.1, 1e-3], dtype=F64)  # both sides of lambda = 0 (t = 0.5)
    ref = ls.reference_solve(teacher, x_T, times, rtol=1e-11, atol=1e-11)
    for i, t in enumerate(times):
        torch.testing.assert_close(ref.trajectory[i], teacher.exact_flow(x_T, times[0], t), rtol=0, atol=1e-8)
    actual = float((ref.x - teacher.exact_flow(x_T, times[0], times[-1])).pow(2).mean().sqrt())
    assert actual <= ref.error_estimate < 1e-6
    assert ref.nfe == 2 + 6 * (ref.steps + ref.rejected)  # a first slope in u and one in lambda, 6 stages per attempt
    errors = [float((ls.reference_solve(teacher, x_T, times[[0, -1]], rtol=tol, atol=tol).x
                     - teacher.exact_flow(x_T, times[0], times[-1])).abs().max()) for tol in (1e-5, 1e-8, 1e-11)]
    assert errors[0] > 30 * errors[1] > 30 * 30 * errors[2]


# ---------------------------------------------------------------------------------- convergence on the mixture
FLOW_ORDER_CASES = [("euler", 1, {}, 1), ("dpm_solver++", 2, {}, 2), ("dpm_solver++", 3, {}, 2),
                    ("dpm_solver++", 2, dict(variant="taylor"), 2),
                    ("dpm_solver++", 2, dict(method="singlestep"), 2),
                    ("dpm_solver++", 3, dict(method="singlestep", variant="taylor"), 3),
                    ("dpm_solver++", 3, dict(method="singlestep"), 3),
                    ("unipc", 2, dict(lower_order_final=False), 3), ("unipc", 3, dict(lower_order_final=False), 4),
                    ("unipc", 3, dict(variant="bh1", corrector=False, lower_order_final=False), 3),
                    ("heun", 2, {}, 2), ("dpm_solver", 2, {}, 2), ("deis", 3, dict(basis="tab"), 3)]


@pytest.mark.parametrize("case", FLOW_ORDER_CASES, ids=lambda c: f"{c[0]}{c[1]}{c[2] or ''}->{c[3]}")
def test_convergence_order_on_the_exact_flow_mixture(case, mixture):
    """From t = 1 for every solver that starts there (the others from t_cap), log-SNR grids spaced from t_cap."""
    solver, order, opts, expected = case
    s = mixture.noise_schedule
    start = start_time(s, solver, opts)
    assert (start == 1) == starts_at_noise(solver, opts)
    x_T = noise((8, 6), seed=1) * s.init_noise_std()
    times = torch.tensor([start, s.t_min], dtype=F64)
    ref = ls.reference_solve(mixture, x_T, times, rtol=1e-12, atol=1e-12).x
    steps, errors = [64, 128, 256], []
    for n in steps:
        out = ls.sample(mixture, x_T, ls.grids.make("logsnr", n, s, t_max=start), solver, order, **opts)
        errors.append(float((out - ref).pow(2).mean().sqrt()))
    measured = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(measured - expected) <= 0.3, f"measured order {measured:.2f}, errors {errors}"


# ---------------------------------------------------------------------------------------- parity with diffusers
def run_flow_scheduler(scheduler, velocity, x_T, grid):
    """diffusers' denoising loop on our grid: sigmas = our times (float64), timesteps = times * n."""
    n = len(grid) - 1
    scheduler.set_timesteps(n)
    scheduler.sigmas = grid.clone()
    scheduler.timesteps = grid[:-1] * scheduler.config.num_train_timesteps
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    x = x_T.clone()
    for ts in scheduler.timesteps:
        v = velocity(x, (ts / scheduler.config.num_train_timesteps).expand(len(x)))
        x = scheduler.step(v, ts, x).prev_sample
    return x.to(F64)


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("to_zero", [True, False])
@pytest.mark.parametrize("kind", ["shifted", "logsnr"])
def test_flow_match_euler_parity(velocity, kind, to_zero):
    s = velocity.noise_schedule
    grid = ls.grids.make(kind, 10, s, to_zero=to_zero)
    x_T = noise((8, 6)) * s.init_noise_std()
    theirs = run_flow_scheduler(diffusers.FlowMatchEulerDiscreteScheduler(shift=s.shift), velocity, x_T, grid)
    assert relative(ls.sample(velocity, x_T, grid, "euler"), theirs) <= 1e-6  # their step is float32


@pytest.mark.parametrize("steps", [6, 12])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("to_zero", [True, False])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpm_solver_multistep_flow_parity(velocity, steps, order, to_zero, solver_type):
    s = velocity.noise_schedule
    sched = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                  flow_shift=s.shift, solver_order=order, solver_type=solver_type,
                                                  final_sigmas_type="zero" if to_zero else "sigma_min")
    grid = ls.grids.make("shifted", steps, s, to_zero=to_zero)
    x_T = noise((8, 6)) * s.init_noise_std()
    ours = ls.sample(velocity, x_T, grid, "dpm_solver++", order, variant="taylor" if solver_type == "heun" else "midpoint")
    assert relative(ours, run_flow_scheduler(sched, velocity, x_T, grid)) <= 1e-6  # their step is float32


@pytest.mark.parametrize("steps", [6, 12])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("to_zero", [True, False])
def test_unipc_flow_parity(velocity, steps, order, to_zero):
    s = velocity.noise_schedule
    sched = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                              flow_shift=s.shift, solver_order=order, solver_type="bh2",
                                              final_sigmas_type="zero" if to_zero else "sigma_min")
    # from t = 1 up to order 2; order 3 from t_cap (diffusers' UniPC-3 turns the start at sigma = 1 into NaN:
    # tests/test_interop.py, where that schedule is refused for diffusers)
    grid = ls.grids.make("shifted", steps, s, to_zero=to_zero, t_max=1.0 if order == 2 else s.t_cap)
    x_T = noise((8, 6)) * s.init_noise_std()
    ours = ls.sample(velocity, x_T, grid, "unipc", order)
    assert relative(ours, run_flow_scheduler(sched, velocity, x_T, grid)) <= 1e-12


def test_flux_dynamic_shift_from_the_scheduler_config():
    """A FLUX-style config (use_dynamic_shifting): the shift is e^mu with the pipelines' mu for the latent size,
    and the shifted grid is diffusers' set_timesteps(N, mu=mu) grid (but its first point, at t = 1)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from learnsteps.teachers.pipelines.base import _schedule

    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                      base_image_seq_len=256, max_image_seq_len=4096)
    mu = calculate_shift(1024, 256, 4096, 0.5, 1.15)  # the pipeline's mu for 1024 latent tokens (its family's `mu`)
    schedule, prediction = _schedule(type(sched).__name__, dict(sched.config), mu)
    assert prediction == "flow" and schedule.shift == pytest.approx(math.exp(mu), rel=1e-12)
    sched.set_timesteps(8, mu=mu)
    theirs = sched.sigmas.to(F64)
    ours = ls.grids.make("shifted", 8, FlowMatching(shift=schedule.shift, t_max=1 - 1e-9, t_min=float(theirs[-2])),
                         to_zero=True)
    torch.testing.assert_close(ours[1:], theirs[1:], rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["FlowMatchEulerDiscrete", "DPMSolverMultistep", "UniPCMultistep"])
@pytest.mark.parametrize("steps", [6, 20])
def test_the_flow_schedulers_own_grids_in_our_core(velocity, name, steps):
    """Each flow scheduler's own set_timesteps(N), read by pipeline_grid, in our core gives its own loop's samples:
    FlowMatchEuler from sigma = 1 exactly (before, our core could only clip it), DPM-Solver++ with flow sigmas from
    shift(1 - 1/n), UniPC from 1 - 1e-6 (diffusers moves it off 1 "to avoid inf"); their model times (DPM-Solver's
    integer timesteps) as decoupled evaluation times. Their steps are float32 (FlowMatchEuler, DPM-Solver)."""
    from learnsteps.interop.diffusers import pipeline_grid

    s = velocity.noise_schedule
    flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=s.shift)
    make = {"FlowMatchEulerDiscrete": lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=s.shift),
            "DPMSolverMultistep": lambda: diffusers.DPMSolverMultistepScheduler(**flow, solver_order=3),
            "UniPCMultistep": lambda: diffusers.UniPCMultistepScheduler(**flow, solver_order=3)}[name]
    pg = pipeline_grid(make(), steps)
    start = {"FlowMatchEulerDiscrete": 1.0, "DPMSolverMultistep": np.float32(s.t_cap),
             "UniPCMultistep": np.float32(1 - 1e-6)}[name]
    assert pg.grid[0] == float(start) and pg.grid[-1] == 0 and pg.latents_scale == pg.output_scale == 1
    scheduler = make()
    scheduler.set_timesteps(steps)
    x = x_T = noise((8, 6)) * s.init_noise_std()
    for ts in scheduler.timesteps:
        x = scheduler.step(velocity(x, (ts / 1000).to(F64).expand(len(x))), ts, x).prev_sample
    assert relative(ls.sample(velocity, x_T, **pg.solve_kwargs), x.to(F64)) <= 1e-6

"""Flow matching (rectified flow) in the core: the schedule in closed form, velocity prediction, the shifted grid,
convergence orders on an exact flow-matching mixture, and step-by-step parity with diffusers' flow schedulers.

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
from learnsteps.core.schedules import FlowMatching, dynamic_shift_mu, make_schedule, shift_sigma, unshift_sigma
from learnsteps.teachers.gmm import toy_mixture

from helpers import F64, noise, reexpressed

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
    zero = torch.tensor(0.0, dtype=F64)
    assert s.lambda_(zero) == math.inf and s.alpha(zero) == 1 and s.sigma(zero) == 0
    assert s.t_max == pytest.approx(0.999) and s.t_min == pytest.approx(0.001) and s.init_noise_std() == s.t_max


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
    # their ends (the training table's, shifted once more inside set_timesteps) as our t_max, t_min
    t_max, t_min = float(theirs[0]), float(theirs[-2])
    assert t_max == 1.0  # where alpha = 0: our t_max stays below, and the first point is the only one that differs
    ours = ls.grids.make("shifted", 8, FlowMatching(shift=3.0, t_max=min(t_max, 1 - 1e-9), t_min=t_min), to_zero=True)
    assert len(ours) == len(theirs)
    torch.testing.assert_close(ours[1:], theirs[1:], rtol=2e-7, atol=1e-7)  # theirs are float32
    with pytest.raises(ValueError, match="flow-matching schedule"):
        ls.grids.make("shifted", 8, make_schedule("vp_linear"))
    assert ls.grids.make("shifted", 4, FlowMatching()).tolist() == ls.grids.make("time_uniform", 4, FlowMatching()).tolist()


@pytest.mark.parametrize("kwargs, match", [(dict(shift=0.0), "shift"), (dict(n=1), "n="), (dict(t_max=1.0), "t_max"),
                                           (dict(t_min=0.5, t_max=0.4), "t_min < t_max")])
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
    grid = ls.grids.make("shifted", 8, mixture.noise_schedule, to_zero=solver != "dpm_solver")
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


# ---------------------------------------------------------------------------------- convergence on the mixture
FLOW_ORDER_CASES = [("euler", 1, {}, 1), ("heun", 2, {}, 2), ("dpm_solver++", 2, {}, 2), ("dpm_solver", 2, {}, 2),
                    ("unipc", 2, dict(lower_order_final=False), 3), ("unipc", 3, dict(lower_order_final=False), 4),
                    ("deis", 3, dict(basis="tab"), 3), ("dpm_solver++", 3, dict(method="singlestep", variant="taylor"), 3)]


@pytest.mark.parametrize("case", FLOW_ORDER_CASES, ids=lambda c: f"{c[0]}{c[1]}{c[2] or ''}->{c[3]}")
def test_convergence_order_on_the_exact_flow_mixture(case, mixture):
    solver, order, opts, expected = case
    s = mixture.noise_schedule
    x_T = noise((8, 6), seed=1) * s.init_noise_std()
    times = torch.tensor([s.t_max, s.t_min], dtype=F64)
    ref = ls.reference_solve(mixture, x_T, times, rtol=1e-12, atol=1e-12).x
    steps, errors = [64, 128, 256], []
    for n in steps:
        out = ls.sample(mixture, x_T, ls.grids.make("logsnr", n, s), solver, order, **opts)
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
    grid = ls.grids.make("shifted", steps, s, to_zero=to_zero)
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

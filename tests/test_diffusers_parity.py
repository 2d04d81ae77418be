"""Our solvers against diffusers' schedulers on the same exact model and the same grid (relative error <= 1e-5).

We feed our core the scheduler's own timesteps (plus its final point: t = 0 for final_sigmas_type="sigma_min",
t_zero = -1 for "zero"). diffusers rounds its sigma tables to float32; for the exponential integrators (DPM,
UniPC, DEIS) we hand it the float64 sigmas of the same grid, the brief's "drive both from one explicit grid", so
that what remains is the solvers' algebra (and DPMSolverMultistep's own float32 upcast of the sample).
"""
import pytest
import torch

import learnsteps as ls
from learnsteps.core.schedules import DiscreteDDPM
from learnsteps.teachers.gmm import toy_mixture

from helpers import F64, noise

diffusers = pytest.importorskip("diffusers")
RTOL = 1e-5
BETAS = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)  # stated: defaults differ by class


@pytest.fixture(scope="module")
def teacher():
    return toy_mixture(noise_schedule=DiscreteDDPM("linear"))


def run_diffusers(scheduler, teacher, x_T, steps, x_tilde=False, final=None):
    """The standard diffusers denoising loop with our exact model predicting epsilon."""
    scheduler.set_timesteps(steps)
    if final is not None:  # float64 sigmas of the very grid our core integrates on
        scheduler.sigmas = teacher.noise_schedule.sigma_tilde(grid_of(scheduler, final))
    x = x_T * scheduler.init_noise_sigma if x_tilde else x_T.clone()
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        eps = teacher.eps(x_in, torch.as_tensor(t, dtype=F64).expand(len(x)))
        x = scheduler.step(eps, t, x).prev_sample
    return x.to(F64)


def grid_of(scheduler, final: str):
    t = scheduler.timesteps.to(F64)
    t = torch.unique_consecutive(t)  # Heun repeats its timesteps
    return torch.cat([t, torch.tensor([0.0 if final == "sigma_min" else -1.0], dtype=F64)])


def assert_parity(ours, theirs):
    err = float((ours - theirs).norm() / theirs.norm())
    assert err <= RTOL, f"relative error {err:.2e}"


@pytest.mark.parametrize("steps", [9, 20])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("algorithm, final", [("dpmsolver++", "zero"), ("dpmsolver++", "sigma_min"),
                                              ("dpmsolver", "sigma_min")])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpm_solver_multistep(teacher, steps, order, algorithm, final, solver_type):
    sched = diffusers.DPMSolverMultistepScheduler(**BETAS, algorithm_type=algorithm, solver_order=order,
                                                  solver_type=solver_type, final_sigmas_type=final)
    x_T = noise((8, 6))
    theirs = run_diffusers(sched, teacher, x_T, steps, final=final)
    ours = ls.sample(teacher, x_T, grid_of(sched, final), "dpm_solver++" if algorithm == "dpmsolver++" else "dpm_solver",
                     order, variant="midpoint" if solver_type == "midpoint" else "taylor")
    assert_parity(ours, theirs)


def singlestep_plan_of(order_list):
    """diffusers' per-step order list [1, 2, 3, 1, 2, ...] as our groups [3, 2, ...]."""
    plan = []
    for o in order_list:
        if o == 1:
            plan.append(1)
        else:
            plan[-1] = o
    return plan


@pytest.mark.parametrize("steps", [8, 9, 10])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("algorithm, final", [("dpmsolver++", "zero"), ("dpmsolver++", "sigma_min"),
                                              ("dpmsolver", "sigma_min")])
def test_dpm_solver_singlestep(teacher, steps, order, algorithm, final):
    # only diffusers' "heun" (= DPM-Solver's "taylor") builds order-3 stages as the original does
    sched = diffusers.DPMSolverSinglestepScheduler(**BETAS, algorithm_type=algorithm, solver_order=order,
                                                   solver_type="heun", final_sigmas_type=final, lower_order_final=True)
    x_T = noise((8, 6))
    theirs = run_diffusers(sched, teacher, x_T, steps, final=final)
    ours = ls.sample(teacher, x_T, grid_of(sched, final), "dpm_solver++" if algorithm == "dpmsolver++" else "dpm_solver",
                     order, method="singlestep", variant="taylor", plan=singlestep_plan_of(sched.order_list))
    assert_parity(ours, theirs)


@pytest.mark.parametrize("steps", [6, 10, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant, final", [("bh1", "sigma_min"), ("bh2", "sigma_min"), ("bh2", "zero")])
def test_unipc(teacher, steps, order, variant, final):
    sched = diffusers.UniPCMultistepScheduler(**BETAS, solver_order=order, solver_type=variant,
                                              final_sigmas_type=final, lower_order_final=True)
    x_T = noise((8, 6))
    theirs = run_diffusers(sched, teacher, x_T, steps, final=final)
    ours = ls.sample(teacher, x_T, grid_of(sched, final), "unipc", order, variant=variant, corrector=True)
    assert_parity(ours, theirs)


@pytest.mark.parametrize("steps", [6, 10, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis(teacher, steps, order):
    sched = diffusers.DEISMultistepScheduler(**BETAS, solver_order=order, lower_order_final=True)
    x_T = noise((8, 6))
    theirs = run_diffusers(sched, teacher, x_T, steps, final="sigma_min")
    ours = ls.sample(teacher, x_T, grid_of(sched, "sigma_min"), "deis", order, basis="logrho")
    assert_parity(ours, theirs)


@pytest.mark.parametrize("steps", [5, 10, 25])
@pytest.mark.parametrize("cls, solver", [("EulerDiscreteScheduler", "euler"), ("HeunDiscreteScheduler", "heun")])
def test_euler_and_heun(teacher, steps, cls, solver):
    """These two run on x~ = x / alpha with fractional timesteps and sigma~ interpolated linearly in t."""
    sched = getattr(diffusers, cls)(**BETAS)
    x_T = noise((8, 6))
    theirs = run_diffusers(sched, teacher, x_T, steps, x_tilde=True)
    grid = grid_of(sched, "zero")
    x_T_vp = x_T * sched.init_noise_sigma * teacher.noise_schedule.alpha(grid[0])
    sol = ls.solve(teacher, x_T_vp, grid, solver)
    assert_parity(sol.x, theirs)
    assert sol.nfe == len(sched.timesteps)

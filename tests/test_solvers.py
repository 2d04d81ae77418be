
import numpy as np
import pytest
import torch

import learnsteps as ls
from learnsteps.core.denoiser import NetworkDenoiser
from learnsteps.core.schedules import EDM, DiscreteDDPM, VPLinear
from learnsteps.teachers.gmm import gaussian, toy_mixture

from helpers import DETERMINISTIC, F64, CountingDenoiser, ident, noise, reexpressed


@pytest.fixture(scope="module")
def teacher():
    return toy_mixture()


# ------------------------------------------------------------------------------------------------ identities
@pytest.mark.parametrize("schedule", [VPLinear(), EDM(), DiscreteDDPM()], ids=lambda s: s.kind)
@pytest.mark.parametrize("to_zero", [False, True])
def test_first_order_solvers_are_one_method(schedule, to_zero):
    """DDIM = DPM-Solver-1 = DPM-Solver++-1 = Euler in (x/alpha, sigma/alpha), to 1e-10."""
    teacher = toy_mixture(noise_schedule=schedule)
    grid = ls.grids.make("logsnr", 7, schedule, to_zero=to_zero)
    x_T = noise((5, 6)) * schedule.init_noise_std()
    # EDM's Euler written out, as k-diffusion's sample_euler does it
    x_tilde = x_T / schedule.alpha(grid[0])
    for i in range(7):
        s_i, s_next = schedule.sigma_tilde(grid[i]), schedule.sigma_tilde(grid[i + 1])
        d = teacher.eps(x_tilde * schedule.alpha(grid[i]), grid[i])
        x_tilde = x_tilde + (s_next - s_i) * d
    euler = x_tilde * schedule.alpha(grid[-1])
    for solver, opts in [("euler", {}), ("dpm_solver", {}), ("dpm_solver++", {}), ("dpm_solver", dict(method="singlestep")),
                         ("unipc", dict(corrector=False)), ("deis", {}), ("ipndm", {}), ("er_sde", dict(noise_scale="ode"))]:
        out = ls.sample(teacher, x_T, grid, solver, order=1, **opts)
        torch.testing.assert_close(out, euler, rtol=1e-10, atol=1e-10, msg=f"{solver} {opts}")


def test_unipc2_predictor_is_dpmpp_2m(teacher):
    grid = ls.grids.make("logsnr", 20, teacher.noise_schedule)
    x_T = noise((4, 6))
    a = ls.sample(teacher, x_T, grid, "unipc", 2, variant="bh2", corrector=False, lower_order_final=False)
    b = ls.sample(teacher, x_T, grid, "dpm_solver++", 2, variant="midpoint", lower_order_final=False)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_deis_logrho_2_is_dpm_solver_2m_taylor(teacher):
    grid = ls.grids.make("time_quadratic", 9, teacher.noise_schedule)
    x_T = noise((4, 6))
    a = ls.sample(teacher, x_T, grid, "deis", 2, basis="logrho")
    b = ls.sample(teacher, x_T, grid, "dpm_solver", 2, variant="taylor")
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_stochastic_ddim_is_er_sde_1_with_the_reverse_sde_noise(teacher):
    """DDIM(eta=1) and ER-SDE-1 with phi(s) = s^2 both are SDE-DPM-Solver++-1: same noise, same samples."""
    grid = ls.grids.make("logsnr", 10, teacher.noise_schedule)
    x_T = noise((4, 6))
    a = ls.sample(teacher, x_T, grid, "euler", eta=1.0, generator=torch.Generator().manual_seed(3))
    b = ls.sample(teacher, x_T, grid, "er_sde", 1, noise_scale="sde", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------ convergence orders
# Theoretical orders of each method as published, on a logSNR grid of a smooth exact teacher. Notes:
# - 3M as published halves its D2 term: its local error keeps an h^3 m''/12 term, so it is of order 2
#   (measured 2.2-2.5 at these step counts; docs/solvers.md has the algebra);
# - UniPC-p with its corrector is of order p+1 (lower_order_final off, so the last step keeps its order);
# - iPNDM's fixed Adams-Bashforth weights assume equal sigma~ steps; on a logSNR grid the steps' ratio makes it 2;
# - ER-SDE-3 estimates x0' by a backward difference, an O(h) error times Q1 = O(h^2): order 2.
ORDER_CASES = [
    ("euler", 1, {}, 1), ("heun", 2, {}, 2),
    *[(s, p, dict(variant=v), p) for s in ("dpm_solver", "dpm_solver++") for p in (1, 2) for v in ("midpoint", "taylor")],
    ("dpm_solver", 3, {}, 2), ("dpm_solver++", 3, {}, 2),
    *[(s, p, dict(method="singlestep", variant=v), p) for s in ("dpm_solver", "dpm_solver++") for p in (2, 3)
      for v in ("midpoint", "taylor")],
    *[("unipc", p, dict(variant=v, lower_order_final=False), p + 1) for p in (1, 2, 3) for v in ("bh1", "bh2")],
    *[("unipc", p, dict(corrector=False, lower_order_final=False), p) for p in (2, 3)],
    *[("deis", p, dict(basis="tab"), p) for p in (1, 2, 3, 4)],
    *[("deis", p, dict(basis="logrho"), p) for p in (2, 3)],
    ("deis", 3, dict(basis="rhoab"), 3),
    ("ipndm", 1, {}, 1), ("ipndm", 4, {}, 2),
    ("er_sde", 2, dict(noise_scale="ode"), 2), ("er_sde", 3, dict(noise_scale="ode"), 2),
]


@pytest.fixture(scope="module")
def reference(teacher):
    x_T = noise((8, 6), seed=1)
    times = torch.tensor([1.0, 1e-3], dtype=F64)
    return x_T, ls.reference_solve(teacher, x_T, times, rtol=1e-12, atol=1e-12).x


@pytest.mark.parametrize("case", ORDER_CASES, ids=lambda c: ident(c[:3]) + f"->{c[3]}")
def test_convergence_order(case, teacher, reference):
    solver, order, opts, expected = case
    x_T, ref = reference
    steps = [64, 128, 256]
    errors = []
    for n in steps:
        grid = ls.grids.make("logsnr", n, teacher.noise_schedule, t_min=1e-3)
        out = ls.sample(teacher, x_T, grid, solver, order, **opts)
        errors.append(float((out - ref).pow(2).mean().sqrt()))
    measured = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(measured - expected) <= 0.3, f"measured order {measured:.2f}, errors {errors}"


# ------------------------------------------------------------------------------------------------------- NFE
@pytest.mark.parametrize("case", DETERMINISTIC, ids=ident)
@pytest.mark.parametrize("to_zero", [False, True])
def test_model_call_counts(case, to_zero, teacher):
    solver, order, opts = case
    for steps in range(max(order, 1 + to_zero), 9):
        counted = CountingDenoiser(teacher)
        grid = ls.grids.make("logsnr", steps, teacher.noise_schedule, to_zero=to_zero)
        sol = ls.solve(counted, noise((2, 6)), grid, solver, order, **opts)
        assert sol.nfe == len(counted.calls) == ls.nfe(solver, steps, to_zero)
        assert torch.isfinite(sol.x).all()


# ------------------------------------------------------------------------------------- gradients w.r.t. the grid
@pytest.mark.parametrize("case", DETERMINISTIC, ids=ident)
def test_gradcheck_with_respect_to_the_grid(case):
    solver, order, opts = case
    teacher = toy_mixture(dim=3, components=2)
    steps = max(order, 4)
    grid = ls.grids.make("logsnr", steps, teacher.noise_schedule, t_min=0.01)
    x_T = noise((2, 3))

    def run(inner, inner_eval):
        g = torch.cat([grid[:1], inner, grid[-1:]])
        e = torch.cat([grid[:1], inner_eval, grid[-1:]])
        return ls.sample(teacher, x_T, g, solver, order, eval_grid=e, **opts)

    inner = grid[1:-1].clone().requires_grad_()
    inner_eval = (grid[1:-1] * 1.01).requires_grad_()  # LD3's decoupled evaluation times
    assert torch.autograd.gradcheck(run, (inner, inner_eval), eps=1e-7, atol=1e-6, rtol=1e-4)


def test_gradients_are_finite_through_a_final_step_to_zero():
    teacher = toy_mixture(dim=3, components=2)
    grid = ls.grids.make("logsnr", 6, teacher.noise_schedule, to_zero=True)
    for solver, order in [("dpm_solver++", 3), ("unipc", 3), ("deis", 3), ("ipndm", 4), ("heun", 2)]:
        inner = grid[1:-1].clone().requires_grad_()
        out = ls.sample(teacher, noise((2, 3)), torch.cat([grid[:1], inner, grid[-1:]]), solver, order)
        out.sum().backward()
        assert torch.isfinite(inner.grad).all() and inner.grad.abs().sum() > 0, solver


# --------------------------------------------------------------------------------------- evaluation grid, API
def test_model_is_called_at_the_evaluation_times(teacher):
    grid = ls.grids.make("logsnr", 5, teacher.noise_schedule)
    eval_grid = grid * torch.tensor([1, 0.98, 0.97, 1.02, 1.01, 1], dtype=F64)
    counted = CountingDenoiser(teacher)
    x, traj = ls.sample(counted, noise((2, 6)), grid, "dpm_solver++", 2, eval_grid=eval_grid,
                        return_trajectory=True)
    np.testing.assert_allclose(counted.calls, eval_grid[:5].tolist(), rtol=1e-12)
    assert traj.shape == (6, 2, 6) and torch.equal(traj[-1], x)
    same = ls.sample(teacher, noise((2, 6)), grid, "dpm_solver++", 2, eval_grid=grid)
    torch.testing.assert_close(same, ls.sample(teacher, noise((2, 6)), grid, "dpm_solver++", 2), rtol=0, atol=0)


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v", "edm"])
def test_every_prediction_type_gives_the_same_sampler(prediction, teacher):
    s = teacher.noise_schedule
    wrapped = reexpressed(teacher, prediction)
    grid = ls.grids.make("edm", 8, s)
    for solver in ("dpm_solver++", "unipc", "heun"):
        torch.testing.assert_close(ls.sample(wrapped, noise((3, 6)), grid, solver),
                                   ls.sample(teacher, noise((3, 6)), grid, solver), rtol=1e-9, atol=1e-9)


def test_classifier_free_guidance_combines_the_two_branches():
    s = VPLinear()
    gs = [gaussian(4, seed=k) for k in range(3)]

    class CondNet(torch.nn.Module):  # class c in {0, 1} picks a Gaussian; 2 is the unconditional model
        def forward(self, x, t, c):
            return torch.stack([gs[int(k)].eps(x[i:i + 1], t[i:i + 1])[0] for i, k in enumerate(c)])

    den = NetworkDenoiser(CondNet(), s, "epsilon")
    x, t, c = noise((2, 4)), torch.full((2,), 0.5, dtype=F64), torch.tensor([0, 1])
    for scale in (0.0, 1.0, 3.5):
        guided = ls.ClassifierFreeGuidance(den, scale, null_cond=2)
        expected = den.eps(x, t, torch.tensor([2, 2])) + scale * (den.eps(x, t, c) - den.eps(x, t, torch.tensor([2, 2])))
        torch.testing.assert_close(guided.eps(x, t, c), expected, rtol=1e-12, atol=1e-12)
    out = ls.sample(ls.ClassifierFreeGuidance(den, 2.0, 2), noise((2, 4)), ls.grids.make("logsnr", 4, s), cond=c)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------- stochastic solvers
# DDPM-like ancestral sampling converges weakly at order 1 (covariance error 0.14, 0.10, 0.055, 0.034 at 60, 120,
# 240, 480 steps here); ER-SDE-3 is accurate at 60.
@pytest.mark.parametrize("solver, opts, steps", [("euler", dict(eta=1.0), 480), ("er_sde", dict(noise_scale="sde5"), 60),
                                                 ("er_sde", dict(noise_scale="sde"), 60)])
def test_stochastic_solvers_sample_the_data_distribution(solver, opts, steps):
    teacher = gaussian(3, seed=2)
    grid = ls.grids.make("logsnr", steps, teacher.noise_schedule, to_zero=True)
    gen = torch.Generator().manual_seed(0)
    out = ls.sample(teacher, noise((20000, 3), seed=5), grid, solver, generator=gen, **opts)
    data = teacher.sample_data(20000, torch.Generator().manual_seed(1))
    assert (out.mean(0) - data.mean(0)).abs().max() < 0.05
    assert (out.T.cov() - data.T.cov()).abs().max() < 0.08
    again = ls.sample(teacher, noise((20000, 3), seed=5), grid, solver, generator=torch.Generator().manual_seed(0), **opts)
    torch.testing.assert_close(out, again, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("grid, match", [
    ([1.0, 0.5, 0.7, 0.1], "decrease strictly"),
    ([1.0, float("nan"), 0.1], "non-finite"),
    ([1.0, float("inf"), 0.1], "non-finite"),
    ([[1.0, 0.5]], "1-D"),
    ([1.0], "at least 2"),
])
def test_bad_grids_are_rejected(grid, match, teacher):
    with pytest.raises(ValueError, match=match):
        ls.sample(teacher, noise((2, 6)), torch.tensor(grid, dtype=F64))


@pytest.mark.parametrize("kwargs, match", [
    (dict(solver="dpm_solver++", order=4), "supports order"),
    (dict(solver="heun", order=1), "supports order"),
    (dict(solver="ipndm", order=4, steps=3), "needs at least 4 steps"),
    (dict(solver="unipc", order=3, steps=2), "needs at least 3 steps"),
    (dict(solver="dpm_solver_pp"), "unknown solver"),
    (dict(solver="unipc", etaa=1.0), "unknown option"),
    (dict(solver="deis", basis="t"), "basis='t' is not 'tab' or 'logrho' or 'rhoab'"),
    (dict(solver="er_sde", noise_scale="x3"), "noise_scale='x3' is not"),
    (dict(solver="dpm_solver", method="adaptive"), "method='adaptive' is not 'multistep' or 'singlestep'"),
    (dict(solver="unipc", variant="midpoint"), "variant='midpoint' is not 'bh1' or 'bh2'"),
    (dict(solver="euler", eta=1.5), "eta=1.5 is not a number in"),
    (dict(solver="unipc", corrector="yes"), "corrector='yes' is not true or false"),
    (dict(solver="dpm_solver", method="singlestep", plan=[2, 2]), "singlestep plan"),
])
def test_bad_solver_arguments_are_rejected(kwargs, match, teacher):
    steps = kwargs.pop("steps", 5)
    with pytest.raises(ValueError, match=match):
        ls.sample(teacher, noise((2, 6)), ls.grids.make("logsnr", steps, teacher.noise_schedule), **kwargs)


def test_evaluation_grid_must_match_the_grid(teacher):
    grid = ls.grids.make("logsnr", 5, teacher.noise_schedule)
    with pytest.raises(ValueError, match="evaluation grid has 5 times"):
        ls.sample(teacher, noise((2, 6)), grid, eval_grid=grid[:-1])


def test_solve_in_batches_is_solve_per_sample():
    """What LD3 and eval.py run a large teacher with: batches of any size give `solve`'s samples (float64, exact
    mixture: the same to rounding), conditions sliced with their samples, `then` applied per batch."""
    from learnsteps.core.sample import solve_in_batches

    teacher = toy_mixture()
    grid = ls.grids.make("logsnr", 5, teacher.noise_schedule)
    x_T = noise((7, *teacher.shape), seed=3) * teacher.noise_schedule.init_noise_std()
    whole = ls.solve(teacher, x_T, grid, "dpm_solver++", 2).x
    for size in (1, 3, 7, 50):
        got = solve_in_batches(teacher, x_T, size, grid=grid, solver="dpm_solver++", order=2, then=lambda x: 2 * x)
        torch.testing.assert_close(got, 2 * whole, rtol=1e-12, atol=1e-12)

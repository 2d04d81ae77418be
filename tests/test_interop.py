"""A schedule file run by its consumers as their users run them, against our core on the same noise (float64).

diffusers: `scheduler_for` (or `apply_schedule`) + the standard step loop started from `initial_sample`.
k-diffusion: its own samplers (`sample_euler`, `sample_heun`, `sample_dpmpp_2m`, ...), with its own
DiscreteEpsDDPMDenoiser around an epsilon network, started from `Schedule.x_tilde`.
Grids are irregular, learned-looking, with fractional DDPM times, with and without decoupled evaluation times.
"""
import numpy as np
import pytest
import torch

import learnsteps as ls
from learnsteps.core.denoiser import EpsilonNetwork, NetworkDenoiser
from learnsteps.core.schedules import DiscreteDDPM, FlowMatching, VPLinear
from learnsteps.schedule import Schedule, ScheduleError
from learnsteps.teachers.gmm import toy_mixture

from helpers import F64, noise, reexpressed

diffusers = pytest.importorskip("diffusers")
RTOL = 1e-5


def ddpm_teacher(betas="linear"):
    exact = toy_mixture(noise_schedule=DiscreteDDPM(betas))
    return NetworkDenoiser(EpsilonNetwork(exact), exact.noise_schedule, "epsilon")


def learned_looking(schedule, steps, to_zero, decoupled, seed=0, t_max=None):
    """An irregular grid (log-SNR spacing, each interior point moved by up to 15 % of its interval) and, if
    `decoupled`, interior evaluation times off the grid by up to 20 % of the shorter neighbouring interval."""
    gen = torch.Generator().manual_seed(seed)
    grid = ls.grids.make("logsnr", steps, schedule, to_zero=to_zero, t_max=t_max)
    lam = schedule.lambda_(grid[: len(grid) - to_zero])
    lam[0] = schedule.lambda_(torch.tensor(schedule.t_cap, dtype=F64))  # (a flow grid from t = 1 is spaced from there)
    lam[1:-1] += 0.3 * (torch.rand(len(lam) - 2, generator=gen, dtype=F64) - 0.5) * (lam[2:] - lam[:-2]) / 2
    grid[: len(lam)] = schedule.t_of_lambda(lam)
    grid[0], grid[len(lam) - 1] = schedule.t_max if t_max is None else t_max, schedule.t_min
    eval_grid = None
    if decoupled:
        eval_grid = grid.clone()
        gaps = torch.minimum(grid[:-2] - grid[1:-1], grid[1:-1] - grid[2:])  # around each interior point
        eval_grid[1:-1] += 0.4 * (torch.rand(steps - 1, generator=gen, dtype=F64) - 0.5) * gaps
    return grid, eval_grid


def relative_error(ours, theirs):
    return float((ours - theirs).norm() / theirs.norm())


# --------------------------------------------------------------------------------------------------- diffusers
DIFFUSERS = [
    ("dpm_solver++", 2, {}, True), ("dpm_solver++", 3, {}, False), ("dpm_solver++", 2, dict(variant="taylor"), True),
    ("dpm_solver", 2, {}, False), ("dpm_solver++", 3, dict(method="singlestep", variant="taylor"), True),
    ("dpm_solver++", 2, dict(method="singlestep"), False),
    ("unipc", 3, dict(variant="bh2"), True), ("unipc", 2, dict(variant="bh1"), False),
    ("deis", 3, dict(basis="logrho"), False), ("euler", 1, {}, True), ("euler", 1, {}, False),
    ("heun", 2, {}, True),
]


def run_documented_loop(scheduler, schedule, net, x_T):
    """docs/schedule-format.md's loop, word for word."""
    from learnsteps.interop.diffusers import initial_sample

    x = initial_sample(scheduler, schedule, x_T)
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)  # flow schedulers have none
    for t in scheduler.timesteps:
        x = scheduler.step(net(scale(x, t), t), t, x).prev_sample
    return schedule.from_x_tilde(x) if type(scheduler).__name__ in ("EulerDiscreteScheduler",
                                                                    "HeunDiscreteScheduler") else x


@pytest.mark.parametrize("decoupled", [False, True], ids=["grid", "decoupled"])
@pytest.mark.parametrize("solver, order, options, to_zero", DIFFUSERS, ids=str)
def test_diffusers_runs_a_schedule_file_like_our_core(tmp_path, solver, order, options, to_zero, decoupled):
    from learnsteps.interop.diffusers import scheduler_for
    from learnsteps.schedule import load_schedule, save_schedule

    teacher = ddpm_teacher()
    grid, eval_grid = learned_looking(teacher.noise_schedule, 7, to_zero, decoupled)
    path = save_schedule(tmp_path / "s.json", Schedule.from_grid(grid, teacher.noise_schedule, solver, order,
                                                                  eval_grid=eval_grid, options=options))
    schedule = load_schedule(path)
    x_T = noise((8, 6))
    net = lambda x, t: teacher(x, torch.as_tensor(t, dtype=F64).expand(len(x)))  # noqa: E731
    theirs = run_documented_loop(scheduler_for(schedule), schedule, net, x_T)
    ours = ls.sample(teacher, x_T, schedule.grid, solver, order, eval_grid=schedule.eval_grid, **schedule.options)
    assert relative_error(ours, theirs) <= RTOL


FLOW = [("euler", 1, {}, True), ("euler", 1, {}, False), ("dpm_solver++", 2, {}, True),
        ("dpm_solver++", 3, dict(variant="taylor"), False), ("unipc", 3, {}, True), ("unipc", 2, {}, False)]


@pytest.mark.parametrize("decoupled", [False, True], ids=["grid", "decoupled"])
@pytest.mark.parametrize("solver, order, options, to_zero", FLOW, ids=str)
def test_diffusers_flow_schedulers_run_a_flow_schedule_file_like_our_core(tmp_path, solver, order, options, to_zero,
                                                                          decoupled):
    """A schedule learned for a flow-matching (velocity) teacher, through the file and `scheduler_for`, in the
    documented loop with the model called at diffusers' timestep t * n, as an SD3 pipeline calls its transformer."""
    from learnsteps.interop.diffusers import scheduler_for
    from learnsteps.schedule import load_schedule, save_schedule

    teacher = reexpressed(toy_mixture(noise_schedule=FlowMatching(shift=3.0)), "flow")
    s = teacher.noise_schedule  # from t = 1, but diffusers' UniPC-3 from t_cap (below)
    grid, eval_grid = learned_looking(s, 7, to_zero, decoupled, t_max=s.t_cap if (solver, order) == ("unipc", 3) else None)
    path = save_schedule(tmp_path / "s.json", Schedule.from_grid(grid, teacher.noise_schedule, solver, order,
                                                                  eval_grid=eval_grid, options=options))
    schedule = load_schedule(path)
    x_T = noise((8, 6))
    net = lambda x, t: teacher(x, (torch.as_tensor(t, dtype=F64) / 1000).expand(len(x)))  # noqa: E731
    scheduler = scheduler_for(schedule)
    theirs = run_documented_loop(scheduler, schedule, net, x_T)
    ours = ls.sample(teacher, x_T * teacher.noise_schedule.init_noise_std(), schedule.grid, solver, order,
                     eval_grid=schedule.eval_grid, **schedule.options)
    # FlowMatchEuler and DPMSolverMultistep compute their step in float32 (tests/test_flow.py)
    assert relative_error(ours, theirs) <= (1e-12 if solver == "unipc" else 1e-6)
    assert schedule.to_dict()["diffusers_timesteps"] == [t * 1000 for t in schedule.eval_times[:-1]]


def test_diffusers_unipc_3_from_sigma_1_is_nan_and_refused():
    """diffusers' UniPC-3 from sigma = 1 (alpha = 0) solves a Vandermonde system with an infinite entry: NaN samples.
    Our core takes the limit there (tests/test_flow.py); the interop refuses to hand such a schedule to diffusers."""
    from learnsteps.interop.diffusers import apply_schedule, recipe, scheduler_for

    teacher = reexpressed(toy_mixture(noise_schedule=FlowMatching(shift=3.0)), "flow")
    s = teacher.noise_schedule
    grid, _ = learned_looking(s, 7, True, False)
    schedule = Schedule.from_grid(grid, s, "unipc", 3)
    with pytest.raises(ScheduleError, match="UniPC of order 3 .* returns NaN"):
        recipe(schedule)
    assert "returns NaN" in schedule.consumers()["diffusers"]["unsupported"]
    two = Schedule.from_grid(grid, s, "unipc", 2)
    net = lambda x, t: teacher(x, (torch.as_tensor(t, dtype=F64) / 1000).expand(len(x)))  # noqa: E731
    x_T = noise((4, 6))
    sched = diffusers.UniPCMultistepScheduler(**{**recipe(two)["config"], "solver_order": 3})  # what it would run
    theirs = run_documented_loop(apply_schedule(sched, two), schedule, net, x_T)
    assert torch.isnan(theirs).all() and torch.isfinite(ls.sample(teacher, x_T, grid, "unipc", 3)).all()
    torch.testing.assert_close(run_documented_loop(scheduler_for(two), two, net, x_T),
                               ls.sample(teacher, x_T, grid, "unipc", 2), rtol=1e-12, atol=1e-12)


def test_a_flow_schedule_is_refused_by_a_vp_scheduler_and_the_reverse():
    import diffusers

    from learnsteps.interop.diffusers import apply_schedule, recipe

    flow = Schedule.from_grid(ls.grids.make("shifted", 6, FlowMatching(shift=3.0)), FlowMatching(shift=3.0), "unipc", 2)
    with pytest.raises(ScheduleError, match="does not use flow-matching sigmas"):
        apply_schedule(diffusers.UniPCMultistepScheduler(), flow)
    s = DiscreteDDPM("linear")
    vp = Schedule.from_grid(ls.grids.make("logsnr", 6, s), s, "unipc", 2)
    with pytest.raises(ScheduleError, match="uses flow-matching sigmas"):
        apply_schedule(diffusers.FlowMatchEulerDiscreteScheduler(), vp)
    with pytest.raises(ScheduleError, match="no diffusers flow-matching scheduler implements deis"):
        recipe(Schedule.from_grid(flow.grid, FlowMatching(shift=3.0), "deis", 2))


def test_unipc_bh1_onto_sigma_zero_is_refused_with_one_line():
    from learnsteps.interop.diffusers import apply_schedule, scheduler_for

    teacher = ddpm_teacher()
    grid, _ = learned_looking(teacher.noise_schedule, 6, True, False)
    schedule = Schedule.from_grid(grid, teacher.noise_schedule, "unipc", 2, options=dict(variant="bh1"))
    for attempt in (lambda: scheduler_for(schedule),
                    lambda: apply_schedule(diffusers.UniPCMultistepScheduler(solver_type="bh1"), schedule)):
        with pytest.raises(ScheduleError, match="bh1 returns NaN on a step to sigma = 0") as err:
            attempt()
        assert "\n" not in str(err.value)
    assert schedule.consumers()["diffusers"]["unsupported"].startswith("diffusers' UniPC with variant bh1")


@pytest.mark.parametrize("betas", ["linear", "scaled_linear"])
def test_the_resolved_betas_reach_the_file_and_the_scheduler(tmp_path, betas):
    """A DDPM schedule built without beta_start/beta_end records the values it used, and the scheduler gets them:
    alphas_cumprod agree (diffusers' own defaults, 0.0001/0.02 for every kind, would be off by 0.15)."""
    from learnsteps.interop.diffusers import scheduler_for
    from learnsteps.schedule import load_schedule, save_schedule

    s = DiscreteDDPM(betas)
    path = save_schedule(tmp_path / "s.json", Schedule.from_grid(ls.grids.make("logsnr", 6, s), s, "unipc", 2))
    written = load_schedule(path).noise_schedule
    assert written["beta_start"] is not None and written["beta_end"] is not None
    sched = scheduler_for(load_schedule(path))
    assert (sched.config.beta_start, sched.config.beta_end) == (written["beta_start"], written["beta_end"])
    # what add_noise, img2img strength and a later set_timesteps read
    torch.testing.assert_close(sched.alphas_cumprod.to(F64), s.alphas_cumprod, rtol=1e-5, atol=1e-7)


def test_heun_into_sigma_min_is_refused_by_diffusers():
    """diffusers' Heun makes its last step Euler whatever sigma it ends at; ours (and k-diffusion's) only into 0."""
    from learnsteps.interop.diffusers import recipe

    teacher = ddpm_teacher()
    grid, _ = learned_looking(teacher.noise_schedule, 6, False, False)
    with pytest.raises(ScheduleError, match="Euler last step"):
        recipe(Schedule.from_grid(grid, teacher.noise_schedule, "heun", 2))


def test_solvers_diffusers_lacks_are_refused():
    from learnsteps.interop.diffusers import scheduler_for

    ddpm, vp = DiscreteDDPM(), VPLinear()
    with pytest.raises(ScheduleError, match="no diffusers scheduler implements ipndm"):
        scheduler_for(Schedule.from_grid(ls.grids.make("logsnr", 6, ddpm), ddpm, "ipndm", 4))
    with pytest.raises(ScheduleError, match="discrete DDPM"):
        scheduler_for(Schedule.from_grid(ls.grids.make("logsnr", 6, vp), vp, "unipc", 3))


def test_a_scheduler_with_other_betas_is_refused():
    from learnsteps.interop.diffusers import apply_schedule

    s = DiscreteDDPM("scaled_linear")
    schedule = Schedule.from_grid(ls.grids.make("logsnr", 6, s), s, "dpm_solver++", 2)
    with pytest.raises(ScheduleError, match="beta table"):
        apply_schedule(diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear"), schedule)


def test_initial_sample_is_our_start_and_init_noise_sigma_is_not():
    from learnsteps.interop.diffusers import initial_sample, scheduler_for

    s = DiscreteDDPM("scaled_linear")
    schedule = Schedule.from_grid(ls.grids.make("edm", 6, s, to_zero=True), s, "euler", 1)
    euler, x_T = scheduler_for(schedule), noise((4, 6))
    torch.testing.assert_close(initial_sample(euler, schedule, x_T), x_T / s.alpha(schedule.grid[0]))
    gap = float(euler.init_noise_sigma / (1 + float(schedule.sigmas[0]) ** 2) ** 0.5 - 1)
    assert abs(gap) > 1e-3  # Stable Diffusion's table: following init_noise_sigma would start 0.2 % off
    dpm = scheduler_for(Schedule.from_grid(schedule.grid, s, "dpm_solver++", 2))
    assert torch.equal(initial_sample(dpm, schedule, x_T), x_T)


def test_fractional_ddpm_times_follow_the_peers_sigma_to_t():
    """Our DDPM time of a sigma~ is diffusers' `_sigma_to_t` and k-diffusion's `sigma_to_t` (log sigma linear)."""
    K = pytest.importorskip("k_diffusion")
    s = DiscreteDDPM("scaled_linear")
    sig = torch.exp(torch.linspace(np.log(14.0), np.log(0.03), 41, dtype=F64))
    log_sigmas = (-s.lambda_(torch.arange(s.n, dtype=F64))).numpy()
    euler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear")
    theirs = torch.tensor(np.array([euler._sigma_to_t(x, log_sigmas) for x in sig.numpy()]), dtype=F64)
    torch.testing.assert_close(s.t_of_sigma_tilde(sig), theirs, rtol=1e-12, atol=1e-9)
    k = K.external.DiscreteEpsDDPMDenoiser(None, s.alphas_cumprod, quantize=False)
    torch.testing.assert_close(s.t_of_sigma_tilde(sig), k.sigma_to_t(sig), rtol=1e-12, atol=1e-9)


# ------------------------------------------------------------------------------------------------- k-diffusion
KDIFF = [  # solver, order, options, to_zero, the k-diffusion sampler it must run as
    ("euler", 1, {}, True, "sample_euler"), ("euler", 1, {}, False, "sample_euler"),
    ("heun", 2, {}, True, "sample_heun"), ("heun", 2, {}, False, "sample_heun"),
    ("dpm_solver++", 2, {}, True, "sample_dpmpp_2m"),
    ("dpm_solver++", 2, dict(lower_order_final=False), False, "sample_dpmpp_2m"),
    ("dpm_solver++", 2, dict(variant="taylor"), True, "sample_dpmpp_2m_sde"),
    ("dpm_solver++", 3, dict(variant="taylor", lower_order_final=False), True, "sample_dpmpp_3m_sde"),
    ("dpm_solver++", 3, dict(variant="taylor", lower_order_final=False), False, "sample_dpmpp_3m_sde"),
    ("deis", 3, dict(basis="rhoab", lower_order_final=False), False, "sample_lms"),
    ("deis", 4, dict(basis="rhoab", lower_order_final=False), False, "sample_lms"),
]


@pytest.mark.parametrize("solver, order, options, to_zero, sampler", KDIFF, ids=str)
def test_k_diffusion_runs_a_schedule_file_like_our_core(solver, order, options, to_zero, sampler):
    """The DDPM teacher's epsilon network in k-diffusion's own DiscreteEpsDDPMDenoiser, at fractional times."""
    K = pytest.importorskip("k_diffusion")
    from learnsteps.interop.k_diffusion import recipe

    teacher = ddpm_teacher("scaled_linear")
    grid, _ = learned_looking(teacher.noise_schedule, 9, to_zero, False, seed=3)
    schedule = Schedule.from_grid(grid, teacher.noise_schedule, solver, order, options=options)
    r = recipe(schedule)
    assert r["sampler"] == sampler
    model = K.external.DiscreteEpsDDPMDenoiser(teacher.net, teacher.noise_schedule.alphas_cumprod, quantize=False)
    x_T = noise((8, 6))
    sigmas = torch.tensor(schedule.sigmas, dtype=F64)
    theirs = getattr(K.sampling, sampler)(model, schedule.x_tilde(x_T), sigmas, disable=True, **r["kwargs"])
    ours = ls.sample(teacher, x_T, schedule.grid, solver, order, **schedule.options)
    assert relative_error(ours, schedule.from_x_tilde(theirs)) <= RTOL


@pytest.mark.parametrize("solver, order, options, to_zero, sampler", KDIFF[:8], ids=str)
def test_k_diffusion_runs_continuous_teachers_through_our_wrapper(solver, order, options, to_zero, sampler):
    pytest.importorskip("k_diffusion")
    from learnsteps.interop.k_diffusion import KDiffusionDenoiser, sample

    teacher = toy_mixture(noise_schedule=VPLinear())
    grid, _ = learned_looking(teacher.noise_schedule, 9, to_zero, False, seed=4)
    schedule = Schedule.from_grid(grid, teacher.noise_schedule, solver, order, options=options)
    x_T = noise((8, 6))
    theirs = sample(KDiffusionDenoiser(teacher), x_T, schedule)
    assert relative_error(ls.sample(teacher, x_T, schedule.grid, solver, order, **schedule.options), theirs) <= RTOL


@pytest.mark.parametrize("solver, order, options, to_zero, match", [
    ("dpm_solver++", 2, {}, False, "lower_order_final on 9 < 15 steps"),
    ("dpm_solver++", 3, dict(variant="taylor"), True, "lower_order_final on 9 < 15 steps"),
    ("dpm_solver++", 3, {}, True, "variant: taylor"),
    ("deis", 3, dict(basis="rhoab", lower_order_final=False), True, "end the grid at t_min"),
    ("unipc", 3, {}, True, "no k-diffusion sampler computes unipc"),
])
def test_k_diffusion_refusals_are_real(solver, order, options, to_zero, match):
    """Each refused case names why; where a sampler of the same family exists, running it anyway really differs."""
    K = pytest.importorskip("k_diffusion")
    from learnsteps.interop.k_diffusion import recipe

    teacher = ddpm_teacher("scaled_linear")
    grid, _ = learned_looking(teacher.noise_schedule, 9, to_zero, False, seed=3)
    schedule = Schedule.from_grid(grid, teacher.noise_schedule, solver, order, options=options)
    with pytest.raises(ScheduleError, match=match):
        recipe(schedule)
    nearest = {"dpm_solver++": "sample_dpmpp_2m" if order == 2 else "sample_dpmpp_3m_sde", "deis": "sample_lms"}
    if solver in nearest:
        model = K.external.DiscreteEpsDDPMDenoiser(teacher.net, teacher.noise_schedule.alphas_cumprod, quantize=False)
        kwargs = dict(order=order) if solver == "deis" else dict(eta=0.0) if order == 3 else {}
        theirs = getattr(K.sampling, nearest[solver])(model, schedule.x_tilde(noise((8, 6))),
                                                      torch.tensor(schedule.sigmas, dtype=F64), disable=True, **kwargs)
        ours = ls.sample(teacher, noise((8, 6)), schedule.grid, solver, order, **schedule.options)
        assert relative_error(ours, schedule.from_x_tilde(theirs)) > 10 * RTOL


def test_decoupled_schedules_are_refused_by_k_diffusion():
    from learnsteps.interop.k_diffusion import recipe

    s = VPLinear()
    grid, eval_grid = learned_looking(s, 6, True, True)
    with pytest.raises(ScheduleError, match="times of its own"):
        recipe(Schedule.from_grid(grid, s, "euler", 1, eval_grid=eval_grid))


# ------------------------------------------------------------------------------------------------------ export
def export_cli(path, *args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "learnsteps.schedule", "export", str(path), *args],
                          capture_output=True, text=True)


def test_export_prints_each_tool_its_form(tmp_path):
    from learnsteps.schedule import save_schedule

    s = DiscreteDDPM("scaled_linear")
    grid, _ = learned_looking(s, 6, True, False)
    schedule = Schedule.from_grid(grid, s, "dpm_solver++", 2)
    path = save_schedule(tmp_path / "s.json", schedule)
    parse = lambda out: [float(v) for v in out.strip().split(",")]  # noqa: E731
    for target, sampler in (("comfyui", "ComfyUI's dpmpp_2m"), ("sigmas", "k-diffusion's sample_dpmpp_2m")):
        run = export_cli(path, "--to", target)
        assert run.returncode == 0
        # the float32 values the UIs compute with (tests/test_comfyui.py: exactly those)
        torch.testing.assert_close(torch.tensor(parse(run.stdout)), torch.tensor(schedule.sigmas), rtol=1e-7, atol=0)
        assert f"exact with {sampler}" in run.stderr
    a1111 = export_cli(path, "--to", "a1111")
    assert parse(a1111.stdout) == parse(export_cli(path, "--to", "sigmas").stdout)[:-1]  # A1111 appends the 0
    diff = export_cli(path, "--to", "diffusers")
    assert diff.stdout.startswith("sigmas=[") and "\ntimesteps=[999, " in diff.stdout and "rounded by up to" in diff.stderr


def test_export_k_diffusion_snippet_runs_as_printed(tmp_path):
    """The printed k-diffusion code, executed as a user would paste it, reproduces our core."""
    K = pytest.importorskip("k_diffusion")
    from learnsteps.interop.export import export

    teacher = ddpm_teacher("scaled_linear")
    grid, _ = learned_looking(teacher.noise_schedule, 7, True, False, seed=5)
    schedule = Schedule.from_grid(grid, teacher.noise_schedule, "dpm_solver++", 2)
    code, _ = export(schedule, "k-diffusion")
    model = K.external.DiscreteEpsDDPMDenoiser(teacher.net, teacher.noise_schedule.alphas_cumprod, quantize=False)
    torch.manual_seed(0)
    x_T = torch.randn((8, 6), dtype=F64)
    torch.manual_seed(0)
    env = dict(torch=torch, k_diffusion=K, model=model, shape=(8, 6))
    torch.set_default_dtype(F64)
    try:
        exec(code, env)  # noqa: S102 - our own generated snippet
    finally:
        torch.set_default_dtype(torch.float32)
    assert relative_error(ls.sample(teacher, x_T, schedule.grid, "dpm_solver++", 2), env["x"]) <= RTOL


def test_export_steps_interpolates_and_says_so(tmp_path):
    from learnsteps.interop.export import export, resampled_sigmas

    s = DiscreteDDPM("scaled_linear")
    for to_zero in (True, False):
        grid, eval_grid = learned_looking(s, 6, to_zero, True)
        schedule = Schedule.from_grid(grid, s, "euler", 1, eval_grid=eval_grid)
        assert resampled_sigmas(schedule, 6) == schedule.sigmas
        ten = resampled_sigmas(schedule, 10)
        assert len(ten) == 11 and ten[0] == pytest.approx(schedule.sigmas[0]) and ten[-1] == schedule.sigmas[-1]
        assert all(b < a for a, b in zip(ten, ten[1:]))
        _, notes = export(schedule, "sigmas", steps=10)
        assert any(n.startswith("interpolated") for n in notes) and any("not exact" in n for n in notes)
        _, notes = export(schedule, "comfyui", steps=10)
        assert any(n.startswith("interpolated") for n in notes)
        assert any(n.startswith("no ComfyUI sampler reproduces it exactly") for n in notes)


def test_export_of_a_bad_file_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "bad.json").write_text("{")
    run = export_cli(tmp_path / "bad.json", "--to", "comfyui")
    assert run.returncode == 2 and run.stdout == "" and run.stderr.count("\n") == 1 and "not valid JSON" in run.stderr

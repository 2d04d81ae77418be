"""The generalized multistep solver: tables that reproduce the named solvers, gradients, the version-2 schedule
file with its reference sampler, and TabulatedScheduler in diffusers' loop and pipelines (float64 unless said)."""
import itertools
import json
import re
from pathlib import Path

import pytest
import torch

import learnsteps as ls
from learnsteps.core.sample import start_time
from learnsteps.core.schedules import EDM, DiscreteDDPM, FlowMatching, VPLinear
from learnsteps.core.steps import Grid
from learnsteps.core.tables import solver_table
from learnsteps.schedule import Schedule, ScheduleError, load_schedule, save_schedule
from learnsteps.teachers.gmm import toy_mixture

from helpers import noise

BASE = [("dpm_solver++", 2, {}, "data"), ("dpm_solver++", 3, {}, "data"), ("dpm_solver++", 2, dict(variant="taylor"), "data"),
        ("unipc", 2, {}, "data"), ("unipc", 3, {}, "data"), ("unipc", 2, dict(variant="bh1"), "data"),
        ("ipndm", 2, {}, "noise"), ("ipndm", 3, {}, "noise"), ("ipndm", 4, {}, "noise"), ("deis", 3, {}, "noise"),
        ("euler", 1, {}, "data"), ("dpm_solver", 2, {}, "noise")]
SCHEDULES = [VPLinear(), EDM(), FlowMatching(shift=3.0)]


def irregular(schedule, steps, to_zero, t_max=None):
    """A learned-looking grid (log-SNR spacing jittered) with decoupled model times."""
    g = ls.grids.make("logsnr", steps, schedule, to_zero=to_zero, t_max=t_max)
    lam = schedule.lambda_(g[:steps + 1 - to_zero])
    lam[0] = schedule.lambda_(torch.tensor(schedule.t_cap, dtype=torch.float64))  # (a flow grid from t = 1)
    jitter = torch.linspace(0, 1, len(lam), dtype=torch.float64).sin() * 0.3 * (lam[1] - lam[0])
    jitter[0] = jitter[-1] = 0
    t = torch.cat([schedule.t_of_lambda(lam + jitter), g[steps + 1 - to_zero:]])
    t[0] = g[0]
    e = t.clone()
    e[1:steps - to_zero] = schedule.t_of_lambda(schedule.lambda_(t[1:steps - to_zero]) + 0.1)
    return t, e


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.kind)
@pytest.mark.parametrize("to_zero", [False, True])
@pytest.mark.parametrize("case", BASE, ids=lambda c: f"{c[0]}-{c[1]}-{'-'.join(c[2].values())}")
def test_each_multistep_solver_is_a_table(schedule, to_zero, case):
    """The table found for a solver reproduces it, decoupled times included, to 1e-12 (relative to the largest
    state; a noise-form step on a flow grid works in x / alpha with alpha down to 1e-3, which that rounding scales)."""
    solver, order, opts, form = case
    teacher = toy_mixture(noise_schedule=schedule)
    t, e = irregular(schedule, 6, to_zero, t_max=start_time(schedule, solver, opts))  # flow: from t = 1 where it can
    x_T = noise((5, 6)) * schedule.init_noise_std()
    table = solver_table(solver, order, Grid(schedule, t, e), form, **opts)
    want = ls.solve(teacher, x_T, t, solver, order, eval_grid=e, return_trajectory=True, **opts).trajectory
    got = ls.solve(teacher, x_T, t, "tabulated", table.shape[1], eval_grid=e, coefficients=table, form=form,
                   return_trajectory=True).trajectory
    if solver == "unipc":  # its states between the ends are the corrected ones; the table's, where the model is called
        want, got = want[-1], got[-1]
    scale = want.abs().max() * (float(1 / schedule.alpha(t[0])) if form == "noise" else 1.0)
    assert float((got - want).abs().max()) <= 1e-12 * scale
    assert table.shape == (6, order + (solver == "unipc"))  # UniPC's corrector reaches one output further back
    future = torch.arange(table.shape[1])[None] > torch.arange(6)[:, None]
    assert torch.all(table[future] == 0)  # warm-up rows use only the outputs that exist


def test_first_order_rows_are_ddim():
    s = VPLinear()
    g = Grid(s, ls.grids.make("logsnr", 5, s))
    lam = torch.stack(g.lam)
    torch.testing.assert_close(solver_table("euler", 1, g, "data")[:, 0], -torch.expm1(lam[:-1] - lam[1:]))
    sig = torch.stack(g.sigma_tilde)
    torch.testing.assert_close(solver_table("euler", 1, g, "noise")[:, 0], sig[1:] - sig[:-1])


def test_heun_is_not_a_table_and_the_other_form_needs_the_whole_history():
    """Heun calls the model twice per step: refused. The noise form of a data-form solver (and vice versa) is still
    a table, since eps and x0 are linear in the state, but every past state brings its own outputs: N columns."""
    s = VPLinear()
    g = Grid(s, ls.grids.make("logsnr", 6, s))
    with pytest.raises(ValueError, match="not a multistep table"):
        solver_table("heun", 2, g, "data")
    assert solver_table("dpm_solver++", 2, g, "data").shape == (6, 2)
    assert solver_table("dpm_solver++", 2, g, "noise").shape == (6, 5)
    assert solver_table("ipndm", 4, g, "noise").shape == (6, 4)
    assert solver_table("ipndm", 4, g, "data").shape == (6, 6)
    with pytest.raises(ValueError, match="needs a table 6 outputs wide, not 4"):
        solver_table("ipndm", 4, g, "data", width=4)


@pytest.mark.parametrize("table, match", [
    ([[1.0, 0.0]] * 3, r"must be \(4, 2\)"), ([[1.0, 0.5]] + [[1.0, 0.0]] * 3, "not computed yet"),
    ([[float("nan"), 0.0]] + [[1.0, 0.0]] * 3, "finite numbers"), (None, "needs its coefficients")])
def test_bad_tables_are_refused(table, match):
    s = VPLinear()
    with pytest.raises(ValueError, match=match):
        ls.sample(toy_mixture(noise_schedule=s), noise((2, 6)), ls.grids.make("logsnr", 4, s), "tabulated", 2,
                  coefficients=table)


def test_a_table_beyond_the_coefficient_bound_is_refused_by_the_solver_itself():
    from learnsteps.core.solvers import MAX_COEFFICIENT

    s = VPLinear()
    grid = ls.grids.make("logsnr", 4, s)
    table = solver_table("dpm_solver++", 2, Grid(s, grid), "data")
    table[2, 1] = -1.01 * MAX_COEFFICIENT
    with pytest.raises(ValueError, match=r"coefficient c\[2\]\[1\] = -1.01e\+06 is beyond the bound of 1e\+06"):
        ls.sample(toy_mixture(noise_schedule=s), noise((2, 6)), grid, "tabulated", 2, coefficients=table)
    noise_table = solver_table("ipndm", 2, Grid(s, grid), "noise")  # in units of sigma~(times[0]) = 152
    noise_table[1, 0] = 100 * MAX_COEFFICIENT
    ls.sample(toy_mixture(noise_schedule=s), noise((2, 6)), grid, "tabulated", 2, coefficients=noise_table,
              form="noise")
    noise_table[1, 0] = 200 * MAX_COEFFICIENT
    with pytest.raises(ValueError, match=r"beyond the bound of 1e\+06 x sigma~\(times\[0\]\) = 1.52"):
        ls.sample(toy_mixture(noise_schedule=s), noise((2, 6)), grid, "tabulated", 2, coefficients=noise_table,
                  form="noise")


CORE_TABLES = [("dpm_solver++", 3, {}), ("unipc", 3, {}), ("unipc", 3, dict(variant="bh1")), ("deis", 3, {}),
               ("deis", 4, {}), ("ipndm", 4, {}), ("euler", 1, {})]


def largest_coefficients() -> dict[str, float]:
    """form -> the largest |c| / unit of the tables of CORE_TABLES on the five hand grids of the five noise schedules
    at NFE 3-50 (unit: 1 in the data form, sigma~(times[0]) in the noise form)."""
    from learnsteps.core.grids import applicable
    from learnsteps.core.schedules import make_schedule

    worst = dict(data=0.0, noise=0.0)
    for kind in ("vp_linear", "vp_cosine", "ddpm", "edm", "flow"):
        s = make_schedule(kind)
        for spacing in applicable(["time_uniform", "time_quadratic", "logsnr", "edm", "shifted"], s):
            for nfe in (3, 4, 6, 10, 20, 50):
                # (a flow grid from t_cap: not every core solver can start at t = 1)
                g = Grid(s, ls.grids.make(spacing, nfe, s, to_zero=True, t_max=s.t_cap))
                for (solver, order, options), form in itertools.product(CORE_TABLES, worst):
                    if nfe >= order:
                        unit = 1.0 if form == "data" else float(g.sigma[0] / g.alpha[0])
                        c = solver_table(solver, order, g, form, **options)
                        worst[form] = max(worst[form], float(c.abs().max()) / unit)
    return worst


def test_every_core_solvers_table_stays_far_below_the_coefficient_bound():
    """Measured: 1.15e4 in the data form (DEIS-4's data-form table on the EDM grid of a flow schedule at NFE 10; its
    narrowest form is the noise one), 40 in the noise form: the bound, 1e6, leaves a factor of 80 and more."""
    from learnsteps.core.solvers import MAX_COEFFICIENT

    worst = largest_coefficients()
    assert 1e4 < worst["data"] < MAX_COEFFICIENT / 50 and 10 < worst["noise"] < MAX_COEFFICIENT / 50, worst


def test_gradients_match_finite_differences():
    """d(sample)/d(coefficients) and d(sample)/d(grid), the base table found differentiably from the grid."""
    s = VPLinear()
    teacher = toy_mixture(noise_schedule=s)
    x_T = noise((2, 6))
    lam_ends = s.lambda_(torch.tensor([s.t_max, s.t_min], dtype=torch.float64))

    def run(inner, delta):
        lam = torch.cat([lam_ends[:1], inner, lam_ends[1:]])
        t = torch.cat([s.t_of_lambda(lam), torch.zeros(1, dtype=torch.float64)])
        table = solver_table("dpm_solver++", 3, Grid(s, t), "data") + delta
        return ls.sample(teacher, x_T, t, "tabulated", 3, coefficients=table)

    inner = torch.linspace(float(lam_ends[0]), float(lam_ends[1]), 5, dtype=torch.float64)[1:-1].requires_grad_()
    delta = (0.01 * noise((5, 3), seed=1)).tril().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: run(a, b.tril()), (inner, delta), eps=1e-6, atol=1e-6)


def learned_schedule(schedule, to_zero=True, steps=5, teacher=None):
    """A version-2 file's Schedule: UniPC-3's table on an irregular decoupled grid, perturbed as a learned one
    (teacher: the record of the teacher it was learned for)."""
    t, e = irregular(schedule, steps, to_zero)
    table = solver_table("unipc", 3, Grid(schedule, t, e), "data")
    table = table * (1 + 0.05 * noise(table.shape, seed=2)).tril()
    return Schedule.from_grid(t, schedule, "tabulated", table.shape[1], eval_grid=e, options=dict(form="data"),
                              coefficients=table, provenance=dict(method="ld3", base="unipc-3"), teacher=teacher)


def test_version_2_round_trip_and_version_1_stays(tmp_path):
    s = DiscreteDDPM()
    sched = learned_schedule(s)
    path = save_schedule(tmp_path / "learned.json", sched)
    raw = json.loads(path.read_text())
    assert raw["version"] == 2 and len(raw["coefficients"]) == 5 and raw["options"] == {"form": "data"}
    assert len(raw["alpha"]) == len(raw["sigma"]) == 6 and raw["sigma"][-1] == 0
    assert all("TabulatedScheduler" in raw["consumers"][k]["unsupported"] for k in ("diffusers", "k_diffusion"))
    back = load_schedule(path, solver="tabulated", nfe=5)
    assert back.coefficients == sched.coefficients and back.eval_times == sched.eval_times
    teacher = toy_mixture(noise_schedule=s)
    x_T = noise((3, 6))
    torch.testing.assert_close(ls.sample(teacher, x_T, back.grid, back.solver, back.order, eval_grid=back.eval_grid,
                                         **back.solver_options),
                               ls.sample(teacher, x_T, sched.grid, "tabulated", 4, eval_grid=sched.eval_grid,
                                         coefficients=sched.coefficients), rtol=0, atol=1e-14)
    plain = save_schedule(tmp_path / "plain.json", Schedule.from_grid(ls.grids.make("logsnr", 4, s), s, "unipc", 2))
    assert json.loads(plain.read_text())["version"] == 1 and load_schedule(plain).coefficients is None


@pytest.mark.parametrize("edit, match", [
    (dict(version=3), "versions 1, 2; the file was written by a newer learnsteps"),
    (dict(version=1), "needs version 2"),
    (dict(solver="unipc", order=3, options={}), "version 2 holds the solver 'tabulated'"),
    (dict(coefficients=[[1.0, 0.2, 0.0, 0.0]] * 5), "not computed yet"),
    (dict(coefficients=[[1.0, 0.0]] * 5), r"must be \(5, 4\)"),
    (dict(alpha=[1.0] * 6), "'alpha' disagree with 'times'"),
    (dict(coefficients="0.5"), "'coefficients' must be a list of rows")])
def test_bad_version_2_files_are_refused(tmp_path, edit, match):
    data = learned_schedule(DiscreteDDPM()).to_dict()
    data.update(edit)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ScheduleError, match=match):
        load_schedule(path)


def reference_sampler():
    """The code block of docs/schedule-format.md's reference sampler, run as a reader without learnsteps would."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "schedule-format.md").read_text()
    code = re.search(r"<!-- reference sampler -->\n```python\n(.*?)```", doc, re.S).group(1)
    assert "learnsteps" not in code
    namespace = {}
    exec(code, namespace)
    return namespace["sample"]


@pytest.mark.parametrize("schedule, prediction", [(DiscreteDDPM(), "epsilon"), (VPLinear(), "v"),
                                                  (FlowMatching(shift=3.0), "flow"), (EDM(), "x0")],
                         ids=lambda v: getattr(v, "kind", v))
def test_the_documented_reference_sampler_is_our_core(tmp_path, schedule, prediction):
    from helpers import reexpressed

    teacher = reexpressed(toy_mixture(noise_schedule=schedule), prediction)
    sched = learned_schedule(schedule, to_zero=schedule.kind != "edm")
    path = save_schedule(tmp_path / "s.json", sched)
    x_T = noise((4, 6)) * schedule.init_noise_std()
    ours = ls.sample(teacher, x_T, sched.grid, "tabulated", sched.order, eval_grid=sched.eval_grid, **sched.solver_options)
    net = {"v": "v", "flow": "flow", "x0": "x0"}.get(prediction, "epsilon")
    theirs = reference_sampler()(str(path), lambda x, t: teacher(x, torch.tensor(t, dtype=torch.float64)), x_T, net)
    assert float((theirs - ours).abs().max()) <= 1e-12 * float(ours.abs().max())


# ---------------------------------------------------------------------------------------------- diffusers
def diffusers_loop(scheduler, net, x):
    scheduler.set_timesteps(scheduler.num_inference_steps)
    for t in scheduler.timesteps:
        x = scheduler.step(net(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


@pytest.mark.parametrize("source", ["learned", "dpm_solver++-3", "unipc-2", "ipndm-4"])
def test_the_scheduler_runs_a_schedule_as_our_core_does(tmp_path, source):
    pytest.importorskip("diffusers")
    from learnsteps.core.denoiser import EpsilonNetwork
    from learnsteps.interop.scheduler import TabulatedScheduler

    from helpers import reexpressed

    s = DiscreteDDPM()
    teacher = reexpressed(toy_mixture(noise_schedule=s), "epsilon")  # natively epsilon, as the loop's network is
    if source == "learned":
        sched = learned_schedule(s, teacher=teacher.record())
    else:
        solver, order = source.rsplit("-", 1)
        t, e = irregular(s, 6, True)
        sched = Schedule.from_grid(t, s, solver, int(order), eval_grid=e, teacher=teacher.record())
    path = save_schedule(tmp_path / "s.json", sched)
    scheduler = TabulatedScheduler.from_schedule(path)
    x = noise((4, 6))
    ours = ls.sample(teacher, x, sched.grid, sched.solver, sched.order, eval_grid=sched.eval_grid, **sched.solver_options)
    theirs = diffusers_loop(scheduler, EpsilonNetwork(teacher), x * scheduler.init_noise_sigma)
    assert float((theirs - ours).norm() / ours.norm()) <= 1e-5
    # it saves and loads as diffusers schedulers do
    scheduler.save_pretrained(tmp_path / "scheduler")
    again = TabulatedScheduler.from_pretrained(tmp_path / "scheduler")
    torch.testing.assert_close(diffusers_loop(again, EpsilonNetwork(teacher), x), theirs, rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"num_inference_steps={len(sched.times) - 1}"):
        scheduler.set_timesteps(50)


def test_the_scheduler_refuses_what_it_cannot_run(tmp_path):
    pytest.importorskip("diffusers")
    from learnsteps.interop.scheduler import TabulatedScheduler

    s = DiscreteDDPM()
    with pytest.raises(ScheduleError, match="not a multistep table"):
        TabulatedScheduler.from_schedule(Schedule.from_grid(ls.grids.make("logsnr", 3, s, to_zero=True), s, "heun", 2))
    with pytest.raises(ScheduleError, match="DDPM or flow-matching"):
        TabulatedScheduler.from_schedule(learned_schedule(VPLinear()))


@pytest.mark.parametrize("name", ["sd", "sd_v", "sd3"])
def test_a_learned_solver_in_a_pipeline_gives_our_latents(tmp_path, name):
    """pipe.scheduler = TabulatedScheduler.from_schedule(path); pipe(latents=noise): the pipeline's latents are our
    core's from x_T = noise * std (float32), with the prediction type the file records (v for sd_v), whether the
    pipeline scales given latents by init_noise_sigma (StableDiffusionPipeline) or not (StableDiffusion3Pipeline)."""
    pytest.importorskip("transformers")
    import diffusers
    import tiny_pipelines

    from learnsteps.interop.scheduler import TabulatedScheduler
    from learnsteps.teachers import load_teacher

    build = {"sd": tiny_pipelines.stable_diffusion, "sd_v": tiny_pipelines.stable_diffusion, "sd3": tiny_pipelines.sd3}
    directory = build[name](tmp_path / name, **(dict(prediction_type="v_prediction") if name == "sd_v" else {}))
    prompts = ["a red dot", "two cats"]
    teacher = load_teacher(str(directory), conditions=prompts, guidance=4.0)
    s = teacher.noise_schedule
    sched = learned_schedule(s, steps=5, teacher=teacher.record())
    assert sched.teacher["prediction_type"] == {"sd": "epsilon", "sd_v": "v_prediction", "sd3": "flow_prediction"}[name]
    path = save_schedule(tmp_path / "s.json", sched)
    x = torch.randn(2, *teacher.shape, generator=torch.Generator().manual_seed(0))
    ours = ls.sample(teacher, x * s.init_noise_std(), sched.grid, "tabulated", sched.order, eval_grid=sched.eval_grid,
                     cond=torch.tensor([0, 1]), **sched.solver_options)
    pipe = diffusers.DiffusionPipeline.from_pretrained(directory, **({"text_encoder_3": None, "tokenizer_3": None}
                                                                     if name == "sd3" else {}))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = TabulatedScheduler.from_schedule(path)
    theirs = pipe(prompts, latents=x, guidance_scale=4.0, output_type="latent", height=8, width=8,
                  num_inference_steps=5).images
    assert float((theirs - ours).norm() / ours.norm()) <= 1e-5
    if name == "sd_v":  # the same file read as epsilon, as it was before the file recorded the type: far off
        with pytest.raises(ScheduleError, match="made for a v_prediction teacher, not epsilon"):
            TabulatedScheduler.from_schedule(path, prediction_type="epsilon")
        data = json.loads(path.read_text())
        del data["teacher"]["prediction_type"], data["sha256"]
        old = tmp_path / "old.json"
        old.write_text(json.dumps(data))
        with pytest.raises(ScheduleError, match="does not record its prediction type"):
            TabulatedScheduler.from_schedule(old)
        data["teacher"] = {}
        old.write_text(json.dumps(data))
        with pytest.warns(UserWarning, match="read as epsilon"):
            pipe.scheduler = TabulatedScheduler.from_schedule(old)
        wrong = pipe(prompts, latents=x, guidance_scale=4.0, output_type="latent", height=8, width=8,
                     num_inference_steps=5).images
        assert float((wrong - ours).norm() / ours.norm()) > 0.1

import json

import pytest
import torch

import learnsteps as ls
from learnsteps.core.schedules import DiscreteDDPM, VPLinear
from learnsteps.schedule import Schedule, ScheduleError, load_schedule, save_schedule

from helpers import F64


def baseline(nfe=6, solver="unipc", order=3, schedule=None, to_zero=False, **kw):
    s = schedule or VPLinear()
    grid = ls.grids.make("logsnr", nfe, s, to_zero=to_zero)
    return Schedule.from_grid(grid, s, solver, order, teacher=dict(fingerprint="abc"), provenance=dict(method="logsnr"),
                              **kw)


def test_round_trip(tmp_path):
    s = baseline(eval_grid=ls.grids.make("logsnr", 6, VPLinear()) * 0.99, options=dict(variant="bh1"))
    path = save_schedule(tmp_path / "s.json", s)
    again = load_schedule(path, solver="unipc", order=3, nfe=6)
    assert again.times == s.times and again.eval_times == s.eval_times and again.options == {
        "variant": "bh1", "corrector": True, "data": True, "lower_order_final": True}  # every setting, resolved
    data = json.loads(path.read_text())
    assert data["format"] == "learnsteps-schedule" and data["version"] == 1 and len(data["sigmas"]) == 7
    assert data["provenance"]["method"] == "logsnr" and "learnsteps_version" in data["provenance"]
    torch.testing.assert_close(torch.tensor(data["sigmas"], dtype=F64), VPLinear().sigma_tilde(s.grid))
    assert again.decoupled and not baseline().decoupled


def test_discrete_teachers_get_diffusers_timesteps(tmp_path):
    s = baseline(schedule=DiscreteDDPM(), to_zero=True)
    data = json.loads(save_schedule(tmp_path / "s.json", s).read_text())
    assert data["diffusers_timesteps"] == s.eval_times[:-1] and data["sigmas"][-1] == 0.0
    assert len(data["sigmas"]) == 7 and data["consumers"]["diffusers"]["scheduler"] == "UniPCMultistepScheduler"
    assert "no k-diffusion sampler computes unipc" in data["consumers"]["k_diffusion"]["unsupported"]


def write(tmp_path, **changes):
    data = baseline().to_dict()
    data.update(changes)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("changes, match", [
    (dict(format="ld3"), "unknown format"),
    (dict(teacher=dict(prediction_type="velocity")), "teacher.prediction_type 'velocity' is not one of"),
    (dict(version=3), "unsupported version 3"),
    (dict(version=2), "version 2 holds the solver .tabulated."),
    (dict(times=[1.0, 0.5, 0.6, 0.1, 0.05, 0.01, 0.001]), "decrease strictly"),
    (dict(times=[1.0, float("nan"), 0.3, 0.1, 0.05, 0.01, 0.001]), "NaN is not a JSON number"),
    (dict(times=[1.0, 1e300 * 1e10, 0.3, 0.1, 0.05, 0.01, 0.001]), "Infinity is not a JSON number"),
    (dict(times=[10**400, 0.5, 0.3, 0.1, 0.05, 0.01, 0.001]), "an integer of 401 digits"),
    (dict(times=[[[[1.0]]]] * 7), "'times' must be a list of numbers"),
    (dict(noise_schedule=dict(kind="vp_linear", beta_min="0.1")), "beta_min='0.1' must be a number"),
    (dict(noise_schedule=dict(kind="ddpm", n=10**7)), "n=10000000 must be an integer in"),
    (dict(noise_schedule=dict(kind=["vp_linear"])), "unknown noise schedule"),
    (dict(noise_schedule=dict(kind="edm", sigma_max=1e400 if False else -3.0)), "sigma_max=-3.0 must be"),
    (dict(eval_times=[1.0, 0.5, 0.0, 0.1, 0.05, 0.01, 0.001]), "reach the clean end"),
    (dict(options=dict(method=-1)), "unknown option"),
    (dict(times=[1.0 - k * 1e-4 for k in range(2000)]), "2000 values, more than"),
    (dict(times=[1.0, 0.5, 0.1, 0.01, 0.001]), "not the NFE 6"),
    (dict(eval_times=[1.0, 0.5]), "'eval_times' has 2 values"),
    (dict(order=4), "supports order"),
    (dict(solver="unipc_pp"), "unknown solver"),
    (dict(options=dict(etaa=1)), "unknown option"),
    (dict(options=dict(variant="tab")), "variant='tab' is not 'bh1' or 'bh2'"),
    (dict(options=dict(lower_order_final="yes")), "lower_order_final='yes' is not true or false"),
    (dict(options=dict(generator=None)), "'options' must be a JSON object"),
    (dict(options=[1]), "'options' must be a JSON object"),
    (dict(sigmas=[1.0] * 7), "disagree"),
    (dict(noise_schedule=dict(kind="vp_quadratic")), "unknown noise schedule"),
    (dict(nfe="6"), "'nfe' is missing"),
])
def test_bad_files_are_rejected_with_the_reason(tmp_path, changes, match):
    path = write(tmp_path, **changes)
    with pytest.raises(ScheduleError, match=match) as err:
        load_schedule(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


@pytest.mark.parametrize("text, match", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("[1, 2]", "not a JSON object"),
    ("{" + " " * (17 << 20) + "}", "more than any learnsteps file holds"),
    ("\xff\xfe{", "not valid|codec|decode|Expecting"),
    (json.dumps(baseline().to_dict()).replace('"nfe": 6', '"nfe": ' + "9" * 5000), "an integer of 5000 digits"),
])
def test_bytes_no_schedule_holds_fail_with_the_file_name(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    with pytest.raises(ScheduleError, match=match) as err:
        load_schedule(path)
    assert str(err.value).startswith(str(path))


def test_a_schedule_learnsteps_wrote_is_checksummed_and_a_change_is_caught(tmp_path):
    path = save_schedule(tmp_path / "s.json", baseline())
    data = json.loads(path.read_text())
    assert "sha256" in data
    data["times"][2] += 1e-3  # a plausible edit: still a valid grid
    path.write_text(json.dumps(data))
    with pytest.raises(ScheduleError, match="checksum mismatch"):
        load_schedule(path)
    del data["sha256"]  # a file written by hand (no checksum) is validated, not refused
    path.write_text(json.dumps(data))
    data.pop("sigmas")
    path.write_text(json.dumps(data))
    assert load_schedule(path).times == data["times"]


def test_a_schedule_of_another_noise_schedule_is_refused(tmp_path):
    from learnsteps.core.schedules import EDM

    path = save_schedule(tmp_path / "s.json", baseline())
    with pytest.raises(ScheduleError, match="not the teacher's EDM"):
        load_schedule(path, noise_schedule=EDM())


def test_caller_expectations_are_checked(tmp_path):
    path = save_schedule(tmp_path / "s.json", baseline())
    with pytest.raises(ScheduleError, match="made for solver 'unipc', not 'heun'"):
        load_schedule(path, solver="heun")
    with pytest.raises(ScheduleError, match="made for NFE 6, not 8"):
        load_schedule(path, nfe=8)
    with pytest.raises(ScheduleError, match="no such schedule file"):
        load_schedule(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ScheduleError, match="not valid JSON"):
        load_schedule(tmp_path / "junk.json")


def test_a_failed_save_leaves_the_previous_file(tmp_path):
    path = save_schedule(tmp_path / "s.json", baseline())
    before = path.read_text()
    bad = baseline()
    bad.times = bad.times[::-1]
    with pytest.raises(ScheduleError):
        save_schedule(path, bad)
    assert path.read_text() == before and not list(tmp_path.glob("*.tmp"))


# ---- fuzzing the loader: whatever the file holds, it loads as a usable schedule or fails with ScheduleError ------
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

JSON = st.recursive(st.none() | st.booleans() | st.integers(-10, 10) | st.floats(allow_nan=True) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
                    max_leaves=12)
KEYS = sorted(baseline().to_dict())
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def usable(sched: Schedule) -> None:
    """What a loaded schedule promises its samplers: sane fields, and our core runs it on a teacher of its noise
    schedule without an error (a NaN from an extreme but valid grid is allowed; an exception is not)."""
    from learnsteps.teachers.gmm import gaussian

    s = sched.make_noise_schedule()
    t = torch.tensor(sched.times, dtype=F64)
    assert len(t) >= 2 and torch.all(t[1:] < t[:-1]) and torch.isfinite(t).all()
    assert float(t[0]) <= s.t_max + 1e-9 and float(t[-1]) >= s.t_zero - 1e-9
    assert len(sched.eval_times) == len(t) and all(s.t_zero - 1e-9 <= e <= s.t_max + 1e-9 for e in sched.eval_times)
    assert sched.nfe >= 1 and isinstance(sched.options, dict) and isinstance(sched.teacher, dict)
    x = torch.randn(2, 2, dtype=F64) * s.init_noise_std()
    ls.sample(gaussian(dim=2, noise_schedule=s), x, sched.grid, sched.solver, sched.order, eval_grid=sched.eval_grid,
              **sched.solver_options)
    if sched.coefficients is not None and s.kind in ("ddpm", "flow"):  # and diffusers' loop takes its table
        from learnsteps.interop.scheduler import TabulatedScheduler

        TabulatedScheduler.from_schedule(sched)


def loads_usable_or_fails_cleanly(path, data) -> None:
    """`data` written to `path` either loads as a usable schedule or fails with ScheduleError (any other exception
    fails the test)."""
    path.write_text(json.dumps(data))
    try:
        sched = load_schedule(path)
    except ScheduleError:
        return
    usable(sched)


@FUZZ
@given(edits=st.dictionaries(st.sampled_from(KEYS + ["extra"]), JSON | st.just(None), max_size=3),
       drop=st.sets(st.sampled_from(KEYS), max_size=2))
def test_fuzzed_fields_load_as_usable_schedules_or_fail_with_schedule_error(tmp_path, edits, drop):
    data = {k: v for k, v in baseline().to_dict().items() if k not in drop}
    data.update(edits)
    loads_usable_or_fails_cleanly(tmp_path / "fuzz.json", data)


@FUZZ
@given(times=st.lists(st.floats(-0.5, 1.5, allow_nan=False), min_size=2, max_size=12),
       shift=st.floats(-0.2, 0.2))
def test_fuzzed_times_load_as_usable_schedules_or_fail_with_schedule_error(tmp_path, times, shift):
    data = baseline().to_dict()
    data.update(times=times, eval_times=[t + shift for t in times], nfe=len(times) - 1, order=1, solver="euler",
                options={})
    data.pop("sigmas")
    loads_usable_or_fails_cleanly(tmp_path / "fuzz.json", data)


NASTY = (st.integers(-10**60, 10**60) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=4)
         | st.sampled_from(["0.1", "-1", "", "tab", "bh1", "singlestep", None, True, [], {}, [[[[1]]]], 0, -1, 1e-300]))


@FUZZ
@given(where=st.sampled_from(["noise_schedule", "options", "times", "eval_times", "teacher", "provenance"]),
       key=st.sampled_from(["kind", "beta_min", "beta_max", "t_min", "t_max", "n", "betas", "beta_start", "s",
                            "sigma_min", "sigma_max", "variant", "method", "corrector", "data", "lower_order_final",
                            "plan", "basis", "eta", 0, 1, -1, 3]),
       value=NASTY, solver=st.sampled_from(["unipc", "dpm_solver++", "euler", "deis", "heun", "er_sde"]),
       kind=st.sampled_from(["vp_linear", "ddpm", "edm", "vp_cosine", "flow"]))
def test_structured_mutations_load_as_usable_schedules_or_fail_with_schedule_error(tmp_path, where, key, value,
                                                                                  solver, kind):
    """One field deep inside a valid file set to something nasty: any solver, any noise schedule."""
    from learnsteps.core.sample import start_time
    from learnsteps.core.schedules import make_schedule

    ns = make_schedule(kind)
    order = {"unipc": 2, "dpm_solver++": 2, "euler": 1, "deis": 2, "heun": 2, "er_sde": 2}[solver]
    grid = ls.grids.make("logsnr", 4, ns, to_zero=True, t_max=start_time(ns, solver))  # flow: t = 1 where it can
    data = Schedule.from_grid(grid, ns, solver, order).to_dict()
    target = data[where]
    if isinstance(target, dict) and isinstance(key, str):
        target[key] = value
    elif isinstance(target, list) and isinstance(key, int) and -len(target) <= key < len(target):
        target[key] = value
    else:
        data[where] = value
    loads_usable_or_fails_cleanly(tmp_path / "fuzz.json", data)


@FUZZ
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_fail_with_schedule_error(tmp_path, raw):
    path = tmp_path / "fuzz.json"
    path.write_bytes(raw)
    with pytest.raises(ScheduleError):
        load_schedule(path)


@FUZZ
@given(cuts=st.lists(st.integers(1, 1000), min_size=1, max_size=10, unique=True), to_zero=st.booleans())
def test_every_valid_grid_round_trips(tmp_path, cuts, to_zero):
    s = VPLinear()
    grid = s.t_max - (s.t_max - s.t_min) * torch.tensor(sorted([0, *cuts]), dtype=F64) / 1000
    if to_zero:
        grid = torch.cat([grid, torch.zeros(1, dtype=F64)])
    sched = Schedule.from_grid(grid, s, "euler", 1)
    again = load_schedule(save_schedule(tmp_path / "s.json", sched))
    usable(again)
    assert again.times == sched.times == grid.tolist() and again.nfe == len(grid) - 1


# ---- version 2: the coefficient table, alpha and sigma, the teacher's prediction type -----------------------------
def table_file(kind: str, solver: str, order: int) -> dict:
    """A valid version-2 file: `solver`'s narrowest table on a 5-step grid of the `kind` noise schedule."""
    from learnsteps.core.schedules import make_schedule
    from learnsteps.core.steps import Grid
    from learnsteps.core.tables import narrowest_table

    ns = make_schedule(kind)
    grid = ls.grids.make("shifted" if kind == "flow" else "logsnr", 5, ns, to_zero=True)
    table, form = narrowest_table(solver, order, Grid(ns, grid))
    return Schedule.from_grid(grid, ns, "tabulated", table.shape[1], options=dict(form=form), coefficients=table,
                              teacher=dict(prediction_type="epsilon")).to_dict()


TABLES = [table_file(*case) for case in [("ddpm", "dpm_solver++", 3), ("flow", "unipc", 2), ("vp_linear", "ipndm", 4),
                                         ("edm", "deis", 3), ("vp_cosine", "unipc", 3)]]
NUMBERS = (st.floats(allow_nan=False, allow_infinity=False) | st.integers(-10**40, 10**40)
           | st.sampled_from([1e6, 1e6 + 1, -1e7, 1e300, 1e308, -1e308, 5e-324, 0.0]))


@FUZZ
@given(base=st.integers(0, len(TABLES) - 1), where=st.sampled_from(["cell", "row", "alpha", "sigma", "prediction_type",
                                                                    "form", "coefficients", "order", "version"]),
       i=st.integers(0, 6), j=st.integers(0, 4), value=NUMBERS | NASTY)
def test_version_2_mutations_load_as_usable_tables_or_fail_with_schedule_error(tmp_path, base, where, i, j, value):
    """One value of a valid table file set to anything: a table cell (numbers of every size: the bound), a row,
    alpha or sigma, the teacher's prediction type, the table's form; loaded by the loader and TabulatedScheduler."""
    import copy

    data = copy.deepcopy(TABLES[base])
    rows = data["coefficients"]
    if where == "cell":
        rows[i % len(rows)][j % len(rows[0])] = value
    elif where == "row":
        rows[i % len(rows)] = value
    elif where in ("alpha", "sigma"):
        data[where][i % len(data[where])] = value
    elif where == "prediction_type":
        data["teacher"]["prediction_type"] = value
    elif where == "form":
        data["options"]["form"] = value
    else:
        data[where] = value
    loads_usable_or_fails_cleanly(tmp_path / "fuzz.json", data)


def test_a_table_at_the_bound_loads_and_one_beyond_is_refused(tmp_path):
    from learnsteps.core.solvers import MAX_COEFFICIENT

    for data in TABLES:
        scale = 1.0 if data["options"]["form"] == "data" else data["sigmas"][0]
        at = MAX_COEFFICIENT * scale * (1 - 1e-12)  # (sigmas[0] and the loader's sigma / alpha may differ by an ulp)
        data["coefficients"][-1][0] = at
        loads_usable_or_fails_cleanly(tmp_path / "at.json", data)
        assert load_schedule(tmp_path / "at.json").coefficients[-1][0] == at
        data["coefficients"][-1][0] = -MAX_COEFFICIENT * scale * (1 + 1e-9)
        (tmp_path / "beyond.json").write_text(json.dumps(data))
        with pytest.raises(ScheduleError, match=r"coefficient c\[4\]\[0\] = .* is beyond the bound of 1e\+06"):
            load_schedule(tmp_path / "beyond.json")


# ------------------------------------------------------------------------------ flow schedules from t = 1, old files
DATA = __import__("pathlib").Path(__file__).parent / "data"


def test_a_flow_schedule_from_t_1_round_trips_with_its_infinite_sigma_as_null(tmp_path):
    """A flow teacher's grid starts at t = 1 (alpha = 0), where sigma~ = sigma / alpha is infinite: JSON's null."""
    from learnsteps.core.schedules import FlowMatching
    from learnsteps.teachers.gmm import toy_mixture

    s = FlowMatching(shift=3.0)
    grid = ls.grids.make("shifted", 6, s, to_zero=True)
    eval_grid = grid.clone()
    eval_grid[1:-1] += 0.1 * (grid[2:] - grid[1:-1])
    sched = Schedule.from_grid(grid, s, "dpm_solver++", 3, eval_grid=eval_grid)
    path = save_schedule(tmp_path / "s.json", sched)
    data = json.loads(path.read_text())
    del data["sha256"]  # (edited below)
    assert data["times"][0] == data["eval_times"][0] == 1 and data["noise_schedule"]["t_max"] == 1
    assert data["sigmas"][0] is None and data["eval_sigmas"][0] is None and None not in data["sigmas"][1:]
    assert data["diffusers_timesteps"][0] == 1000 and "unsupported" in data["consumers"]["k_diffusion"]
    again = load_schedule(path, solver="dpm_solver++", nfe=6)
    assert again.times == sched.times and again.eval_times == sched.eval_times and again.sigmas[0] == float("inf")
    teacher = toy_mixture(noise_schedule=s)
    x_T = torch.randn(3, 6, dtype=F64)
    torch.testing.assert_close(ls.sample(teacher, x_T, **again.solve_kwargs),
                               ls.sample(teacher, x_T, grid, "dpm_solver++", 3, eval_grid=eval_grid), rtol=0, atol=0)
    for edit, match in [(dict(sigmas=[None] * 7), "'sigmas' disagree"),
                        (dict(solver="deis", order=2, options={}), "deis {} cannot start at t = 1.0"),
                        (dict(solver="heun", order=2, nfe=11, options={}), "heun {} cannot start at t = 1.0"),
                        (dict(options=dict(variant="bh1"), solver="unipc"), "cannot start at t = 1.0")]:
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(dict(data, **edit)))
        with pytest.raises(ScheduleError, match=match):
            load_schedule(bad)


@pytest.mark.parametrize("name", ["flow_v1_previous_release.json", "flow_v2_previous_release.json"])
def test_flow_files_of_the_previous_release_load_and_run(name):
    """Files written by the previous release (tests/data: DPM-Solver++(3M) and a UniPC-2 table, decoupled, from a
    tiny SD3 pipeline teacher), whose flow schedule ended at t_max = shift(1 - 1/n) < 1: they keep that schedule
    and run in the core on today's flow teacher (same time units) as they did, and in TabulatedScheduler."""
    from learnsteps.core.schedules import FlowMatching, shift_sigma
    from learnsteps.teachers.gmm import toy_mixture

    sched = load_schedule(DATA / name)
    old = sched.make_noise_schedule()
    assert old.config() == FlowMatching(shift=3.0, t_max=shift_sigma(0.999, 3.0)).config() and old.t_max < 1
    assert sched.times[0] == old.t_max and sched.decoupled and "prediction_type" not in sched.teacher
    from helpers import reexpressed

    # a velocity network, as the pipeline's (decoupled times read its output at the integration time)
    teacher = reexpressed(toy_mixture(noise_schedule=FlowMatching(shift=3.0)), "flow")  # t_max = 1 today
    x_T = torch.randn(3, 6, dtype=F64) * old.init_noise_std()
    then = ls.sample(reexpressed(toy_mixture(noise_schedule=old), "flow"), x_T, **sched.solve_kwargs)
    torch.testing.assert_close(ls.sample(teacher, x_T, **sched.solve_kwargs), then, rtol=0, atol=0)
    pytest.importorskip("diffusers")
    from learnsteps.interop.scheduler import TabulatedScheduler

    scheduler = TabulatedScheduler.from_schedule(DATA / name)  # a flow file: flow_prediction
    assert scheduler.init_noise_sigma == pytest.approx(old.t_max)
    x = x_T / old.init_noise_std() * scheduler.init_noise_sigma
    scheduler.set_timesteps(scheduler.num_inference_steps)
    for t in scheduler.timesteps:
        x = scheduler.step(teacher(x, (t / 1000).expand(len(x))), t, x).prev_sample
    torch.testing.assert_close(x, then, rtol=1e-12, atol=1e-12)

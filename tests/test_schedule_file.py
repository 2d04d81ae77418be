import json

import pytest
import torch

import learnsteps as ls
from learnsteps.core.denoiser import NetworkDenoiser
from learnsteps.core.schedules import DiscreteDDPM, VPLinear
from learnsteps.schedule import Schedule, ScheduleError, k_diffusion_sigmas, load_schedule, save_schedule
from learnsteps.teachers.gmm import toy_mixture

from helpers import F64, noise


def baseline(nfe=6, solver="unipc", order=3, schedule=None, to_zero=False, **kw):
    s = schedule or VPLinear()
    grid = ls.grids.make("logsnr", nfe, s, to_zero=to_zero)
    return Schedule.from_grid(grid, s, solver, order, teacher=dict(fingerprint="abc"), provenance=dict(method="logsnr"),
                              **kw)


def test_round_trip(tmp_path):
    s = baseline(eval_grid=ls.grids.make("logsnr", 6, VPLinear()) * 0.99, options=dict(variant="bh1"))
    path = save_schedule(tmp_path / "s.json", s)
    again = load_schedule(path, solver="unipc", order=3, nfe=6)
    assert again.times == s.times and again.eval_times == s.eval_times and again.options == {"variant": "bh1"}
    data = json.loads(path.read_text())
    assert data["format"] == "learnsteps-schedule" and data["version"] == 1 and len(data["sigmas"]) == 7
    assert data["provenance"]["method"] == "logsnr" and "learnsteps_version" in data["provenance"]
    torch.testing.assert_close(torch.tensor(data["sigmas"], dtype=F64), VPLinear().sigma_tilde(s.grid))
    assert again.decoupled and not baseline().decoupled


def test_discrete_teachers_get_diffusers_timesteps(tmp_path):
    s = baseline(schedule=DiscreteDDPM(), to_zero=True)
    data = json.loads(save_schedule(tmp_path / "s.json", s).read_text())
    assert data["diffusers_timesteps"] == s.eval_times[:-1] and data["sigmas"][-1] == 0.0
    assert k_diffusion_sigmas(s)[-1] == 0 and len(k_diffusion_sigmas(s)) == 7


def write(tmp_path, **changes):
    data = baseline().to_dict()
    data.update(changes)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("changes, match", [
    (dict(format="ld3"), "unknown format"),
    (dict(version=2), "unsupported version"),
    (dict(times=[1.0, 0.5, 0.6, 0.1, 0.05, 0.01, 0.001]), "decrease strictly"),
    (dict(times=[1.0, float("nan"), 0.3, 0.1, 0.05, 0.01, 0.001]), "non-finite"),
    (dict(times=[1.0, 0.5, 0.1, 0.01, 0.001]), "not the NFE 6"),
    (dict(eval_times=[1.0, 0.5]), "'eval_times' has 2 values"),
    (dict(order=4), "supports order"),
    (dict(solver="unipc_pp"), "unknown solver"),
    (dict(options=dict(etaa=1)), "not all options"),
    (dict(sigmas=[1.0] * 7), "disagree"),
    (dict(noise_schedule=dict(kind="vp_quadratic")), "unknown noise schedule"),
    (dict(nfe="6"), "'nfe' is missing"),
])
def test_bad_files_are_rejected_with_the_reason(tmp_path, changes, match):
    with pytest.raises(ScheduleError, match=match):
        load_schedule(write(tmp_path, **changes))


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


def test_k_diffusion_cannot_express_decoupled_times():
    s = baseline(eval_grid=ls.grids.make("logsnr", 6, VPLinear()) * 1.01)
    with pytest.raises(ScheduleError, match="k-diffusion"):
        k_diffusion_sigmas(s)


# ------------------------------------------------------------------------------------------- diffusers interop
diffusers = pytest.importorskip("diffusers")

INTEROP = [
    ("dpm_solver++", 2, {}, True), ("dpm_solver++", 3, {}, False), ("dpm_solver++", 2, dict(variant="taylor"), True),
    ("dpm_solver", 2, {}, False), ("dpm_solver++", 3, dict(method="singlestep", variant="taylor"), True),
    ("dpm_solver++", 2, dict(method="singlestep"), False),
    ("unipc", 3, dict(variant="bh2"), True), ("unipc", 2, dict(variant="bh1"), False),
    ("deis", 3, dict(basis="logrho"), False), ("euler", 1, {}, True), ("heun", 2, {}, True),
]


@pytest.mark.parametrize("solver, order, options, to_zero", INTEROP, ids=lambda v: str(v))
def test_diffusers_runs_an_exported_schedule_like_our_core(solver, order, options, to_zero):
    from learnsteps.interop.diffusers import scheduler_for

    # an epsilon-predicting network, as diffusers assumes (with decoupled times, the output type decides the sample)
    exact = toy_mixture(noise_schedule=DiscreteDDPM())
    s = exact.noise_schedule
    teacher = NetworkDenoiser(EpsNet(exact), s, "epsilon")
    steps = 7
    grid = ls.grids.make("time_quadratic", steps, s, to_zero=to_zero)
    # an uneven, "learned-looking" grid with decoupled evaluation times
    grid[1:-1 - to_zero] = grid[1:-1 - to_zero] * torch.linspace(0.97, 1.03, steps - 1 - to_zero, dtype=F64)
    eval_grid = grid.clone()
    eval_grid[1:steps] = eval_grid[1:steps] * 0.98
    schedule = Schedule.from_grid(grid, s, solver, order, eval_grid=eval_grid, options=options)
    sched = scheduler_for(schedule)
    x_T = noise((8, 6))
    x_tilde = solver in ("euler", "heun")
    x = x_T * sched.init_noise_sigma if x_tilde else x_T.clone()
    for t in sched.timesteps:
        eps = teacher.eps(sched.scale_model_input(x, t), torch.as_tensor(t, dtype=F64).expand(len(x)))
        x = sched.step(eps, t, x).prev_sample
    x_vp_T = x_T * sched.init_noise_sigma * s.alpha(grid[0]) if x_tilde else x_T
    ours = ls.sample(teacher, x_vp_T, schedule.grid, solver, order, eval_grid=schedule.eval_grid, **options)
    if x_tilde and not to_zero:
        x = x * s.alpha(grid[-1])
    assert float((ours - x).norm() / x.norm()) <= 1e-5


class EpsNet(torch.nn.Module):
    def __init__(self, exact):
        super().__init__()
        self.exact = exact

    def forward(self, x, t):
        return self.exact.eps(x, t)


def test_solvers_diffusers_lacks_are_refused():
    from learnsteps.interop.diffusers import scheduler_for

    with pytest.raises(ScheduleError, match="no diffusers scheduler implements ipndm"):
        scheduler_for(baseline(solver="ipndm", order=4, schedule=DiscreteDDPM()))
    with pytest.raises(ScheduleError, match="discrete DDPM"):
        scheduler_for(baseline())


# ---- fuzzing the loader: whatever the file holds, it loads as a usable schedule or fails with ScheduleError ------
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

JSON = st.recursive(st.none() | st.booleans() | st.integers(-10, 10) | st.floats(allow_nan=True) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
                    max_leaves=12)
KEYS = sorted(baseline().to_dict())
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def usable(sched: Schedule) -> None:
    """What a loaded schedule promises its samplers."""
    s = sched.make_noise_schedule()
    t = torch.tensor(sched.times, dtype=F64)
    assert len(t) >= 2 and torch.all(t[1:] < t[:-1]) and torch.isfinite(t).all()
    assert float(t[0]) <= s.t_max + 1e-9 and float(t[-1]) >= s.t_zero - 1e-9
    assert len(sched.eval_times) == len(t) and all(s.t_zero - 1e-9 <= e <= s.t_max + 1e-9 for e in sched.eval_times)
    assert sched.nfe >= 1 and isinstance(sched.options, dict) and isinstance(sched.teacher, dict)


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

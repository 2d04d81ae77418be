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
    (dict(version=2), "unsupported version"),
    (dict(times=[1.0, 0.5, 0.6, 0.1, 0.05, 0.01, 0.001]), "decrease strictly"),
    (dict(times=[1.0, float("nan"), 0.3, 0.1, 0.05, 0.01, 0.001]), "non-finite"),
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

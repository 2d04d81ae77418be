"""learnsteps in ComfyUI: the nodes' functions and the export, against what ComfyUI's own code did.

CI has no ComfyUI (no registry package carries its sampling code as a dependency a test can take). The
development check `python benchmarks/comfyui.py --comfyui-dir ... --record tests/fixtures/comfyui_conventions.json`
ran the nodes and the exported lists through a ComfyUI checkout (the commit is in the fixture) and recorded
ComfyUI's sigma tables, timestep rounding and noise scaling, and each run's file, sigmas, outputs and the timesteps
its network was called at (checksummed). Here tests/comfyui_standin.py is first checked against that record, then
the node functions run on it: they must give what ComfyUI gave, and our core's samples.
"""
import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import learnsteps as ls
from learnsteps.core.schedules import DiscreteDDPM, FlowMatching, VPLinear
from learnsteps.files import read_json, write_json
from learnsteps.interop.comfyui import comfy_sigmas, load_sigmas, model_fit, recipe
from learnsteps.interop.comfyui.sampler import exact_timesteps, sampler_function
from learnsteps.interop.export import export
from learnsteps.schedule import Schedule, ScheduleError, save_schedule, validate

import comfyui_standin as standin

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "comfyui_conventions.json"
REC = read_json(FIXTURE, checksum="required")
F32 = torch.float32


def _bench():
    spec = importlib.util.spec_from_file_location("comfyui_bench", ROOT / "benchmarks" / "comfyui.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _bench()  # the recorded runs' teacher (teacher_for) and network (TeacherNet), and ManualSigmas' pattern


def relative(ours, theirs) -> float:
    return float((theirs.double().flatten() - ours.flatten()).norm() / ours.norm())


def stand_in_model(schedule: Schedule):
    """The stand-in ComfyUI model of the file's type with the recorded runs' network (the exact mixture)."""
    ns = schedule.make_noise_schedule()
    flow = ns.kind == "flow"
    ms = standin.model_sampling(flow, **(dict(shift=ns.shift) if flow else {}))
    teacher = BENCH.teacher_for(ns)
    return standin.BaseModel(ms, BENCH.TeacherNet(teacher, flow)), teacher


def noise():
    return torch.tensor(REC["noise"], dtype=F32).reshape(REC["shape"])


def ours(schedule: Schedule, teacher):
    return ls.sample(teacher, noise().double() * teacher.noise_schedule.init_noise_std(), **schedule.solve_kwargs)


def cases(route):
    return [pytest.param(c, id=f"{c['name']}: {c['label']}") for c in REC["cases"] if c["route"] == route]


# ------------------------------------------------------------------------------------------------- the record
def test_the_record_is_checksummed_and_names_its_comfyui(tmp_path):
    assert REC["comfyui"]["repository"] == "Comfy-Org/ComfyUI" and len(REC["comfyui"]["commit"]) == 40
    bad = dict(REC, seed=REC["seed"] + 1)
    write_json(tmp_path / "f.json", REC)
    text = (tmp_path / "f.json").read_text().replace(f'"seed": {REC["seed"]}', f'"seed": {bad["seed"]}')
    (tmp_path / "f.json").write_text(text)
    with pytest.raises(ValueError, match="checksum"):
        read_json(tmp_path / "f.json", checksum="required")


def test_the_stand_in_has_comfyuis_discrete_sampling():
    rec, ms = REC["discrete"], standin.model_sampling(False)
    assert {"ModelSamplingDiscrete", "EPS"} <= set(rec["classes"])
    assert ms.sigmas.tolist() == rec["sigmas"]  # bit for bit: SD1's float32 table
    probes = torch.tensor(rec["probes"], dtype=F32)
    assert ms.timestep(probes).tolist() == rec["timestep"]  # rounded to whole timesteps
    assert [math.isclose(float(ms.sigma_max), p, rel_tol=1e-5) or p > float(ms.sigma_max)
            for p in rec["probes"][-3:]] == rec["max_denoise"]
    ones, zeros = torch.ones(2), torch.zeros(2)
    assert ms.noise_scaling(ms.sigmas[-1], ones, zeros, True).tolist() == rec["noise_scaling"][0]
    assert ms.noise_scaling(ms.sigmas[500], ones, zeros, False).tolist() == rec["noise_scaling"][1]
    # the nodes' patch gives the same fractional timesteps on the stand-in as on ComfyUI's own class
    torch.testing.assert_close(exact_timesteps(ms).timestep(probes), torch.tensor(rec["exact_timestep"]),
                               rtol=0, atol=1e-4)


def test_the_stand_in_has_comfyuis_flow_sampling():
    rec = REC["flow"]
    ms = standin.model_sampling(True, shift=rec["shift"], multiplier=rec["multiplier"])
    assert {"ModelSamplingDiscreteFlow", "CONST"} <= set(rec["classes"])
    assert float(ms.sigma_max) == rec["sigma_max"]
    torch.testing.assert_close(ms.timestep(torch.tensor(rec["probes"])), torch.tensor(rec["timestep"]))
    ones, zeros = torch.ones(2), torch.zeros(2)
    torch.testing.assert_close(ms.noise_scaling(torch.tensor(0.77), ones, zeros, True), torch.tensor(rec["noise_scaling"]))
    torch.testing.assert_close(ms.inverse_noise_scaling(torch.tensor(0.25), ones),
                               torch.tensor(rec["inverse_noise_scaling"]))
    assert exact_timesteps(ms) is ms  # flow models take t * multiplier as it is: nothing to patch


# ---------------------------------------------------------------------------------------------------- the nodes
@pytest.mark.parametrize("case", cases("node"))
def test_the_nodes_on_the_stand_in_give_what_comfyui_gave_and_our_core(tmp_path, case):
    """'Load learnsteps schedule' and 'learnsteps sampler' on the stand-in: the sigmas ComfyUI got, the timesteps its
    network was called at, its output (float32 rounding apart), and our core's samples at 1e-5 (exact timesteps)."""
    schedule = validate(REC["files"][case["file"]])
    path = save_schedule(tmp_path / "s.json", schedule)
    base, teacher = stand_in_model(schedule)
    sigmas, _ = load_sigmas(path, base.model_sampling)
    assert sigmas.tolist() == case["sigmas"]
    reports = []
    fn = sampler_function(schedule, exact=case["exact_timesteps"])
    out = standin.sample_custom(base, fn, noise(), sigmas, callback=reports.append)
    assert len(reports) == schedule.nfe and reports[-1]["i"] == len(schedule.times) - 2
    torch.testing.assert_close(torch.tensor([c[0] for c in base.net.calls]), torch.tensor(case["timesteps"]),
                               rtol=0, atol=1e-3)
    recorded = torch.tensor(case["output"])
    assert relative(recorded.double(), out) <= 1e-6
    err = relative(ours(schedule, teacher), out)
    assert err == pytest.approx(case["relative"], rel=0.05, abs=1e-7)
    fractional = not schedule.noise_schedule["kind"] == "flow" and any(t != round(t) for t in schedule.eval_times[:-1])
    if case["exact_timesteps"] or not fractional:
        assert err <= 1e-5
    else:  # ComfyUI's rounding to whole timesteps, which the node avoids by default
        assert err > 1e-4


@pytest.mark.parametrize("case", cases("pasted"))
def test_the_exported_list_pasted_into_comfyui_gave_our_core(case):
    """What `export --to comfyui` prints today is the list ComfyUI ran (read as ManualSigmas reads it), with the
    sampler and settings the export names, and ComfyUI's output was our core's: at 1e-5 where ComfyUI called the
    network at the list's own times (flow models, whole timesteps, or the 'learnsteps exact timesteps' node)."""
    schedule = validate(REC["files"][case["file"]])
    payload, notes = export(schedule, "comfyui")
    assert torch.FloatTensor([float(v) for v in re.findall(BENCH.MANUAL_SIGMAS, payload)]).tolist() == case["sigmas"]
    assert recipe(schedule) == case["recipe"]
    assert any(n.startswith(f"exact with ComfyUI's {case['recipe']['sampler']} ") for n in notes)
    _, teacher = stand_in_model(schedule)
    err = relative(ours(schedule, teacher), torch.tensor(case["output"]))
    assert err == pytest.approx(case["relative"], rel=0.05, abs=1e-7)
    flow = schedule.noise_schedule["kind"] == "flow"
    if flow or case.get("exact_timesteps") or all(t == round(t) for t in schedule.eval_times[:-1]):
        assert err <= 1e-5
    else:
        assert err > 1e-4 and any("round each sigma to a whole timestep" in n for n in notes)


@pytest.mark.parametrize("case", cases("other"))
def test_what_the_old_export_led_to_was_far_off(case):
    """The sigma/alpha list the export printed for flow models before, and dpmpp_2m on the t list: ComfyUI's result
    was nowhere near our core's (recorded), which is why the export now prints t and names dpmpp_2m_sde."""
    schedule = validate(REC["files"][case["file"]])
    _, teacher = stand_in_model(schedule)
    assert relative(ours(schedule, teacher), torch.tensor(case["output"])) > 0.1


def test_a_file_for_another_shift_is_refused_as_comfyui_refused_it(tmp_path):
    assert REC["refusals"], "the record holds the LD3 file's refusal on a model of another shift"
    for rec in REC["refusals"]:
        schedule = validate(REC["files"][rec["file"]])
        path = save_schedule(tmp_path / "s.json", schedule)
        with pytest.raises(ScheduleError) as err:
            load_sigmas(path, standin.model_sampling(True, shift=REC["flow"]["shift"]))
        assert str(err.value).replace(str(path), "FILE") == rec["error"]


def test_files_for_another_noise_schedule_are_refused_with_one_line():
    flow, ddpm = FlowMatching(shift=3.0), DiscreteDDPM("scaled_linear")
    f = Schedule.from_grid(ls.grids.make("shifted", 6, flow, to_zero=True), flow, "euler", 1)
    d = Schedule.from_grid(ls.grids.make("logsnr", 6, ddpm, to_zero=True), ddpm, "euler", 1)
    for schedule, ms, match in [
        (f, standin.model_sampling(True, shift=1.0), "shift 3; the connected model samples with shift 1"),
        (f, standin.model_sampling(True, shift=3.0, multiplier=1), "multiplies t by 1"),
        (f, standin.model_sampling(False), "made for a flow model; the connected model is not one"),
        (d, standin.model_sampling(True), "made for a discrete DDPM model"),
        (d, standin.model_sampling(False, beta_start=1e-4, beta_end=0.02), "sigma table differs by"),
        (d, standin.model_sampling(False, n=500), "has 500 steps"),
        (Schedule.from_grid(ls.grids.make("logsnr", 6, VPLinear()), VPLinear(), "euler", 1),
         standin.model_sampling(False), "ComfyUI's models sample discrete DDPM or flow"),
    ]:
        with pytest.raises(ScheduleError, match=match) as err:
            model_fit(schedule, ms)
        assert "\n" not in str(err.value)
    model_fit(f, standin.model_sampling(True, shift=3.0))
    model_fit(d, standin.model_sampling(False))

    class ModelSamplingFlux(standin.CONST):  # FLUX's: shift is mu, sigma = e^mu / (e^mu + 1/t - 1)
        def __init__(self, mu):
            self.shift = mu

    model_fit(f, ModelSamplingFlux(math.log(3.0)))
    with pytest.raises(ScheduleError, match="FLUX shift mu = 1.15"):
        model_fit(f, ModelSamplingFlux(1.15))


def test_the_sampler_runs_a_plain_file_on_other_sigmas_and_refuses_for_a_learned_table(tmp_path):
    """Re-spaced sigmas (the loader's steps > 0): the file's solver on them, with a warning; a learned table or
    LD3's evaluation times belong to the file's own grid and are refused."""
    ddpm = DiscreteDDPM("scaled_linear")
    plain = Schedule.from_grid(ls.grids.make("logsnr", 6, ddpm, to_zero=True), ddpm, "dpm_solver++", 2)
    base, teacher = stand_in_model(plain)
    sigmas, warnings = load_sigmas(save_schedule(tmp_path / "p.json", plain), base.model_sampling, steps=9)
    assert len(sigmas) == 10 and "not one learned for 9 steps" in warnings[0]
    told = []
    out = standin.sample_custom(base, sampler_function(plain, warn=told.append), noise(), sigmas)
    nine = Schedule.from_grid(ddpm.t_of_sigma_tilde(sigmas.double()), ddpm, "dpm_solver++", 2)
    assert relative(ours(nine, teacher), out) <= 1e-5 and "not what was learned" in told[0]
    grid = plain.grid
    learned = Schedule.from_grid(grid, ddpm, "tabulated", 2, options=dict(form="data"),
                                 coefficients=ls.core.tables.solver_table("dpm_solver++", 2, ls.core.steps.Grid(ddpm, grid)))
    with pytest.raises(ScheduleError, match="coefficient table belong to its own grid"):
        standin.sample_custom(base, sampler_function(learned), noise(), sigmas)


def test_exact_timesteps_invert_comfyuis_own_sigma_of_a_timestep():
    """The patch calls the network at the DDPM time whose sigma~ ComfyUI was given: log sigma~ linear between whole
    timesteps, ComfyUI's `sigma(timestep)` and our DDPM times' convention (float32 table: ~1e-4 steps)."""
    ms, ddpm = standin.model_sampling(False), DiscreteDDPM("scaled_linear")
    t = torch.tensor([998.7, 640.25, 371.5, 12.125, 0.5], dtype=torch.float64)
    torch.testing.assert_close(exact_timesteps(ms).timestep(ddpm.sigma_tilde(t).float()).double(), t, rtol=0, atol=2e-3)
    assert ms.timestep(ddpm.sigma_tilde(t).float()).tolist() == [999, 640, 372, 12, 0]  # what ComfyUI does itself


# --------------------------------------------------------------------------------------------------- the export
def test_the_export_prints_fixed_point_that_manualsigmas_reads_back_as_float32():
    """Scientific notation is misread by ManualSigmas ("1e-05" -> 1, -5); every list is fixed-point, each number the
    float32 of the schedule's value (at most 9 significant digits)."""
    tiny = FlowMatching(shift=0.05)  # t_min = 5e-5: printed as 5.0047e-05 before
    schedule = Schedule.from_grid(ls.grids.make("shifted", 8, tiny, to_zero=True), tiny, "euler", 1)
    for target in ("comfyui", "a1111", "sigmas"):
        payload, _ = export(schedule, target)
        assert "e" not in payload.lower()
        got = [float(v) for v in re.findall(BENCH.MANUAL_SIGMAS, payload)]
        values = comfy_sigmas(schedule)  # t: the flow models of ComfyUI, A1111, Forge, stable-diffusion.cpp
        want = torch.tensor(values[:-1] if target == "a1111" else values, dtype=F32).tolist()
        assert torch.tensor(got, dtype=F32).tolist() == want and got == [float(v) for v in payload.split(",")]
        assert max(len(v.strip().lstrip("0.").replace(".", "")) for v in payload.split(",")) <= 9


def test_the_export_gives_flow_files_in_t_with_the_sampler_that_runs_them():
    flow = FlowMatching(shift=3.0)
    grid = ls.grids.make("shifted", 6, flow, to_zero=True, t_max=flow.t_cap)  # (from t = 1: the test below)
    dpm = Schedule.from_grid(grid, flow, "dpm_solver++", 2)
    payload, notes = export(dpm, "comfyui")
    assert torch.tensor([float(v) for v in payload.split(",")], dtype=F32).tolist() == \
        torch.tensor(dpm.times, dtype=F32).tolist()  # t, not t/(1 - t)
    assert "exact with ComfyUI's dpmpp_2m_sde (SamplerDPMPP_2M_SDE: eta 0, solver_type midpoint)" in notes[1]
    taylor = Schedule.from_grid(grid, flow, "dpm_solver++", 2, options=dict(variant="taylor"))
    assert recipe(taylor)["kwargs"] == dict(eta=0.0, solver_type="heun")
    for solver, order in (("heun", 2), ("unipc", 2)):
        _, notes = export(Schedule.from_grid(grid, flow, solver, order), "comfyui")
        assert notes[1].startswith("no ComfyUI sampler reproduces it exactly") and "'learnsteps sampler' node" in notes[1]
    a1111, notes = export(dpm, "a1111")
    assert a1111 == payload.rsplit(", ", 1)[0] and "not in the flow's log-SNR" in notes[-2]


def test_a_flow_file_from_t_1_exports_its_t_and_only_euler_is_called_exact():
    """ComfyUI takes t = 1 as a flow model's sigma; its Euler step from there is the flow Euler step, but its
    multistep samplers first move a sigma of 1 to percent_to_sigma(1e-4) (offset_first_sigma_for_snr)."""
    flow = FlowMatching(shift=3.0)
    grid = ls.grids.make("shifted", 6, flow, to_zero=True)
    assert grid[0] == 1
    euler = Schedule.from_grid(grid, flow, "euler", 1)
    payload, notes = export(euler, "comfyui")
    assert [float(v) for v in payload.split(",")][0] == 1.0 and "exact with ComfyUI's euler" in notes[1]
    payload, notes = export(Schedule.from_grid(grid, flow, "dpm_solver++", 2), "comfyui")
    assert payload.startswith("1, ") and "offset_first_sigma_for_snr" in notes[1] and "'learnsteps sampler'" in notes[1]
    for target in ("k-diffusion", "diffusers"):
        with pytest.raises(ScheduleError, match="infinite"):
            export(euler, target)
    with pytest.raises(ScheduleError, match="--steps"):
        export(euler, "comfyui", steps=4)


def test_the_export_says_which_files_only_the_node_runs():
    ddpm = DiscreteDDPM("scaled_linear")
    grid = ls.grids.make("logsnr", 6, ddpm, to_zero=True)
    eval_grid = grid.clone()
    eval_grid[1:-1] += 0.3
    decoupled = Schedule.from_grid(grid, ddpm, "euler", 1, eval_grid=eval_grid)
    for schedule in (decoupled, Schedule.from_grid(grid, ddpm, "tabulated", 1, options=dict(form="data"),
                                                   coefficients=[[0.5]] * 6)):
        assert "'learnsteps sampler' node" in schedule.consumers()["comfyui"]["unsupported"]
    late = Schedule.from_grid(torch.cat([grid[1:-1], grid[-1:]]), ddpm, "euler", 1)  # starts below sigma_max
    _, notes = export(late, "comfyui")
    assert any("ComfyUI starts from noise * sigmas[0]" in n for n in notes)


# ------------------------------------------------------------------------------------------------- installing
def test_install_writes_the_custom_node_folder_and_refuses_a_non_comfyui_folder(tmp_path):
    (tmp_path / "ComfyUI" / "comfy").mkdir(parents=True)
    (tmp_path / "ComfyUI" / "custom_nodes").mkdir()
    run = lambda d: subprocess.run([sys.executable, "-m", "learnsteps.interop.comfyui", "install", str(d)],  # noqa: E731
                                   capture_output=True, text=True)
    ok = run(tmp_path / "ComfyUI")
    assert ok.returncode == 0, ok.stderr
    shim = (tmp_path / "ComfyUI" / "custom_nodes" / "learnsteps" / "__init__.py").read_text()
    assert "from learnsteps.interop.comfyui.nodes import comfy_entrypoint" in shim
    bad = run(tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    assert not (tmp_path / "custom_nodes").exists()

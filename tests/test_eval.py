import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import learnsteps as ls
from learnsteps.config import SolverChoice
from learnsteps.eval.evaluate import EvalConfig, evaluate
from learnsteps.quality.metrics import Features, cache_dir, fid_kid, reference_features
from learnsteps.schedule import Schedule, save_schedule
from learnsteps.teachers.gmm import digits_data, gmm_digits

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def features():
    return Features("digits")


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(features):
    data = digits_data(torch.float32)
    f = features(data)
    assert abs(fid_kid(f, f)["fid"]) < 1e-6
    g = torch.Generator().manual_seed(0)
    fids = [fid_kid(features(data + s * torch.randn(data.shape, generator=g)), f)["fid"] for s in (0.05, 0.1, 0.2, 0.4)]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert fids[0] < 1 < fids[-1]
    assert fid_kid(f, f)["precision"] == 1.0 and fid_kid(f, f)["recall"] == 1.0


def test_reference_features_are_cached_by_data_and_extractor(features, tmp_path, monkeypatch):
    monkeypatch.setenv("LEARNSTEPS_CACHE", str(tmp_path))
    a = reference_features("digits", features)
    files = list(cache_dir().glob("digits-digits-*.safetensors"))
    assert len(files) == 1 and features.fingerprint[:16] in files[0].name
    torch.testing.assert_close(reference_features("digits", features), a)
    with pytest.raises(ValueError, match="unknown reference data set"):
        reference_features("cifar10", features)


def test_inception_without_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="Inception-v3 feature extractor needs its weights"):
        Features("inception")


def test_eval_end_to_end_with_a_schedule_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LEARNSTEPS_CACHE", str(tmp_path / "cache"))
    teacher = gmm_digits()
    s = teacher.noise_schedule
    grid = ls.grids.make("time_quadratic", 3, s, to_zero=True)
    path = save_schedule(tmp_path / "learned.json", Schedule.from_grid(
        grid, s, "unipc", 2, teacher=dict(fingerprint=teacher.fingerprint())))
    # the same solver as a learned-solver file (version 2): UniPC-2's own table on that grid
    from learnsteps.core.steps import Grid
    from learnsteps.core.tables import solver_table

    table = solver_table("unipc", 2, Grid(s, grid), "data")
    tabulated = save_schedule(tmp_path / "table.json", Schedule.from_grid(
        grid, s, "tabulated", table.shape[1], options=dict(form="data"), coefficients=table,
        teacher=dict(fingerprint=teacher.fingerprint())))
    cfg = EvalConfig(teachers=["gmm_digits"], solvers=[SolverChoice("dpm_solver++", 2), SolverChoice("euler", 1)],
                     grids=["logsnr", "edm"], nfe=[3, 4], samples=64, batch_size=64, teacher_steps=10,
                     schedules=[str(path), str(tabulated)], out_dir=str(tmp_path / "out"))
    rows = evaluate(cfg)
    assert len(rows) == 2 + 2 * 2 * 2 + 2  # teacher, floor, solvers x grids x NFE, the schedule files
    learned = [r for r in rows if r["grid"].endswith("/learned.json")]
    assert learned[0]["solver"] == "unipc-2" and learned[0]["nfe"] == 3
    table_row = [r for r in rows if r["grid"].endswith("/table.json")][0]
    assert table_row["solver"] == f"tabulated-{table.shape[1]}" and table_row["nfe"] == 3
    assert table_row["rmse_teacher"] == pytest.approx(learned[0]["rmse_teacher"], rel=1e-9)
    # the teacher against itself: 0 up to the rounding of a rank-deficient covariance (64 samples, 128 features)
    assert rows[0]["fid_teacher"] == pytest.approx(0, abs=1e-3) and rows[0]["grid"] == "teacher"
    with open(tmp_path / "out" / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp_path / "out" / "fid_vs_nfe.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "samples_nfe3.png").is_file()


def test_eval_of_a_dsno_checkpoint(tmp_path, monkeypatch):
    from learnsteps.dsno.module import DSNOConfig, make_student
    from learnsteps.dsno.student import save_student

    monkeypatch.setenv("LEARNSTEPS_CACHE", str(tmp_path / "cache"))
    teacher = gmm_digits()
    cfg = DSNOConfig(teacher="gmm_digits", output_times=[0.5, 0.1, 0.0])
    cfg.unet.channels = 8
    student = make_student(cfg, teacher, torch.tensor(cfg.output_times, dtype=torch.float64))
    save_student(tmp_path / "student", student, dict(teacher=dict(fingerprint=teacher.fingerprint(), name="gmm")))
    cfg = EvalConfig(teachers=["gmm_digits"], solvers=[], grids=[], nfe=[], samples=32, batch_size=32, teacher_steps=5,
                     students=[str(tmp_path / "student")], out_dir=str(tmp_path / "out"))
    rows = evaluate(cfg)
    assert [r["grid"] for r in rows][:2] == ["teacher", "floor (teacher, other noise)"]
    assert rows[-1]["grid"].endswith("/student")
    assert rows[-1]["solver"] == "dsno-M3" and rows[-1]["nfe"] == 1 and math.isfinite(rows[-1]["fid_data"])


def test_a_schedule_of_another_teacher_is_refused(tmp_path):
    s = gmm_digits().noise_schedule
    path = save_schedule(tmp_path / "x.json", Schedule.from_grid(ls.grids.make("logsnr", 3, s), s, "unipc", 2,
                                                                teacher=dict(fingerprint="0" * 64)))
    res = subprocess.run([sys.executable, str(ROOT / "eval.py"), "teachers=[gmm_digits]", f"schedules=[{path}]",
                          "samples=8", f"out_dir={tmp_path / 'o'}"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "made for another teacher" in res.stderr


def test_schedules_in_same_named_folders_get_distinct_labels():
    from learnsteps.eval.evaluate import short_labels

    paths = ["runs/a/bare/nfe4/schedule.json", "runs/a/full/nfe4/schedule.json", "runs/a/full/nfe6/schedule.json"]
    assert short_labels(paths) == {p: "/".join(p.split("/")[-3:]) for p in paths}
    assert short_labels(["x/nfe4/schedule.json"]) == {"x/nfe4/schedule.json": "nfe4/schedule.json"}
    assert short_labels(["s.json", "./s.json"]) == {"s.json": "s.json", "./s.json": "./s.json"}


def test_a_flow_teachers_hand_grids_start_where_each_solver_can():
    """On a flow teacher (t_max = 1, alpha = 0) the default solvers' hand grids start at 1 where the solver can start
    there (DPM-Solver++) and at t_cap where it cannot (iPNDM; UniPC bh1 with its corrector), and they all sample."""
    from learnsteps.core.schedules import FlowMatching
    from learnsteps.eval.evaluate import entries
    from learnsteps.teachers.gmm import toy_mixture

    teacher = toy_mixture(noise_schedule=FlowMatching(shift=3.0))
    s = teacher.noise_schedule
    cfg = EvalConfig(nfe=[4], grids=["logsnr", "shifted"])
    starts = {}
    for kind, case, nfe, grid, eval_grid in entries(cfg, teacher):
        starts[case.solver] = float(grid[0])
        assert torch.isfinite(ls.sample(teacher, torch.randn(2, 6, dtype=torch.float64), grid, case.solver,
                                        case.order, **case.options)).all()
    assert starts == {"dpm_solver++": 1.0, "unipc": s.t_cap, "ipndm": s.t_cap}

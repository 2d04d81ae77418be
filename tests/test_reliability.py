"""Reliability, round two: every bad input is one line on stderr, exit code 2, and nothing written; every artifact
is checksummed and every reader verifies it; a NaN's advice works; one run per run directory."""
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from learnsteps.cli import eval_main, train_main

from helpers import Linear
from learnsteps.training.common import (CheckpointError, NonFiniteLoss, RunConfig, RunDirError, fit, make_trainer,
                                        prepare_run)

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "learnsteps" / "assets"
QUIET = ["trainer.progress_bar=false", "wandb.mode=disabled"]


def snapshot(root: Path) -> set:
    return {(str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")}


def files(tmp_path: Path) -> dict:
    """Paths the bad inputs point at: a plain file, a directory that is no teacher, a DSNO data dir with a bad
    manifest, a binary prompt file, and checksummed schedule files that are wrong inside (for digits_unet: options
    holding "options", a coefficient of 1e308; one learned for gmm_digits)."""
    from learnsteps.files import write_json

    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "not_a_teacher").mkdir()
    (tmp_path / "not_a_teacher" / "readme.txt").write_text("hello")
    bad = tmp_path / "bad_data"
    bad.mkdir()
    (bad / "manifest.json").write_text('{"format": "learnsteps-trajectories", "output_times": [1, ')
    (tmp_path / "prompts.bin").write_bytes(b"\xff\xfe\x00a red dot\n")
    paths = dict(file=tmp_path / "a_file", notteacher=tmp_path / "not_a_teacher", baddata=bad,
                 binprompts=tmp_path / "prompts.bin")
    for name, data in schedule_files().items():
        paths[name] = write_json(tmp_path / f"{name}.json", data)
    return paths


@functools.lru_cache(maxsize=None)
def _schedule_files() -> str:
    import learnsteps as ls
    from learnsteps.core.steps import Grid
    from learnsteps.core.tables import narrowest_table
    from learnsteps.schedule import Schedule
    from learnsteps.teachers import load_teacher

    unet, gmm = load_teacher("digits_unet"), load_teacher("gmm_digits")
    s = unet.noise_schedule
    grid = ls.grids.make("logsnr", 6, s, to_zero=True)
    optnull = Schedule.from_grid(grid, s, "dpm_solver++", 3, teacher=dict(fingerprint=unet.fingerprint())).to_dict()
    optnull["options"]["options"] = None
    table, form = narrowest_table("dpm_solver++", 3, Grid(s, grid))
    bigcoef = Schedule.from_grid(grid, s, "tabulated", table.shape[1], options=dict(form=form), coefficients=table,
                                 teacher=dict(fingerprint=unet.fingerprint())).to_dict()
    bigcoef["coefficients"][2][0] = 1e308
    gmmschedule = Schedule.from_grid(grid, s, "dpm_solver++", 3, teacher=dict(fingerprint=gmm.fingerprint(),
                                                                             name="gmm_digits")).to_dict()
    return json.dumps(dict(optnull=optnull, bigcoef=bigcoef, gmmschedule=gmmschedule))


def schedule_files() -> dict:
    return {k: {f: v for f, v in d.items() if f != "sha256"} for k, d in json.loads(_schedule_files()).items()}


def fill(args: list[str], paths: dict) -> list[str]:
    """The arguments with {name} replaced by the path of that name (other braces, e.g. YAML maps, left alone)."""
    out = []
    for a in args:
        for name, path in paths.items():
            a = a.replace("{" + name + "}", str(path))
        out.append(a)
    return out


TRAIN_CASES = {  # args -> a fragment of the one line on stderr (the case's own arguments come last and win)
    "ld3 batch_size=0": (["mode=ld3", "batch_size=0"], "batch_size=0: must be a number >= 1"),
    "run_dir is a file": (["mode=ld3", "run_dir={file}"], "is an existing file"),
    "pairs.directory is a file": (["mode=ld3", "pairs.directory={file}"], "pairs.directory="),
    "accelerator=tpu": (["mode=ld3", "trainer.accelerator=tpu"], "trainer.accelerator='tpu': must be one of"),
    "spec.n=0": (["mode=trajectories", "spec.n=0"], "spec.n=0"),
    "spec.n=-5": (["mode=trajectories", "spec.n=-5"], "spec.n=-5"),
    "spec.shard_size=0": (["mode=trajectories", "spec.shard_size=0"], "spec.shard_size=0"),
    "spec.dtype=int8": (["mode=trajectories", "spec.dtype=int8", "out_dir={out}"], "spec.dtype='int8'"),
    "out_dir is a file": (["mode=trajectories", "out_dir={file}"], "is an existing file"),
    "unet.channels=-1": (["mode=teacher", "unet.channels=-1"], "unet.channels=-1"),
    "unet.image_size=6": (["mode=teacher", "unet.image_size=6", "unet.channel_mult=[1,2,2]"], "cannot be halved"),
    "pairs.train=0": (["mode=ld3", "pairs.train=0"], "pairs.train=0"),
    "checkpoint_every=0": (["mode=ld3", "trainer.checkpoint_every=0"], "trainer.checkpoint_every=0"),
    "gamma=-1": (["mode=ld3", "gamma=-1"], "gamma=-1"),
    "dsno modes=0": (["mode=dsno", "modes=0"], "modes=0"),
    "nfe=1000": (["mode=ld3", "nfe=1000"], "nfe=1000: must be a number in [1, 100]"),
    "init=foo": (["mode=ld3", "init=foo"], "init='foo'"),
    "baselines=[foo]": (["mode=ld3", "baselines=[foo]"], "baselines=['foo']: [0]='foo' must be one of"),
    "time_mode=foo": (["mode=ld3", "time_mode=foo"], "time_mode='foo'"),
    "options={foo: 1}": (["mode=ld3", "options={foo: 1}"], "unknown option(s) ['foo']"),
    "options.variant=tab": (["mode=ld3", "solver=unipc", "options.variant=tab"], "variant='tab' is not"),
    "lr_theta=-0.1": (["mode=ld3", "lr_theta=-0.1"], "lr_theta=-0.1"),
    "no rounds": (["mode=ld3", "rounds_theta=0", "rounds_joint=0"], "rounds_theta + rounds_joint"),
    "pairs.solver=foo": (["mode=ld3", "pairs.solver=foo"], "unknown solver 'foo'"),
    "name that is no teacher": (["mode=ld3", "teacher=nonexistent_teacher"], "unknown teacher 'nonexistent_teacher'"),
    "directory that is no teacher": (["mode=dsno", "teacher={notteacher}"], "is a directory but not a teacher"),
    "file as teacher": (["mode=ld3", "teacher={file}"], "is a file; a teacher is a directory"),
    "hub id, not cached, offline": (["mode=ld3", "teacher=someorg/nomodel"], "not in the Hugging Face cache"),
    "dsno bad manifest": (["mode=dsno", "data_dir={baddata}"], "manifest.json: not valid JSON"),
    "features holdout=0": (["mode=features", "holdout=0"], "holdout=0"),
    "wandb.mode=foo": (["mode=teacher", "wandb.mode=foo"], "wandb.mode='foo'"),
    "schedule param": (["mode=teacher", "schedule.params={beta_min: -1}"], "beta_min=-1"),
    # round three (issue #32): the surfaces added since
    "options holding options": (["mode=ld3", "options={options: null}"], "unknown option(s) ['options']"),
    "ld3 solver=tabulated": (["mode=ld3", "solver=tabulated"], "solver=tabulated: LD3 learns"),
    "ld3 init_schedule of another teacher": (["mode=ld3", "learn=solver", "init_schedule={gmmschedule}"],
                                             "learned for another teacher (gmm_digits), not digits_unet"),
    "ld3 data_reference without images": (["mode=ld3", "teacher=digits_latent_flow", "loss=l2+data_mmd",
                                           "data_reference={notteacher}"], "0 image files"),
    "ld3 feature_net that is no network": (["mode=ld3", "loss=l2+features", "feature_net={notteacher}"],
                                           "no feature network in"),
    "class label 10 of 10 classes": (["mode=ld3", "teacher=digits_latent_flow", "conditions=[10]"],
                                     "class label 10 is not one of this pipeline's 10 classes"),
    "class label 999": (["mode=dsno", "teacher=digits_latent_flow", "conditions=[999]"],
                        "class label 999 is not one of this pipeline's 10 classes"),
    "guidance=1e9": (["mode=ld3", "teacher=digits_latent_flow", "conditions=[3]", "guidance=1e9"],
                     "guidance=1000000000.0: must be a number in [0, 100.0]"),
    "binary prompt file": (["mode=ld3", "teacher=digits_latent_flow", "conditions={binprompts}"],
                           "prompt file {binprompts} cannot be read as UTF-8"),
    "latent_teacher 5 levels": (["mode=latent_teacher", "vae.channels=[8,8,8,8,8]"], "below one latent pixel"),
    "latent_teacher GroupNorm": (["mode=latent_teacher", "vae.channels=[12,20]"], "must be a multiple of 8"),
    "latent_teacher guidance": (["mode=latent_teacher", "guidance=101"], "guidance=101.0: must be a number in [0, 100"),
}


EVAL_CASES = {
    "reference folder without images": (["reference={notteacher}"], "0 image files"),
    "samples=0": (["samples=0"], "samples=0"),
    "samples=-1": (["samples=-1"], "samples=-1"),
    "teachers=[]": (["teachers=[]"], "teachers=[]: must not be empty"),
    "order 9": (["solvers=[{solver: unipc, order: 9}]"], "unipc supports order 1 or 2 or 3, not 9"),
    "nfe=[1000]": (["nfe=[1000]"], "nfe=[1000]"),
    "grids=[foo]": (["grids=[foo]"], "grids=['foo']"),
    "out_dir is a file": (["out_dir={file}"], "is an existing file"),
    "unknown teacher": (["teachers=[nowhere]"], "unknown teacher 'nowhere'"),
    "schedule whose options hold options": (["schedules=[{optnull}]"], "optnull.json: unknown option(s) ['options']"),
    "coefficient 1e308": (["schedules=[{bigcoef}]"], "bigcoef.json: coefficient c[2][0] = 1e+308 is beyond the bound"),
    "solver tabulated": (["solvers=[{solver: tabulated, order: 3}]"], "tabulated runs a schedule file's own table"),
    "guidance=1e9": (["teachers=[digits_latent_flow]", "conditions=[3]", "guidance=1e9"], "guidance=1000000000.0"),
}


CASES = [("train.py", name) for name in sorted(TRAIN_CASES)] + [("eval.py", name) for name in sorted(EVAL_CASES)]


@pytest.mark.parametrize("program, case", CASES, ids=[f"{p} {c}" for p, c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(program, case, tmp_path, capsys):
    main, cases, out_key, default = ((train_main, TRAIN_CASES, "run_dir", QUIET) if program == "train.py"
                                     else (eval_main, EVAL_CASES, "out_dir", []))
    args, match = cases[case]
    paths = dict(files(tmp_path), out=tmp_path / "out")
    args, match = fill(args, paths), fill([match], paths)[0]
    before = snapshot(tmp_path)
    out = [] if any(a.startswith(f"{out_key}=") for a in args) else [f"{out_key}={tmp_path / 'run'}"]
    assert main(default + out + args) == 2  # the case's own arguments come last and win
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err
    assert snapshot(tmp_path) == before


def test_a_schedule_of_another_noise_schedule_is_refused_by_eval(tmp_path, capsys):
    """The right teacher's fingerprint, but EDM times: eval.py refuses it instead of sampling nonsense."""
    import learnsteps as ls
    from learnsteps.core.schedules import EDM
    from learnsteps.schedule import Schedule, save_schedule
    from learnsteps.teachers import load_teacher

    teacher = load_teacher("digits_unet")
    path = save_schedule(tmp_path / "s.json", Schedule.from_grid(ls.grids.make("edm", 4, EDM()), EDM(), "euler", 1,
                                                                  teacher=dict(fingerprint=teacher.fingerprint())))
    assert eval_main([f"schedules=[{path}]", f"out_dir={tmp_path / 'eval'}", "samples=8"]) == 2
    assert "not the teacher's" in capsys.readouterr().err and not (tmp_path / "eval").exists()


# ---------------------------------------------------------------------------------------------------- integrity
def teacher_copy(tmp_path: Path) -> Path:
    d = tmp_path / "teacher"
    shutil.copytree(ASSETS / "digits_unet", d)
    return d


def damage_teacher_json_key(d):
    meta = json.loads((d / "teacher.json").read_text())
    del meta["unet"]
    from learnsteps.files import write_json
    write_json(d / "teacher.json", {k: v for k, v in meta.items() if k != "sha256"})


DAMAGE = {
    "safetensors header": (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 8 + (d / "model.safetensors").read_bytes()[8:]),
                           "model.safetensors is not a readable safetensors file"),
    "one weight changed": (lambda d: _flip(d / "model.safetensors", -100), "model.safetensors: checksum mismatch"),
    "teacher.json without a key": (damage_teacher_json_key, "teacher.json: malformed (KeyError: 'unet')"),
    "teacher.json unreadable": (lambda d: (d / "teacher.json").write_text("{oops"), "teacher.json: not valid JSON"),
    "teacher.json edited": (lambda d: (d / "teacher.json").write_text((d / "teacher.json").read_text()
                                                                        .replace('"dropout": 0.0', '"dropout": 0.1')),
                            "teacher.json: checksum mismatch"),
}


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_teacher_is_one_line_naming_the_file(damage, tmp_path, capsys):
    d = teacher_copy(tmp_path)
    how, match = DAMAGE[damage]
    how(d)
    assert train_main(["mode=ld3", f"teacher={d}", f"run_dir={tmp_path / 'run'}"] + QUIET) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err and str(d) in err, err
    assert not (tmp_path / "run").exists()


def run_linear(tmp_path, lr, max_steps, nan_at=-1):
    cfg = RunConfig(mode="test")
    cfg.trainer.max_steps, cfg.trainer.checkpoint_every, cfg.trainer.progress_bar = max_steps, 4, False
    module = Linear(lr, nan_at)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 1)), batch_size=4)
    fit(make_trainer(cfg, tmp_path, []), module, data, run_dir=tmp_path)
    return module


def test_the_nan_advice_works_the_rerun_resumes_with_the_new_rate(tmp_path, capsys):
    with pytest.raises(NonFiniteLoss, match="rerun the same command with a smaller lr: it resumes from .*last.ckpt"):
        run_linear(tmp_path, lr=0.1, max_steps=20, nan_at=9)
    module = run_linear(tmp_path, lr=0.01, max_steps=20)
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)
    assert "resuming with lr=0.01 (the checkpoint's run used 0.1)" in capsys.readouterr().out
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 20


@pytest.mark.parametrize("damage, match", [("flip", "checksum mismatch"), ("truncate", "checksum mismatch"),
                                           ("empty", "checksum mismatch"), ("no checksum", "checksum file")])
def test_a_damaged_checkpoint_is_refused_not_resumed(tmp_path, damage, match):
    run_linear(tmp_path, lr=0.05, max_steps=8)
    last = tmp_path / "checkpoints" / "last.ckpt"
    if damage == "flip":
        _flip(last, len(last.read_bytes()) // 2)
    elif damage == "truncate":
        last.write_bytes(last.read_bytes()[:100])
    elif damage == "empty":
        last.write_bytes(b"")
    else:
        (tmp_path / "checkpoints" / "last.ckpt.sha256").unlink()
    with pytest.raises(CheckpointError, match=f"{match}.*restart=true starts the run over"):
        run_linear(tmp_path, lr=0.05, max_steps=12)


def test_a_checkpoint_killed_between_its_two_renames_still_resumes(tmp_path):
    """The checksum file is renamed first and keeps the previous sha256: the previous checkpoint verifies."""
    from learnsteps.files import verify_checksum, write_checksummed

    path = tmp_path / "last.ckpt"
    write_checksummed(path, lambda tmp: tmp.write_bytes(b"first"))
    boom = RuntimeError("killed")

    def dies_before_the_rename(tmp):
        tmp.write_bytes(b"second")
        from learnsteps.files import checksum_path, sha256_file, write_text
        write_text(checksum_path(path), sha256_file(tmp) + "\n" + checksum_path(path).read_text().split("\n")[0] + "\n")
        raise boom

    with pytest.raises(RuntimeError):
        write_checksummed(path, dies_before_the_rename)
    assert path.read_bytes() == b"first" and verify_checksum(path) == path


def test_a_damaged_trajectory_shard_stops_training(tmp_path, capsys):
    data = tmp_path / "data"
    args = ["mode=dsno", "teacher=gmm_digits", "unet.channels=8", "trajectories.n=32", "trajectories.shard_size=16",
            "trajectories.steps_per_interval=2", "batch_size=8", "trainer.max_steps=2", f"data_dir={data}"] + QUIET
    assert train_main(args + [f"run_dir={tmp_path / 'one'}"]) == 0
    _flip(data / "shard-00001.safetensors", -20)
    assert train_main(args + [f"run_dir={tmp_path / 'two'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "shard-00001.safetensors: fails its checksum" in err


def test_a_damaged_student_is_refused_by_eval(tmp_path, capsys):
    from learnsteps.dsno.student import StudentError, load_student

    args = ["mode=dsno", "teacher=gmm_digits", "unet.channels=8", "trajectories.n=16", "trajectories.shard_size=16",
            "trajectories.steps_per_interval=2", "batch_size=8", "trainer.max_steps=1", f"run_dir={tmp_path}"] + QUIET
    assert train_main(args) == 0
    student = tmp_path / "student"
    load_student(student)
    _flip(student / "model.safetensors", -10)
    with pytest.raises(StudentError, match="checksum mismatch"):
        load_student(student)
    assert eval_main([f"students=[{student}]", "teachers=[gmm_digits]", f"out_dir={tmp_path / 'eval'}"]) == 2
    assert "checksum mismatch" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- one run per run_dir
def test_a_run_dir_in_use_is_refused_naming_the_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from learnsteps.training.common import RunConfig, prepare_run;"
        "prepare_run(RunConfig(mode='test', run_dir=sys.argv[2])); print('locked', flush=True); time.sleep(60)"),
        str(ROOT), str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match="in use by another learnsteps process"):
            prepare_run(RunConfig(mode="test", run_dir=str(tmp_path / "run")))
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10  # the lock goes with the process
    while True:
        try:
            prepare_run(RunConfig(mode="test", run_dir=str(tmp_path / "run")))
            break
        except RunDirError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_a_changed_configuration_is_refused_unless_asked_to_restart(tmp_path, capsys):
    """A finished LD3 run rerun with another NFE: refused before config.yaml is touched; restart=true starts over."""
    run = tmp_path / "run"
    args = ["mode=ld3", "teacher=toy_mixture", "solver=unipc", "order=2", "pairs.train=4", "pairs.val=4",
            "pairs.test=4", "pairs.solver=reference", "rounds_theta=1", "rounds_joint=0", f"run_dir={run}"] + QUIET
    assert train_main(args + ["nfe=4"]) == 0
    config = (run / "config.yaml").read_text()
    assert train_main(args + ["nfe=5"]) == 2
    err = capsys.readouterr().err
    assert "holds a run of another configuration (nfe: 4 -> 5" in err and "restart=true" in err
    assert (run / "config.yaml").read_text() == config
    assert train_main(args + ["nfe=4", "trainer.progress_bar=true"]) == 0  # what a resume may change
    assert train_main(args + ["nfe=5", "restart=true"]) == 0
    assert "nfe: 5" in (run / "config.yaml").read_text()
    assert json.loads((run / "schedule.json").read_text())["nfe"] == 5


def test_config_yaml_round_trips_for_every_mode(tmp_path):
    """What prepare_run writes, resume_conflicts reads back as equal (floats, lists, nested options)."""
    from learnsteps.cli import _modes
    from learnsteps.config import CONFIG_DIR, load_config
    from learnsteps.training.common import resume_conflicts

    for mode, (schema, _) in _modes().items():
        cfg = load_config(schema, [CONFIG_DIR / f"{mode}.yaml"], [f"run_dir={tmp_path / mode}"])
        prepare_run(cfg)
        assert resume_conflicts(cfg, tmp_path / mode) == [], mode


def test_the_lock_does_not_stop_ddp_ranks(tmp_path, monkeypatch):
    """Rank 1 (LOCAL_RANK=1, as Lightning's launcher sets it) neither locks nor rewrites the run directory."""
    prepare_run(RunConfig(mode="test", run_dir=str(tmp_path / "run")))
    monkeypatch.setenv("LOCAL_RANK", "1")
    code = ("import sys; sys.path.insert(0, sys.argv[1]);"
            "from learnsteps.training.common import RunConfig, prepare_run;"
            "prepare_run(RunConfig(mode='test', run_dir=sys.argv[2])); print('ok')")
    res = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path / "run")], capture_output=True,
                         text=True, env=dict(os.environ, LOCAL_RANK="1"))
    assert res.stdout.strip() == "ok", res.stderr


def test_train_py_on_a_damaged_checkpoint_is_one_line(tmp_path):
    """Checked when the run directory is taken, before a Trainer exists: no Lightning banner precedes the line."""
    run = tmp_path / "run"
    args = [sys.executable, str(ROOT / "train.py"), "mode=ld3", "teacher=toy_mixture", "solver=unipc", "order=2",
            "nfe=4", "pairs.train=4", "pairs.val=4", "pairs.test=4", "pairs.solver=reference", "rounds_theta=1",
            "rounds_joint=1", "trainer.checkpoint_every=1", f"run_dir={run}", *QUIET]
    env = dict(os.environ, WANDB_MODE="disabled")
    assert subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT).returncode == 0
    _flip(run / "checkpoints" / "last.ckpt", len((run / "checkpoints" / "last.ckpt").read_bytes()) // 2)
    res = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "last.ckpt: checksum mismatch" in res.stderr and "restart=true" in res.stderr


# ------------------------------------------------------------- pipeline directories (tiny pipelines built here)
def _index_edit(**changes):
    def edit(path: Path) -> None:
        path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))
    return edit


PIPELINE_DAMAGE = {  # model_index.json of a DiT flow pipeline -> what the one line says
    "_class_name a dict": (_index_edit(_class_name={"a": 1}), "'_class_name' is {'a': 1}, not the name of"),
    "_class_name a number": (_index_edit(_class_name=5), "'_class_name' is 5"),
    "transformer declared as UNet2DModel": (
        _index_edit(transformer=["diffusers", "UNet2DModel"]),
        "transformer is declared as ['diffusers', 'UNet2DModel'], but the weights in transformer/ do not fit it"),
    "component not [library, class]": (_index_edit(transformer=["diffusers"]),
                                       "component 'transformer' is declared as ['diffusers'], not [library, class]"),
    "truncated": (lambda p: p.write_text(p.read_text()[:30]), "not valid JSON"),
    "empty list": (lambda p: p.write_text("[]"), "holds a JSON object, not list"),
    "binary": (lambda p: p.write_bytes(b"\xff\xfe\x00\x01\x80garbage"), "not valid JSON"),
}


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory):
    pytest.importorskip("diffusers")
    import tiny_pipelines

    return tiny_pipelines.dit(tmp_path_factory.mktemp("pipelines") / "dit", flow=True)


@pytest.mark.parametrize("damage", sorted(PIPELINE_DAMAGE))
@pytest.mark.parametrize("conditions", [["conditions=[0]"], []], ids=["conditions", "none"])
def test_a_damaged_model_index_is_one_line_naming_it(damage, conditions, tiny_dit, tmp_path, capsys):
    d = tmp_path / "pipe"
    shutil.copytree(tiny_dit, d)
    how, match = PIPELINE_DAMAGE[damage]
    how(d / "model_index.json")
    before = snapshot(tmp_path)
    assert train_main(["mode=ld3", f"teacher={d}", *conditions, f"run_dir={tmp_path / 'run'}"] + QUIET) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {d / 'model_index.json'}: ") and err.count("\n") == 1 and match in err, err
    assert snapshot(tmp_path) == before


COMPONENTS = st.sampled_from([["diffusers", c] for c in ("UNet2DModel", "Transformer2DModel", "AutoencoderKL",
                                                           "AutoencoderTiny", "DDIMScheduler", "NoSuchClass")]
                             + [["transformers", "CLIPTextModel"], ["nolibrary", "X"], [None, None], ["diffusers"],
                                ["diffusers", "AutoencoderKL", "x"], ["", ""], [1, 2], []])
INDEX_VALUES = (COMPONENTS | st.sampled_from(["DiTPipeline", "StableDiffusionPipeline", "DDPMPipeline", "UNet2DModel",
                                              "", "no such", "0.42.1", None, True, 0, -1, 1e300, {}, {"0": 5},
                                              {"x": "y"}, {"10": "ten"}])
                | st.text(max_size=6) | st.integers(-10, 2000))


@settings(max_examples=int(os.environ.get("FUZZ_INDEX", 40)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["_class_name", "transformer", "vae", "scheduler", "id2label", "_diffusers_version",
                            "extra"]), value=INDEX_VALUES,
       whole=st.none() | st.binary(max_size=40) | st.sampled_from(["[]", "{}", "null", '"DiTPipeline"', "[1, 2]"]))
def test_fuzzed_model_index_loads_a_usable_teacher_or_fails_with_teacher_load_error(tiny_dit, tmp_path, key, value,
                                                                                   whole):
    """A pipeline directory whose model_index.json holds anything (one entry edited, or other bytes altogether):
    the teacher loads and samples, or loading is a TeacherLoadError (never another exception)."""
    from learnsteps.teachers import load_teacher
    from learnsteps.teachers.network import TeacherLoadError

    d = tmp_path / "pipe"
    if not d.exists():
        shutil.copytree(tiny_dit, d)
    index = d / "model_index.json"
    if whole is None:
        index.write_text(json.dumps(dict(json.loads((tiny_dit / "model_index.json").read_text()), **{key: value})))
    else:
        index.write_bytes(whole if isinstance(whole, bytes) else whole.encode())
    try:
        teacher = load_teacher(str(d), conditions=[0])
    except TeacherLoadError:
        return
    assert len(teacher.fingerprint()) == 64
    x = torch.randn(2, *teacher.shape)
    assert teacher(x, torch.full((2,), teacher.noise_schedule.t_max * 0.5)).shape == x.shape


def test_class_labels_are_checked_against_the_pipelines_own_label_table(tiny_dit):
    """The tiny DiT's id2label has 3 classes (its network embeds 1000): label 2 and its name load, 3 does not."""
    from learnsteps.teachers import load_teacher
    from learnsteps.teachers.network import TeacherLoadError

    assert load_teacher(str(tiny_dit), conditions=[2, "one"]).class_ids(torch.tensor([0, 1])).tolist() == [2, 1]
    with pytest.raises(TeacherLoadError, match=r"class label 3 is not one of this pipeline's 3 classes \(0..2 in its"):
        load_teacher(str(tiny_dit), conditions=[3])


# ------------------------------------------------------- schedule files: one refusal, whoever reads them
def ddpm_table_file(tmp_path: Path, **teacher) -> dict:
    """A valid version-2 file (DPM-Solver++(3M)'s table on a DDPM logsnr grid), as a dict without its checksum."""
    import learnsteps as ls
    from learnsteps.core.schedules import DiscreteDDPM
    from learnsteps.core.steps import Grid
    from learnsteps.core.tables import narrowest_table
    from learnsteps.schedule import Schedule

    s = DiscreteDDPM()
    grid = ls.grids.make("logsnr", 6, s, to_zero=True)
    table, form = narrowest_table("dpm_solver++", 3, Grid(s, grid))
    data = Schedule.from_grid(grid, s, "tabulated", table.shape[1], options=dict(form=form), coefficients=table,
                              teacher=teacher).to_dict()
    return {k: v for k, v in data.items() if k != "sha256"}


def test_a_table_beyond_the_bound_is_refused_by_every_reader(tmp_path):
    """The same ScheduleError from the loader (eval.py: EVAL_CASES), TabulatedScheduler and the export command."""
    from learnsteps.files import write_json
    from learnsteps.interop.export import main as export_main
    from learnsteps.interop.scheduler import TabulatedScheduler
    from learnsteps.schedule import ScheduleError, load_schedule

    data = ddpm_table_file(tmp_path)
    assert TabulatedScheduler.from_schedule(write_json(tmp_path / "good.json", data)).num_inference_steps == 6
    data["coefficients"][3][1] = -1e30
    path = write_json(tmp_path / "big.json", data)
    match = f"{path}: coefficient c[3][1] = -1e+30 is beyond the bound"
    for read in (load_schedule, TabulatedScheduler.from_schedule):
        with pytest.raises(ScheduleError) as err:
            read(path)
        assert str(err.value).startswith(match)
    res = subprocess.run([sys.executable, "-m", "learnsteps.schedule", "export", str(path), "--to", "sigmas"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and match in res.stderr and not res.stdout
    assert export_main(["export", str(path), "--to", "comfyui"]) == 2


@pytest.mark.parametrize("prediction", ["foo", 5, None, [1], {"a": 1}])
def test_a_bad_prediction_type_is_a_schedule_error_naming_the_file(tmp_path, prediction):
    from learnsteps.files import write_json
    from learnsteps.interop.scheduler import TabulatedScheduler
    from learnsteps.schedule import ScheduleError

    path = write_json(tmp_path / "s.json", ddpm_table_file(tmp_path, prediction_type=prediction))
    with pytest.raises(ScheduleError, match=re.escape(f"teacher.prediction_type {prediction!r} is not one of")) as err:
        TabulatedScheduler.from_schedule(path)
    assert str(err.value).startswith(str(path))


@pytest.mark.parametrize("args, match", [(["--to", "foo"], "argument --to: invalid choice: 'foo'"),
                                         (["--steps", "x", "--to", "sigmas"], "argument --steps: invalid int value"),
                                         ([], "the following arguments are required: --to")])
def test_export_argument_errors_are_one_line(tmp_path, args, match):
    from learnsteps.schedule import save_schedule

    path = save_schedule(tmp_path / "s.json", _schedule_of_digits_unet())
    res = subprocess.run([sys.executable, "-m", "learnsteps.schedule", "export", str(path), *args],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert match in res.stderr and not res.stdout


def _schedule_of_digits_unet():
    from learnsteps.schedule import validate

    return validate(schedule_files()["gmmschedule"])


def test_solver_options_are_its_keyword_parameters_not_a_catch_all():
    from learnsteps.core.sample import solver_options

    assert solver_options("dpm_solver++") == {"method", "variant", "lower_order_final", "plan"}
    assert "options" not in solver_options("dpm_solver")
    # the method picks the function whose names count (found by the schedule-file fuzzer: a singlestep file with
    # multistep's lower_order_final reached dpm_singlestep as a TypeError)
    from learnsteps.core.sample import check_options

    check_options("dpm_solver++", dict(method="singlestep", plan=[2, 1]))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['lower_order_final'\] for solver dpm_solver\+\+"):
        check_options("dpm_solver++", dict(method="singlestep", lower_order_final=True))


# ---------------------------------------------------------------------------------------- diverged runs
def test_a_diverging_validation_loss_stops_the_run_before_any_export(tmp_path):
    """SGD at twice the stable rate: the validation loss grows x9 per step; past 1000x the first it stops."""
    from helpers import ValidatedLinear
    from learnsteps.training.common import StopOnDivergence

    cfg = RunConfig(mode="test")
    cfg.trainer.max_steps, cfg.trainer.checkpoint_every, cfg.trainer.progress_bar = 40, 100, False
    x = torch.ones(64, 1)  # E[x^2] = 1: stable below lr 1; at 2, w - 2 is multiplied by -3 each step
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)
    trainer = make_trainer(cfg, tmp_path, [], val_check_interval=1, num_sanity_val_steps=1)
    with pytest.raises(NonFiniteLoss, match=r"validation loss \(val/loss\) is .*x the size of the first validation's "
                                            r"4 above it at step \d+: stopped, nothing exported .*smaller lr and "
                                            r"restart=true") as err:
        fit(trainer, ValidatedLinear(lr=2.0), data, data, run_dir=tmp_path)
    step = int(str(err.value).split(" at step ")[1].split(":")[0])
    assert 9 ** step > StopOnDivergence.FACTOR >= 9 ** (step - 1)  # the first validation past the factor
    module = ValidatedLinear(lr=0.1)  # a learning run is not stopped
    fit(make_trainer(cfg, tmp_path / "ok", [], val_check_interval=1), module, data, data, run_dir=tmp_path / "ok")
    assert abs(float(module.w.detach()) - 2) < 1e-3


def test_a_negative_validation_loss_is_measured_by_its_size_not_its_sign():
    """A loss with an unbiased MMD term (class_mmd) can start below zero: a later validation a little above it is
    learning, not divergence (the guard once read -1.1 after -4.4 as past 1000x the first and stopped a run);
    FACTOR times the first's size above it is divergence, whatever its sign."""
    from types import SimpleNamespace

    from learnsteps.training.common import StopOnDivergence

    def validate(guard, value, step):
        trainer = SimpleNamespace(callback_metrics={"val/loss": torch.tensor(value)}, global_step=step)
        guard.on_validation_end(trainer, None)

    for first in (-4.4, 4.4):
        guard = StopOnDivergence()
        for step, value in enumerate((first, -1.1, 0.5, first + 999 * abs(first))):
            validate(guard, value, step)
        with pytest.raises(NonFiniteLoss, match=f"the size of the first validation's {first:.4g} above it at step 9"):
            validate(guard, first + 1001 * abs(first), 9)


def test_a_non_finite_first_validation_says_the_starting_point_is_at_fault(tmp_path):
    from helpers import ValidatedLinear

    cfg = RunConfig(mode="test")
    cfg.trainer.max_steps, cfg.trainer.progress_bar = 4, False
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.full((8, 1), float("inf"))), batch_size=4)
    with pytest.raises(NonFiniteLoss, match="is nan at step 0: stopped, nothing exported .the first validation is "
                                            "not finite: the teacher's samples or the starting point are at fault"):
        fit(make_trainer(cfg, tmp_path, [], num_sanity_val_steps=1), ValidatedLinear(lr=0.1), data, data,
            run_dir=tmp_path)


@pytest.mark.parametrize("guidance, ratio", [(1.15, (0.5, 2)), (100, (2, 20)), (1e9, None)])
def test_a_teacher_whose_samples_diverge_writes_no_pairs(tmp_path, guidance, ratio):
    """Case 10 of issue #32 through the Python API, where no config bounds guidance: the shipped latent model's
    samples are about as large as its noise at its guidance (1.15), a few times larger at the bound (100), and 1e8
    times at 1e9, whose pairs are refused before a shard is written."""
    from learnsteps.teachers import load_teacher
    from learnsteps.trajectories import DIVERGED, TrajectoryDataset, TrajectoryError, TrajectorySpec, generate

    teacher = load_teacher("digits_latent_flow", conditions=[3, 5])
    teacher.guidance = teacher.cfg = guidance  # the config's bound bypassed (cfg: the CFG scale it samples with)
    s = teacher.noise_schedule
    spec = TrajectorySpec(n=16, shard_size=16, output_times=[s.t_max, s.t_min, s.t_zero], solver="unipc", order=2,
                          steps_per_interval=10)
    if ratio is None:
        with pytest.raises(TrajectoryError, match=r"the teacher's samples diverge \(RMS .*: [0-9.e+]*x the starting "
                                                  rf"noise's, the limit is {DIVERGED:g}x\)"):
            generate(teacher, tmp_path / "pairs", spec, progress=False)
        assert not list((tmp_path / "pairs").glob("shard-*"))
        return
    generate(teacher, tmp_path / "pairs", spec, progress=False)
    t = TrajectoryDataset(tmp_path / "pairs").tensors
    measured = float(t["trajectory"][:, -1].pow(2).mean().sqrt() / t["x_T"].pow(2).mean().sqrt())
    assert ratio[0] < measured < ratio[1] and measured < DIVERGED

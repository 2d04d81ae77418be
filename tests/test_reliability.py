"""Reliability, round two: every bad input is one line on stderr, exit code 2, and nothing written; every artifact
is checksummed and every reader verifies it; a NaN's advice works; one run per run directory."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

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
    manifest."""
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "not_a_teacher").mkdir()
    (tmp_path / "not_a_teacher" / "readme.txt").write_text("hello")
    bad = tmp_path / "bad_data"
    bad.mkdir()
    (bad / "manifest.json").write_text('{"format": "learnsteps-trajectories", "output_times": [1, ')
    return dict(file=tmp_path / "a_file", notteacher=tmp_path / "not_a_teacher", baddata=bad)


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
}


EVAL_CASES = {
    "samples=0": (["samples=0"], "samples=0"),
    "samples=-1": (["samples=-1"], "samples=-1"),
    "teachers=[]": (["teachers=[]"], "teachers=[]: must not be empty"),
    "order 9": (["solvers=[{solver: unipc, order: 9}]"], "unipc supports order 1 or 2 or 3, not 9"),
    "nfe=[1000]": (["nfe=[1000]"], "nfe=[1000]"),
    "grids=[foo]": (["grids=[foo]"], "grids=['foo']"),
    "out_dir is a file": (["out_dir={file}"], "is an existing file"),
    "unknown teacher": (["teachers=[nowhere]"], "unknown teacher 'nowhere'"),
}


CASES = [("train.py", name) for name in sorted(TRAIN_CASES)] + [("eval.py", name) for name in sorted(EVAL_CASES)]


@pytest.mark.parametrize("program, case", CASES, ids=[f"{p} {c}" for p, c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(program, case, tmp_path, capsys):
    main, cases, out_key, default = ((train_main, TRAIN_CASES, "run_dir", QUIET) if program == "train.py"
                                     else (eval_main, EVAL_CASES, "out_dir", []))
    args, match = cases[case]
    args = fill(args, dict(files(tmp_path), out=tmp_path / "out"))
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

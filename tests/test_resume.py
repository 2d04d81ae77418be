"""Killed runs resume: a training subprocess is SIGKILLed after its first checkpoint and started again with the
same command; its final output must equal that of an uninterrupted run with the same seed. Tolerance: none
(bitwise equal tensors, identical schedule JSON times), since on one CPU process the resumed run replays the
same batches (SeededShuffle from the checkpointed position), the same random numbers (ExactResume) and the
same arithmetic. The same for runs stopped by SIGTERM or SIGINT (which checkpoint their last step and exit with
128 + the signal's number), under SLURM's requeue signal, and for a disk that fills up while a run writes."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(ROOT))

COMMON = ["trainer.progress_bar=false", "wandb.mode=disabled", "trainer.checkpoint_every=5"]
MODES = {
    "dsno": (["mode=dsno", "teacher=gmm_digits", "unet.channels=8", "trajectories.n=96",
              "trajectories.steps_per_interval=3", "batch_size=16", "trainer.max_steps=24",
              "trainer.val_check_interval=5"], "student/model.safetensors"),
    "ld3": (["mode=ld3", "teacher=toy_mixture", "nfe=4", "solver=unipc", "order=2", "pairs.train=16", "pairs.val=8",
             "pairs.test=8", "pairs.solver=reference", "rounds_theta=2", "rounds_joint=3", "batch_size=4",
             "val_every_n_steps=3"], "schedule.json"),
    "teacher": (["mode=teacher", "unet.channels=8", "unet.blocks_per_level=1", "batch_size=32",
                 "trainer.max_steps=30", "trainer.val_check_interval=10", "sample_steps=3"],
                "teacher/model.safetensors"),
}


def train(args, run_dir: Path, shared: Path, env: dict | None = None, program: list[str] | None = None
          ) -> subprocess.Popen:
    extra = [f"data_dir={shared}"] if "mode=dsno" in args else [f"pairs.directory={shared}"] if "mode=ld3" in args else []
    return subprocess.Popen([sys.executable, *(program or [str(ROOT / "train.py")]), *args, *COMMON, *extra,
                             f"run_dir={run_dir}"], cwd=ROOT, env=env or ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen) -> None:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]


def output(run_dir: Path, name: str):
    path = run_dir / name
    return load_file(str(path)) if path.suffix == ".safetensors" else json.loads(path.read_text())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """mode -> (the run directory of an uninterrupted run, its shared data / pairs directory), made once."""
    root, done = tmp_path_factory.mktemp("straight"), {}

    def run(mode: str) -> tuple[Path, Path]:
        if mode not in done:
            finish(train(MODES[mode][0], root / mode, root / f"{mode}-shared"))  # also makes the shared data / pairs
            done[mode] = root / mode, root / f"{mode}-shared"
        return done[mode]
    return run


def wait_for(p: subprocess.Popen, path: Path) -> None:
    deadline = time.monotonic() + 300
    while not path.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.exists(), "the run ended before its first checkpoint"


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def assert_same_result(mode: str, run_dir: Path, straight_dir: Path, step: int) -> None:
    result = MODES[mode][1]
    a, b = output(straight_dir, result), output(run_dir, result)
    if isinstance(a, dict) and "times" in a:  # a schedule: the learned times must match exactly
        assert a["times"] == b["times"] and a["eval_times"] == b["eval_times"], f"resumed at step {step}"
    else:
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{k} differs after resuming at step {step}"


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, mode, straight):
    args, result = MODES[mode]
    straight_dir, shared = straight(mode)
    p = train(args, tmp_path / "killed", shared)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    wait_for(p, last)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL and last.exists()
    assert not (tmp_path / "killed" / result).exists()  # it was killed before the end
    step = step_of(last)
    finish(train(args, tmp_path / "killed", shared))
    assert_same_result(mode, tmp_path / "killed", straight_dir, step)


@pytest.mark.parametrize("mode, sig", [("ld3", signal.SIGINT), ("dsno", signal.SIGTERM), ("teacher", signal.SIGTERM)],
                         ids=lambda v: v.name if isinstance(v, signal.Signals) else v)
def test_a_signalled_run_checkpoints_its_last_step_and_says_how_to_resume(tmp_path, mode, sig, straight):
    """SIGTERM (a scheduler's pre-emption) or SIGINT (Ctrl+C): the step in progress is finished and checkpointed,
    one line says so and gives the command, the exit code is 128 + the signal's; the rerun resumes exactly. (One
    handler serves every mode and both signals: each mode is stopped once, by one of them; the SLURM test below
    sends SIGTERM to an LD3 run.)"""
    args, result = MODES[mode]
    straight_dir, shared = straight(mode)
    run = tmp_path / "run"
    p = train(args, run, shared)
    last = run / "checkpoints" / "last.ckpt"
    wait_for(p, last)
    periodic = step_of(last)
    p.send_signal(sig)
    _, err = p.communicate(timeout=300)
    line = err.strip().splitlines()[-1]
    assert p.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err and err.count("error: ") == 1
    step = int(re.fullmatch(rf"error: interrupted by {sig.name} after step (\d+), checkpointed in "
                            rf"{re.escape(str(last))}; rerun the same command to resume: python train\.py mode=.*"
                            rf"run_dir={re.escape(str(run))}", line)[1])
    assert step_of(last) == step >= periodic and not (run / result).exists()
    finish(train(args, run, shared))
    assert_same_result(mode, run, straight_dir, step)


def test_under_slurm_lightnings_requeue_still_works(tmp_path, straight):
    """SLURM's requeue signal (SIGUSR1, #SBATCH --signal) stays Lightning's: it saves hpc_ckpt_1.ckpt and calls
    `scontrol requeue <job>`; the SIGTERM that follows is learnsteps': the step is finished and checkpointed, exit
    143; the requeued job resumes from the newer of the two checkpoints, exactly."""
    args, _ = MODES["ld3"]
    straight_dir, shared = straight("ld3")
    (tmp_path / "bin").mkdir()
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'calls'}\n")
    scontrol.chmod(0o755)
    env = dict(ENV, SLURM_JOB_ID="4242", SLURM_NTASKS="1", SLURM_JOB_NAME="learnsteps", SLURM_PROCID="0",
               SLURM_LOCALID="0", SLURM_NODEID="0", PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    run = tmp_path / "run"
    p = train(args, run, shared, env)
    wait_for(p, run / "checkpoints" / "last.ckpt")
    p.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 60
    while not (tmp_path / "calls").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 143 and "error: interrupted by SIGTERM" in err.strip().splitlines()[-1], err[-3000:]
    assert (tmp_path / "calls").read_text() == "requeue 4242\n" and (run / "hpc_ckpt_1.ckpt").is_file()
    step = step_of(run / "checkpoints" / "last.ckpt")
    assert step >= step_of(run / "hpc_ckpt_1.ckpt")
    finish(train(args, run, shared, env))
    assert_same_result("ld3", run, straight_dir, step)


# A disk that fills up: the process's os.replace (where every write of learnsteps.files is committed) raises
# ENOSPC for the file named FAIL_NAME once it has succeeded FAIL_AFTER times.
FULL_DISK = ["-c", "import errno, os, sys\n"
             "real, done = os.replace, []\n"
             "def replace(src, dst, *args, **kwargs):\n"
             "    if str(dst).endswith(os.environ['FAIL_NAME']):\n"
             "        done.append(dst)\n"
             "        if len(done) > int(os.environ['FAIL_AFTER']):\n"
             "            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
             "    return real(src, dst, *args, **kwargs)\n"
             "os.replace = replace\n"
             "from learnsteps.cli import train_main\n"
             "sys.exit(train_main(sys.argv[1:]))\n"]


@pytest.mark.parametrize("name, after", [("last.ckpt", 1), ("schedule.json", 0), ("shard-00000.safetensors", 0)])
def test_a_full_disk_is_one_line_naming_the_file_and_the_checkpoint_survives(tmp_path, name, after, straight):
    args, result = MODES["ld3"]
    straight_dir, shared = straight("ld3")
    run = tmp_path / "run"
    pairs = shared if name != "shard-00000.safetensors" else tmp_path / "pairs"
    p = train(args, run, pairs, dict(ENV, FAIL_NAME=name, FAIL_AFTER=str(after)), FULL_DISK)
    _, err = p.communicate(timeout=600)
    failed = next(run.rglob(name), None) if name == "last.ckpt" else (run / name if name == "schedule.json"
                                                                       else pairs / "train" / name)
    assert p.returncode == 2 and "Traceback" not in err and err.count("error: ") == 1, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(f"error: cannot write {failed}: No space left on device (errno 28 "
                                                   f"ENOSPC); its previous version, if any, is intact; rerun the "
                                                   f"same command to resume: python train.py mode=ld3")
    assert not list(tmp_path.rglob("*.tmp*")) and not (run / result).exists()
    if name == "last.ckpt":  # the first checkpoint is intact, and verifies
        from learnsteps.training.common import AtomicCheckpointIO

        AtomicCheckpointIO.verify(failed)
        assert step_of(failed) == 5
    finish(train(args, run, pairs))  # space freed: the rerun resumes and ends where an uninterrupted run does
    assert_same_result("ld3", run, straight_dir, -1)

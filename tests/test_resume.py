"""Killed runs resume: a training subprocess is SIGKILLed after its first checkpoint and started again with the
same command; its final output must equal that of an uninterrupted run with the same seed. Tolerance: none
(bitwise equal tensors, identical schedule JSON times), since on one CPU process the resumed run replays the
same batches (SeededShuffle from the checkpointed position), the same random numbers (ExactResume) and the
same arithmetic."""
import json
import os
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


def train(args, run_dir: Path, shared: Path) -> subprocess.Popen:
    extra = [f"data_dir={shared}"] if "mode=dsno" in args else [f"pairs.directory={shared}"] if "mode=ld3" in args else []
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, *COMMON, *extra, f"run_dir={run_dir}"],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen) -> None:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]


def output(run_dir: Path, name: str):
    path = run_dir / name
    return load_file(str(path)) if path.suffix == ".safetensors" else json.loads(path.read_text())


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, mode):
    args, result = MODES[mode]
    finish(train(args, tmp_path / "straight", tmp_path / "shared"))  # also makes the shared data / pairs
    p = train(args, tmp_path / "killed", tmp_path / "shared")
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL and last.exists()
    assert not (tmp_path / "killed" / result).exists()  # it was killed before the end
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    finish(train(args, tmp_path / "killed", tmp_path / "shared"))
    a, b = output(tmp_path / "straight", result), output(tmp_path / "killed", result)
    if isinstance(a, dict) and "times" in a:  # a schedule: the learned times must match exactly
        assert a["times"] == b["times"] and a["eval_times"] == b["eval_times"], f"resumed at step {step}"
    else:
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{k} differs after resuming at step {step}"

"""What users and clusters do to a run: bad input (a message, exit code 2, nothing written), a NaN loss (stop,
keep the last good checkpoint), interrupted writes (the previous file survives)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from learnsteps.cli import eval_main, train_main
from learnsteps.files import write_safetensors, write_text
from learnsteps.training.common import NonFiniteLoss, RunConfig, make_trainer

from helpers import Linear

ASSETS = Path(__file__).resolve().parents[1] / "learnsteps" / "assets"


def teacher_copy(tmp_path: Path, damage: str) -> Path:
    d = tmp_path / f"teacher-{damage}"
    shutil.copytree(ASSETS / "digits_unet", d)
    if damage == "truncated":
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:  # one weight changed: the file reads, but its checksum (the fingerprint in teacher.json) does not match
        from safetensors.torch import load_file, save_file
        w = load_file(str(d / "model.safetensors"))
        k = next(iter(w))
        w[k] = w[k] + 1e-3
        save_file(w, str(d / "model.safetensors"))
    return d


CASES = {
    "unknown key": (["mode=ld3", "lr_thet=0.1"], "Did you mean one of: 'lr_theta'"),
    "wrong type": (["mode=ld3", "nfe=six"], "nfe"),
    "unknown mode": (["mode=ld4"], "unknown mode 'ld4'"),
    "unknown solver": (["mode=ld3", "solver=dpm_solver+++"], "dpm_solver+++"),
    "unknown teacher": (["mode=dsno", "teacher=no_such_teacher"], "no_such_teacher"),
    "nfe < 1": (["mode=ld3", "nfe=0"], "NFE"),
    "order too high": (["mode=ld3", "solver=dpm_solver++", "order=3", "nfe=2"], "order 3"),
    "truncated teacher": (["mode=ld3", "teacher={truncated}"], "safetensors"),
    "weights not learnsteps wrote": (["mode=dsno", "teacher={changed}"], "model.safetensors: no checksum"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_training_input_exits_2_with_a_message_and_writes_nothing(case, tmp_path, capsys):
    args, match = CASES[case]
    paths = {"truncated": teacher_copy(tmp_path, "truncated"), "changed": teacher_copy(tmp_path, "changed")}
    run_dir = tmp_path / "run"
    assert train_main([a.format(**paths) for a in args] + [f"run_dir={run_dir}", "trainer.progress_bar=false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match.lower() in err.lower(), err
    assert not run_dir.exists()


def test_bad_eval_input_exits_2_with_a_message_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "eval"
    bad = tmp_path / "schedule.json"
    bad.write_text(json.dumps({"format": "learnsteps-schedule", "times": [1.0, 0.5, 0.7]}))
    for args, match in [(["nfe=[0]"], "nfe"), ([f"schedules=[{bad}]"], str(bad)),
                        ([f"students=[{tmp_path}]"], "no DSNO student"), (["teachers=[nowhere]"], "nowhere")]:
        assert eval_main(args + [f"out_dir={out}", "samples=16"]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and match in err, (args, err)
        assert not out.exists()


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = RunConfig(mode="test")
    cfg.trainer.max_steps, cfg.trainer.checkpoint_every, cfg.trainer.progress_bar = 20, 4, False
    trainer = make_trainer(cfg, tmp_path, [])
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 1)), batch_size=4)
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 10.*resumes from .*last.ckpt"):
        trainer.fit(Linear(lr=0.1, nan_at=9), data)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8 and torch.isfinite(last["state_dict"]["w"]).all()
    assert not list((tmp_path / "checkpoints").glob("*.tmp*"))


def test_an_interrupted_write_leaves_the_previous_file(tmp_path, monkeypatch):
    path = write_text(tmp_path / "a.json", "old")
    st = write_safetensors(tmp_path / "w.safetensors", {"w": torch.ones(3)})
    monkeypatch.setattr(Path, "write_text", lambda self, text: (open(self, "w").write(text[:2]), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        write_text(path, "new and longer")
    import learnsteps.files as files

    def half(tensors, name, metadata=None):
        Path(name).write_bytes(b"\0" * 5)
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "save_file", half)
    with pytest.raises(KeyboardInterrupt):
        write_safetensors(st, {"w": torch.zeros(3)})
    monkeypatch.undo()
    assert path.read_text() == "old" and not list(tmp_path.glob("*.tmp*"))
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(st))["w"], torch.ones(3))


def test_the_network_is_blocked_here_and_in_subprocesses_but_loopback_works():
    import socket
    import subprocess
    import sys

    with pytest.raises(OSError, match="may not reach the network"):
        socket.create_connection(("pypi.org", 443), timeout=1)
    with pytest.raises(OSError, match="may not reach the network"):
        socket.socket().connect(("8.8.8.8", 53))
    res = subprocess.run([sys.executable, "-c", "import urllib.request; urllib.request.urlopen('https://pypi.org')"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "may not reach the network" in res.stderr
    with socket.create_server(("127.0.0.1", 0)) as server:  # what gloo's rendezvous needs
        socket.create_connection(server.getsockname(), timeout=5).close()

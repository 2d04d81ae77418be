import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from learnsteps.files import write_safetensors
from safetensors.torch import save_file

import learnsteps as ls
from helpers import refused_by_train_py
from learnsteps.core.schedules import VPLinear
from learnsteps.teachers import load_teacher
from learnsteps.teachers.network import TeacherLoadError, edm_teacher, save_unet_teacher
from learnsteps.teachers.unet import UNet, UNetConfig

ROOT = Path(__file__).resolve().parents[1]
SMALL = UNetConfig(channels=8, channel_mult=[1, 2], blocks_per_level=1)


def randomized(net):
    """Zero-initialised output layers make a fresh UNet predict 0: give every weight a value."""
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net


def test_own_unet_teacher_round_trip_and_fingerprint(tmp_path):
    net = randomized(UNet(SMALL))
    save_unet_teacher(tmp_path, net, VPLinear(), extra=dict(note="test"))
    meta = json.loads((tmp_path / "teacher.json").read_text())
    teacher = load_teacher(tmp_path)
    assert meta["fingerprint"] == teacher.fingerprint() and meta["note"] == "test"
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.9, 0.5, 0.1])
    torch.testing.assert_close(teacher(x, t), net(x, t))
    assert teacher.shape == (1, 8, 8) and not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training  # a teacher stays in eval mode
    out = ls.sample(teacher, torch.randn(2, 1, 8, 8), ls.grids.make("logsnr", 4, teacher.noise_schedule), "unipc", 2)
    assert torch.isfinite(out).all()
    # other weights under the same teacher.json: the fingerprint catches it
    write_safetensors(tmp_path / "model.safetensors", {k: v + 1e-3 for k, v in net.state_dict().items()})
    with pytest.raises(TeacherLoadError, match="do not match the fingerprint"):
        load_teacher(tmp_path)


def test_corrupt_weights_are_a_clear_error(tmp_path):
    save_unet_teacher(tmp_path, UNet(SMALL), VPLinear())
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(TeacherLoadError, match="not a readable safetensors file"):
        load_teacher(tmp_path)


diffusers = pytest.importorskip("diffusers")


def tiny_unet(**kw):
    return randomized(diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                            block_out_channels=(8, 16), norm_num_groups=4,
                                            down_block_types=("DownBlock2D", "DownBlock2D"),
                                            up_block_types=("UpBlock2D", "UpBlock2D"), **kw))


SCHED = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="epsilon")


def test_diffusers_unet_from_a_local_directory(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    diffusers.DDPMScheduler(**SCHED).save_pretrained(tmp_path / "scheduler")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    teacher = load_teacher(tmp_path)  # a pipeline layout: unet/ and scheduler/
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([999.0, 10.0])
    torch.testing.assert_close(teacher(x, t), unet(x, t).sample)
    assert teacher.prediction == "epsilon" and teacher.noise_schedule.config()["n"] == 1000 and teacher.shape == (1, 8, 8)
    assert len(teacher.fingerprint()) == 64 and not teacher.training
    grid = ls.grids.make("time_uniform", 5, teacher.noise_schedule, to_zero=True)
    assert torch.isfinite(ls.sample(teacher, torch.randn(2, 1, 8, 8), grid, "dpm_solver++", 2)).all()


def test_diffusers_class_conditional_with_guidance(tmp_path):
    unet = tiny_unet(num_class_embeds=4)  # class 3 plays "no label"
    unet.save_pretrained(tmp_path)
    teacher = ls.teachers.network.diffusers_teacher(str(tmp_path), scheduler_config=dict(SCHED, prediction_type="v_prediction"))
    assert teacher.prediction == "v"
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([500.0, 500.0]), torch.tensor([0, 2])
    guided = ls.ClassifierFreeGuidance(teacher, 2.5, null_cond=3)
    u, c = unet(x, t, class_labels=torch.tensor([3, 3])).sample, unet(x, t, class_labels=y).sample
    torch.testing.assert_close(guided(x, t, y), u + 2.5 * (c - u), rtol=1e-5, atol=1e-5)


def test_hub_model_offline_and_not_cached_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(TeacherLoadError, match="not in the Hugging Face cache .*offline.*huggingface-cli download"):
        load_teacher("google/ddpm-cifar10-32")


class EDMNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)

    def forward(self, x, sigma):
        return self.lin(x) / (1 + sigma[:, None])


def test_edm_teacher_from_a_state_dict(tmp_path):
    net = EDMNet()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    for f in ("w.pt", "w.safetensors"):
        teacher = edm_teacher(EDMNet(), tmp_path / f)
        x, s = torch.randn(3, 6), torch.tensor([80.0, 1.0, 0.01])
        torch.testing.assert_close(teacher.x0(x, s), net(x, s))
        torch.testing.assert_close(teacher.eps(x, s), (x - net(x, s)) / s[:, None])
    with pytest.raises(TeacherLoadError, match="do not exist"):
        edm_teacher(EDMNet(), tmp_path / "missing.pt")


def run_train(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "WANDB_MODE": "disabled"})


def test_train_teacher_mode_exports_a_loadable_teacher(tmp_path):
    res = run_train("mode=teacher", "trainer.max_steps=3", "unet.channels=8", f"run_dir={tmp_path}", "sample_steps=3",
                    "trainer.progress_bar=false")
    assert res.returncode == 0, res.stderr[-2000:]
    teacher = load_teacher(tmp_path / "teacher")
    assert teacher.net.config.channels == 8
    assert json.loads((tmp_path / "teacher" / "teacher.json").read_text())["trained"]["steps"] == 3
    assert (tmp_path / "samples.png").stat().st_size > 0 and (tmp_path / "config.yaml").is_file()


@pytest.mark.parametrize("args, match", [
    (["mode=teachr"], "unknown mode 'teachr'"),
    ([], "say which mode"),
    (["mode=teacher", "batch_sise=3"], "Did you mean: 'batch_size'"),
    (["mode=teacher", "data=cifar"], "data='cifar': must be one of 'digits'"),
])
def test_bad_train_arguments_exit_2_with_a_message(args, match, tmp_path, capsys):
    assert match in refused_by_train_py([*args, f"run_dir={tmp_path}"], capsys)

import json
from pathlib import Path

import pytest
import torch

from learnsteps.config import load_config
from learnsteps.dsno.module import DSNOConfig, student_times, time_weights, train_dsno
from learnsteps.dsno.student import DSNOStudent, StudentConfig, TemporalConv, load_student
from learnsteps.core.schedules import VPLinear
from learnsteps.teachers.unet import UNetConfig

ROOT = Path(__file__).resolve().parents[1]
SMALL = UNetConfig(channels=8, channel_mult=[1, 2], blocks_per_level=1)


def test_temporal_conv_mixes_times_only_through_its_modes():
    torch.manual_seed(0)
    conv = TemporalConv(channels=3, num_times=6, modes=2)
    h = torch.randn(2, 6, 3, 4, 4)
    out = conv(h)
    assert out.shape == h.shape and (out - h).abs().max() > 0
    # a signal with only frequencies >= 2 along the time axis is outside the kept modes: the layer passes it
    m = torch.arange(6, dtype=torch.float32)
    high = torch.cos(2 * torch.pi * 2 * m / 6)[None, :, None, None, None].expand(2, 6, 3, 4, 4)
    torch.testing.assert_close(conv(high), high, rtol=0, atol=1e-5)
    # pixels do not mix: changing one pixel changes only that pixel's output
    h2 = h.clone()
    h2[..., 0, 0] += 1
    diff = (conv(h2) - conv(h)).abs().sum(dim=(0, 1, 2))
    assert diff[0, 0] > 0 and diff.flatten()[1:].max() == 0


def test_fft_runs_in_float32_under_autocast():
    conv = TemporalConv(channels=4, num_times=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(torch.randn(1, 4, 4, 2, 2, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_student_outputs_every_time_and_copies_start_alike():
    cfg = StudentConfig(unet=SMALL, output_times=[0.5, 0.2, 0.05, 0.0], time_input=[0.5, 0.2, 0.05, 0.001],
                        temporal=False)
    student = DSNOStudent(cfg)
    x = torch.randn(3, 1, 8, 8)
    out = student(x)
    assert out.shape == (3, 4, 1, 8, 8)
    # without temporal layers, output m is the backbone at time input m
    torch.testing.assert_close(out[:, 1], student.unet(x, torch.full((3,), 0.2)))
    with_temporal = DSNOStudent(StudentConfig(**{**cfg.__dict__, "temporal": True}))
    assert sum(p.numel() for p in with_temporal.parameters()) > sum(p.numel() for p in student.parameters())


def test_snr_weights_clamp_as_dsno_does():
    w = time_weights(DSNOConfig(), VPLinear(), torch.tensor([1.0, 0.3, 0.05, 0.0], dtype=torch.float64))
    assert w[0] == 1.0 and w[-1] == 1e4 and (w[1:] >= w[:-1]).all()
    assert time_weights(DSNOConfig(weighting="uniform"), VPLinear(), torch.zeros(3)).tolist() == [1, 1, 1]


def test_output_times_are_dsno_s_and_nest_across_m():
    vp = VPLinear(t_min=0.0)
    torch.testing.assert_close(student_times(DSNOConfig(num_times=4), vp),
                               torch.tensor([0.5625, 0.25, 0.0625, 0.0], dtype=torch.float64))  # DSNO, CIFAR-10
    assert student_times(DSNOConfig(num_times=1), vp).tolist() == [0.0]
    for kind in ("quadratic", "uniform", "logsnr"):
        t8 = student_times(DSNOConfig(num_times=8, times=kind), VPLinear())
        for m in (1, 2, 4):
            torch.testing.assert_close(student_times(DSNOConfig(num_times=m, times=kind), VPLinear()), t8[8 // m - 1::8 // m])
    lam = VPLinear().lambda_(student_times(DSNOConfig(num_times=4, times="logsnr"), VPLinear())[:-1])
    torch.testing.assert_close(lam.diff(), torch.full((2,), float(lam[1] - lam[0]), dtype=torch.float64))
    for bad in (dict(num_times=0), dict(times="cosine"), dict(output_times=[0.5, 0.6, 0.0]),
                dict(output_times=[0.5, 0.1])):
        with pytest.raises(ValueError):
            student_times(DSNOConfig(**bad), VPLinear())


def test_dsno_end_to_end_on_the_exact_digits_teacher(tmp_path):
    cfg = load_config(DSNOConfig, [ROOT / "configs" / "dsno.yaml"], [
        "teacher=gmm_digits", f"run_dir={tmp_path}", "trainer.max_steps=20", "trainer.val_check_interval=10",
        "trajectories.n=128", "trajectories.steps_per_interval=4", "unet.channels=8", "batch_size=16",
        "trainer.progress_bar=false", "wandb.mode=disabled"])
    run_dir = train_dsno(cfg)
    student = load_student(run_dir / "student")
    info = json.loads((run_dir / "student" / "student.json").read_text())
    assert info["teacher"]["name"] == "gmm_digits" and len(info["student"]["output_times"]) == 4
    assert info["training"]["steps"] == 20 and info["student"]["output_times"][-1] == 0.0
    x = student.sample(torch.randn(5, 1, 8, 8))
    assert x.shape == (5, 1, 8, 8) and torch.isfinite(x).all()
    (run_dir / "student" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_student(run_dir / "student")
    # the same trajectories serve M = 2 and plain one-step distillation (M = 1, no temporal layers)
    for extra in (["num_times=2"], ["num_times=1", "temporal=false"]):
        more = load_config(DSNOConfig, [ROOT / "configs" / "dsno.yaml"], [
            "teacher=gmm_digits", f"run_dir={tmp_path / extra[0]}", f"data_dir={run_dir / 'trajectories'}",
            "trainer.max_steps=4", "trainer.val_check_interval=2", "unet.channels=8", "batch_size=16",
            "trainer.progress_bar=false", "wandb.mode=disabled", *extra])
        one = load_student(train_dsno(more) / "student")
        assert one.cfg.output_times == info["student"]["output_times"][4 // one.num_times - 1::4 // one.num_times]
    assert not (tmp_path / "num_times=2" / "trajectories").exists()
    with pytest.raises(ValueError, match="do not hold output time"):
        train_dsno(load_config(DSNOConfig, [ROOT / "configs" / "dsno.yaml"], [
            "teacher=gmm_digits", f"run_dir={tmp_path / 'bad'}", f"data_dir={run_dir / 'trajectories'}",
            "num_times=3", "wandb.mode=disabled"]))
    assert not (tmp_path / "bad").exists()  # nothing written for a bad request

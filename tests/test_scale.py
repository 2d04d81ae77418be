"""Real size (issue #31): the benchmark's smallest setting runs (never its timings), and a large teacher gets LD3's
large-teacher settings and bfloat16 by itself, a small one today's, and whatever the user sets is kept."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from learnsteps.config import CONFIG_DIR, load_config
from learnsteps.ld3 import LD3Config, config as ld3_config
from learnsteps.teachers import load
from learnsteps.teachers.model_index import denoiser_parameters

pytest.importorskip("diffusers")
from tiny_pipelines import BUILD  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_scale_benchmark_toy(tmp_path):
    """`python benchmarks/scale.py toy=true`: one teacher call, one LD3 step, pairs and one DSNO step, each in its
    own process, through the pipeline-teacher path (bfloat16 weights, an embeddings file); finite ratios, memory
    measured."""
    out = tmp_path / "scale"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "toy=true", f"out_dir={out}"],
                          capture_output=True, text=True, env=dict(os.environ, WANDB_MODE="disabled"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    results = {r["result"]["kind"]: r["result"] for r in records}
    assert set(results) == {"call", "ld3", "pairs", "dsno"}, [r["result"].get("error") for r in records]
    for kind, r in results.items():
        assert "error" not in r, r
        assert math.isfinite(r["seconds"]) and r["seconds"] > 0 and r["total"] > 0, r
    for kind in ("ld3", "pairs", "dsno"):
        assert math.isfinite(results[kind]["ratio"]) and results[kind]["ratio"] > 0
    assert results["ld3"]["peak"] > 0 and results["dsno"]["peak"] > 0  # what the step adds above the loaded teacher
    assert results["pairs"]["calls"] > 0
    text = (out / "scale.md").read_text()
    assert "LD3 step" in text and "DSNO step" in text and "Failed" not in text


def ld3_cfg(*args) -> LD3Config:
    return load_config(LD3Config, [CONFIG_DIR / "ld3.yaml"], list(args))


def test_auto_settings_by_teacher_size(monkeypatch, capsys):
    from learnsteps.teachers import load_teacher

    teacher = load_teacher("digits_unet")
    small = ld3_cfg()
    ld3_config.resolve_auto(small, teacher)  # today's recipe, said nowhere
    assert (small.batch_size, small.val_every_n_steps) == (32, 10)
    assert (small.pairs.train, small.pairs.val, small.pairs.test, small.pairs.steps, small.pairs.batch_size) == \
        (200, 200, 200, 40, 128)
    assert "large teacher" not in capsys.readouterr().out

    monkeypatch.setattr(ld3_config, "LARGE_TEACHER", 1000)  # the digits UNet counts as large
    large = ld3_cfg("pairs.test=7", "batch_size=3")
    ld3_config.resolve_auto(large, teacher)
    said = capsys.readouterr().out
    assert "large teacher" in said and "pairs.train=100" in said and "batch_size=3" not in said
    assert (large.batch_size, large.pairs.test) == (3, 7)  # the user's
    assert (large.pairs.train, large.pairs.val, large.pairs.steps, large.pairs.batch_size, large.val_every_n_steps) \
        == (100, 50, 20, 4, 25)
    assert f"remat={large.remat}" in said  # remat=auto: its own threshold (5 M parameters), said with the rest

    monkeypatch.setattr(ld3_config, "HUGE_TEACHER", 2000)  # and as huge: fewer pairs again
    huge = ld3_cfg()
    ld3_config.resolve_auto(huge, teacher)
    assert "huge teacher" in capsys.readouterr().out
    assert (huge.batch_size, huge.pairs.train, huge.pairs.val, huge.pairs.test, huge.pairs.batch_size) == \
        (2, 32, 16, 32, 2)
    assert ld3_config.size_of(1999) == "large" and ld3_config.size_of(999) == "small"


def test_auto_dtype_counts_the_denoiser(tmp_path, monkeypatch):
    """teacher_dtype=auto: the denoiser's parameters read from its safetensors headers (exactly), bfloat16 at
    LARGE_TEACHER or more; not a pipeline: float32."""
    from diffusers import DiffusionPipeline

    directory = BUILD["sdxl"](tmp_path / "sdxl")
    unet = DiffusionPipeline.from_pretrained(directory).unet
    n = sum(p.numel() for p in unet.parameters()) + sum(b.numel() for b in unet.buffers())
    assert denoiser_parameters(directory) == n
    assert denoiser_parameters(tmp_path / "nothing") is None
    assert load.auto_dtype(str(directory)) == "float32"
    monkeypatch.setattr(load, "LARGE_TEACHER", n)
    assert load.auto_dtype(str(directory)) == "bfloat16"
    assert load.auto_dtype("digits_unet") == "float32"
    teacher = load.load_teacher(str(directory), conditions=["a cat"], teacher_dtype="auto", height=8, width=8)
    assert next(teacher.net.parameters()).dtype == torch.bfloat16

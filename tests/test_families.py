"""The pipeline families users bring today (issue #29): SDXL, FLUX.1 (dev, schnell), FLUX.2, Qwen-Image and Wan video,
as tiny pipelines with seeded random weights built offline (tests/tiny_pipelines.py), loaded the way a user's
model is. For each: the teacher's call is the pipeline's own (its own grid and solver in our core give its own
latents), a few LD3 steps go back into the same pipeline through apply_schedule and TabulatedScheduler and give our
core's latents (float32: <= 1e-5 relative), and the resolution, dtype and embeddings-file options do what they say."""
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

import learnsteps as ls
from learnsteps.interop.diffusers import pipeline_grid
from learnsteps.schedule import Schedule, ScheduleError
from learnsteps.teachers import load_teacher
from learnsteps.teachers.network import TeacherLoadError

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from learnsteps.teachers.pipelines import encode_conditions  # noqa: E402
from tiny_pipelines import BUILD, load_pipeline, own_grid, run_pipeline  # noqa: E402

PROMPTS = ["a red dot", "two cats"]
# the teacher as users run each pipeline: its guidance, its size and text length (tiny here)
OPTIONS = {"sdxl": dict(guidance=4.0, height=8, width=8),
           "flux": dict(guidance=3.5, height=16, width=16, max_sequence_length=16),  # FLUX.1 [dev]: an input, one pass
           "flux_cfg": dict(guidance=3.5, true_cfg=2.0, negative_prompt="ugly", height=16, width=16,
                            max_sequence_length=16),  # and true CFG with a negative prompt
           "schnell": dict(height=16, width=16, max_sequence_length=16),
           "flux2": dict(guidance=4.0, height=16, width=16, max_sequence_length=192),  # past its system message
           "qwen": dict(true_cfg=4.0, negative_prompt=" ", height=16, width=16),
           "wan": dict(guidance=5.0, height=16, width=16, frames=5, max_sequence_length=16),
           "wan22": dict(guidance=5.0, height=16, width=16, frames=5, max_sequence_length=16)}  # TI2V's timesteps
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: build(root / name) for name, build in BUILD.items()}


def teacher_of(pipes, case, **kw):
    return load_teacher(str(pipes[case.split("_")[0]]), conditions=PROMPTS, **{**OPTIONS[case], **kw})


def relative(a, b):
    return float((a - b).norm() / b.norm())


SHAPES = {"sdxl": (4, 4, 4), "flux": (4, 8, 8), "flux_cfg": (4, 8, 8), "schnell": (4, 8, 8), "flux2": (16, 4, 4),
          "qwen": (4, 4, 4), "wan": (4, 2, 2, 2), "wan22": (4, 2, 2, 2)}


@pytest.mark.parametrize("case", list(OPTIONS))
def test_a_family_loads_as_a_guided_teacher_at_its_size(pipes, case):
    teacher = teacher_of(pipes, case)
    flow = case != "sdxl"
    assert teacher.shape == SHAPES[case] and teacher.conditions == PROMPTS
    assert teacher.noise_schedule.kind == ("flow" if flow else "ddpm")
    assert teacher.prediction == ("flow" if flow else "epsilon")
    x = torch.randn(3, *teacher.shape, generator=torch.Generator().manual_seed(1))
    t = torch.full((3,), teacher.noise_schedule.t_max * 0.5)
    cond = torch.tensor([0, 1, 0])
    c = teacher.net(x, t, cond)
    assert c.shape == x.shape and torch.isfinite(c).all()
    assert not torch.allclose(c, teacher.net(x, t, torch.tensor([1, 0, 1])))  # the prompt reaches the network
    if teacher.cfg != 1:  # the pipeline's own combination of the two branches, in one batch
        u = teacher.net(x, t, torch.full_like(cond, teacher.null))
        # float32 kernels round a batch of 6 and two of 3 differently (~1e-7 relative), and CFG multiplies c - u by
        # the scale: 1.4e-6 absolute on an AMD EPYC without AVX-512, where a wrong combination is off by ~0.1
        close = dict(rtol=1e-5, atol=1e-6 * (1 + 2 * teacher.cfg))
        torch.testing.assert_close(teacher(x, t, cond), teacher.net.combine(c, u, teacher.cfg), **close)
        if case != "qwen":  # linear CFG; Qwen-Image renormalises per token (its own test below)
            torch.testing.assert_close(teacher(x, t, cond), u + teacher.cfg * (c - u), **close)
    else:
        torch.testing.assert_close(teacher(x, t, cond), c)
    images = teacher.decode(x[:1])
    assert images.shape[:2] == (1, 3) and images.abs().max() <= 1
    assert images.shape[2:] == ((5, 16, 16) if case.startswith("wan") else (teacher.config["height"],) * 2)
    record = teacher.record(steps=4)
    assert record["height"] == OPTIONS[case]["height"] and record["pipeline"] == type(load_pipeline(
        pipes[case.split("_")[0]])).__name__
    assert ("mu" in record) == (case in ("flux", "flux_cfg", "schnell", "flux2", "qwen"))  # shifts with the size


def test_guidance_means_what_each_pipeline_makes_of_it(pipes):
    dev, cfg, schnell = teacher_of(pipes, "flux"), teacher_of(pipes, "flux_cfg"), teacher_of(pipes, "schnell")
    assert (dev.net.guidance, dev.cfg) == (3.5, 1.0)  # FLUX.1 [dev]: an input, one pass
    assert (cfg.net.guidance, cfg.cfg) == (3.5, 2.0)  # true CFG on top, with the negative prompt's row
    assert (schnell.net.guidance, schnell.cfg) == (None, 1.0)
    with pytest.raises(TeacherLoadError, match="no guidance embedding .* its CFG is true_cfg="):
        teacher_of(pipes, "schnell", guidance=3.5)
    with pytest.raises(TeacherLoadError, match="a WanPipeline's CFG scale is guidance="):
        teacher_of(pipes, "wan", true_cfg=2.0)
    with pytest.raises(TeacherLoadError, match="Flux2Pipeline has no negative branch"):
        teacher_of(pipes, "flux2", true_cfg=2.0)
    qwen = teacher_of(pipes, "qwen")
    x = torch.randn(2, *qwen.shape)
    t = torch.full((2,), 0.5)
    c, u = qwen.net(x, t, torch.tensor([0, 1])), qwen.net(x, t, torch.tensor([2, 2]))
    tokens = lambda v: v.reshape(2, 4, 2, 2, 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 4, 16)  # noqa: E731  2x2 patches
    comb, cond = tokens(u + 4.0 * (c - u)), tokens(c)
    out = tokens(qwen(x, t, torch.tensor([0, 1])))  # CFG, then each token rescaled to the conditional one's norm
    torch.testing.assert_close(out, comb * cond.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True),
                               rtol=1e-5, atol=1e-6)
    sdxl = teacher_of(pipes, "sdxl", guidance_rescale=0.7)
    x = torch.randn(2, *sdxl.shape)
    t = torch.full((2,), 500.0)
    c, u = sdxl.net(x, t, torch.tensor([0, 1])), sdxl.net(x, t, torch.tensor([2, 2]))
    g = u + 4.0 * (c - u)
    rescaled = g * (c.std(dim=(1, 2, 3), keepdim=True) / g.std(dim=(1, 2, 3), keepdim=True))
    torch.testing.assert_close(sdxl(x, t, torch.tensor([0, 1])), 0.7 * rescaled + 0.3 * g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", list(OPTIONS))
def test_the_pipelines_own_grid_and_solver_in_our_core_give_its_latents(pipes, case):
    """The pipeline with its own scheduler, from our noise; our core on the grid it ran, with its solver, from the
    pipeline's own start (a flow pipeline's sigma = 1, alpha = 0). By hand, Euler from t = 1 through the teacher,
    they agree to rounding too, which checks the family's call alone."""
    import diffusers

    teacher = teacher_of(pipes, case)
    pipe = load_pipeline(pipes[case.split("_")[0]])
    noise = torch.randn(2, *teacher.shape, generator=torch.Generator().manual_seed(0))
    theirs = run_pipeline(pipe, teacher, noise, num_inference_steps=4)
    grid, solver = own_grid(pipe, teacher)
    cond = torch.tensor([0, 1])
    if solver["solver"] == "unipc":  # Wan: UniPC calls the network at its own timesteps, read by pipeline_grid
        pg = pipeline_grid(pipe, 4)
        ours = ls.sample(teacher, noise * pg.latents_scale, cond=cond, **pg.solve_kwargs) * pg.output_scale
    else:
        ours = ls.sample(teacher, noise, grid, cond=cond, **solver)
    assert relative(ours, theirs) <= 1e-5
    if teacher.noise_schedule.kind == "ddpm":  # SDXL: EulerDiscrete starts at noise * init_noise_sigma = our x_T
        return
    assert float(grid[0]) == pytest.approx(1.0, abs=2e-6)  # UniPC with flow sigmas rounds 1 to 1 - 1e-6
    if solver["solver"] != "euler":  # Wan's UniPC: the by-hand check with the flow Euler scheduler instead
        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=teacher.noise_schedule.shift)
        theirs = run_pipeline(pipe, teacher, noise, num_inference_steps=4)
        grid, solver = own_grid(pipe, teacher)
    x = noise
    with torch.no_grad():  # FlowMatchEuler's step, x + (sigma_next - sigma) v, from sigma = 1
        for s, s_next in zip(grid[:-1], grid[1:]):
            x = x + (s_next - s) * teacher(x, s.expand(2), cond)
    assert relative(x, theirs) <= 1e-5  # the network's own input, the pipeline's own combination


LD3_RUNS = {"sdxl": ("unipc", 2), "flux": ("dpm_solver++", 2), "flux2": ("euler", 1), "qwen": ("dpm_solver++", 2),
            "wan": ("unipc", 2)}


def ld3_run(pipes, case, tmp_path, solver, order):
    from learnsteps.config import load_config
    from learnsteps.ld3 import LD3Config, train_ld3

    options = [f"{k}={json.dumps(v)}" for k, v in OPTIONS[case].items()]
    cfg = load_config(LD3Config, [ROOT / "configs" / "ld3.yaml"], [
        f"teacher={pipes[case]}", f"conditions={json.dumps(PROMPTS)}", *options, f"run_dir={tmp_path}",
        f"solver={solver}", f"order={order}", "nfe=3", "pairs.train=4", "pairs.val=2", "pairs.test=2",
        "pairs.steps=3", "batch_size=2", "rounds_theta=1", "rounds_joint=1", "baselines=[time_uniform]",
        "trainer.progress_bar=false", "wandb.mode=disabled"])
    return train_ld3(cfg)


@pytest.mark.parametrize("case", list(LD3_RUNS))
def test_ld3_on_a_family_and_its_schedule_back_into_the_pipeline(pipes, tmp_path, case):
    """A few LD3 steps on the guided teacher at its size; the schedule file records the pipeline, the size (and the
    shift mu of FLUX-like schedulers); apply_schedule and TabulatedScheduler make the same pipeline give our core's
    latents."""
    from learnsteps.interop.diffusers import apply_schedule, initial_sample
    from learnsteps.interop.scheduler import TabulatedScheduler
    from learnsteps.schedule import load_schedule

    run_dir = ld3_run(pipes, case, tmp_path, *LD3_RUNS[case])
    schedule = load_schedule(run_dir / "schedule.json")
    teacher = teacher_of(pipes, case)
    assert schedule.teacher["fingerprint"] == teacher.fingerprint()
    assert {k: schedule.teacher[k] for k in ("height", "width")} == {k: OPTIONS[case][k] for k in ("height", "width")}
    assert schedule.teacher.get("mu") == teacher.record(steps=3).get("mu")
    assert (run_dir / "samples.png").is_file()  # decoded: images, or a row of frames per clip
    noise = torch.randn(2, *teacher.shape, generator=torch.Generator().manual_seed(5))
    pipe = load_pipeline(pipes[case])
    x_T = noise * teacher.noise_schedule.init_noise_std()
    ours = ls.sample(teacher, x_T, cond=torch.tensor([0, 1]), **schedule.solve_kwargs)
    kwargs = apply_schedule(pipe, schedule)
    assert relative(run_pipeline(pipe, teacher, initial_sample(pipe.scheduler, schedule, noise), **kwargs), ours) <= 1e-5
    pipe.scheduler = TabulatedScheduler.from_schedule(run_dir / "schedule.json")
    theirs = run_pipeline(pipe, teacher, noise * pipe.scheduler.init_noise_sigma, num_inference_steps=3)
    assert relative(theirs, ours) <= 1e-5


def test_a_flux_schedule_belongs_to_its_size(pipes):
    """FLUX shifts its grid with the image size: the shift a schedule was learned at is recorded, a pipeline called
    at another size is refused (apply_schedule and TabulatedScheduler), and the grid the pipeline really runs is
    the file's, unshifted (diffusers shifts sigmas handed to it: the naive route lands elsewhere)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from learnsteps.interop.diffusers import apply_schedule, initial_sample
    from learnsteps.interop.scheduler import TabulatedScheduler

    teacher = teacher_of(pipes, "flux")
    assert teacher.record()["mu"] == calculate_shift(16)  # 16 px: 8x8 latents, 4x4 = 16 tokens
    assert teacher.noise_schedule.shift == pytest.approx(math.exp(calculate_shift(16)), rel=1e-12)
    assert teacher_of(pipes, "flux", height=32, width=32).record()["mu"] == calculate_shift(64)
    s = teacher.noise_schedule
    grid = ls.grids.make("shifted", 4, s, to_zero=True)
    schedule = Schedule.from_grid(grid, s, "euler", 1, teacher=teacher.record(steps=4))
    pipe = load_pipeline(pipes["flux"])
    kwargs = apply_schedule(pipe, schedule)
    seen = []

    def spy(p, i, t, out):
        seen.append(p.scheduler.sigmas.double().clone())
        return out

    x_T = initial_sample(pipe.scheduler, schedule, torch.randn(2, *teacher.shape))
    run_pipeline(pipe, teacher, x_T, callback_on_step_end=spy, **kwargs)
    assert torch.equal(seen[0], schedule.grid)  # exactly the file's grid
    with pytest.raises(ScheduleError, match="learned at height=16, width=16 .* called at another size"):
        pipe(prompt=PROMPTS, height=32, width=32, guidance_scale=3.5, output_type="latent", **kwargs)
    pipe.scheduler = TabulatedScheduler.from_schedule(schedule)
    with pytest.raises(ValueError, match="learned at height=16, width=16"):
        pipe(prompt=PROMPTS, height=32, width=32, guidance_scale=3.5, output_type="latent", num_inference_steps=4)
    # the naive route: the same times as sigmas=, through FluxPipeline's own scheduler, are shifted once more
    pipe = load_pipeline(pipes["flux"])
    seen.clear()
    run_pipeline(pipe, teacher, x_T, sigmas=schedule.times[:-1], callback_on_step_end=spy)
    mu = calculate_shift(16)
    shifted = torch.tensor([math.exp(mu) / (math.exp(mu) + 1 / t - 1)
                            for t in schedule.times[:-1]], dtype=torch.float32).double()
    torch.testing.assert_close(seen[0][:-1], shifted)
    assert not torch.allclose(seen[0], schedule.grid)


def test_sizes_are_checked_and_default_to_the_pipelines(pipes):
    with pytest.raises(TeacherLoadError, match="height=18 is not a multiple of 4 .* it would sample at 16.*use 16 or 20"):
        teacher_of(pipes, "flux", height=18)
    with pytest.raises(TeacherLoadError, match="frames=6 is not 1 \\+ a multiple of 4"):
        teacher_of(pipes, "wan", frames=6)
    with pytest.raises(TeacherLoadError, match="frames= does not apply to a FluxPipeline"):
        teacher_of(pipes, "flux", frames=5)
    wan = load_teacher(str(pipes["wan"]), conditions=PROMPTS)  # WanPipeline's own default: 832 x 480, 81 frames
    assert wan.shape == (4, 21, 60, 104) and (wan.size["width"], wan.size["frames"]) == (832, 81)
    # another size is another teacher: a schedule learned at one is refused by eval at the other
    assert teacher_of(pipes, "flux").fingerprint() != teacher_of(pipes, "flux", height=32).fingerprint()


def test_a_bfloat16_teacher_computes_in_bfloat16_and_samples_in_float32(pipes):
    from learnsteps.core.denoiser import dtype_of

    full, half = teacher_of(pipes, "flux"), teacher_of(pipes, "flux", teacher_dtype="bfloat16")
    assert half.net.dtype == torch.bfloat16 and half.net.embeds.dtype == torch.bfloat16
    assert dtype_of(half) == torch.float32 and half.config["dtype"] == "bfloat16"
    noise = torch.randn(2, *full.shape, generator=torch.Generator().manual_seed(0))
    grid = ls.grids.make("shifted", 4, full.noise_schedule, to_zero=True)
    a, b = (ls.sample(t, noise, grid, "euler", 1, cond=torch.tensor([0, 1])) for t in (full, half))
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert relative(b, a) <= 0.05  # bfloat16's 8-bit mantissa, through 4 steps


def test_precomputed_embeddings_replace_the_text_encoders(pipes, tmp_path, capsys):
    """`python -m learnsteps.teachers.pipelines encode` writes the tables; a teacher from that file is the same
    teacher, loaded without the text encoders (here: a copy of the pipeline that has none)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "flux.safetensors"
    run = subprocess.run([sys.executable, "-m", "learnsteps.teachers.pipelines", "encode", str(pipes["flux"]),
                          "--conditions", str(prompts), "--negative-prompt", "ugly", "--max-sequence-length", "16",
                          "--out", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    bare = tmp_path / "bare"
    shutil.copytree(pipes["flux"], bare, ignore=shutil.ignore_patterns("text_encoder*", "tokenizer*"))
    options = dict(OPTIONS["flux_cfg"])
    options.pop("negative_prompt")
    a = teacher_of(pipes, "flux_cfg")
    b = load_teacher(str(bare), conditions=str(out), **options)
    assert b.conditions == PROMPTS and b.config["negative_prompt"] == "ugly" and b.fingerprint() != ""
    x, t = torch.randn(2, *a.shape), torch.full((2,), 0.7)
    torch.testing.assert_close(b(x, t), a(x, t), rtol=0, atol=0)
    with pytest.raises(TeacherLoadError, match="negative prompt 'ugly', not 'nice'"):
        load_teacher(str(bare), conditions=str(out), **dict(options, negative_prompt="nice"))
    plain = encode_conditions(str(pipes["flux"]), PROMPTS, tmp_path / "plain.safetensors", max_sequence_length=16)
    with pytest.raises(TeacherLoadError, match="encoded without a negative prompt"):
        load_teacher(str(bare), conditions=str(plain), **options)
    with pytest.raises(TeacherLoadError, match="a FluxPipeline's text encoders, not a WanPipeline's"):
        load_teacher(str(pipes["wan"]), conditions=str(out))
    with pytest.raises(TeacherLoadError, match="max_sequence_length=16, not 32"):
        load_teacher(str(bare), conditions=str(out), **dict(options, max_sequence_length=32))
    data = bytearray(out.read_bytes())
    data[-3] ^= 1
    out.write_bytes(bytes(data))
    with pytest.raises(TeacherLoadError, match="checksum"):
        load_teacher(str(bare), conditions=str(out), **options)
    from learnsteps.teachers.pipelines.__main__ import main

    assert main(["encode", str(tmp_path / "nowhere"), "--conditions", str(prompts), "--out",
                 str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and not (tmp_path / "x.safetensors").exists()


def test_a_pipelines_unet_directory_says_to_load_the_pipeline(pipes):
    with pytest.raises(TeacherLoadError, match="is the UNet2DConditionModel of a pipeline: load the pipeline "
                                               "directory itself") as err:
        load_teacher(str(pipes["sdxl"] / "unet"), conditions=PROMPTS)
    assert "unconditional" not in str(err.value)
    with pytest.raises(TeacherLoadError, match="FluxTransformer2DModel of a pipeline"):
        load_teacher(str(pipes["flux"] / "transformer"))


def test_loading_a_teacher_leaves_the_progress_bars_as_the_user_set_them(pipes):
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for enabled in (False, True):
        for log in (dlog, tlog):
            (log.enable_progress_bar if enabled else log.disable_progress_bar)()
        teacher_of(pipes, "flux")
        assert dlog.is_progress_bar_enabled() == enabled and tlog.is_progress_bar_enabled() == enabled


def test_video_latents_through_the_core_eval_and_dsno(pipes, tmp_path):
    """5-D latents: the sampler, trajectories, frame-wise features and picture grids; DSNO on the teacher's own
    transformer (the fresh 2-D UNet student refuses them)."""
    from learnsteps.config import load_config
    from learnsteps.dsno import load_student
    from learnsteps.dsno.module import DSNOConfig, train_dsno
    from learnsteps.eval.evaluate import sample_in_batches
    from learnsteps.quality.images import save_image_grid
    from learnsteps.quality.metrics import Features
    from learnsteps.trajectories import TrajectoryDataset, TrajectorySpec, generate

    teacher = teacher_of(pipes, "wan")
    s = teacher.noise_schedule
    generate(teacher, tmp_path / "traj", TrajectorySpec(n=3, shard_size=2, num_times=3, solver="unipc", order=2,
                                                        steps_per_interval=2), progress=False)
    data = TrajectoryDataset(tmp_path / "traj")
    assert data.tensors["trajectory"].shape == (3, 3, 4, 2, 2, 2) and data.tensors["cond"].tolist() == [0, 1, 0]
    videos = sample_in_batches(teacher, torch.randn(3, *teacher.shape) * s.init_noise_std(),
                               ls.grids.make("shifted", 3, s, to_zero=True), "unipc", 2, 2,
                               cond=torch.tensor([0, 1, 0]))
    assert videos.shape == (3, 3, 5, 16, 16) and videos.abs().max() <= 1
    save_image_grid(videos, tmp_path / "clips.png")
    from PIL import Image

    assert Image.open(tmp_path / "clips.png").size == (4 * ((16 + 1) * 5 + 1), 4 * ((16 + 1) * 3 + 1))  # 5 frames a row
    grey = torch.rand(3, 1, 5, 8, 8) * 2 - 1
    features = Features("digits")
    torch.testing.assert_close(features(grey), features(grey.transpose(1, 2).flatten(0, 1)))  # FID over frames
    args = [f"teacher={pipes['wan']}", f"conditions={json.dumps(PROMPTS)}", "guidance=5.0", "height=16", "width=16",
            "frames=5", "trainer.max_steps=2", "trainer.val_check_interval=2", "trajectories.n=8",
            "trajectories.steps_per_interval=2", "batch_size=4", "trainer.progress_bar=false", "wandb.mode=disabled"]
    with pytest.raises(ValueError, match="video latents .* own network \\(backbone=teacher\\)"):
        train_dsno(load_config(DSNOConfig, [ROOT / "configs" / "dsno.yaml"],
                               [*args, "backbone=unet", f"run_dir={tmp_path / 'unet'}"]))
    assert not (tmp_path / "unet").exists()
    run = train_dsno(load_config(DSNOConfig, [ROOT / "configs" / "dsno.yaml"], [*args, f"run_dir={tmp_path / 'dsno'}"]))
    student = load_student(run / "student")  # the Wan transformer with temporal layers, on 5-D latents
    x = torch.randn(2, *teacher.shape)
    assert student.sample(x, torch.tensor([0, 1])).shape == x.shape

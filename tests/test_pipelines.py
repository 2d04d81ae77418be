"""Diffusers pipelines as teachers: tiny SD (epsilon and v), DiT and SD3 pipelines with random weights, built
offline (tests/tiny_pipelines.py), loaded the way a user's model is, sampled by our core, and a schedule handed
back to the same pipeline, which must then give our core's latents (float32: relative 1e-5)."""
import json

import numpy as np
import pytest
import torch

import learnsteps as ls
from learnsteps.schedule import Schedule, ScheduleError
from learnsteps.teachers import load_teacher
from learnsteps.teachers.network import TeacherLoadError

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
import tiny_pipelines  # noqa: E402

PROMPTS = ["a red dot", "two cats"]
KINDS = {"sd": (tiny_pipelines.stable_diffusion, {}), "sd_v": (tiny_pipelines.stable_diffusion,
                                                                dict(prediction_type="v_prediction")),
         "dit": (tiny_pipelines.dit, {}), "sd3": (tiny_pipelines.sd3, {}), "dit_flow": (tiny_pipelines.dit, dict(flow=True))}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {name: build(root / name, **kw) for name, (build, kw) in KINDS.items()}


def conditions_of(name):
    return [0, "two"] if name.startswith("dit") else PROMPTS


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name, schedule, prediction", [("sd", "ddpm", "epsilon"), ("sd_v", "ddpm", "v"),
                                                        ("dit", "ddpm", "epsilon"), ("sd3", "flow", "flow"),
                                                        ("dit_flow", "flow", "flow")])
def test_pipelines_load_as_latent_conditional_teachers(pipelines, name, schedule, prediction):
    teacher = load_teacher(str(pipelines[name]), conditions=conditions_of(name), guidance=3.0)
    assert teacher.noise_schedule.kind == schedule and teacher.prediction == prediction
    assert teacher.shape == (4, 4, 4) and teacher.conditions == conditions_of(name)
    if schedule == "flow":
        assert teacher.noise_schedule.shift == (2.0 if name == "dit_flow" else 3.0)
    x = torch.randn(3, *teacher.shape)
    t = torch.full((3,), teacher.noise_schedule.t_max * 0.5)
    cond = torch.tensor([0, 1, 0])
    # classifier-free guidance is uncond + w (cond - uncond), with the unconditional row of the table
    c, u = teacher.net(x, t, cond), teacher.net(x, t, torch.full_like(cond, teacher.null))
    torch.testing.assert_close(teacher(x, t, cond), u + 3.0 * (c - u), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(c, u)  # the condition reaches the network
    # without cond, sample i takes condition i mod K; decoding gives images in [-1, 1]
    torch.testing.assert_close(teacher(x, t), teacher(x, t, torch.tensor([0, 1, 0])))
    images = teacher.decode(x)
    assert images.shape == (3, 1 if name.startswith("dit") else 3, 8, 8) and images.abs().max() <= 1
    assert teacher.fingerprint() != load_teacher(str(pipelines[name]), conditions=conditions_of(name)[:1],
                                                 guidance=3.0).fingerprint()


@pytest.mark.parametrize("name, solver, order, to_zero", [("sd", "dpm_solver++", 2, True), ("sd_v", "unipc", 2, False),
                                                           ("sd3", "euler", 1, True), ("sd3", "dpm_solver++", 2, True),
                                                           ("sd", "euler", 1, True)])
def test_a_schedule_applied_to_the_pipeline_gives_our_latents(pipelines, name, solver, order, to_zero):
    import diffusers

    from learnsteps.interop.diffusers import apply_schedule

    teacher = load_teacher(str(pipelines[name]), conditions=PROMPTS, guidance=4.0)
    s = teacher.noise_schedule
    grid = ls.grids.make("shifted" if s.kind == "flow" else "logsnr", 5, s, to_zero=to_zero)
    eval_grid = grid.clone()
    eval_grid[1:-1] += 0.2 * (grid[2:] - grid[1:-1])  # decoupled model times, as LD3 learns them
    schedule = Schedule.from_grid(grid, s, solver, order, eval_grid=eval_grid, teacher=teacher.record())
    noise = torch.randn(2, *teacher.shape, generator=torch.Generator().manual_seed(0))
    ours = ls.sample(teacher, noise * s.init_noise_std(), grid, solver, order, eval_grid=eval_grid,
                     cond=torch.tensor([0, 1]), **schedule.options)
    pipe = diffusers.DiffusionPipeline.from_pretrained(pipelines[name], **({"text_encoder_3": None, "tokenizer_3": None}
                                                                         if name == "sd3" else {}))
    pipe.set_progress_bar_config(disable=True)
    kwargs = apply_schedule(pipe, schedule)
    # latents=noise: StableDiffusionPipeline scales them by init_noise_sigma (our start's scale, e.g. Euler's
    # x~ = x / alpha), StableDiffusion3Pipeline takes them as they are (our start from t = 1 is noise itself)
    theirs = pipe(PROMPTS, latents=noise, guidance_scale=4.0, output_type="latent", height=8, width=8,
                  **kwargs).images
    if type(pipe.scheduler).__name__ == "EulerDiscreteScheduler":
        theirs = schedule.from_x_tilde(theirs)
    assert relative(ours, theirs) <= 1e-5
    with pytest.raises(ScheduleError, match="num_inference_steps=5"):
        pipe(PROMPTS, guidance_scale=4.0, output_type="latent", height=8, width=8, num_inference_steps=7)


def test_dit_with_a_schedule_gives_our_images(pipelines):
    """DiTPipeline draws its own noise (no latents argument): the same generator gives the same start."""
    import diffusers

    from learnsteps.interop.diffusers import apply_schedule

    teacher = load_teacher(str(pipelines["dit"]), conditions=[0, 2], guidance=4.0)
    s = teacher.noise_schedule
    grid = ls.grids.make("logsnr", 4, s, to_zero=True)
    schedule = Schedule.from_grid(grid, s, "dpm_solver++", 2, teacher=dict(pipeline="DiTPipeline"))
    pipe = diffusers.DiffusionPipeline.from_pretrained(pipelines["dit"])
    pipe.set_progress_bar_config(disable=True)
    kwargs = apply_schedule(pipe, schedule)
    theirs = pipe([0, 2], guidance_scale=4.0, generator=torch.Generator().manual_seed(3), output_type="np", **kwargs).images
    noise = torch.randn(2, *teacher.shape, generator=torch.Generator().manual_seed(3))
    ours = teacher.decode(ls.sample(teacher, noise, grid, "dpm_solver++", 2, cond=torch.tensor([0, 1])))
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - theirs).max() <= 1e-5


def test_a_schedule_for_another_pipeline_class_is_refused(pipelines):
    import diffusers

    from learnsteps.interop.diffusers import apply_schedule

    s = ls.core.schedules.DiscreteDDPM("scaled_linear")
    schedule = Schedule.from_grid(ls.grids.make("logsnr", 4, s), s, "dpm_solver++", 2,
                                  teacher=dict(pipeline="StableDiffusion3Pipeline"))
    pipe = diffusers.DiffusionPipeline.from_pretrained(pipelines["sd"])
    with pytest.raises(ScheduleError, match="learned for a StableDiffusion3Pipeline, not a StableDiffusionPipeline"):
        apply_schedule(pipe, schedule)
    # a v-prediction teacher's schedule on an epsilon pipeline (or scheduler) is refused, not sampled as epsilon
    v = Schedule.from_grid(schedule.grid, s, "dpm_solver++", 2, teacher=dict(prediction_type="v_prediction"))
    with pytest.raises(ScheduleError, match="made for a v_prediction teacher, and this DDIMScheduler reads the model "
                                            "output as epsilon"):
        apply_schedule(pipe, v)
    with pytest.raises(ScheduleError, match="reads the model output as epsilon"):
        apply_schedule(diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                             beta_end=0.012), v)


def test_conditions_from_a_prompt_file_and_bad_conditions(pipelines, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red dot\n\n two cats \n")
    teacher = load_teacher(str(pipelines["sd"]), conditions=str(prompts))
    assert teacher.conditions == ["a red dot", "two cats"] and teacher.guidance == 1.0
    with pytest.raises(TeacherLoadError, match="text-conditional: give conditions="):
        load_teacher(str(pipelines["sd"]))
    with pytest.raises(TeacherLoadError, match="no such prompt file"):
        load_teacher(str(pipelines["sd"]), conditions=str(tmp_path / "missing.txt"))
    with pytest.raises(TeacherLoadError, match="'seven' is neither a label index nor a label name"):
        load_teacher(str(pipelines["dit"]), conditions=["seven"])
    assert load_teacher(str(pipelines["dit"])).conditions == [0, 1, 2]  # DiT: every label it names
    with pytest.raises(TeacherLoadError, match="unconditional"):
        load_teacher("gmm_digits", guidance=3.0)


def test_an_unsupported_pipeline_is_named(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(TeacherLoadError, match="is a KandinskyPipeline; learnsteps loads StableDiffusionPipeline"):
        load_teacher(str(tmp_path))


# ------------------------------------------------------------------------------------ the methods on pipelines
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def run_pipeline(pipe, name, schedule, teacher, seed):
    """The pipeline on `schedule` from the noise of `seed`: (our core's result, the pipeline's), as latents, or as
    images for DiT (whose pipeline takes no latents and always decodes)."""
    from learnsteps.interop.diffusers import apply_schedule

    noise = torch.randn(2, *teacher.shape, generator=torch.Generator().manual_seed(seed))
    # DiTPipeline starts from its noise as it is (no latents argument, no init_noise_sigma), as our core does
    assert teacher.noise_schedule.init_noise_std() == 1  # DDPM, and flow from t = 1
    ours = ls.sample(teacher, noise, schedule.grid, schedule.solver,
                     schedule.order, eval_grid=schedule.eval_grid, cond=torch.tensor([0, 1]), **schedule.options)
    kwargs = apply_schedule(pipe, schedule)
    if name.startswith("dit"):
        labels = teacher.net.labels[:-1].tolist()  # the conditions as DiT's label ids ("two" -> 2)
        theirs = pipe(labels, guidance_scale=teacher.guidance, output_type="np",
                      generator=torch.Generator().manual_seed(seed), **kwargs).images
        return (teacher.decode(ours) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), torch.from_numpy(theirs)
    theirs = pipe(teacher.conditions, latents=noise, guidance_scale=teacher.guidance, output_type="latent", height=8,
                  width=8, **kwargs).images
    return ours, theirs


@pytest.mark.parametrize("name, solver, order", [("sd3", "dpm_solver++", 2), ("sd", "unipc", 2),
                                                 ("sd_v", "dpm_solver++", 3), ("dit", "unipc", 2),
                                                 ("dit_flow", "euler", 1)])
def test_ld3_with_guidance_on_a_pipeline_and_back_into_it(pipelines, tmp_path, name, solver, order):
    """A few LD3 steps on a guided pipeline teacher: the pairs carry their conditions, the file records the
    pipeline, and `apply_schedule` makes the pipeline reproduce our core's latents on the learned grid."""
    import diffusers

    from learnsteps.config import load_config
    from learnsteps.ld3 import LD3Config, train_ld3
    from learnsteps.schedule import load_schedule
    from learnsteps.trajectories import TrajectoryDataset

    conditions = conditions_of(name)
    cfg = load_config(LD3Config, [ROOT / "configs" / "ld3.yaml"], [
        f"teacher={pipelines[name]}", f"conditions=[{','.join(map(str, conditions))}]", "guidance=4.0",
        f"run_dir={tmp_path}", f"solver={solver}", f"order={order}", "nfe=4", "pairs.train=6", "pairs.val=4",
        "pairs.test=4", "pairs.steps=4", "batch_size=3", "rounds_theta=1", "rounds_joint=1",
        "trainer.progress_bar=false", "wandb.mode=disabled"])
    run_dir = train_ld3(cfg)
    pairs = TrajectoryDataset(run_dir / "pairs" / "train")
    assert pairs.tensors["cond"].tolist() == [i % 2 for i in range(10)]  # sample j, condition j mod K
    assert (run_dir / "samples.png").is_file()  # decoded by the VAE
    schedule = load_schedule(run_dir / "schedule.json")
    assert schedule.teacher["pipeline"] == {"sd3": "StableDiffusion3Pipeline", "dit": "DiTPipeline",
                                            "dit_flow": "DiTPipeline"}.get(name, "StableDiffusionPipeline")
    assert schedule.teacher["conditions"] == conditions and schedule.teacher["guidance"] == 4.0
    assert schedule.teacher["prediction_type"] == ("v_prediction" if name == "sd_v" else "flow_prediction"
                                                   if name in ("sd3", "dit_flow") else "epsilon")
    teacher = load_teacher(str(pipelines[name]), conditions=conditions, guidance=4.0)
    pipe = diffusers.DiffusionPipeline.from_pretrained(pipelines[name], **({"text_encoder_3": None, "tokenizer_3": None}
                                                                         if name == "sd3" else {}))
    pipe.set_progress_bar_config(disable=True)
    ours, theirs = run_pipeline(pipe, name, schedule, teacher, seed=1)
    assert relative(ours, theirs) <= 1e-5


def test_dsno_trains_a_conditional_student_on_a_latent_pipeline_teacher(pipelines, tmp_path):
    """The trajectories carry each sample's condition; the student, the teacher's own transformer, takes it."""
    from learnsteps.config import load_config
    from learnsteps.dsno.module import DSNOConfig, train_dsno
    from learnsteps.dsno.student import load_student
    from learnsteps.trajectories import TrajectoryDataset

    run_dir = train_dsno(load_config(DSNOConfig, [ROOT / "configs" / "dsno.yaml"], [
        f"teacher={pipelines['dit_flow']}", "conditions=[0,1,2]", "guidance=3.0", "trainer.max_steps=2",
        "trainer.val_check_interval=1", "trajectories.n=12", "trajectories.steps_per_interval=2", "batch_size=4",
        f"run_dir={tmp_path}", "trainer.progress_bar=false", "wandb.mode=disabled"]))
    data = TrajectoryDataset(run_dir / "trajectories")
    assert data.tensors["cond"].tolist() == [i % 3 for i in range(12)]
    student = load_student(run_dir / "student")
    assert student.cfg.num_conditions == 3 and student.info["teacher"]["conditions"] == [0, 1, 2]
    x = torch.randn(3, 4, 4, 4)
    a, b = student.sample(x, torch.tensor([0, 1, 2])), student.sample(x, torch.tensor([2, 0, 1]))
    assert a.shape == (3, 4, 4, 4) and torch.isfinite(a).all() and not torch.equal(a, b)
    assert (run_dir / "samples.png").is_file()


def test_pixel_losses_on_a_latent_teacher_go_through_its_vae(pipelines, tmp_path):
    """loss=l2+features on DiT (grey 8x8 images): l2 stays in latent space, the feature loss reads the decoded
    images, and its gradient reaches the grid through the VAE."""
    from learnsteps.quality.losses import distance, pixel_space

    teacher = load_teacher(str(pipelines["dit"]), conditions=[0, 1], guidance=2.0)
    space = pixel_space(teacher, "l2+features")
    assert pixel_space(teacher, "l2") == {}  # a latent loss never runs the VAE
    assert space["image_shape"] == (1, 8, 8)
    with pytest.raises(ValueError, match="reads 1x8x8 images"):
        distance("features", teacher.shape)  # on the latents themselves it cannot
    dist = distance("l2+features", teacher.shape, **space)
    x, y = torch.randn(3, *teacher.shape, requires_grad=True), torch.randn(3, *teacher.shape)
    d = dist(x, y)
    d.sum().backward()
    assert d.shape == (3,) and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    features = distance("features", **space)
    torch.testing.assert_close(features(x.detach(), y), distance("features")(teacher.decode(x.detach()), teacher.decode(y)))


def test_eval_scores_a_conditional_latent_teacher_over_its_condition_set(pipelines, tmp_path):
    from learnsteps.config import SolverChoice
    from learnsteps.eval.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(teachers=[str(pipelines["dit"])], conditions=[0, 2], guidance=4.0, samples=16, batch_size=8,
                     nfe=[4], teacher_steps=6, grids=["logsnr", "edm"], solvers=[SolverChoice("dpm_solver++", 2)],
                     out_dir=str(tmp_path / "eval"))
    rows = evaluate(cfg)
    assert [r["grid"] for r in rows] == ["teacher", "floor (teacher, other noise)", "logsnr", "edm"]
    # conditions 0 and 2 are digit classes: the guided class accuracy by the shipped classifier (random weights
    # here, so only its range is asserted; the shipped model's is in test_latent_teacher)
    assert all(0 <= r["class_acc"] <= 1 for r in rows)
    assert "class accuracy" in (tmp_path / "eval" / "results.md").read_text()
    assert all(r["fid_teacher"] == r["fid_teacher"] for r in rows) and rows[2]["rmse_teacher"] > 0
    assert (tmp_path / "eval" / "samples_nfe4.png").is_file()
    with pytest.raises(ValueError, match="feature_extractor=digits reads 1x8x8 images; .* are 3x8x8"):
        evaluate(EvalConfig(teachers=[str(pipelines["sd"])], conditions=PROMPTS, samples=4, out_dir=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


def test_an_uncached_hub_pipeline_fails_offline_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TeacherLoadError, match="not in the Hugging Face cache") as err:
        load_teacher("learnsteps-test/no-such-pipeline", conditions=["a"])
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------- the pipeline's own grid and solver
def with_scale_model_input(scheduler):
    """The same scheduler with the identity scale_model_input that DiTPipeline calls and flow schedulers lack
    (stock DiTPipeline cannot run FlowMatchEulerDiscreteScheduler: AttributeError)."""
    cls = type(scheduler)
    sub = type(cls.__name__, (cls,), dict(scale_model_input=lambda self, sample, *args, **kwargs: sample))
    return sub.from_config(scheduler.config)


OWN = [("sd", None, "euler", 1), ("sd_v", None, "euler", 1), ("dit", None, "dpm_solver++", 2),
       ("dit_flow", None, "euler", 1), ("sd3", None, "euler", 1),
       ("sd", ("EulerDiscreteScheduler", {}), "euler", 1),
       ("sd_v", ("DPMSolverMultistepScheduler", dict(solver_order=3)), "dpm_solver++", 3),
       ("sd", ("UniPCMultistepScheduler", {}), "unipc", 2),
       ("sd3", ("DPMSolverMultistepScheduler", dict(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                    flow_shift=3.0, solver_order=2)), "dpm_solver++", 2),
       ("sd3", ("UniPCMultistepScheduler", dict(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                flow_shift=3.0, solver_order=3)), "unipc", 3)]


@pytest.mark.parametrize("name, scheduler, solver, order", OWN, ids=lambda v: v[0] if isinstance(v, tuple) else str(v))
def test_the_pipelines_own_grid_and_solver_reproduce_its_own_sampling(pipelines, name, scheduler, solver, order):
    """pipeline_grid(pipe, N): the pipeline's own call from the same latents is our core's solve on that grid
    (float32, <= 1e-5 relative): its own scheduler, or another one configured on top of its config."""
    import diffusers

    from learnsteps.interop.diffusers import pipeline_grid

    teacher = load_teacher(str(pipelines[name]), conditions=conditions_of(name), guidance=4.0)
    pipe = diffusers.DiffusionPipeline.from_pretrained(pipelines[name], **({"text_encoder_3": None, "tokenizer_3": None}
                                                                         if name == "sd3" else {}))
    pipe.set_progress_bar_config(disable=True)
    if scheduler:
        pipe.scheduler = getattr(diffusers, scheduler[0]).from_config({**pipe.scheduler.config, **scheduler[1]})
    if name == "dit_flow":
        pipe.scheduler = with_scale_model_input(pipe.scheduler)
    pg = pipeline_grid(pipe, 6)
    assert (pg.solver, pg.order) == (solver, order) and len(pg.grid) == 7
    flow = teacher.noise_schedule.kind == "flow"
    if flow:  # FlowMatchEuler starts at t = 1 (alpha = 0), DPM-Solver with flow sigmas at shift(1 - 1/n), UniPC
        # at 1 - 1e-6 ("to avoid inf torch.log(alpha)", diffusers 0.42)
        start = {None: 1.0, "DPMSolverMultistepScheduler": teacher.noise_schedule.t_cap,
                 "UniPCMultistepScheduler": np.float32(1 - 1e-6)}[scheduler and scheduler[0]]
        assert pg.grid[0] == pytest.approx(float(start), rel=1e-7, abs=0)
    noise = torch.randn(2, *teacher.shape, generator=torch.Generator().manual_seed(5))
    ours = ls.sample(teacher, noise * pg.latents_scale, cond=torch.tensor([0, 1]), **pg.solve_kwargs)
    if name.startswith("dit"):  # DiTPipeline draws its own noise (the same generator) and decodes
        labels = teacher.net.labels[:-1].tolist()
        theirs = torch.from_numpy(pipe(labels, guidance_scale=4.0, num_inference_steps=6, output_type="np",
                                       generator=torch.Generator().manual_seed(5)).images)
        ours = (teacher.decode(ours) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    else:
        theirs = pipe(PROMPTS, latents=noise, guidance_scale=4.0, num_inference_steps=6, output_type="latent",
                      height=8, width=8).images / pg.output_scale
    assert relative(ours, theirs) <= 1e-5


def test_user_sigmas_are_shifted_by_the_flow_scheduler_and_pipeline_grid_says_so(pipelines):
    """StableDiffusion3Pipeline(sigmas=s) samples on shift(s) (diffusers #13243, #14013, #14461: the static shift is
    applied to given sigmas), then 0: pipeline_grid reports that grid, and our core on it gives the pipeline's latents."""
    import diffusers

    from learnsteps.core.schedules import shift_sigma
    from learnsteps.interop.diffusers import pipeline_grid

    teacher = load_teacher(str(pipelines["sd3"]), conditions=PROMPTS, guidance=4.0)
    pipe = diffusers.DiffusionPipeline.from_pretrained(pipelines["sd3"], text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    sigmas = [1.0, 0.75, 0.5, 0.25]
    pg = pipeline_grid(pipe, sigmas=sigmas)
    shifted = shift_sigma(torch.tensor(sigmas + [0.0], dtype=torch.float64), 3.0)
    torch.testing.assert_close(pg.grid, shifted.float().double())  # not the sigmas given
    assert pg.grid[1] == pytest.approx(0.9)  # 0.75 became 0.9
    noise = torch.randn(2, *teacher.shape, generator=torch.Generator().manual_seed(2))
    ours = ls.sample(teacher, noise, cond=torch.tensor([0, 1]), **pg.solve_kwargs)
    theirs = pipe(PROMPTS, latents=noise, guidance_scale=4.0, sigmas=sigmas, output_type="latent", height=8,
                  width=8).images
    assert relative(ours, theirs) <= 1e-5
    unshifted = ls.sample(teacher, noise, torch.tensor(sigmas + [0.0], dtype=torch.float64), "euler", 1,
                          cond=torch.tensor([0, 1]))
    assert relative(unshifted, theirs) > 1e-2


def test_pipeline_grid_refuses_what_the_core_does_not_compute():
    import diffusers

    from learnsteps.interop.diffusers import pipeline_grid

    for scheduler, match in [(diffusers.DDIMScheduler(), "clip_sample=True"),
                             (diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="linspace"), "t - 100"),
                             (diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), "algorithm_type"),
                             (diffusers.PNDMScheduler(), "not a PNDMScheduler"),
                             (diffusers.FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), "stochastic")]:
        with pytest.raises(ScheduleError, match=match):
            pipeline_grid(scheduler, 10)


@pytest.mark.parametrize("learned_solver", [False, True], ids=["ld3-grid", "learned-solver"])
def test_the_line_an_ld3_run_prints_runs_its_file_in_the_shipped_pipeline(tmp_path, learned_solver):
    """The run's last line, `pipe(..., **apply_schedule(pipe, "<file>"))`, on the shipped digits_latent_flow
    (diffusers' own DiTPipeline, from its directory): a grid file gets the pinned diffusers scheduler, a learned
    solver's (version 2) learnsteps' TabulatedScheduler, and the pipeline's images are our core's, decoded."""
    import diffusers
    from test_tabulated import learned_schedule

    from learnsteps.interop.diffusers import apply_schedule
    from learnsteps.ld3.run import how_to_use
    from learnsteps.schedule import save_schedule
    from learnsteps.teachers.load import ASSETS

    teacher = load_teacher("digits_latent_flow", guidance=1.0)
    s = teacher.noise_schedule
    if learned_solver:
        schedule = learned_schedule(s, steps=4, teacher=teacher.record())
    else:
        grid = ls.grids.make("time_quadratic", 4, s, to_zero=True)
        schedule = Schedule.from_grid(grid, s, "unipc", 2, eval_grid=grid * 0.98 + 0.01 * (grid > 0),
                                      teacher=teacher.record())
    path = save_schedule(tmp_path / "schedule.json", schedule)
    line = how_to_use(path, schedule)
    assert line.startswith("in your DiTPipeline:") and f'**apply_schedule(pipe, "{path}")' in line
    pipe = diffusers.DiTPipeline.from_pretrained(ASSETS / "digits_latent_flow")
    pipe.set_progress_bar_config(disable=True)
    cond = torch.tensor([3, 7])
    labels = teacher.class_ids(cond).tolist()  # DiT's label ids of the conditions
    theirs = pipe(labels, guidance_scale=1.0, output_type="np", generator=torch.Generator().manual_seed(4),
                  **apply_schedule(pipe, str(path))).images
    noise = torch.randn(2, *teacher.shape, generator=torch.Generator().manual_seed(4))
    ours = ls.sample(teacher, noise, cond=cond, **schedule.solve_kwargs)
    ours = (teacher.decode(ours) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert type(pipe.scheduler).__name__ == ("TabulatedScheduler" if learned_solver else "UniPCMultistepScheduler")
    assert relative(ours, torch.from_numpy(theirs)) <= 1e-5


def test_a_pipeline_s_fingerprint_is_of_its_weights_not_of_where_it_is_stored(pipelines, tmp_path):
    """A schedule or student learned for a pipeline read from one place (the hub cache, a checkout's asset) is
    accepted for the same pipeline read from another (a copy): the fingerprint is the weights' and settings'."""
    import shutil

    from learnsteps.teachers.network import made_for

    copy = shutil.copytree(pipelines["dit_flow"], tmp_path / "elsewhere" / "dit_flow")
    here, there = (load_teacher(str(p), conditions=[0, "two"], guidance=2.0) for p in (pipelines["dit_flow"], copy))
    assert here.config["model"] != there.config["model"] and here.fingerprint() == there.fingerprint()
    assert made_for(there, here.fingerprint())
    assert load_teacher(str(copy), conditions=[0, "two"], guidance=3.0).fingerprint() != here.fingerprint()
    other = load_teacher(str(pipelines["dit"]), conditions=[0, "two"], guidance=2.0)
    assert other.fingerprint() != here.fingerprint()
    # files of earlier versions recorded the located fingerprint: still accepted where they were made, only there
    legacy = here.located_fingerprint()
    assert legacy != here.fingerprint() and made_for(here, legacy) and not made_for(there, legacy)
    assert not made_for(other, here.fingerprint())


def test_trajectories_recorded_with_an_earlier_version_s_fingerprint_are_still_this_teacher_s(pipelines, tmp_path):
    from learnsteps.files import read_json, write_json
    from learnsteps.trajectories import TrajectoryError, TrajectorySpec, check_directory, generate

    teacher = load_teacher(str(pipelines["dit_flow"]), conditions=[0, "two"], guidance=2.0)
    spec = TrajectorySpec(n=2, num_times=3, solver="unipc", order=2, steps_per_interval=2, shard_size=2)
    generate(teacher, tmp_path / "t", spec)
    meta = read_json(tmp_path / "t" / "spec.json")
    write_json(tmp_path / "t" / "spec.json", dict(meta, teacher=dict(meta["teacher"],
                                                                     fingerprint=teacher.located_fingerprint())))
    check_directory(tmp_path / "t", spec, teacher)  # accepted
    other = load_teacher(str(pipelines["dit_flow"]), conditions=[0, "two"], guidance=3.0)
    with pytest.raises(TrajectoryError, match="another teacher"):
        check_directory(tmp_path / "t", spec, other)

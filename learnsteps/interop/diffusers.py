"""Run a learnsteps schedule in diffusers' schedulers.

`scheduler_for(schedule)` builds the diffusers scheduler that implements the schedule's solver, configured
like our core (order, variant, final step, and the schedule's own beta table), and `apply_schedule(scheduler,
schedule)` gives a scheduler the grid. No diffusers scheduler takes an arbitrary grid *and* separate model
times through set_timesteps, so we use the documented workaround for all of them: call set_timesteps(N), then
overwrite `sigmas` (sigma/alpha at the integration times, N+1 values) and `timesteps` (the model-evaluation
times, N values; Heun repeats them as it repeats its sigmas) and fix the step index to 0. Every
DPM/UniPC/DEIS/Euler/Heun update reads only `sigmas[step_index +- k]`; the timesteps only reach the model,
which is how LD3's decoupled times carry over. `initial_sample` scales the starting noise to the scheduler's
own state, so that the usual denoising loop starts where our core does.

The other way round, `pipeline_grid(pipe, N)` reads the grid, model times and solver a pipeline's own configured
scheduler samples on (after its own set_timesteps, as the pipeline calls it), so that our core reproduces the
pipeline's own sampling from the same latents.
"""
from __future__ import annotations

import copy
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from ..core.schedules import DiscreteDDPM, NoiseSchedule
from ..core.solvers import singlestep_plan
from ..schedule import Schedule, ScheduleError, load_schedule

# Schedulers whose state is x~ = x / alpha (k-diffusion's), not the VP state x: they start from noise * sigma~_max
# scaled up by init_noise_sigma, and scale the model input back down.
X_TILDE_SCHEDULERS = ("EulerDiscreteScheduler", "HeunDiscreteScheduler")


def flow_recipe(schedule: Schedule) -> dict:
    """The flow-matching schedulers: FlowMatchEulerDiscreteScheduler for Euler, and DPM-Solver++ / UniPC with flow
    sigmas (alpha = 1 - sigma) and the velocity as "flow_prediction"."""
    ns, o, name, order = schedule.noise_schedule, schedule.options, schedule.solver, schedule.order
    base = dict(num_train_timesteps=ns["n"])
    flow = dict(base, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=ns["shift"],
                final_sigmas_type="zero" if schedule.to_zero else "sigma_min")
    if name in ("euler", "ddim") and not o.get("eta"):
        return dict(scheduler="FlowMatchEulerDiscreteScheduler", config=dict(base, shift=ns["shift"]))
    if name == "dpm_solver++" and o.get("method", "multistep") == "multistep":
        return dict(scheduler="DPMSolverMultistepScheduler",
                    config=dict(flow, algorithm_type="dpmsolver++", solver_order=order,
                                solver_type="heun" if o.get("variant") == "taylor" else "midpoint",
                                lower_order_final=o.get("lower_order_final", True)))
    if name == "unipc":
        check_unipc_final_step(o.get("variant", "bh2"), schedule.to_zero)
        if order >= 3 and schedule.times[0] == 1:
            raise ScheduleError("diffusers' UniPC of order 3 solves its Vandermonde system with the infinite log-SNR "
                                "step of a start at sigma = 1 (alpha = 0) and returns NaN: use order 2 or dpm_solver++")
        return dict(scheduler="UniPCMultistepScheduler",
                    config=dict(flow, solver_order=order, solver_type=o.get("variant", "bh2"),
                                predict_x0=o.get("data", True), lower_order_final=o.get("lower_order_final", True)))
    raise ScheduleError(f"no diffusers flow-matching scheduler implements {name} with options {o} (diffusers has "
                        f"FlowMatchEuler, and DPM-Solver++ multistep and UniPC with use_flow_sigmas)")


def recipe(schedule: Schedule) -> dict:
    """{"scheduler": diffusers class name, "config": its configuration} that runs `schedule` as our core does,
    or ScheduleError saying why no diffusers scheduler can."""
    ns, o = schedule.noise_schedule, schedule.options
    if schedule.coefficients is not None:
        raise ScheduleError("no diffusers scheduler runs a learned solver's coefficient table: "
                            "pipe.scheduler = learnsteps.interop.scheduler.TabulatedScheduler.from_schedule(path)")
    if ns.get("kind") == "flow":
        return flow_recipe(schedule)
    if ns.get("kind") != "ddpm":
        raise ScheduleError("diffusers' DDPM-family schedulers need a discrete DDPM teacher schedule "
                            f"(this one is {ns.get('kind')!r})")
    to_zero = schedule.to_zero
    final = dict(final_sigmas_type="zero" if to_zero else "sigma_min")
    name, order = schedule.solver, schedule.order
    if name in ("dpm_solver", "dpm_solver++"):
        if name == "dpm_solver" and to_zero:
            raise ScheduleError("diffusers' noise-prediction DPM-Solver cannot step to sigma = 0; "
                                "end the grid at t_min or use dpm_solver++")
        common = dict(algorithm_type="dpmsolver++" if name == "dpm_solver++" else "dpmsolver", solver_order=order,
                      solver_type="heun" if o.get("variant") == "taylor" else "midpoint", **final)
        if o.get("method", "multistep") == "singlestep":
            if order == 3 and o.get("variant", "midpoint") != "taylor":
                raise ScheduleError("diffusers' singlestep order 3 matches DPM-Solver only with variant=taylor")
            cls, config = "DPMSolverSinglestepScheduler", common
        else:
            cls, config = "DPMSolverMultistepScheduler", dict(common, lower_order_final=o.get("lower_order_final", True))
    elif name == "unipc":
        check_unipc_final_step(o.get("variant", "bh2"), to_zero)
        cls, config = "UniPCMultistepScheduler", dict(solver_order=order, solver_type=o.get("variant", "bh2"),
                                                      predict_x0=o.get("data", True), **final,
                                                      lower_order_final=o.get("lower_order_final", True))
    elif name == "deis" and o.get("basis", "tab") == "logrho":
        cls, config = "DEISMultistepScheduler", dict(solver_order=order,
                                                     lower_order_final=o.get("lower_order_final", True))
    elif name in ("euler", "ddim") and not o.get("eta"):
        cls, config = "EulerDiscreteScheduler", {}
    elif name == "heun":
        if not to_zero:
            raise ScheduleError("diffusers' HeunDiscreteScheduler takes an Euler last step into sigma_min where our "
                                "core (and k-diffusion) take a Heun step: end the grid at sigma = 0")
        cls, config = "HeunDiscreteScheduler", {}
    else:
        raise ScheduleError(f"no diffusers scheduler implements {name} with options {o} (diffusers has "
                            f"DPM-Solver(++), UniPC, DEIS log-rho, Euler and Heun)")
    betas = dict(num_train_timesteps=ns["n"], beta_schedule=ns["betas"])
    betas.update({k: ns[k] for k in ("beta_start", "beta_end") if ns.get(k) is not None})
    prediction = schedule.teacher.get("prediction_type")
    if prediction in DDPM_PREDICTION_TYPES:  # the network's own, as the file records it
        betas["prediction_type"] = prediction
    return dict(scheduler=cls, config={**betas, **config})


DDPM_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def scheduler_prediction(scheduler_class: str, config) -> str:
    """The prediction type a diffusers scheduler (class name and config) reads its model output as."""
    if scheduler_class.startswith("FlowMatch"):
        return "flow_prediction"
    return config.get("prediction_type", "epsilon")


def check_prediction(schedule: Schedule, scheduler_class: str, config) -> None:
    """ScheduleError if the schedule's teacher predicted something else than the scheduler reads (a v-prediction
    network's output read as epsilon samples garbage without an error)."""
    recorded = schedule.teacher.get("prediction_type")
    theirs = scheduler_prediction(scheduler_class, config)
    if recorded and recorded != theirs:
        raise ScheduleError(f"the schedule was made for a {recorded} teacher, and this {scheduler_class} reads the "
                            f"model output as {theirs}: is it the pipeline the schedule was learned for?")


def check_unipc_final_step(variant: str, to_zero: bool) -> None:
    # diffusers' UniPC multiplies B(h) = hh = -inf by a zero residual on a bh1 step to sigma = 0: NaN samples
    if variant == "bh1" and to_zero:
        raise ScheduleError("diffusers' UniPC with variant bh1 returns NaN on a step to sigma = 0 (B(h) = -inf "
                            "times 0): use a schedule that ends at t_min, or variant bh2")


def scheduler_for(schedule: Schedule, **base_config):
    """A diffusers scheduler that runs `schedule` (base_config: further settings of the class, e.g. steps_offset)."""
    import diffusers

    r = recipe(schedule)
    scheduler = getattr(diffusers, r["scheduler"])(**{**base_config, **r["config"]})
    return apply_schedule(scheduler, schedule)


def apply_schedule(target, schedule: Schedule | str, device: str | torch.device = "cpu"):
    """Put the schedule's grid (a Schedule, or a schedule file's path) into a configured diffusers scheduler (see
    the module docstring), or make a pipeline sample on it (`apply_to_pipeline`); ScheduleError if the scheduler's
    beta table is not the schedule's, or if it would sample the grid wrongly."""
    if not isinstance(schedule, Schedule):
        schedule = load_schedule(schedule)
    if hasattr(target, "components") and hasattr(target, "scheduler"):
        return apply_to_pipeline(target, schedule)
    return _put_grid(target, schedule, device, target.set_timesteps)


def apply_to_pipeline(pipe, schedule: Schedule) -> dict:
    """Make a diffusers pipeline sample on the schedule: its scheduler is replaced by the class and configuration
    `recipe` names (on top of the pipeline's own scheduler config), whose set_timesteps puts the schedule's grid
    (and LD3's model-evaluation times) in place whenever the pipeline calls it. Returns the keyword arguments for
    `pipe(...)`: num_inference_steps = N. The scheduler's init_noise_sigma is what `initial_sample` scales unit
    noise by, so `pipe(..., latents=noise)` starts where our core's x_T = noise * init_noise_std() does in both
    conventions of diffusers' pipelines: those that scale given latents by init_noise_sigma (StableDiffusion-
    Pipeline's prepare_latents) and those that take them as they are (StableDiffusion3Pipeline, FLUX), whose
    schedules (flow, from t = 1, std 1) have init_noise_sigma = 1. (DiTPipeline draws its own noise, unscaled.)
    A learned solver's file (its coefficient table) gets learnsteps' TabulatedScheduler, the same way."""
    import diffusers

    wanted = schedule.teacher.get("pipeline")
    if wanted and type(pipe).__name__ != wanted:
        raise ScheduleError(f"the schedule was learned for a {wanted}, not a {type(pipe).__name__}")
    check_prediction(schedule, type(pipe.scheduler).__name__, pipe.scheduler.config)
    if schedule.coefficients is not None:  # a learned solver's table, which no diffusers class runs: ours
        from .scheduler import TabulatedScheduler

        pipe.scheduler = TabulatedScheduler.from_schedule(schedule)
        return dict(num_inference_steps=len(schedule.times) - 1)
    r = recipe(schedule)
    base = getattr(diffusers, r["scheduler"])
    n = len(schedule.times) - 1

    # FluxPipeline and its kin always hand set_timesteps a default sigma list (and check that it takes `sigmas`):
    # its length is the step count; the sigmas themselves are the schedule's, never shifted by diffusers
    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None, **kwargs):
        asked = num_inference_steps if sigmas is None else len(sigmas)
        if asked not in (None, n):
            raise ScheduleError(f"this pipeline's scheduler runs the learned {n}-step schedule: call it with "
                                f"num_inference_steps={n}, not {asked}")
        check_size(schedule.teacher, mu)
        extra = {} if mu is None else dict(mu=mu)
        _put_grid(self, schedule, device or "cpu", lambda steps, device: base.set_timesteps(self, steps, device, **extra))

    start = start_scale(base.__name__, schedule)
    members = dict(set_timesteps=set_timesteps, __doc__=f"{base.__name__} pinned to a learnsteps schedule",
                   init_noise_sigma=property(lambda self: start, lambda self, v: None))
    if not hasattr(base, "scale_model_input"):  # flow schedulers have none; DiTPipeline calls it: x as it is
        members["scale_model_input"] = lambda self, sample, *args, **kwargs: sample
    learned = type(base.__name__, (base,), members)
    config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    from ..hf import quiet_diffusers

    with quiet_diffusers():
        pipe.scheduler = learned.from_config({**config, **r["config"]})
    return dict(num_inference_steps=n)


def check_size(teacher: dict, mu: float | None) -> None:
    """ScheduleError unless a pipeline that shifts its grid with the image size (FLUX, Qwen-Image: the `mu` it hands
    its scheduler) is called at the size the schedule was learned at (`teacher`: the schedule file's record of it,
    with its size and mu)."""
    learned = teacher.get("mu")
    if mu is None or learned is None or abs(float(mu) - float(learned)) <= 1e-9 * max(1.0, abs(float(learned))):
        return
    t = teacher
    raise ScheduleError(f"this schedule was learned at height={t.get('height')}, width={t.get('width')} (the "
                        f"pipeline's shift mu = {float(learned):.6g}) and the pipeline is called at another size "
                        f"(mu = {float(mu):.6g}): call it at that size, or learn a schedule at this one")


def _put_grid(scheduler, schedule: Schedule, device, set_timesteps):
    cls = type(scheduler).__name__
    check_prediction(schedule, cls, scheduler.config)
    ns = schedule.make_noise_schedule()
    if getattr(scheduler, "alphas_cumprod", None) is not None and schedule.noise_schedule.get("kind") == "ddpm":
        theirs = scheduler.alphas_cumprod.to(torch.float64)
        if theirs.shape != ns.alphas_cumprod.shape or not torch.allclose(theirs, ns.alphas_cumprod, rtol=1e-4, atol=1e-7):
            c = scheduler.config
            raise ScheduleError(f"{cls}'s beta table (beta_schedule={c.get('beta_schedule')!r}, beta_start="
                                f"{c.get('beta_start')}, beta_end={c.get('beta_end')}, {len(theirs)} steps) is not the "
                                f"schedule's {ns!r}: configure the scheduler with the schedule's betas")
    n, to_zero = len(schedule.times) - 1, schedule.to_zero
    flow = schedule.noise_schedule.get("kind") == "flow"
    if flow != bool(cls.startswith("FlowMatch") or scheduler.config.get("use_flow_sigmas")):
        raise ScheduleError(f"{cls} {'does not use' if flow else 'uses'} flow-matching sigmas and the schedule is "
                            f"for a {'flow-matching' if flow else schedule.noise_schedule.get('kind')} teacher: "
                            f"configure the scheduler as recipe(schedule) says")
    if cls == "UniPCMultistepScheduler":
        check_unipc_final_step(scheduler.config.solver_type, to_zero)
    if scheduler.config.get("use_dynamic_shifting") and set_timesteps == getattr(scheduler, "set_timesteps", None):
        set_timesteps = partial(set_timesteps, mu=0.0)  # any mu: the sigmas are overwritten below
    set_timesteps(n, device=device)
    # flow schedulers' sigma is our time t (alpha = 1 - t), their timestep t * n; the others' sigma is sigma~
    sigmas = torch.tensor(schedule.times if flow else schedule.sigmas, dtype=torch.float64, device=device)
    timesteps = torch.tensor(schedule.diffusers_timesteps, dtype=torch.float64, device=device)
    if cls == "HeunDiscreteScheduler":  # first- and second-order halves of every step
        sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
        timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
    if cls == "DPMSolverSinglestepScheduler":
        plan = schedule.options.get("plan") or singlestep_plan(n, schedule.order, to_zero)
        scheduler.order_list = [k for group in plan for k in range(1, group + 1)]
        scheduler.sample = None
    scheduler.sigmas, scheduler.timesteps = sigmas, timesteps
    scheduler.num_inference_steps = n
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    return scheduler


def initial_sample(scheduler, schedule: Schedule, noise: Tensor) -> Tensor:
    """The scheduler's starting state for unit Gaussian `noise`, equal to our core's x_T = noise * std.

    Euler and Heun work on x~ = x / alpha and start from x~_T = x_T / alpha(t_0) = noise sqrt(1 + sigma~_0^2) for VP
    teachers; their `init_noise_sigma` is sigma~_0 instead under timestep_spacing="linspace" or "trailing" (a
    relative difference of 1 / (2 sigma~_0^2), 2e-5 for DDPM's table, 2e-3 for Stable Diffusion's), so the
    pipelines' own `noise * init_noise_sigma` is not our start (a pipeline given to `apply_schedule` gets this
    scale as its init_noise_sigma). The other classes work on x itself (for flow models x_T = sigma(t_0) noise:
    noise itself from t = 1, where their pipelines start)."""
    return noise * start_scale(type(scheduler).__name__, schedule)


def start_scale(scheduler_class: str, schedule: Schedule) -> float:
    """The factor from unit noise to the starting state of a scheduler of this class on `schedule`."""
    std = schedule.make_noise_schedule().init_noise_std()
    return float(schedule.x_tilde(torch.tensor(std, dtype=torch.float64))) if scheduler_class in X_TILDE_SCHEDULERS \
        else std


# ------------------------------------------------------------------------------------- the pipeline's own grid
class PipelineGrid(NamedTuple):
    """What a diffusers scheduler samples on, in our core's units (see `pipeline_grid`)."""

    grid: Tensor  # the N+1 integration times, native (DDPM index, flow t), float64
    eval_grid: Tensor  # the times the model is called at (the scheduler's timesteps), N+1
    solver: str
    order: int
    options: dict
    latents_scale: float  # our core's x_T = latents * latents_scale, for the latents the pipeline is given
    output_scale: float  # the pipeline's output latents = our core's result * output_scale

    @property
    def solve_kwargs(self) -> dict:
        """learnsteps.solve(teacher, latents * pg.latents_scale, **pg.solve_kwargs)."""
        return dict(grid=self.grid, eval_grid=self.eval_grid, solver=self.solver, order=self.order, **self.options)


PIPELINE_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
                       "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")


def pipeline_grid(pipe_or_scheduler, num_inference_steps: int | None = None, **set_timesteps_kwargs) -> PipelineGrid:
    """The grid, model times, solver, order and options on which a pipeline's configured scheduler samples
    `num_inference_steps` steps, read from what the scheduler itself computes in its own set_timesteps (called
    on a copy, as the pipelines call it: set_timesteps_kwargs are what the pipeline passes, e.g. FLUX's
    sigmas=np.linspace(1, 1/N, N) and mu; diffusers shifts given sigmas, so the grid is the shifted one).

        pg = pipeline_grid(pipe, 28)
        x = learnsteps.sample(teacher, latents * pg.latents_scale, **pg.solve_kwargs)
        # == pipe(..., latents=latents, num_inference_steps=28, output_type="latent").images / pg.output_scale

    The times are the scheduler's own sigmas (a flow model's t, from t = 1 for FlowMatchEuler; DDPM times from
    its float32 sigma~ table), and the model is called at its own timesteps (decoupled evaluation times where
    they differ, e.g. DPMSolverMultistep's integer timesteps on flow sigmas). FlowMatchEulerDiscrete, DDIM,
    EulerDiscrete (DDPM), DPMSolverMultistep and UniPCMultistep (DDPM or flow sigmas) are read; other classes and
    settings our core does not compute (stochastic sampling, thresholding, SDE variants, ...) are refused with
    ScheduleError."""
    scheduler = copy.deepcopy(getattr(pipe_or_scheduler, "scheduler", pipe_or_scheduler))
    cls, c = type(scheduler).__name__, scheduler.config
    if cls not in PIPELINE_SCHEDULERS:
        raise ScheduleError(f"pipeline_grid reads {', '.join(PIPELINE_SCHEDULERS)}, not a {cls}")
    refused = [k for k, bad in (("thresholding", c.get("thresholding")), ("clip_sample", c.get("clip_sample")),
                                ("stochastic_sampling", c.get("stochastic_sampling")),
                                ("invert_sigmas", c.get("invert_sigmas")),
                                ("euler_at_final", c.get("euler_at_final")),
                                ("disable_corrector", c.get("disable_corrector")),
                                ("timestep_type", c.get("timestep_type", "discrete") != "discrete"),
                                ("algorithm_type", c.get("algorithm_type", "dpmsolver++") not in ("dpmsolver++",
                                                                                                   "dpmsolver")))
               if bad]
    if refused:
        raise ScheduleError(f"{cls} with {', '.join(f'{k}={c.get(k)!r}' for k in refused)} computes what no solver of "
                            f"learnsteps' core does")
    if "sigmas" in set_timesteps_kwargs or "timesteps" in set_timesteps_kwargs:  # as retrieve_timesteps calls it
        scheduler.set_timesteps(**set_timesteps_kwargs)
    else:
        scheduler.set_timesteps(num_inference_steps, **set_timesteps_kwargs)
    flow = cls.startswith("FlowMatch") or bool(c.get("use_flow_sigmas"))
    timesteps = scheduler.timesteps.to(torch.float64).cpu()
    n = len(timesteps)
    if flow:
        grid = scheduler.sigmas.to(torch.float64).cpu()
        # the model input: where the scheduler's timesteps are its sigmas * n in float32 (FlowMatchEuler), the
        # grid itself gives them exactly (the teacher multiplies t by n in the latents' dtype)
        same = torch.equal(scheduler.timesteps.cpu().float(), scheduler.sigmas[:-1].cpu().float() * c.num_train_timesteps)
        eval_grid = grid.clone() if same else torch.cat([timesteps / c.num_train_timesteps, grid[-1:]])
    else:
        ddpm = _ddpm_of(scheduler)
        if cls == "DDIMScheduler":
            grid, eval_grid = _ddim_grid(scheduler, ddpm, timesteps)
        else:
            grid = ddpm.t_of_sigma_tilde(scheduler.sigmas.to(torch.float64).cpu())
            eval_grid = torch.cat([timesteps, grid[-1:]])
    if cls in ("FlowMatchEulerDiscreteScheduler", "DDIMScheduler", "EulerDiscreteScheduler"):
        solver, order, options = "euler", 1, {}
    elif cls == "DPMSolverMultistepScheduler":
        solver = "dpm_solver++" if c.algorithm_type == "dpmsolver++" else "dpm_solver"
        order, options = c.solver_order, dict(variant="taylor" if c.solver_type == "heun" else "midpoint",
                                              lower_order_final=c.lower_order_final)
    else:
        solver, order = "unipc", c.solver_order
        options = dict(variant=c.solver_type, corrector=True, data=c.predict_x0, lower_order_final=c.lower_order_final)
    latents_scale = output_scale = 1.0
    if cls == "EulerDiscreteScheduler":  # its state is x~ = x / alpha: it starts at latents * init_noise_sigma
        alpha = ddpm.alpha(grid[[0, -1]])
        latents_scale, output_scale = float(scheduler.init_noise_sigma * alpha[0]), float(1 / alpha[1])
    assert len(grid) == n + 1
    return PipelineGrid(grid, eval_grid, solver, order, options, latents_scale, output_scale)


def _ddpm_of(scheduler) -> DiscreteDDPM:
    """Our DDPM schedule of a scheduler's beta table (ScheduleError for trained betas, or a table not ours)."""
    c = scheduler.config
    if c.get("trained_betas") is not None or c.get("rescale_betas_zero_snr"):
        raise ScheduleError("pipeline_grid reads the named beta schedules, not trained_betas or zero-SNR rescaling")
    ddpm = DiscreteDDPM(c.beta_schedule, c.num_train_timesteps, c.beta_start, c.beta_end)
    if not torch.allclose(scheduler.alphas_cumprod.to(torch.float64).cpu(), ddpm.alphas_cumprod, rtol=1e-4, atol=1e-7):
        raise ScheduleError(f"{type(scheduler).__name__}'s beta table is not {ddpm!r}")
    return ddpm


def _ddim_grid(scheduler, ddpm: NoiseSchedule, timesteps: Tensor) -> tuple[Tensor, Tensor]:
    """DDIM steps from timestep t to t - n // N, the last to final_alpha_cumprod: our DDIM (euler) on those times,
    each at its float32 alphas_cumprod (the model called at the integer timestep)."""
    n_train, n = scheduler.config.num_train_timesteps, len(timesteps)
    prev = timesteps - n_train // n
    if not torch.equal(prev[:-1], timesteps[1:]):
        raise ScheduleError(f"DDIMScheduler's step goes from t to t - {n_train // n}, which is not its next timestep "
                            f"under timestep_spacing={scheduler.config.timestep_spacing!r}: no single time grid")
    ac = scheduler.alphas_cumprod.to(torch.float64).cpu()
    end = ac[int(prev[-1])] if prev[-1] >= 0 else torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    bars = torch.cat([ac[timesteps.long()], end.reshape(1)])
    grid = ddpm.t_of_sigma_tilde(((1 - bars) / bars).sqrt())
    return grid, torch.cat([timesteps, grid[-1:]])

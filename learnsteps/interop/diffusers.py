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
"""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from ..core.solvers import singlestep_plan
from ..schedule import Schedule, ScheduleError

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
    return dict(scheduler=cls, config={**betas, **config})


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


def apply_schedule(target, schedule: Schedule, device: str | torch.device = "cpu"):
    """Put the schedule's grid into a configured diffusers scheduler (see the module docstring), or make a
    pipeline sample on it (`apply_to_pipeline`); ScheduleError if the scheduler's beta table is not the
    schedule's, or if it would sample the grid wrongly."""
    if hasattr(target, "components") and hasattr(target, "scheduler"):
        return apply_to_pipeline(target, schedule)
    return _put_grid(target, schedule, device, target.set_timesteps)


def apply_to_pipeline(pipe, schedule: Schedule) -> dict:
    """Make a diffusers pipeline sample on the schedule: its scheduler is replaced by the class and configuration
    `recipe` names (on top of the pipeline's own scheduler config), whose set_timesteps puts the schedule's grid
    (and LD3's model-evaluation times) in place whenever the pipeline calls it. Returns the keyword arguments for
    `pipe(...)`: num_inference_steps = N. The scheduler's init_noise_sigma is 1, so that
    `pipe(..., latents=initial_sample(pipe.scheduler, schedule, noise))` starts exactly where our core does and
    gives the same latents."""
    import diffusers

    wanted = schedule.teacher.get("pipeline")
    if wanted and type(pipe).__name__ != wanted:
        raise ScheduleError(f"the schedule was learned for a {wanted}, not a {type(pipe).__name__}")
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

    members = dict(set_timesteps=set_timesteps, __doc__=f"{base.__name__} pinned to a learnsteps schedule",
                   init_noise_sigma=property(lambda self: 1.0, lambda self, v: None))
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
    pipelines' own `noise * init_noise_sigma` is not our start. The other classes work on x itself (for flow
    models x_T = t_0 noise, where their pipelines start from noise at t = 1)."""
    x_T = noise * schedule.make_noise_schedule().init_noise_std()
    if type(scheduler).__name__ in X_TILDE_SCHEDULERS:
        return schedule.x_tilde(x_T)
    return x_T

"""Run a learnsteps schedule in diffusers' schedulers.

`scheduler_for(schedule)` builds the diffusers scheduler that implements the schedule's solver, configured
like our core (order, variant, final step), and `apply_schedule(scheduler, schedule)` gives it the grid.
No diffusers scheduler takes an arbitrary grid *and* separate model times through set_timesteps, so we use
the documented workaround for all of them: call set_timesteps(N), then overwrite `sigmas` (sigma/alpha at the
integration times, N+1 values) and `timesteps` (the model-evaluation times, N values; Heun repeats them as it
repeats its sigmas) and fix the step index to 0. Every DPM/UniPC/DEIS/Euler/Heun update reads only
`sigmas[step_index +- k]`; the timesteps only reach the model, which is how LD3's decoupled times carry over.
"""
from __future__ import annotations

import torch

from ..core.solvers import singlestep_plan
from ..schedule import Schedule, ScheduleError


def _config(schedule: Schedule) -> tuple[str, dict]:
    """The diffusers class and config for the schedule's solver, order and options."""
    o, to_zero = schedule.options, schedule.times[-1] == schedule.make_noise_schedule().t_zero
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
            return "DPMSolverSinglestepScheduler", common
        return "DPMSolverMultistepScheduler", dict(common, lower_order_final=o.get("lower_order_final", True))
    if name == "unipc":
        return "UniPCMultistepScheduler", dict(solver_order=order, solver_type=o.get("variant", "bh2"),
                                               predict_x0=o.get("data", True), **final,
                                               lower_order_final=o.get("lower_order_final", True))
    if name == "deis" and o.get("basis", "tab") == "logrho":
        return "DEISMultistepScheduler", dict(solver_order=order, lower_order_final=o.get("lower_order_final", True))
    if name in ("euler", "ddim") and not o.get("eta"):
        return "EulerDiscreteScheduler", {}
    if name == "heun":
        return "HeunDiscreteScheduler", {}
    raise ScheduleError(f"no diffusers scheduler implements {name} with options {o} (diffusers has DPM-Solver(++), "
                        f"UniPC, DEIS log-rho, Euler and Heun)")


def scheduler_for(schedule: Schedule, **base_config):
    """A diffusers scheduler that runs `schedule` (base_config: e.g. the pipeline's beta settings)."""
    import diffusers

    if schedule.noise_schedule.get("kind") != "ddpm":
        raise ScheduleError("diffusers' DDPM-family schedulers need a discrete DDPM teacher schedule "
                            f"(this one is {schedule.noise_schedule.get('kind')!r})")
    cls, config = _config(schedule)
    ns = schedule.noise_schedule
    betas = dict(num_train_timesteps=ns["n"], beta_schedule=ns["betas"])
    betas.update({k: ns[k] for k in ("beta_start", "beta_end") if ns.get(k) is not None})
    scheduler = getattr(diffusers, cls)(**{**betas, **base_config, **config})
    return apply_schedule(scheduler, schedule)


def apply_schedule(scheduler, schedule: Schedule, device: str | torch.device = "cpu"):
    """Put the schedule's grid into a configured diffusers scheduler (see the module docstring)."""
    n = len(schedule.times) - 1
    scheduler.set_timesteps(n, device=device)
    sigmas = torch.tensor(schedule.sigmas, dtype=torch.float64, device=device)
    timesteps = torch.tensor(schedule.eval_times[:-1], dtype=torch.float64, device=device)
    if type(scheduler).__name__ == "HeunDiscreteScheduler":  # first- and second-order halves of every step
        sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
        timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
    if type(scheduler).__name__ == "DPMSolverSinglestepScheduler":
        plan = schedule.options.get("plan") or singlestep_plan(n, schedule.order, sigmas[-1] == 0)
        scheduler.order_list = [k for group in plan for k in range(1, group + 1)]
        scheduler.sample = None
    scheduler.sigmas, scheduler.timesteps = sigmas, timesteps
    scheduler.num_inference_steps = n
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    return scheduler

"""Run a learnsteps schedule in k-diffusion's samplers (and in what builds on them: ComfyUI, A1111).

k-diffusion samplers take a decreasing sigma~ list, a denoiser `model(x~, sigma~) -> x0` and the state
x~ = x / alpha; they call the model at the integration sigmas, so decoupled evaluation times cannot be expressed.
`recipe(schedule)` names the sampler that computes exactly what our core computes for the schedule's solver,
order and options, with its keyword arguments, or says why none does (ScheduleError). Which combinations are
exact (tests/test_interop.py runs each against our core at 1e-5):

    our solver                                  k-diffusion                               exact when
    euler (eta = 0), dpm_solver++ order 1       sample_euler                              always
    heun                                        sample_heun                               always
    dpm_solver++ 2M, midpoint / taylor          sample_dpmpp_2m / _2m_sde(eta=0, heun)    sigma ends at 0, or no lowered final order
    dpm_solver++ 3M, taylor                     sample_dpmpp_3m_sde(eta=0)                no lowered final orders
    deis, basis="rhoab"                         sample_lms(order)                         sigma ends > 0, no lowered final orders

"Lowered final orders" is our (and diffusers') lower_order_final on grids of fewer than 15 steps; k-diffusion
has no such rule, so learn with options={lower_order_final: false} for schedules meant for it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..core.denoiser import Denoiser, per_sample
from ..core.steps import LOWER_ORDER_FINAL_BELOW
from ..schedule import Schedule, ScheduleError


def is_euler(schedule: Schedule) -> bool:
    """Whether the schedule's solver is the first-order deterministic step (DDIM = Euler in sigma~)."""
    name, o = schedule.solver, schedule.options
    return name in ("euler", "ddim") and not o.get("eta") or name == "dpm_solver++" and schedule.order == 1


def recipe(schedule: Schedule) -> dict:
    """{"sampler": name in k_diffusion.sampling, "kwargs": its arguments} reproducing `schedule`, or ScheduleError."""
    if schedule.coefficients is not None:
        raise ScheduleError("a learned solver's coefficient table has no k-diffusion sampler: run it with the "
                            "reference sampler of docs/schedule-format.md, learnsteps' core or TabulatedScheduler")
    if schedule.decoupled:
        raise ScheduleError("this schedule evaluates the model at times of its own (LD3's offsets); a k-diffusion "
                            "sampler cannot express that: use learnsteps' core or the diffusers interop")
    if math.isinf(schedule.sigmas[0]):
        raise ScheduleError("k-diffusion's samplers work on x~ = x/alpha over sigma~ = sigma/alpha, both infinite "
                            "where alpha = 0, where this schedule starts (a flow model's t = 1): use learnsteps' core "
                            "or the diffusers interop")
    name, order, o = schedule.solver, schedule.order, schedule.options
    steps = len(schedule.times) - 1
    lowered = o.get("lower_order_final", True) and steps < LOWER_ORDER_FINAL_BELOW
    why_lowered = (f"this schedule lowers the order of its last steps (lower_order_final on {steps} < "
                   f"{LOWER_ORDER_FINAL_BELOW} steps) and k-diffusion's samplers do not; learn it with "
                   f"options={{lower_order_final: false}}")
    if is_euler(schedule):
        return dict(sampler="sample_euler", kwargs={})
    if name == "heun":
        return dict(sampler="sample_heun", kwargs={})
    if name == "dpm_solver++" and o.get("method", "multistep") == "multistep":
        taylor = o.get("variant", "midpoint") == "taylor"
        if order == 2:
            if lowered and not schedule.to_zero:
                raise ScheduleError(why_lowered + " (or end the grid at sigma = 0)")
            if taylor:
                return dict(sampler="sample_dpmpp_2m_sde", kwargs=dict(eta=0.0, solver_type="heun"))
            return dict(sampler="sample_dpmpp_2m", kwargs={})
        if not taylor:
            raise ScheduleError("k-diffusion's 3M (sample_dpmpp_3m_sde) warms up with the taylor second-order "
                                "step: learn the schedule with options={variant: taylor}")
        if lowered:
            raise ScheduleError(why_lowered)
        return dict(sampler="sample_dpmpp_3m_sde", kwargs=dict(eta=0.0))
    if name == "deis" and o.get("basis", "tab") == "rhoab":
        if schedule.to_zero:
            raise ScheduleError("k-diffusion's sample_lms integrates its polynomial down to sigma = 0 where our "
                                "core takes the first-order data step: end the grid at t_min")
        if lowered:
            raise ScheduleError(why_lowered)
        return dict(sampler="sample_lms", kwargs=dict(order=order))
    raise ScheduleError(f"no k-diffusion sampler computes {name} (order {order}, options {o}) as our core does; "
                        f"it has Euler, Heun, DPM-Solver++(2M/3M) and LMS (= deis basis=rhoab)")


class KDiffusionDenoiser(nn.Module):
    """A learnsteps teacher as a k-diffusion denoiser: model(x~, sigma~) -> x0, at the native time whose sigma~
    it is (for a discrete DDPM teacher, exactly where k-diffusion's DiscreteEpsDDPMDenoiser would call the net)."""

    def __init__(self, teacher: Denoiser):
        super().__init__()
        self.teacher = teacher

    def forward(self, x_tilde: Tensor, sigma_tilde: Tensor, cond=None) -> Tensor:
        s = self.teacher.noise_schedule
        t = s.t_of_sigma_tilde(sigma_tilde.to(torch.float64)).to(x_tilde.dtype)
        return self.teacher.x0(x_tilde * per_sample(s.alpha(t), x_tilde), t, cond)


def sample(model, noise: Tensor, schedule: Schedule, **extra_args) -> Tensor:
    """Sample `schedule` with k-diffusion as its users do, from unit Gaussian `noise`, and return our core's state
    x at times[-1]. `model` is a k-diffusion denoiser (e.g. KDiffusionDenoiser(teacher), or k-diffusion's own
    wrappers of your network)."""
    import k_diffusion

    r = recipe(schedule)
    sigmas = torch.tensor(schedule.sigmas, dtype=noise.dtype, device=noise.device)
    x = schedule.x_tilde(noise * schedule.make_noise_schedule().init_noise_std())
    fn = getattr(k_diffusion.sampling, r["sampler"])
    return schedule.from_x_tilde(fn(model, x, sigmas, extra_args=extra_args, disable=True, **r["kwargs"]))

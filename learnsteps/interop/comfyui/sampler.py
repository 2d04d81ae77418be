"""The "learnsteps sampler" node's sampler function: the file's solver, run by learnsteps' core on ComfyUI's model.

ComfyUI hands a SAMPLER's function (model, x, sigmas, extra_args, callback, disable) its denoiser
`model(x_c, sigma_c, **extra_args) -> x0` and the state x_c at sigmas[0] (its noise scaling applied). The function
below wraps that denoiser as a learnsteps Denoiser in the file's own time units and calls `learnsteps.solve` with
the file's grid, evaluation times, solver, options and coefficient table: the solver is our core's, not a copy.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from functools import lru_cache

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ...core.denoiser import Denoiser, per_sample
from ...core.sample import nfe as model_calls, solve
from ...core.schedules import interp
from ...schedule import Schedule, ScheduleError
from . import Convention, _kinds, comfy_sigmas, model_fit, prediction_of

F64 = torch.float64


class ExactTimesteps:
    """Mixed into a ComfyUI ModelSamplingDiscrete: timestep(sigma) is the continuous inverse of its own
    sigma(timestep) (log sigma linear between whole timesteps) instead of the nearest whole timestep."""

    def timestep(self, sigma: Tensor) -> Tensor:
        xp = self.log_sigmas.to("cpu", F64)  # float64 on the CPU, whatever device the model is on
        t = interp(sigma.to("cpu", F64).log().reshape(-1), xp, torch.arange(len(xp), dtype=F64))
        return t.clamp(0, len(xp) - 1).view(sigma.shape).to(sigma.device, torch.float32)


@lru_cache(maxsize=None)
def _exact_class(cls: type) -> type:
    return type(f"Exact{cls.__name__}", (ExactTimesteps, cls), {})


def exact_timesteps(model_sampling):
    """A copy of a discrete model's model_sampling that calls the network at fractional timesteps (any other
    model_sampling, and one already exact, is returned as it is)."""
    kinds = _kinds(model_sampling)
    if "ModelSamplingDiscrete" not in kinds or kinds & {"ExactTimesteps", "ModelSamplingDiscreteEDM",
                                                        "StableCascadeSampling"}:
        return model_sampling
    exact = copy.copy(model_sampling)  # shares its buffers
    exact.__class__ = _exact_class(type(model_sampling))
    return exact


class ComfyDenoiser(Denoiser):
    """ComfyUI's denoiser as a learnsteps Denoiser in the file's native time. Called at (x, t) it hands ComfyUI
    x_c = x / c(t) at sigma_c(t) (module docstring of learnsteps.interop.comfyui), so that the network sees the state
    x at time t as our core's teacher would, and returns the network's own prediction, recovered from ComfyUI's
    x0 by inverting its `calculate_denoised`: the solver then converts it with alpha and sigma of the grid point,
    which is how LD3's decoupled evaluation times are read."""

    def __init__(self, model, schedule: Schedule, prediction: str, dtype: torch.dtype, extra_args: dict,
                 on_call=None):
        super().__init__()
        self.model, self.extra_args, self.on_call, self.dtype = model, extra_args, on_call, dtype
        self.noise_schedule, self.prediction, self.conv = schedule.make_noise_schedule(), prediction, Convention(schedule)

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        t = torch.as_tensor(t).to("cpu", F64).expand(x.shape[0])  # the schedule's arithmetic, in float64 on the CPU
        x_c = (x / per_sample(self.conv.scale(t).to(x), x)).to(self.dtype)
        sigma = self.conv.sigma(t).to(x.device, self.dtype)
        denoised = self.model(x_c, sigma, **self.extra_args)
        if self.on_call is not None:
            self.on_call(x_c, sigma, denoised)
        x_c, s, d = x_c.to(x.dtype), per_sample(sigma.to(x.dtype), x), denoised.to(x.dtype)
        if self.prediction == "x0":
            return d
        if self.prediction == "v":  # V_PREDICTION: D = x_c / (s^2 + 1) - v s / sqrt(s^2 + 1)
            return (x_c / (s**2 + 1) - d) * (s**2 + 1).sqrt() / s
        return (x_c - d) / s  # EPS: D = x_c - eps s;  CONST (flow): D = x_c - v s


@contextmanager
def model_sampling_as(base_model, model_sampling):
    """ComfyUI's model (a BaseModel) with another model_sampling while the block runs."""
    old = base_model.model_sampling
    base_model.model_sampling = model_sampling
    try:
        yield
    finally:
        base_model.model_sampling = old


def _grid(schedule: Schedule, sigmas: Tensor, conv: Convention) -> tuple[dict, str | None]:
    """solve()'s grid arguments: the file's own when `sigmas` are its list; else (a list re-spaced by the loader
    node, or split for img2img) the file's solver on the times of those sigmas, if it has nothing tied to its grid."""
    own = torch.tensor(comfy_sigmas(schedule), dtype=torch.float32)
    given = sigmas.detach().to("cpu", torch.float32)
    if given.shape == own.shape and torch.allclose(given, own, rtol=1e-5, atol=0):
        return schedule.solve_kwargs, None
    if schedule.decoupled or schedule.coefficients is not None:
        raise ScheduleError("the sigmas connected are not this schedule file's, and its "
                            + ("evaluation times" if schedule.decoupled else "coefficient table")
                            + " belong to its own grid: connect 'Load learnsteps schedule' (steps 0) as the sigmas")
    s = given.to(F64)
    times = s if conv.flow else conv.ns.t_of_sigma_tilde(s)
    return (dict(grid=times, solver=schedule.solver, order=schedule.order, **schedule.solver_options),
            "running the file's solver on sigmas that are not its own (re-spaced or split): not what was learned")


def sampler_function(schedule: Schedule, exact: bool = True, warn=None):
    """The SAMPLER function of `schedule` (k-diffusion's signature, as comfy.samplers.KSAMPLER takes it). `exact`:
    call discrete models at the file's fractional timesteps (ExactTimesteps) instead of ComfyUI's rounded ones."""

    @torch.no_grad()
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        base = model.inner_model.inner_model  # KSamplerX0Inpaint -> CFGGuider -> the BaseModel being sampled
        model_sampling = base.model_sampling
        model_fit(schedule, model_sampling)
        conv = Convention(schedule)
        kwargs, warning = _grid(schedule, sigmas, conv)
        if warning and warn is not None:
            warn(warning)
        grid = torch.as_tensor(kwargs["grid"], dtype=F64)
        steps, calls = len(grid) - 1, [0]
        nfe = model_calls(kwargs["solver"], steps, bool(grid[-1] == conv.ns.t_zero))
        bar = tqdm(total=nfe, disable=disable, desc="learnsteps")

        def on_call(x_c, sigma, denoised):  # ComfyUI's previews and progress: one report per model call
            if callback is not None:
                i = min(calls[0] * steps // nfe, steps - 1)
                callback({"x": x_c, "i": i, "sigma": sigma[0], "sigma_hat": sigma[0], "denoised": denoised})
            calls[0] += 1
            bar.update()

        denoiser = ComfyDenoiser(model, schedule, prediction_of(model_sampling), x.dtype, extra_args or {}, on_call)
        work = torch.float32 if x.device.type == "mps" else F64  # the solver's state: float64 where the device has it
        x_T = x.to(work) * float(conv.scale(grid[:1])[0])  # ComfyUI's x_c at sigmas[0] as our state
        try:
            with model_sampling_as(base, exact_timesteps(model_sampling) if exact else model_sampling):
                x_end = solve(denoiser, x_T, **kwargs).x
        finally:
            bar.close()
        return (x_end / float(conv.scale(grid[-1:])[0])).to(x.dtype)

    return sample

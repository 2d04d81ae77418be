"""`python -m learnsteps.schedule export FILE --to TARGET [--steps M]`: a schedule file in the form other tools take.

The payload goes to stdout (so that `--sigmas "$(python -m learnsteps.schedule export s.json --to sigmas)"`
works); what the consumer must set, and whether the result is exactly our sampler, goes to stderr as notes.

    comfyui      comma-separated sigma~ list with its terminal value, for ManualSigmas -> SamplerCustom
    a1111        the list without a terminal 0 (A1111 appends sigma = 0 itself)
    sigmas       the plain comma-separated list with its terminal value (stable-diffusion.cpp's --sigmas, ...)
    diffusers    pipeline keyword arguments: sigmas=[...] (Euler/Heun) and timesteps=[...] (integers, DPM/UniPC)
    k-diffusion  a Python snippet: the sigma tensor, the starting state and the sampler call

--steps M re-spaces the list to M steps by log-linear interpolation of sigma~ over a uniform index, as
Align-Your-Steps does for its 10-step lists: an interpolation of a learned schedule, not one learned for M.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from ..core.grids import loglinear_interp
from ..schedule import Schedule, ScheduleError, load_schedule

TARGETS = ("comfyui", "a1111", "sigmas", "diffusers", "k-diffusion")


def _fmt(values) -> str:
    return ", ".join(f"{float(v):.10g}" for v in values)


def resampled_sigmas(schedule: Schedule, steps: int | None) -> list[float]:
    """The schedule's sigma~ list, or (steps given) its log-linear interpolation to `steps` steps."""
    sigmas = schedule.sigmas
    if steps is None or steps == len(sigmas) - 1:
        return sigmas
    if steps < 1:
        raise ScheduleError(f"--steps must be at least 1, got {steps}")
    if schedule.to_zero:
        if steps == 1:
            return [sigmas[0], 0.0]
        return loglinear_interp(sigmas[:-1], steps).tolist() + [0.0]
    return loglinear_interp(sigmas, steps + 1).tolist()


def export(schedule: Schedule, target: str, steps: int | None = None) -> tuple[str, list[str]]:
    """(payload, notes) of `schedule` for `target` (one of TARGETS)."""
    from .k_diffusion import recipe as k_recipe

    if target not in TARGETS:
        raise ScheduleError(f"unknown export target {target!r}: expected one of {', '.join(TARGETS)}")
    if math.isinf(schedule.sigmas[0]):
        raise ScheduleError("this schedule starts where alpha = 0 (a flow model's t = 1), where sigma~ = sigma/alpha is "
                            "infinite: no sigma~ list holds it (flow samplers take sigma = t itself: the file's `times`)")
    sigmas = resampled_sigmas(schedule, steps)
    notes = []
    if len(sigmas) != len(schedule.sigmas):
        notes.append(f"interpolated: sigma~ re-spaced log-linearly from the schedule's {len(schedule.sigmas) - 1} "
                     f"steps to {len(sigmas) - 1} (Align-Your-Steps style); not a schedule learned for that NFE")
    if schedule.decoupled:
        notes.append("not exact: this schedule evaluates the model at times of its own (LD3's decoupled offsets), "
                     "which a sigma list cannot carry; learnsteps' core or learnsteps.interop.diffusers runs it exactly")
    ns = schedule.noise_schedule
    notes.append(f"made for {schedule.solver} order {schedule.order} {json.dumps(schedule.options)} at NFE "
                 f"{schedule.nfe}, on a {ns.get('kind')} teacher; sigma~ = sigma/alpha (k-diffusion's sigma)")
    try:
        k = k_recipe(schedule)
        sampler = k["sampler"] + (f"({', '.join(f'{a}={v!r}' for a, v in k['kwargs'].items())})" if k["kwargs"] else "")
    except ScheduleError as err:
        k, sampler = None, None
        why_not_k = str(err)
    if target in ("comfyui", "a1111", "sigmas", "k-diffusion"):
        if sampler:
            notes.append(f"exact with k-diffusion's {sampler}"
                         + (" (ComfyUI and A1111 samplers of that name are k-diffusion's)" if target != "sigmas" else ""))
        else:
            notes.append(f"no k-diffusion sampler reproduces it exactly: {why_not_k}")
    if target == "comfyui":
        return _fmt(sigmas), notes + ["paste into a ManualSigmas node feeding SamplerCustom's sigmas"]
    if target == "sigmas":
        return _fmt(sigmas), notes
    if target == "a1111":
        if sigmas[-1] == 0:
            return _fmt(sigmas[:-1]), notes + ["A1111 appends sigma = 0 after the list"]
        return _fmt(sigmas), notes + ["not exact: this schedule ends at sigma > 0 and A1111 appends a step to 0"]
    if target == "k-diffusion":
        kwargs = "".join(f", {a}={v!r}" for a, v in (k["kwargs"] if k else {}).items())
        scale = float(schedule.x_tilde(torch.ones((), dtype=torch.float64)))
        code = (f"sigmas = torch.tensor([{_fmt(sigmas)}], dtype=torch.float64)\n"
                f"x = torch.randn(shape) * {scale:.10g}  # our start x_T / alpha(t_0), not randn * sigmas[0]\n"
                f"x = k_diffusion.sampling.{k['sampler'] if k else 'sample_euler'}(model, x, sigmas{kwargs})")
        return code, notes
    # diffusers
    code = f"sigmas=[{_fmt(sigmas)}]"
    notes.append("sigmas= (N + 1 values, terminal included) is what EulerDiscreteScheduler / HeunDiscreteScheduler "
                 "pipelines take; the exact route for every class is learnsteps.interop.diffusers.scheduler_for")
    if ns.get("kind") == "ddpm" and len(sigmas) == len(schedule.sigmas):
        timesteps = [round(t) for t in schedule.eval_times[:-1]]
        worst = max(abs(t - r) for t, r in zip(schedule.eval_times[:-1], timesteps))
        code += f"\ntimesteps=[{', '.join(map(str, timesteps))}]"
        notes.append("timesteps= (integers) is what DPMSolverMultistep / UniPC pipelines take: "
                     + ("exact" if worst == 0 else f"not exact, rounded by up to {worst:.3g} steps"))
    return code, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m learnsteps.schedule",
                                     description="Print a schedule file in the form another tool takes.")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="print the schedule for comfyui, a1111, sigmas, diffusers or k-diffusion")
    ex.add_argument("file")
    ex.add_argument("--to", required=True, choices=TARGETS)
    ex.add_argument("--steps", type=int, default=None, help="re-space log-linearly to this many steps")
    args = parser.parse_args(argv)
    try:
        payload, notes = export(load_schedule(args.file), args.to, args.steps)
    except ScheduleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(payload)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0

"""`python -m learnsteps.schedule export FILE --to TARGET [--steps M]`: a schedule file in the form other tools take.

The payload goes to stdout (so that `--sigmas "$(python -m learnsteps.schedule export s.json --to sigmas)"`
works); what the consumer must set, and whether the result is exactly our sampler, goes to stderr as notes.

    comfyui      comma-separated SIGMAS in the model type's convention (t for flow models, sigma/alpha for
                 discrete ones), terminal value included, for ManualSigmas -> SamplerCustom; the notes name the
                 ComfyUI sampler and settings that reproduce the file, or say that none does
    a1111        the same convention (A1111's and Forge's flow models take sigma = t too), without a terminal 0
                 (A1111 appends sigma = 0 itself)
    sigmas       the same list with its terminal value (stable-diffusion.cpp's --sigmas: its flow models take t too)
    diffusers    pipeline keyword arguments: sigmas=[...] (Euler/Heun) and timesteps=[...] (integers, DPM/UniPC)
    k-diffusion  a Python snippet: the sigma tensor, the starting state and the sampler call

Lists are printed in fixed-point, never in scientific notation (ComfyUI's ManualSigmas reads "1e-05" as 1 and -5):
the lists for UIs with the fewest digits that give back the same float32 (what they compute in, at most 9
significant digits), the code snippets with those of the float64 value.

--steps M re-spaces the list to M steps by log-linear interpolation of sigma~ over a uniform index, as
Align-Your-Steps does for its 10-step lists: an interpolation of a learned schedule, not one learned for M.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import torch

from ..core.grids import loglinear_interp
from ..schedule import Schedule, ScheduleError, load_schedule
from . import comfyui

TARGETS = ("comfyui", "a1111", "sigmas", "diffusers", "k-diffusion")


def _fmt(values, exact: bool = False) -> str:
    """Fixed-point numbers: the shortest that read back as the same float32 (or, `exact`, float64)."""
    cast = float if exact else np.float32
    return ", ".join(np.format_float_positional(cast(v), unique=True, trim="-") for v in values)


def resampled_sigmas(schedule: Schedule, steps: int | None) -> list[float]:
    """The schedule's sigma~ list, or (steps given) its log-linear interpolation to `steps` steps."""
    sigmas = schedule.sigmas
    if steps is None or steps == len(sigmas) - 1:
        return sigmas
    if steps < 1:
        raise ScheduleError(f"--steps must be at least 1, got {steps}")
    if math.isinf(sigmas[0]):
        raise ScheduleError("--steps: this schedule starts at a flow model's t = 1, where sigma~ is infinite: it cannot "
                            "be re-spaced log-linearly in sigma~ (learn a schedule for that number of steps)")
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
    if math.isinf(schedule.sigmas[0]) and target in ("k-diffusion", "diffusers"):
        raise ScheduleError(f"this schedule starts where alpha = 0 (a flow model's t = 1), where sigma~ = sigma/alpha is "
                            f"infinite: no sigma~ list for {target} holds it (flow models take sigma = t itself: "
                            f"--to comfyui, a1111 or sigmas; in a diffusers pipeline learnsteps.interop.diffusers."
                            f"apply_schedule)")
    sigmas = resampled_sigmas(schedule, steps)
    resampled = len(sigmas) != len(schedule.sigmas)
    notes = []
    if resampled:
        notes.append(f"interpolated: sigma~ re-spaced log-linearly from the schedule's {len(schedule.sigmas) - 1} "
                     f"steps to {len(sigmas) - 1} (Align-Your-Steps style); not a schedule learned for that NFE")
    ns = schedule.noise_schedule
    ui_list = target in ("comfyui", "a1111", "sigmas")
    convention = ("t, the sigma of ComfyUI's, A1111's, Forge's and stable-diffusion.cpp's flow models (not "
                  "sigma/alpha)" if ui_list and comfyui.is_flow(schedule) else "sigma~ = sigma/alpha (k-diffusion's sigma)")
    notes.append(f"made for {schedule.solver} order {schedule.order} {json.dumps(schedule.options)} at NFE "
                 f"{schedule.nfe}, on a {ns.get('kind')} teacher; the list holds {convention}")
    if target == "comfyui":
        return _fmt(comfyui.comfy_sigmas(schedule, steps)), notes + comfyui.notes(schedule, resampled)
    if schedule.decoupled:
        notes.append("not exact: this schedule evaluates the model at times of its own (LD3's decoupled offsets), "
                     "which a sigma list cannot carry; learnsteps' core, learnsteps.interop.diffusers and the ComfyUI "
                     "'learnsteps sampler' node run it exactly")
    try:
        k = k_recipe(schedule)
        sampler = k["sampler"] + (f"({', '.join(f'{a}={v!r}' for a, v in k['kwargs'].items())})" if k["kwargs"] else "")
    except ScheduleError as err:
        k, sampler, why_not_k = None, None, str(err)
    if target == "a1111":
        return _a1111(schedule, steps, sampler, notes)
    if target == "sigmas" and comfyui.is_flow(schedule):
        notes.append("which stable-diffusion.cpp sampler reproduces it on a flow model is not checked by learnsteps "
                     "(its flow models take sigma = t, as ComfyUI's, where Euler is the flow Euler step and "
                     "k-diffusion's DPM++ steps in log t)")
    elif target in ("sigmas", "k-diffusion"):
        notes.append(f"exact with k-diffusion's {sampler}" if sampler else
                     f"no k-diffusion sampler reproduces it exactly: {why_not_k}")
    if target == "sigmas":
        return _fmt(comfyui.comfy_sigmas(schedule, steps)), notes
    if target == "k-diffusion":
        kwargs = "".join(f", {a}={v!r}" for a, v in (k["kwargs"] if k else {}).items())
        scale = float(schedule.x_tilde(torch.ones((), dtype=torch.float64)))
        code = (f"sigmas = torch.tensor([{_fmt(sigmas, exact=True)}], dtype=torch.float64)\n"
                f"x = torch.randn(shape) * {scale!r}  # our start x_T / alpha(t_0), not randn * sigmas[0]\n"
                f"x = k_diffusion.sampling.{k['sampler'] if k else 'sample_euler'}(model, x, sigmas{kwargs})")
        return code, notes
    # diffusers
    code = f"sigmas=[{_fmt(sigmas, exact=True)}]"
    notes.append("sigmas= (N + 1 values, terminal included) is what EulerDiscreteScheduler / HeunDiscreteScheduler "
                 "pipelines take; the exact route for every class is learnsteps.interop.diffusers.scheduler_for"
                 + (" (flow pipelines take t, not these sigma/alpha, and shift what they are given: use "
                    "learnsteps.interop.diffusers.apply_schedule)" if comfyui.is_flow(schedule) else ""))
    if ns.get("kind") == "ddpm" and not resampled:
        timesteps = [round(t) for t in schedule.eval_times[:-1]]
        worst = max(abs(t - r) for t, r in zip(schedule.eval_times[:-1], timesteps))
        code += f"\ntimesteps=[{', '.join(map(str, timesteps))}]"
        notes.append("timesteps= (integers) is what DPMSolverMultistep / UniPC pipelines take: "
                     + ("exact" if worst == 0 else f"not exact, rounded by up to {worst:.3g} steps"))
    return code, notes


def _a1111(schedule: Schedule, steps: int | None, sampler: str | None, notes: list[str]) -> tuple[str, list[str]]:
    """A1111 / Forge: the list in the model type's convention (A1111's SD3 and Forge's flow models take sigma = t,
    as ComfyUI's: their CONST sampling), without the terminal 0 they append. Their samplers are k-diffusion's; on a
    flow model only Euler computes the flow step (k-diffusion's DPM++ steps in log t there)."""
    values = comfyui.comfy_sigmas(schedule, steps)
    if comfyui.is_flow(schedule):
        notes.append("Euler: k-diffusion's Euler on sigma = t is the flow Euler step, exact as run in ComfyUI (A1111 "
                     "itself is not run by learnsteps); A1111's DPM++ samplers are k-diffusion's, which step in log t "
                     "rather than the flow's log-SNR: not exact; Forge's flow sampling is not checked by learnsteps"
                     if sampler == "sample_euler"
                     else f"no A1111 sampler is known to reproduce {schedule.solver} on a flow model (k-diffusion's "
                     f"DPM++ steps in log t there, not in the flow's log-SNR); Forge's is not checked by learnsteps")
    elif sampler is None:
        notes.append("no A1111 sampler reproduces it exactly: no k-diffusion sampler does (see --to k-diffusion)")
    else:
        notes.append(f"exact with k-diffusion's {sampler} (A1111's samplers of that name are k-diffusion's) with "
                     f"'Enable quantization in K samplers' off (on, it rounds each sigma to a whole timestep)")
    if values[-1] == 0:
        return _fmt(values[:-1]), notes + ["A1111 appends sigma = 0 after the list"]
    return _fmt(values), notes + ["not exact: this schedule ends at sigma > 0 and A1111 appends a step to 0"]


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are the project's one line (`error: ...`, exit code 2), not a usage block; --help
    still prints the usage."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m learnsteps.schedule",
                     description="Print a schedule file in the form another tool takes.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
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

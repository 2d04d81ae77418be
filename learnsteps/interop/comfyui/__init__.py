"""A learnsteps schedule in ComfyUI: its sigma convention, the ComfyUI sampler that reproduces it, and nodes.

ComfyUI's k-diffusion samplers step a state x_c at sigma_c and call the model as D = model(x_c, sigma_c) -> x0. What
x_c and sigma_c mean depends on the model's `model_sampling` (comfy/model_sampling.py, read at Comfy-Org/ComfyUI
v0.3.64):

    discrete VP (ModelSamplingDiscrete + EPS / V_PREDICTION)   sigma_c = sigma / alpha, x_c = x / alpha
    flow (CONST + ModelSamplingDiscreteFlow / ModelSamplingFlux)  sigma_c = t = sigma,   x_c = x

i.e. x_c = x / c(t) and sigma_c = sigma(t) / c(t) with c = alpha (VP) or c = 1 (flow: x = (1 - t) x0 + t eps
itself). A flow model's shift only moves the schedules ComfyUI computes itself (`ModelSamplingDiscreteFlow.sigma`
of a timestep); a SIGMAS list handed to SamplerCustom is used as it is. Its discrete models round every sigma to the
nearest whole timestep when they call the network (`ModelSamplingDiscrete.timestep`); `sampler.exact_timesteps`
is the continuous inverse of ComfyUI's own `sigma(timestep)` (log sigma linear between whole steps, the convention
of our DDPM times), which the nodes put in place. FLUX's ModelSamplingFlux (shift e^mu, sigma = t) is handled by
the same algebra as ModelSamplingDiscreteFlow; benchmarks/comfyui.py runs SD1- and SD3-type models.

This module needs no ComfyUI: `comfy_sigmas` and `recipe` serve `python -m learnsteps.schedule export --to
comfyui`; `model_fit` and `sampler_function` are what the nodes (nodes.py, imported inside ComfyUI only) run.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from ...schedule import Schedule, ScheduleError

SUPPORTED = ("ddpm", "flow")  # the noise schedules ComfyUI has model samplings for
FLOW_SAMPLERS = {  # k-diffusion's sampler -> ComfyUI's that computes the same on a flow model (see `recipe`)
    "sample_euler": "euler", "sample_dpmpp_2m": "dpmpp_2m_sde", "sample_dpmpp_2m_sde": "dpmpp_2m_sde",
    "sample_dpmpp_3m_sde": "dpmpp_3m_sde",
}
NODES = {"dpmpp_2m_sde": "SamplerDPMPP_2M_SDE", "dpmpp_3m_sde": "SamplerDPMPP_3M_SDE", "lms": "SamplerLMS"}
USE_THE_NODE = "use the 'learnsteps sampler' node (learnsteps.interop.comfyui), which runs the file's solver itself"


def is_flow(schedule: Schedule) -> bool:
    return schedule.noise_schedule.get("kind") == "flow"


def comfy_sigmas(schedule: Schedule, steps: int | None = None) -> list[float]:
    """The schedule's SIGMAS in ComfyUI's convention for its model type (t for flow, sigma/alpha otherwise), with
    its terminal value; `steps`: re-spaced log-linearly in sigma/alpha first (export.resampled_sigmas)."""
    from ..export import resampled_sigmas

    sig = resampled_sigmas(schedule, steps)
    if not is_flow(schedule):
        return sig
    return list(schedule.times) if len(sig) == len(schedule.times) else [s / (1 + s) for s in sig]


def recipe(schedule: Schedule) -> dict:
    """{"sigmas": convention, "sampler": ComfyUI sampler name, "node": the node that sets its options, "kwargs"}
    that reproduces `schedule` with ComfyUI's own samplers on a pasted list, or ScheduleError saying why none does.

    On a flow model ComfyUI's k-diffusion samplers treat x as x0 + sigma eps with sigma = t: Euler's step is then
    exactly the flow Euler step (= DDIM), and its SDE multistep samplers step in the model's log-SNR
    (`sigma_to_half_log_snr` knows CONST), so DPM-Solver++(2M) is `dpmpp_2m_sde` with eta 0 (solver_type midpoint,
    or heun for our variant taylor) and 3M is `dpmpp_3m_sde` with eta 0; `dpmpp_2m`, `heun` and `lms` step in
    log t or t and compute something else."""
    from ..k_diffusion import is_euler, recipe as k_recipe

    kind = schedule.noise_schedule.get("kind")
    if kind not in SUPPORTED:
        raise ScheduleError(f"ComfyUI's models sample discrete DDPM (eps, v) or flow schedules; this one is {kind!r}")
    if schedule.coefficients is not None:
        raise ScheduleError(f"a learned solver's coefficient table runs in no ComfyUI sampler: {USE_THE_NODE}")
    if schedule.decoupled:
        raise ScheduleError(f"this schedule calls the model at times of its own (LD3's evaluation times), which a "
                            f"SIGMAS list cannot carry: {USE_THE_NODE}")
    if math.isinf(schedule.sigmas[0]):  # a flow file from t = 1 (alpha = 0): no sigma~ list, but ComfyUI takes t
        if is_euler(schedule):
            return dict(sigmas="t", sampler="euler", node="KSamplerSelect", kwargs={})
        raise ScheduleError(f"this schedule starts at t = 1, which ComfyUI's multistep samplers move to the model's "
                            f"percent_to_sigma(1e-4) (offset_first_sigma_for_snr): only its euler is exact from there; "
                            f"{USE_THE_NODE}")
    try:
        k = k_recipe(schedule)
    except ScheduleError as err:
        raise ScheduleError(f"{err}; {USE_THE_NODE}") from None
    sampler, kwargs = k["sampler"], dict(k["kwargs"])
    if kind == "flow":
        if sampler not in FLOW_SAMPLERS:
            raise ScheduleError(f"ComfyUI's {sampler.removeprefix('sample_')} steps in t on flow models, not in "
                                f"log-SNR as {schedule.solver} does here: {USE_THE_NODE}")
        if sampler == "sample_dpmpp_2m":
            kwargs = dict(eta=0.0, solver_type="midpoint")
        sampler = FLOW_SAMPLERS[sampler]
    else:
        sampler = sampler.removeprefix("sample_")
    return dict(sigmas="t" if kind == "flow" else "sigma/alpha", sampler=sampler,
                node=NODES.get(sampler, "KSamplerSelect"), kwargs=kwargs)


def rounding(schedule: Schedule) -> float:
    """How far ComfyUI's discrete models move the schedule's model times by rounding them to whole timesteps
    (0 for flow models, which take t * multiplier as it is)."""
    if is_flow(schedule):
        return 0.0
    return max(abs(t - round(t)) for t in schedule.eval_times[:-1])


# ---- the connected model -----------------------------------------------------------------------------------
def _kinds(model_sampling) -> set[str]:
    """The class names of a model_sampling object (ComfyUI composes it from a sampling and a prediction class)."""
    return {c.__name__ for c in type(model_sampling).__mro__}


def prediction_of(model_sampling) -> str:
    """What the model's network outputs, as learnsteps names it (from ComfyUI's prediction class)."""
    kinds = _kinds(model_sampling)
    for name, prediction in (("CONST", "flow"), ("X0", "x0"), ("V_PREDICTION", "v"), ("EPS", "epsilon")):
        if name in kinds:
            return prediction
    raise ScheduleError(f"unknown ComfyUI prediction type {type(model_sampling).__name__}")


def model_fit(schedule: Schedule, model_sampling, where: str = "schedule") -> None:
    """ScheduleError unless the file was made for the connected model's noise schedule: a DDPM file on a discrete
    model with the same sigma table (beta schedule, timestep count, no zero-terminal-SNR rescale), a flow file on a
    flow model with the same shift (and timestep multiplier)."""
    kinds, ns = _kinds(model_sampling), schedule.noise_schedule
    kind = ns.get("kind")
    if kind not in SUPPORTED:
        raise ScheduleError(f"{where}: made for a {kind!r} noise schedule; ComfyUI's models sample discrete DDPM "
                            f"or flow schedules")
    if kind == "flow":
        if "CONST" not in kinds:
            raise ScheduleError(f"{where}: made for a flow model; the connected model is not one "
                                f"({type(model_sampling).__name__})")
        if "ModelSamplingFlux" in kinds:  # FLUX's shift is mu: sigma = e^mu / (e^mu + 1/t - 1)
            shift, what = math.exp(float(model_sampling.shift)), f"FLUX shift mu = {float(model_sampling.shift):g}"
        elif "ModelSamplingDiscreteFlow" in kinds:
            shift, what = float(model_sampling.shift), f"shift {float(model_sampling.shift):g}"
            if float(model_sampling.multiplier) != ns["n"]:
                raise ScheduleError(f"{where}: made for a flow model called at t * {ns['n']}; the connected model "
                                    f"multiplies t by {float(model_sampling.multiplier):g}")
        else:
            raise ScheduleError(f"{where}: unknown ComfyUI flow sampling {type(model_sampling).__name__}")
        if not math.isclose(shift, ns["shift"], rel_tol=1e-6):
            raise ScheduleError(f"{where}: made for a flow model with shift {ns['shift']:g}; the connected model "
                                f"samples with {what} (set it with ModelSamplingSD3 / ModelSamplingFlux, or use a "
                                f"schedule learned for this shift)")
        return
    if "ModelSamplingDiscrete" not in kinds or kinds & {"CONST", "ModelSamplingDiscreteEDM", "StableCascadeSampling"}:
        raise ScheduleError(f"{where}: made for a discrete DDPM model; the connected model samples with "
                            f"{type(model_sampling).__name__}")
    table = torch.as_tensor(model_sampling.sigmas).to(torch.float64)
    want = schedule.make_noise_schedule().sigma_tilde(torch.arange(ns["n"], dtype=torch.float64))
    off = float(((table - want).abs() / want).max()) if table.shape == want.shape else math.inf
    if not off <= 1e-5:  # ComfyUI stores the table in float32: it agrees to ~1e-7 when the betas are the same
        raise ScheduleError(f"{where}: made for a DDPM model with {ns['betas']} betas {ns['beta_start']}..."
                            f"{ns['beta_end']} over {ns['n']} steps; the connected model's sigma table "
                            + (f"differs by {off:.2g} relative" if math.isfinite(off) else f"has {len(table)} steps")
                            + " (another beta schedule, or zero-terminal SNR)")


class Convention:
    """How a ComfyUI model of the file's type sees the file's native times: x_c = x / c(t), sigma_c = sigma(t) / c(t),
    c = alpha for discrete VP models, 1 for flow models."""

    def __init__(self, schedule: Schedule):
        self.ns, self.flow = schedule.make_noise_schedule(), is_flow(schedule)

    def scale(self, t: Tensor) -> Tensor:
        return torch.ones_like(t) if self.flow else self.ns.alpha(t)

    def sigma(self, t: Tensor) -> Tensor:
        return self.ns.sigma(t) if self.flow else self.ns.sigma_tilde(t)


def load_sigmas(path, model_sampling, steps: int = 0) -> tuple[Tensor, list[str]]:
    """The node "Load learnsteps schedule": the file's SIGMAS (float32, as ComfyUI's sigma nodes give them) for the
    connected model, and warnings; `steps` > 0 and not the file's: re-spaced, which is not what was learned."""
    from ...schedule import load_schedule

    schedule = load_schedule(path)
    model_fit(schedule, model_sampling, str(path))
    n = len(schedule.times) - 1
    warnings = []
    if steps and steps != n:
        warnings.append(f"{path}: re-spaced log-linearly from the {n} learned steps to {steps}: an interpolation of "
                        f"the schedule, not one learned for {steps} steps")
    elif schedule.decoupled or schedule.coefficients is not None:
        warnings.append(f"{path}: connect the 'learnsteps sampler' node as the sampler: this schedule's "
                        + ("evaluation times" if schedule.decoupled else "coefficient table")
                        + " reach the model only through it")
    return torch.tensor(comfy_sigmas(schedule, steps or None), dtype=torch.float32), warnings


def install(comfyui_dir, name: str = "learnsteps") -> Path:
    """Write the small custom-node folder custom_nodes/<name>/ that loads learnsteps' nodes into ComfyUI (from the
    Python environment ComfyUI runs in, where learnsteps must be installed)."""
    from ...files import write_text

    root = Path(comfyui_dir)
    if not (root / "custom_nodes").is_dir() or not (root / "comfy").is_dir():
        raise ValueError(f"{root}: not a ComfyUI folder (no comfy/ and custom_nodes/ in it)")
    folder = root / "custom_nodes" / name
    write_text(folder / "__init__.py", SHIM)
    return folder


SHIM = '''"""learnsteps' ComfyUI nodes (written by `python -m learnsteps.interop.comfyui install`): the code lives in the
learnsteps package, which must be installed in the Python environment ComfyUI runs in."""
from learnsteps.interop.comfyui.nodes import comfy_entrypoint  # noqa: F401
'''


def notes(schedule: Schedule, resampled: bool = False) -> list[str]:
    """What `export --to comfyui` says besides the list: the sampler and settings that reproduce the file, or why
    none does, and where ComfyUI's own conventions move the result."""
    out = []
    try:
        r = recipe(schedule)
        settings = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in r["kwargs"].items())
        how = f"{r['node']}: {settings}" if settings else f"{r['node']} '{r['sampler']}'"
        out.append(f"exact with ComfyUI's {r['sampler']} ({how})"
                   + (" — not dpmpp_2m, which steps in log t on flow models" if r["sampler"] == "dpmpp_2m_sde"
                      and is_flow(schedule) else "")
                   + ("; on a re-spaced list it runs the file's solver, not the learned schedule" if resampled else ""))
    except ScheduleError as err:
        out.append(f"no ComfyUI sampler reproduces it exactly: {err}")
    if not is_flow(schedule):
        moved = rounding(schedule)
        if resampled or moved > 0:
            out.append("ComfyUI's discrete models round each sigma to a whole timestep when they call the network"
                       + ("" if resampled else f" (the model times move by up to {moved:.3g} steps here)")
                       + ": connect the model through the 'learnsteps exact timesteps' node to call it at the "
                       "list's own times (docs/benchmarks.md measures what the rounding costs)")
        n = schedule.noise_schedule["n"]
        if schedule.times[0] != n - 1:
            s0 = schedule.sigmas[0]
            out.append(f"ComfyUI starts from noise * sigmas[0] unless sigmas[0] is the model's sigma_max (t = {n - 1}), "
                       f"where it starts from noise * sqrt(1 + sigma^2) as learnsteps does: this schedule's first state "
                       f"differs by a factor {math.sqrt(1 + 1 / s0**2):.6g}")
    elif not schedule.to_zero:
        out.append("ComfyUI divides a flow model's result by 1 - t at the list's last time (its inverse noise "
                   "scaling): the latents it returns are learnsteps' x / alpha there")
    out.append("paste into a ManualSigmas node feeding SamplerCustom's sigmas, or load the file itself with the "
               "'Load learnsteps schedule' node (python -m learnsteps.interop.comfyui install COMFYUI_DIR)")
    return out

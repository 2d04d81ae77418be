"""A diffusers scheduler that runs a learnsteps schedule with the generalized multistep solver.

    from learnsteps.interop.scheduler import TabulatedScheduler
    pipe.scheduler = TabulatedScheduler.from_schedule("schedule.json")
    images = pipe(..., num_inference_steps=pipe.scheduler.num_inference_steps).images

It takes a learned-solver file (version 2: its coefficient table) or any version-1 schedule of a multistep solver
of the core (whose table on its grid core/tables.py finds), so that LD3's decoupled model times and a learned
update rule both reach a pipeline as they are: `timesteps` are the schedule's model inputs, and `step` is
docs/schedule-format.md's reference update,

    x_{i+1} = r_i x_i + alpha_{i+1} sum_j c[i, j] m_{i-j},

with the model output converted to x0 (data form) or eps (noise form) with alpha and sigma of the integration
time, exactly as our core does, and the network's prediction type the file records (prediction_type).

`init_noise_sigma` is our core's starting std, so `pipe(latents=noise)` starts where `learnsteps.sample` does
(x_T = noise * std) in both conventions of diffusers' pipelines: StableDiffusionPipeline (prepare_latents)
multiplies given latents by init_noise_sigma, StableDiffusion3Pipeline and FLUX take them as they are, and the
std is 1 for every DDPM schedule and every flow schedule from t = 1. (Only a flow file of an earlier learnsteps,
starting at t_max < 1 with std t_max, needs latents=noise * init_noise_sigma in the latter pipelines.)
"""
from __future__ import annotations

from pathlib import Path

import warnings

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from ..core.solvers import TABLE_FORMS, check_table, table_scale
from ..core.steps import Grid
from ..core.tables import narrowest_table
from ..schedule import PREDICTION_TYPES as PREDICTIONS, Schedule, ScheduleError, check_prediction_type, load_schedule
from .diffusers import check_size


class TabulatedScheduler(SchedulerMixin, ConfigMixin):
    """The generalized multistep solver as a diffusers scheduler; build it with `from_schedule`."""

    order = 1  # one model call per step

    @register_to_config
    def __init__(self, coefficients: list, timesteps: list, alpha: list, sigma: list, form: str = "data",
                 prediction_type: str = "epsilon", num_train_timesteps: int = 1000, init_noise_sigma: float = 1.0,
                 teacher: dict | None = None, shift_config: dict | None = None):
        n = len(timesteps)
        if len(alpha) != n + 1 or len(sigma) != n + 1:
            raise ValueError(f"alpha and sigma need {n + 1} values (the integration times), got {len(alpha)}, {len(sigma)}")
        if form not in TABLE_FORMS:
            raise ValueError(f"form must be one of {TABLE_FORMS}, not {form!r}")
        check_table(coefficients, n, len(coefficients[0]) if coefficients else 0, table_scale(form, alpha[0], sigma[0]))
        if prediction_type not in PREDICTIONS:
            raise ValueError(f"prediction_type must be one of {PREDICTIONS}, not {prediction_type!r}")
        self.init_noise_sigma = init_noise_sigma
        if shift_config:  # read by FLUX-like pipelines (config.get) to compute their resolution-dependent mu
            self.register_to_config(**shift_config)
        self.num_inference_steps = n
        self.set_timesteps()

    @classmethod
    def from_schedule(cls, schedule: Schedule | str | Path, prediction_type: str | None = None) -> "TabulatedScheduler":
        """The scheduler of a schedule file (or Schedule); prediction_type: what the pipeline's network outputs,
        by default the file's record of its teacher's (teacher.prediction_type; ScheduleError if it names
        another). A file without that record (written before learnsteps recorded it) is read as
        "flow_prediction" for a flow teacher; a pipeline teacher's DDPM file is refused (its network may be a
        v-prediction one: pass prediction_type=pipe.scheduler.config.prediction_type), any other is read as
        "epsilon" with a warning."""
        s = schedule if isinstance(schedule, Schedule) else load_schedule(schedule)
        where = "schedule" if isinstance(schedule, Schedule) else str(schedule)
        kind = s.noise_schedule.get("kind")
        if kind not in ("ddpm", "flow"):
            raise ScheduleError(f"{where}: diffusers pipelines run discrete DDPM or flow-matching models; this "
                                f"schedule is for a {kind!r} noise schedule")
        check_prediction_type(s.teacher, where)
        table, form = s.coefficients, s.options.get("form", "data")
        if table is None:
            table, form = _table_of(s, where)
        prediction_type = _prediction_type(s, prediction_type)
        return cls(coefficients=[list(map(float, row)) for row in table], timesteps=s.diffusers_timesteps,
                   alpha=s.alpha, sigma=s.sigma, form=form, prediction_type=prediction_type,
                   num_train_timesteps=int(s.noise_schedule["n"]),
                   init_noise_sigma=s.make_noise_schedule().init_noise_std(),
                   teacher={k: s.teacher[k] for k in ("mu", "height", "width", "frames") if k in s.teacher},
                   shift_config=s.teacher.get("shift_config"))

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu=None, timesteps=None,
                      **kwargs):
        """The schedule's own steps; a pipeline asking for another number of steps is told how many it has, one
        called at another size than the schedule's (a FLUX-like pipeline's `mu`) is refused. FluxPipeline and its
        kin pass a default sigma list (its length is their step count), never used."""
        n = len(self.config.timesteps)
        asked = num_inference_steps if sigmas is None else len(sigmas)
        if asked not in (None, n):
            raise ValueError(f"this scheduler runs a learned {n}-step schedule: call the pipeline with "
                             f"num_inference_steps={n}, not {asked}")
        check_size(self.config.teacher or {}, mu)
        self.timesteps = torch.tensor(self.config.timesteps, dtype=torch.float64, device=device)
        self.sigmas = torch.tensor(self.config.sigma, dtype=torch.float64)  # what pipelines read for their caches
        self._step_index, self._outputs = 0, []

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Pipelines (FLUX, Qwen-Image, Wan) call it before their loop; the schedule always starts at its first step."""
        if begin_index != 0:
            raise ValueError("a learned schedule runs from its first step (begin_index 0)")

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample  # the network takes the VP (or flow) state itself

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, **kwargs):
        c, a, s = self.config.coefficients, self.config.alpha, self.config.sigma
        i = self._step_index
        if i >= len(c):
            raise ValueError(f"all {len(c)} steps of the schedule are taken: call set_timesteps to sample again")
        x0 = _to_x0(model_output.to(sample.dtype), sample, a[i], s[i], self.config.prediction_type)
        m = x0 if self.config.form == "data" else (sample - a[i] * x0) / s[i]
        self._outputs = [m] + self._outputs[: len(c[i]) - 1]
        r = s[i + 1] / s[i] if self.config.form == "data" else a[i + 1] / a[i]
        prev = r * sample + a[i + 1] * sum(w * out for w, out in zip(c[i], self._outputs))
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def _prediction_type(s: Schedule, given: str | None) -> str:
    recorded = s.teacher.get("prediction_type")
    if recorded and given and given != recorded:
        raise ScheduleError(f"the schedule was made for a {recorded} teacher, not {given}")
    if given or recorded:
        return given or recorded
    if s.noise_schedule.get("kind") == "flow":
        return "flow_prediction"
    if s.teacher.get("pipeline"):
        raise ScheduleError(f"the schedule was learned for a {s.teacher['pipeline']} but does not record its prediction "
                            f"type (an earlier learnsteps wrote it): pass prediction_type= the pipeline scheduler's "
                            f"config.prediction_type")
    warnings.warn("the schedule does not record its teacher's prediction type: read as epsilon (pass "
                  "prediction_type= if the network predicts something else)", stacklevel=3)
    return "epsilon"


def _to_x0(out, x, alpha: float, sigma: float, prediction: str):
    if prediction == "epsilon":
        return (x - sigma * out) / alpha
    if prediction == "v_prediction":
        return alpha * x - sigma * out
    if prediction == "flow_prediction":  # v = eps - x0, alpha + sigma = 1 on the flow path
        return (x - sigma * out) / (alpha + sigma)
    return out


def _table_of(s: Schedule, where: str) -> tuple[list[list[float]], str]:
    """The table of a version-1 schedule's solver on its grid, in the form where it is narrower."""
    try:
        table, form = narrowest_table(s.solver, s.order, Grid(s.make_noise_schedule(), s.grid, s.eval_grid), **s.options)
    except ValueError as err:
        raise ScheduleError(f"{where}: {s.solver} (order {s.order}) is not a multistep table on this grid, so "
                            f"TabulatedScheduler cannot run it: {err}") from None
    return table.tolist(), form

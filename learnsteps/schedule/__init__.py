"""The portable schedule file: a solver's time grid (learned or hand-made) that other samplers load.

docs/schedule-format.md describes the format. `Schedule.from_grid` exports any grid of the core (baselines
included), `save_schedule` writes it atomically, `load_schedule` validates everything it reads and names
the problem when something is off.
"""
from __future__ import annotations

import datetime as _dt
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..core.denoiser import PREDICTION_TYPES as RECORDED
from ..core.sample import check_options, check_order, get_solver, nfe as nfe_of, resolved_options, starts_at_noise
from ..core.schedules import NoiseSchedule, make_schedule
from ..core.solvers import check_table, table_scale
from ..core.steps import Grid, check_times
from ..files import read_json, write_json

FORMAT = "learnsteps-schedule"
# version 1: a grid for a solver of the core; version 2 adds the coefficient table of the generalized multistep
# solver (solver "tabulated") and the alpha, sigma it needs. A file without a table is still written as version 1,
# so that every reader that knows version 1 keeps reading it.
VERSION, TABLE_VERSION = 1, 2
READS = (VERSION, TABLE_VERSION)


# what a diffusers pipeline's network outputs (its scheduler's `prediction_type`): a file's teacher may record it
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow_prediction", "sample")


class ScheduleError(ValueError):
    """A schedule file that cannot be used as asked; the message names the problem."""


# name -> recipe(schedule) -> the settings with which that sampler runs the schedule exactly (ScheduleError where it
# cannot): filled by learnsteps.interop, which sits above this file, so that every file written says how to run it.
CONSUMERS: dict = {}


@dataclass
class Schedule:
    solver: str
    order: int
    nfe: int
    noise_schedule: dict  # NoiseSchedule.config()
    times: list[float]  # integration times, N + 1, decreasing, in the teacher's native time
    eval_times: list[float]  # model-evaluation times, N + 1 (equal to `times` unless LD3's offsets are on)
    options: dict = field(default_factory=dict)  # the solver's own options (variant, corrector, ...)
    teacher: dict = field(default_factory=dict)  # {"fingerprint": ..., "name": ...}
    provenance: dict = field(default_factory=dict)  # method, loss, validation score, seed, date, version
    coefficients: list[list[float]] | None = None  # solver "tabulated": its (N, order) table (version 2)

    # ---- construction --------------------------------------------------------------------------------
    @classmethod
    def from_grid(cls, grid, noise_schedule: NoiseSchedule, solver: str, order: int | None = None,
                  eval_grid=None, options: dict | None = None, teacher: dict | None = None,
                  provenance: dict | None = None, coefficients=None) -> "Schedule":
        t = check_times(torch.as_tensor(grid).detach().to(torch.float64))
        e = t if eval_grid is None else check_times(torch.as_tensor(eval_grid).detach().to(torch.float64),
                                                     "evaluation grid", monotone=False)
        order = check_order(solver, order, len(t) - 1)
        to_zero = bool(t[-1] == noise_schedule.t_zero)
        from .. import __version__

        prov = dict(created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    learnsteps_version=__version__, **(provenance or {}))
        options = dict(options or {})
        if coefficients is None:
            coefficients = options.pop("coefficients", None)
        options = resolved_options(solver, options)
        options.pop("coefficients", None)  # the table is a field of its own
        table = None if coefficients is None else \
            check_table(torch.as_tensor(coefficients).detach(), len(t) - 1, order).tolist()
        if (solver == "tabulated") != (table is not None):
            raise ValueError("a coefficient table goes with the solver 'tabulated', and only with it")
        return cls(solver=solver, order=order, nfe=nfe_of(solver, len(t) - 1, to_zero),
                   noise_schedule=noise_schedule.config(), times=t.tolist(), eval_times=e.tolist(),
                   options=options, teacher=dict(teacher or {}), provenance=prov, coefficients=table)

    # ---- what samplers need ------------------------------------------------------------------------------
    def make_noise_schedule(self) -> NoiseSchedule:
        return make_schedule(**self.noise_schedule)

    @property
    def grid(self) -> Tensor:
        return torch.tensor(self.times, dtype=torch.float64)

    @property
    def eval_grid(self) -> Tensor:
        return torch.tensor(self.eval_times, dtype=torch.float64)

    @property
    def sigmas(self) -> list[float]:
        """sigma / alpha at the integration times (k-diffusion's and diffusers' "sigmas"; 0 at t_zero)."""
        return self.make_noise_schedule().sigma_tilde(self.grid).tolist()

    @property
    def eval_sigmas(self) -> list[float]:
        return self.make_noise_schedule().sigma_tilde(self.eval_grid).tolist()

    @property
    def diffusers_timesteps(self) -> list[float]:
        """The model-evaluation times as diffusers' `timesteps` (N values): the DDPM index itself, or a flow model's
        t * num_train_timesteps."""
        if self.noise_schedule.get("kind") == "flow":
            return [t * self.noise_schedule["n"] for t in self.eval_times[:-1]]
        return self.eval_times[:-1]

    @property
    def solver_options(self) -> dict:
        """What `learnsteps.solve` takes besides the grids: the options, and the table of a tabulated solver."""
        return {**self.options, **({} if self.coefficients is None else dict(coefficients=self.coefficients))}

    @property
    def solve_kwargs(self) -> dict:
        """Everything `learnsteps.solve(teacher, x_T, **s.solve_kwargs)` needs to run the schedule."""
        return dict(grid=self.grid, eval_grid=self.eval_grid, solver=self.solver, order=self.order,
                    **self.solver_options)

    @property
    def alpha(self) -> list[float]:
        """alpha at the integration times (x = alpha x0 + sigma eps; 1 at t_zero)."""
        return self._alpha_sigma()[0]

    @property
    def sigma(self) -> list[float]:
        """sigma at the integration times (0 at t_zero); not `sigmas`, which are sigma / alpha."""
        return self._alpha_sigma()[1]

    def _alpha_sigma(self) -> tuple[list[float], list[float]]:
        g = Grid(self.make_noise_schedule(), self.grid)
        return [float(a) for a in g.alpha], [float(s) for s in g.sigma]

    @property
    def decoupled(self) -> bool:
        return self.eval_times != self.times

    @property
    def to_zero(self) -> bool:
        """Whether the grid ends at the clean data (sigma = 0)."""
        return self.times[-1] == self.make_noise_schedule().t_zero

    def x_tilde(self, x: Tensor) -> Tensor:
        """A state of our core at times[0] as x~ = x / alpha, the state k-diffusion and diffusers' Euler/Heun start
        from (for VP teachers and unit noise, noise * sqrt(1 + sigmas[0]^2), not their usual noise * sigmas[0])."""
        return x / float(self.make_noise_schedule().alpha(self.grid[0]))

    def from_x_tilde(self, x_tilde: Tensor) -> Tensor:
        """The state x = alpha x~ at times[-1] from an x~ sampler's result (the same tensor when sigma ends at 0)."""
        return x_tilde * float(self.make_noise_schedule().alpha(self.grid[-1]))

    def consumers(self) -> dict:
        """How other samplers reproduce this schedule exactly ({"scheduler"/"sampler": ..., ...}), or why they cannot
        ({"unsupported": reason}), for each registered consumer: written into the file for readers without
        learnsteps. The consumers (learnsteps.interop) register themselves in CONSUMERS."""
        out = {}
        for name, recipe in CONSUMERS.items():
            try:
                out[name] = recipe(self)
            except ScheduleError as err:
                out[name] = dict(unsupported=str(err))
        return out

    def to_dict(self) -> dict:
        d = dict(format=FORMAT, version=VERSION if self.coefficients is None else TABLE_VERSION, **asdict(self),
                 sigmas=_json_sigmas(self.sigmas), eval_sigmas=_json_sigmas(self.eval_sigmas))
        if self.coefficients is None:
            del d["coefficients"]
        else:  # what the reference sampler of docs/schedule-format.md needs besides the table
            d.update(alpha=self.alpha, sigma=self.sigma)
        if self.noise_schedule.get("kind") in ("ddpm", "flow"):  # the model inputs a diffusers pipeline feeds
            d["diffusers_timesteps"] = self.diffusers_timesteps
        d["consumers"] = self.consumers()
        return d


def _json_sigmas(sigmas: list[float]) -> list[float | None]:
    """sigma~ as JSON holds it: null for the infinite sigma~ of a start where alpha = 0 (a flow model's t = 1)."""
    return [None if math.isinf(v) else v for v in sigmas]


def save_schedule(path: str | Path, schedule: Schedule) -> Path:
    """Write the schedule JSON, with its checksum, to a temporary file renamed over `path` (never half-written)."""
    path = Path(path)
    data = schedule.to_dict()
    validate(data, str(path))
    return write_json(path, data)


def load_schedule(path: str | Path, solver: str | None = None, order: int | None = None,
                  nfe: int | None = None, noise_schedule: NoiseSchedule | None = None) -> Schedule:
    """Read and validate a schedule file; `solver`, `order`, `nfe`, `noise_schedule`: what the caller will run it
    with (a teacher's noise schedule must be the file's). Whatever the bytes, the only error is ScheduleError.
    The checksum learnsteps writes is verified when present (a file written by hand has none)."""
    path = Path(path)
    if not path.is_file():
        raise ScheduleError(f"{path}: no such schedule file")
    data = read_json(path, ScheduleError, checksum="optional")
    sched = validate(data, str(path))
    if solver is not None and solver != sched.solver:
        raise ScheduleError(f"{path}: made for solver {sched.solver!r}, not {solver!r}")
    if order is not None and order != sched.order:
        raise ScheduleError(f"{path}: made for order {sched.order}, not {order}")
    if nfe is not None and nfe != sched.nfe:
        raise ScheduleError(f"{path}: made for NFE {sched.nfe}, not {nfe}")
    if noise_schedule is not None:
        check_fits(sched, noise_schedule, str(path))
    return sched


def check_fits(schedule: Schedule, noise_schedule: NoiseSchedule, where: str = "schedule") -> None:
    """ScheduleError unless the schedule's times are in `noise_schedule`'s units: the same kind and parameters
    (an EDM-sigma grid run on a VP teacher would sample nonsense without a single error)."""
    if schedule.make_noise_schedule().config() != noise_schedule.config():
        raise ScheduleError(f"{where}: made for the noise schedule {schedule.make_noise_schedule()!r}, not the "
                            f"teacher's {noise_schedule!r}")


MAX_TIMES = 1001  # a schedule of up to 1000 steps


def _times(data: dict, key: str, where: str, null: float | None = None) -> list[float]:
    """data[key] as a list of finite floats, or ScheduleError; with `null` given, JSON's null reads as that value
    (the infinite sigma~ of a start at alpha = 0 is written as null)."""
    v = data.get(key)
    if null is not None and isinstance(v, list):
        v = [null if x is None else x for x in v]
    if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise ScheduleError(f"{where}: '{key}' must be a list of numbers")
    if len(v) > MAX_TIMES:
        raise ScheduleError(f"{where}: '{key}' has {len(v)} values, more than the {MAX_TIMES} of a 1000-step schedule")
    if not all(math.isfinite(x) or x == null for x in v):
        raise ScheduleError(f"{where}: '{key}' has non-finite values")
    return [float(x) for x in v]


def validate(data, where: str = "schedule") -> Schedule:
    """The Schedule a parsed JSON object describes, or ScheduleError naming the first problem found."""
    if not isinstance(data, dict):
        raise ScheduleError(f"{where}: a schedule file holds a JSON object")
    if data.get("format") != FORMAT:
        raise ScheduleError(f"{where}: unknown format {data.get('format')!r} (expected {FORMAT!r})")
    version = data.get("version")
    if version not in READS or isinstance(version, bool):
        newer = isinstance(version, int) and not isinstance(version, bool) and version > max(READS)
        raise ScheduleError(f"{where}: unsupported version {version!r} of {FORMAT} (this learnsteps reads versions "
                            f"{', '.join(map(str, READS))}{'; the file was written by a newer learnsteps' if newer else ''})")
    for key, typ in (("solver", str), ("order", int), ("nfe", int), ("noise_schedule", dict)):
        if not isinstance(data.get(key), typ) or isinstance(data.get(key), bool):
            raise ScheduleError(f"{where}: '{key}' is missing or not a {typ.__name__}")
    try:
        get_solver(data["solver"])
        noise_schedule = make_schedule(**data["noise_schedule"])
        lo, hi = float(noise_schedule.t_zero), float(noise_schedule.t_max)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"the noise schedule's times [{lo}, {hi}] are not a range")
    except Exception as err:  # whatever a malformed parameter makes the schedule's constructor raise
        raise ScheduleError(f"{where}: noise_schedule {data['noise_schedule']!r}: {err}") from None
    times, eval_times = _times(data, "times", where), _times(data, "eval_times", where)
    if len(times) < 2 or any(b >= a for a, b in zip(times, times[1:])):
        raise ScheduleError(f"{where}: 'times' must decrease strictly (at least 2 times)")
    for key, values in (("times", times), ("eval_times", eval_times)):
        if not all(lo <= v <= hi for v in values):
            raise ScheduleError(f"{where}: '{key}' leave the noise schedule's range [{lo}, {hi}]")
    if any(v <= lo for v in eval_times[:-1]):  # the model cannot be called at sigma = 0
        raise ScheduleError(f"{where}: 'eval_times' reach the clean end t_zero = {lo} before their last value")
    steps, to_zero = len(times) - 1, times[-1] == noise_schedule.t_zero
    if nfe_of(data["solver"], steps, to_zero) != data["nfe"]:
        raise ScheduleError(f"{where}: {len(times)} times give {data['solver']} "
                            f"{nfe_of(data['solver'], steps, to_zero)} model calls, not the NFE {data['nfe']} "
                            f"it claims (a schedule for NFE {data['nfe']} has {data['nfe'] + 1} times)")
    if len(eval_times) != len(times):
        raise ScheduleError(f"{where}: 'eval_times' has {len(eval_times)} values, 'times' {len(times)}")
    try:
        check_order(data["solver"], data["order"], steps)
        # times in range can still leave the log-SNR domain (a time of 1e-320 gives lambda = inf before t_zero)
        Grid(noise_schedule, torch.tensor(times, dtype=torch.float64), torch.tensor(eval_times, dtype=torch.float64))
    except ValueError as err:
        raise ScheduleError(f"{where}: {err}") from None
    options = data.get("options", {})
    if not isinstance(options, dict) or "generator" in options:
        raise ScheduleError(f"{where}: 'options' must be a JSON object of the solver's options")
    try:
        check_options(data["solver"], options)
    except ValueError as err:
        raise ScheduleError(f"{where}: {err}") from None
    if noise_schedule.lambda_(torch.tensor(times[:1], dtype=torch.float64)) == -math.inf \
            and not starts_at_noise(data["solver"], options):
        raise ScheduleError(f"{where}: {data['solver']} {options} cannot start at t = {times[0]} (alpha = 0, pure noise), "
                            f"where these times start")
    if "coefficients" in options:
        raise ScheduleError(f"{where}: the coefficient table is the field 'coefficients', not an option")
    coefficients = _table(data, version, steps, where)
    if "sigmas" in data:  # written by us: must agree with the times under the noise schedule (null: sigma~ = inf)
        sig = noise_schedule.sigma_tilde(torch.tensor(times, dtype=torch.float64))
        given = torch.tensor(_times(data, "sigmas", where, null=math.inf), dtype=torch.float64)
        if given.shape != sig.shape or not torch.allclose(sig, given, rtol=1e-6, atol=1e-12):
            raise ScheduleError(f"{where}: 'sigmas' disagree with 'times' under {noise_schedule!r}")
    for key in ("teacher", "provenance"):
        if not isinstance(data.get(key, {}), dict):
            raise ScheduleError(f"{where}: '{key}' must be a JSON object")
    check_prediction_type(data.get("teacher", {}), where)
    return Schedule(solver=data["solver"], order=data["order"], nfe=data["nfe"], noise_schedule=data["noise_schedule"],
                    times=times, eval_times=eval_times, options=options, teacher=dict(data.get("teacher", {})),
                    provenance=dict(data.get("provenance", {})), coefficients=coefficients)


def check_prediction_type(teacher: dict, where: str) -> None:
    """ScheduleError unless the teacher's recorded `prediction_type`, if any, is one a sampler can convert."""
    if "prediction_type" in teacher and teacher["prediction_type"] not in RECORDED.values():
        raise ScheduleError(f"{where}: teacher.prediction_type {teacher['prediction_type']!r} is not one of "
                            f"{', '.join(RECORDED.values())}")


def _table(data: dict, version: int, steps: int, where: str) -> list[list[float]] | None:
    """The coefficient table of a version-2 file (with its alpha and sigma checked), None for a version-1 file."""
    tabulated = data["solver"] == "tabulated"
    if version == VERSION:
        if tabulated or "coefficients" in data:
            raise ScheduleError(f"{where}: a coefficient table needs version {TABLE_VERSION} of {FORMAT}")
        return None
    if not tabulated:
        raise ScheduleError(f"{where}: version {TABLE_VERSION} holds the solver 'tabulated' and its table, "
                            f"not {data['solver']!r}")
    rows = data.get("coefficients")
    if not isinstance(rows, list) or len(rows) > MAX_TIMES:
        raise ScheduleError(f"{where}: 'coefficients' must be a list of rows")
    table = [_times(dict(row=r), "row", f"{where}: 'coefficients' row {i}") for i, r in enumerate(rows)]
    ns = make_schedule(**data["noise_schedule"])
    g = Grid(ns, torch.tensor(data["times"], dtype=torch.float64))
    try:
        c = check_table(table, steps, data["order"],
                        table_scale(data.get("options", {}).get("form", "data"), g.alpha[0], g.sigma[0]))
    except ValueError as err:
        raise ScheduleError(f"{where}: {err}") from None
    for key, want in (("alpha", g.alpha), ("sigma", g.sigma)):
        given = torch.tensor(_times(data, key, where), dtype=torch.float64)
        if given.shape != (len(want),) or not torch.allclose(given, torch.stack(want), rtol=1e-9, atol=1e-12):
            raise ScheduleError(f"{where}: '{key}' disagree with 'times' under {ns!r}")
    return c.tolist()

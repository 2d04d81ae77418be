"""The public sampling entry points: `solve` (samples, trajectory, NFE) and `sample` (just the samples)."""
from __future__ import annotations

import inspect
import math
from functools import lru_cache
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import solvers as S
from .denoiser import Denoiser, device_of
from .schedules import NoiseSchedule
from .steps import Grid, Model


def _dpm_solver(model, x, g, order=2, data=True, method="multistep", **options):
    if method not in ("multistep", "singlestep"):
        raise ValueError(f"unknown DPM-Solver method {method!r}: expected 'multistep' or 'singlestep'")
    if options.get("variant", "midpoint") not in ("midpoint", "taylor"):
        raise ValueError(f"unknown DPM-Solver variant {options['variant']!r}: expected 'midpoint' or 'taylor'")
    fn = S.dpm_multistep if method == "multistep" else S.dpm_singlestep
    return fn(model, x, g, order=order, data=data, **options)


@dataclass(frozen=True)
class SolverSpec:
    fn: S.Solver
    orders: tuple[int, ...]
    default_order: int
    fixed: dict = field(default_factory=dict)  # options the name implies
    multistep: bool = True  # needs as many steps as its order
    doc: str = ""


MAX_TABLE_WIDTH = 8  # outputs a tabulated step may combine

SOLVERS: dict[str, SolverSpec] = {
    "euler": SolverSpec(S.euler, (1,), 1, multistep=False, doc="DDIM / Euler (eta for stochastic DDIM)"),
    "heun": SolverSpec(S.heun, (2,), 2, multistep=False, doc="EDM Heun, 2 calls per step"),
    "dpm_solver": SolverSpec(_dpm_solver, (1, 2, 3), 2, dict(data=False),
                             doc="DPM-Solver (noise prediction), method=multistep|singlestep"),
    "dpm_solver++": SolverSpec(_dpm_solver, (1, 2, 3), 2, dict(data=True),
                               doc="DPM-Solver++ (data prediction), method=multistep|singlestep"),
    "unipc": SolverSpec(S.unipc, (1, 2, 3), 2, doc="UniPC, variant=bh1|bh2, corrector=True|False"),
    "deis": SolverSpec(S.deis, (1, 2, 3, 4), 3, doc="DEIS, basis=tab|logrho|rhoab"),
    "ipndm": SolverSpec(S.ipndm, (1, 2, 3, 4), 4, doc="iPNDM (fixed Adams-Bashforth weights)"),
    "er_sde": SolverSpec(S.er_sde, (1, 2, 3), 3, doc="ER-SDE-Solver, noise_scale=" + "|".join(S.NOISE_SCALES)),
    "tabulated": SolverSpec(S.tabulated, tuple(range(1, MAX_TABLE_WIDTH + 1)), 3, multistep=False,
                            doc="the generalized multistep solver: coefficients=<N x order table>, form=data|noise"),
}
SOLVERS["ddim"] = SOLVERS["euler"]


def get_solver(name: str) -> SolverSpec:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}: expected one of {sorted(SOLVERS)}")
    return SOLVERS[name]


def nfe(solver: str, steps: int, to_zero: bool = False) -> int:
    """Model calls of `solver` over a grid of `steps` intervals (EDM Heun skips its correction into sigma = 0)."""
    get_solver(solver)
    return 2 * steps - int(to_zero) if solver == "heun" else steps


def steps_for_nfe(solver: str, n_calls: int, to_zero: bool) -> int:
    """The grid intervals in which `solver` spends exactly `n_calls` model calls; ValueError where it cannot."""
    if n_calls < 1:
        raise ValueError(f"nfe must be at least 1, got {n_calls}")
    steps = (n_calls + int(to_zero)) // 2 if solver == "heun" else n_calls
    if nfe(solver, steps, to_zero) != n_calls:
        raise ValueError(f"{solver} cannot spend exactly {n_calls} model calls"
                         f"{' with a final step to sigma = 0' if to_zero else ''}")
    return steps


def check_order(solver: str, order: int | None, steps: int | None = None) -> int:
    """The order to use (the solver's default for None); ValueError if unsupported or too high for the steps."""
    spec = get_solver(solver)
    order = spec.default_order if order is None else order
    if order not in spec.orders:
        raise ValueError(f"{solver} supports order {' or '.join(map(str, spec.orders))}, not {order!r}")
    if steps is not None and spec.multistep and steps < order:
        raise ValueError(f"{solver} of order {order} needs at least {order} steps, the grid has {steps}")
    return order


@lru_cache(maxsize=None)
def solver_options(solver: str, method: str | None = None) -> frozenset[str]:
    """The option names `solver` accepts: the keyword parameters of its function(s), not a `**options` catch-all
    (DPM-Solver's wrapper passes that on to the multistep or singlestep function: `method` picks one, None lists
    the names of both)."""
    spec = get_solver(solver)
    dpm = {"multistep": [S.dpm_multistep], "singlestep": [S.dpm_singlestep]}.get(method, [S.dpm_multistep,
                                                                                       S.dpm_singlestep])
    fns = [spec.fn] + (dpm if spec.fn is _dpm_solver else [])
    params = {name for fn in fns for name, p in inspect.signature(fn).parameters.items()
              if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return frozenset(params - {"model", "x", "g", "order"} - set(spec.fixed))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_table(v) -> bool:
    if v is None:  # the default: the solver says it needs one
        return True
    if isinstance(v, Tensor):
        return v.dim() == 2 and bool(torch.isfinite(v).all())
    return (isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(r, (list, tuple)) and len(r) == len(v[0])
                                                                 and all(_is_number(x) for x in r) for r in v))


def check_options(solver: str, options: dict) -> None:
    """ValueError naming the first option `solver` does not have, or a value it does not take."""
    method = options.get("method", "multistep")  # DPM-Solver: singlestep has no lower_order_final
    known = solver_options(solver, method if method in ("multistep", "singlestep") else None)
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for solver {solver}: accepted {sorted(known)}")
    choices = dict(variant=("midpoint", "taylor") if solver.startswith("dpm") else ("bh1", "bh2"),
                   method=("multistep", "singlestep"), basis=S.DEIS_BASES, noise_scale=tuple(S.NOISE_SCALES),
                   form=S.TABLE_FORMS)
    for key, v in options.items():
        if key in choices:
            ok, want = isinstance(v, str) and v in choices[key], " or ".join(map(repr, choices[key]))
        elif key in ("corrector", "data", "lower_order_final"):
            ok, want = isinstance(v, bool), "true or false"
        elif key == "eta":
            ok, want = _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"
        elif key == "coefficients":
            ok, want = _is_table(v), "a table (list of rows) of finite numbers"
        elif key == "plan":
            ok = v is None or (isinstance(v, (list, tuple)) and len(v) > 0
                               and all(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 3 for k in v))
            want = "a list of group orders 1..3"
        else:  # generator
            ok, want = v is None or isinstance(v, torch.Generator), "a torch.Generator"
        if not ok:
            raise ValueError(f"solver {solver}: option {key}={v!r} is not {want}")


def resolved_options(solver: str, options: dict | None = None) -> dict:
    """`options` with every other option of the solver at its default (the random generator aside): what a
    schedule file records, so that a consumer sees every setting it must reproduce (e.g. lower_order_final)."""
    options = dict(options or {})
    check_options(solver, options)
    spec = get_solver(solver)
    fns = [spec.fn]
    if spec.fn is _dpm_solver:
        fns.append(S.dpm_singlestep if options.get("method") == "singlestep" else S.dpm_multistep)
    defaults = {name: p.default for fn in fns for name, p in inspect.signature(fn).parameters.items()
                if p.default is not p.empty and name not in {"order", "generator", *spec.fixed}}
    return {**defaults, **options}


def starts_at_noise(solver: str, options: dict | None = None) -> bool:
    """Whether `solver` with `options` runs from a start where alpha = 0 (lambda = -inf: a flow model's t = 1):
    the data-form solvers do, in the limit of their formulas; the noise-form ones (dpm_solver, unipc data=False,
    deis, ipndm, the tabulated noise form), Heun, ER-SDE and UniPC bh1 with its corrector refuse such a grid."""
    spec = get_solver(solver)
    o = {**resolved_options(solver, options), **spec.fixed}
    if spec.fn in (S.heun, S.deis, S.ipndm, S.er_sde):
        return False
    if spec.fn is S.unipc:
        return o["data"] and not (o["variant"] == "bh1" and o["corrector"])
    if spec.fn is S.tabulated:
        return o["form"] == "data"
    return o.get("data", True)  # euler; dpm_solver(++)


def start_time(schedule: NoiseSchedule, solver: str, options: dict | None = None) -> float:
    """The noisiest time `solver` can start from on `schedule`: t_max, or t_cap where t_max is a start at alpha = 0
    that the solver refuses (`starts_at_noise`)."""
    if schedule.t_cap < schedule.t_max and not starts_at_noise(solver, options):
        return schedule.t_cap
    return schedule.t_max


@dataclass
class Solution:
    x: Tensor  # the state at the last grid point
    trajectory: Tensor | None  # (N+1, *x.shape) states at every grid point, x_T first, when asked for
    nfe: int  # model calls made


def solve(teacher: Denoiser, x_T: Tensor, grid, solver: str = "dpm_solver++", order: int | None = None,
          eval_grid=None, cond=None, return_trajectory: bool = False, remat: bool = False, **options) -> Solution:
    """Integrate from x_T along `grid` (native times of teacher.noise_schedule, decreasing) with `solver`.

    eval_grid: the times the model is called at for each grid point (LD3's decoupled offsets); default `grid`.
    remat: recompute each model call in the backward pass instead of storing its activations (memory flat in
    the number of steps when backpropagating through the sampler, e.g. to learn the grid).
    options: the solver's own (eta, variant, corrector, method, basis, noise_scale, generator, ...)."""
    spec = get_solver(solver)
    check_options(solver, options)
    g = Grid(teacher.noise_schedule, torch.as_tensor(grid), None if eval_grid is None else torch.as_tensor(eval_grid))
    order = check_order(solver, order, g.n)
    model = Model(teacher, g, cond, remat)
    x, states = x_T, [x_T]
    for x in spec.fn(model, x_T, g, order=order, **spec.fixed, **options):
        if return_trajectory:
            states.append(x)
    return Solution(x, torch.stack(states) if return_trajectory else None, model.nfe)


def sample(teacher: Denoiser, x_T: Tensor, grid, solver: str = "dpm_solver++", order: int | None = None,
           return_trajectory: bool = False, **kwargs):
    """The samples at the end of `grid` (and the (N+1, ...) trajectory when return_trajectory); see `solve`."""
    sol = solve(teacher, x_T, grid, solver, order, return_trajectory=return_trajectory, **kwargs)
    return (sol.x, sol.trajectory) if return_trajectory else sol.x


def solve_in_batches(teacher: Denoiser, x_T: Tensor, batch_size: int, cond=None, then=None, **kwargs) -> Tensor:
    """`solve`'s final states (or then(states) per batch, e.g. decoded) for x_T in batches of `batch_size`, each
    moved to the teacher's device, without gradients: what fits a large teacher's memory. cond: per-sample
    conditions (or None); kwargs: `solve`'s (grid, solver, ...)."""
    out, device = [], device_of(teacher)
    with torch.no_grad():
        for b in range(0, len(x_T), batch_size):
            c = None if cond is None else cond[b: b + batch_size].to(device)
            x = solve(teacher, x_T[b: b + batch_size].to(device), cond=c, **kwargs).x
            out.append(x if then is None else then(x))
    return torch.cat(out)

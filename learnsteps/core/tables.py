"""The coefficient table of a multistep solver on a grid: what the generalized solver (`solvers.tabulated`)
needs to reproduce it exactly, and where a learned solver starts from.

Every multistep solver of the core is linear in the model outputs once the grid is fixed, so its table can be
read off by running it on a probe: a "model" whose i-th call returns the i-th unit vector of a space spanned by
x_T and the N outputs. The states the solver calls the probe at, and its final state, are then exact linear
combinations of (x_T, m_0, ..., m_{N-1}); step i of the table is what x_{i+1} - r_i x_i leaves, divided by
alpha_{i+1}. The probe runs the solver's own code, so the table carries its warm-up, lower-order final steps and
corrector (UniPC's corrector makes its table one column wider than its order), and stays differentiable in the
grid. A solver that is not such a table in the asked form (Heun, singlestep DPM-Solver, a data-form solver asked
for a noise table) is refused with the reason.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .denoiser import Denoiser
from .sample import check_options, check_order, get_solver
from .solvers import TABLE_FORMS
from .steps import Grid, Model

TOLERANCE = 1e-9  # relative: what is left besides the table must be rounding


class _Probe(Denoiser):
    """Returns unit vector 1 + k on its k-th call (index 0 is x_T), as its native prediction."""

    def __init__(self, grid: Grid, prediction: str):
        super().__init__()
        self.noise_schedule, self.prediction, self.calls = grid.schedule, prediction, 0
        self.inputs: list[Tensor] = []

    def forward(self, x, t, cond=None):
        self.inputs.append(x[0])
        self.calls += 1
        e = torch.zeros_like(x)
        if self.calls < x.shape[1]:
            e[:, self.calls] = 1
        return e


def solver_table(solver: str, order: int | None, grid: Grid, form: str = "data", width: int | None = None,
                 **options) -> Tensor:
    """The (N, width) table c with which `tabulated(form=form)` on `grid` reproduces `solver` of `order` on it
    (width: the history it needs, or more, padded with zeros). ValueError if there is none."""
    if form not in TABLE_FORMS:
        raise ValueError(f"unknown table form {form!r}: expected one of {TABLE_FORMS}")
    if form == "noise":
        grid.refuse_noise_start("a noise-form table", "scales by r = alpha_1/alpha_0, infinite where alpha = 0",
                                "the data form")
    spec = get_solver(solver)
    check_options(solver, options)
    order = check_order(solver, order, grid.n)
    n = grid.n
    probe = _Probe(grid, "x0" if form == "data" else "epsilon")
    model = Model(probe, grid)
    x_T = torch.zeros(1, n + 1, dtype=torch.float64)
    x_T[0, 0] = 1
    *_, final = spec.fn(model, x_T, grid, order=order, **spec.fixed, **options)
    if probe.calls != n:
        raise ValueError(f"{solver} calls the model {probe.calls} times on {n} steps: not a multistep table")
    states = probe.inputs + [final[0]]
    rows = []
    for i in range(n):
        r = grid.sigma[i + 1] / grid.sigma[i] if form == "data" else grid.alpha[i + 1] / grid.alpha[i]
        d = (states[i + 1] - r * states[i]) / grid.alpha[i + 1]
        rows.append(d[1: i + 2].flip(0))  # outputs m_i, m_{i-1}, ..., m_0
        rest = torch.cat([d[:1], d[i + 2:]]).detach().abs()  # x_T, and outputs not computed yet
        if float(rest.max()) > TOLERANCE * max(1.0, float(d.detach().abs().max())):
            raise ValueError(f"{solver} (order {order}) is not a {form}-form multistep table on this grid: its step "
                             f"{i} is not r x + alpha (a combination of the outputs so far)")
    need = max(_outputs_used(row) for row in rows)
    width = need if width is None else width
    if width < need:
        raise ValueError(f"{solver} (order {order}) needs a table {need} outputs wide, not {width}")
    return torch.stack([torch.cat([row[:width], row.new_zeros(max(0, width - len(row)))]) for row in rows])


def narrowest_table(solver: str, order: int | None, grid: Grid, **options) -> tuple[Tensor, str]:
    """(table, form) of the narrower of the solver's data- and noise-form tables on `grid` (data on a tie):
    DPM-Solver++ and UniPC are data-form tables, iPNDM and DEIS noise-form ones. ValueError if it is neither."""
    found, errors = [], []
    for form in TABLE_FORMS:
        try:
            found.append((solver_table(solver, order, grid, form, **options), form))
        except ValueError as err:
            errors.append(str(err))
    if not found:
        raise ValueError(errors[0])
    return min(found, key=lambda f: f[0].shape[1])


def _outputs_used(row: Tensor) -> int:
    """How far back a row reaches: 1 + the lag of its last weight above rounding (1 for a zero row)."""
    a = row.detach().abs()
    used = (a > TOLERANCE * max(1.0, float(a.max()))).nonzero()
    return int(used.max()) + 1 if len(used) else 1

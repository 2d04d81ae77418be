"""The learned solver (ld3, learn=solver): the coefficients of the generalized multistep solver, learned with
LD3's grid as corrections to a known solver's table on that grid (the recipe of GS, arXiv 2510.17699: LD3's
theta and xi plus bounded corrections to DPM-Solver++(3M)'s coefficients; ../shared brief learned-solvers.md).

The base table is found on the current grid at every step (core/tables.py, differentiable in the grid), so the
correction stays a correction whatever the grid does; an L2 penalty on it keeps the solver near the known one
where the pairs say nothing.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.steps import Grid
from ..core.tables import narrowest_table, solver_table


def base_form(solver: str, order: int, options: dict, grid: Grid) -> tuple[str, int]:
    """(form, width) of the narrowest table that reproduces `solver` on grids like `grid` (DPM-Solver++ and UniPC
    are data-form tables, iPNDM and DEIS noise-form ones), at least `order` wide: a short grid's lowered final
    orders leave DPM-Solver++(3M) at NFE 4 a 2-wide table, and the learned solver may use the third output.
    ValueError if it is no table (Heun)."""
    try:
        table, form = narrowest_table(solver, order, grid, **options)
    except ValueError as err:
        raise ValueError(f"learn=solver needs a multistep solver (one model call per step); {err}") from None
    width = table.shape[1]
    return form, max(width, order)


class LearnedTable(nn.Module):
    """coefficients(grid) = the base solver's table on `grid` + delta, delta zero where no output exists yet."""

    def __init__(self, solver: str, order: int, options: dict, steps: int, form: str, width: int):
        super().__init__()
        self.solver, self.order, self.options, self.form, self.width = solver, order, dict(options), form, width
        self.delta = nn.Parameter(torch.zeros(steps, width, dtype=torch.float64))
        self.register_buffer("mask", (torch.arange(width)[None] <= torch.arange(steps)[:, None]).to(torch.float64))

    def forward(self, grid: Grid) -> Tensor:
        base = solver_table(self.solver, self.order, grid, self.form, width=self.width, **self.options)
        return base + self.delta * self.mask

    def penalty(self) -> Tensor:
        return (self.delta * self.mask).pow(2).sum()

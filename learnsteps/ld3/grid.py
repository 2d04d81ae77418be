"""LD3's parameterisation of a time grid (Tong et al. 2025, sec. 4; the official code's discretize wrapper).

N+1 logits theta give increments softmax(theta); their normalised cumulative sum places the grid between its
pinned ends, in lambda (log-SNR) or in t. Decoupled offsets xi move the model-evaluation times away from the
integration times, clipped to a fraction of the smallest gap of the grid in its own units (the official code
clips with the gaps of the logits in lambda mode, which is a bug), and zero at both ends.

A grid from a start where alpha = 0 (a flow model's t_max = 1, lambda = -inf) keeps that first point; in lambda
mode the others live in (lambda(t_cap), lambda(t_min)], t_cap being the schedule's noisiest time of finite
log-SNR: the spacing runs from lambda(t_cap) and its first point is put back at t_max.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.schedules import NoiseSchedule


class LD3Grid(nn.Module):
    def __init__(self, schedule: NoiseSchedule, steps: int, time_mode: str = "lambda", to_zero: bool = True,
                 window: float = 0.5, t_max: float | None = None, t_min: float | None = None):
        super().__init__()
        if time_mode not in ("lambda", "time"):
            raise ValueError(f"unknown time_mode {time_mode!r}: expected 'lambda' or 'time'")
        self.schedule, self.time_mode, self.to_zero, self.window = schedule, time_mode, to_zero, window
        self.points = steps if to_zero else steps + 1  # learned points, from t_max to t_min
        if self.points < 2:
            raise ValueError(f"{steps} steps leave nothing to learn (need at least 2 points before the end)")
        self.t_max = schedule.t_max if t_max is None else t_max
        self.t_min = schedule.t_min if t_min is None else t_min
        ends = torch.tensor([self.t_max, self.t_min], dtype=torch.float64)
        if time_mode == "lambda":
            ends = schedule.lambda_(ends)
            if ends[0] == -torch.inf:  # alpha = 0 at t_max: space from t_cap, keep t_max as the first point
                if not schedule.t_cap > self.t_min:
                    raise ValueError(f"t_min = {self.t_min} must lie below the schedule's t_cap = {schedule.t_cap}")
                ends[0] = schedule.lambda_(torch.tensor(schedule.t_cap, dtype=torch.float64))
        self.register_buffer("ends", ends)
        self.theta = nn.Parameter(torch.ones(self.points, dtype=torch.float64))  # uniform in lambda (or t)
        self.xi = nn.Parameter(torch.zeros(self.points, dtype=torch.float64))

    @torch.no_grad()
    def init_from(self, t: Tensor, t_eval: Tensor | None = None) -> None:
        """Set theta so that the grid is `t` (N+1 times, or N+2 with t_zero appended), and the offsets so that the
        model-evaluation times are `t_eval` (as far as the window lets them; zero offsets without it).

        Only the increments matter: (c_i - c_0)/(c_N - c_0) = sum_{j<=i} e^theta_j / sum_j e^theta_j (j >= 1)."""
        t = torch.as_tensor(t, dtype=torch.float64)[: self.points]
        v = self._from_time(t).clone()
        if v[0] == -torch.inf:  # a start at alpha = 0, spaced from t_cap
            v[0] = self.ends[0]
        inc = (v[1:] - v[:-1]) / (self.ends[1] - self.ends[0])
        if len(inc) != self.points - 1 or not (inc > 0).all():
            raise ValueError("the initial grid must have the same length and ends as the learned one (and, from "
                             "alpha = 0, its second point below t_cap)")
        self.theta.copy_(torch.cat([inc.log().mean().reshape(1), inc.log()]))
        self.xi.zero_()
        if t_eval is not None:
            offset = self._from_time(torch.as_tensor(t_eval, dtype=torch.float64)[: self.points]) - v
            self.xi[1:-1] = offset[1:-1]

    def _from_time(self, t: Tensor) -> Tensor:
        return self.schedule.lambda_(t) if self.time_mode == "lambda" else t

    def _to_time(self, v: Tensor) -> Tensor:
        return self.schedule.t_of_lambda(v) if self.time_mode == "lambda" else v

    def forward(self, decoupled: bool = True) -> tuple[Tensor, Tensor]:
        """(grid, eval_grid): the integration times and the model-evaluation times, each N+1 long."""
        c = torch.cumsum(torch.softmax(self.theta, 0), 0)
        u = (c - c[0]) / (c[-1] - c[0])
        v = self.ends[0] + (self.ends[1] - self.ends[0]) * u
        t = self._to_time(v)
        t = torch.cat([t.new_tensor([self.t_max]), t[1:-1], t.new_tensor([self.t_min])])  # exact ends
        if decoupled:
            gap = (v[1:] - v[:-1]).abs().min().detach()
            offset = torch.clamp(self.xi, -self.window * gap, self.window * gap)
            offset = torch.cat([offset.new_zeros(1), offset[1:-1], offset.new_zeros(1)])
            t_eval = torch.cat([t[:1], self._to_time(v + offset)[1:-1], t[-1:]])
        else:
            t_eval = t
        if self.to_zero:
            zero = t.new_tensor([self.schedule.t_zero])
            t, t_eval = torch.cat([t, zero]), torch.cat([t_eval, zero])
        return t, t_eval

"""High-accuracy reference solutions of the probability-flow ODE: adaptive Dormand-Prince 5(4) in float64.

The ODE is integrated in lambda on x~ = x / alpha, where it reads dx~/dlambda = x0(x, t(lambda)) - x~: smooth,
non-stiff (its linear part has rate 1) and free of the 1/sigma of the t-parameterisation. A grid that ends at
the schedule's t_zero ends with the same step the solvers take there, x = x0(x_{t_prev}), so solver and reference
are compared on equal terms. A start where alpha = 0 (lambda = -inf, a flow model's t = 1) has x~ = inf; from
there up to lambda = 0 the ODE is integrated in u = e^lambda = alpha/sigma on y = x / sigma, where the data form
of the exact solution reads dy/du = x0(sigma y, t(u)) exactly, with u = 0 at the start.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .denoiser import Denoiser
from .steps import check_times

# Dormand & Prince (1980) 5(4) tableau: nodes, stages, 5th-order weights and the error weights (5th - 4th).
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


@dataclass
class ReferenceSolution:
    x: Tensor  # state at the last time
    trajectory: Tensor  # (len(times), *x.shape) states at every requested time
    nfe: int  # model calls
    error_estimate: float  # sum of the accepted steps' local error estimates (RMS, in x~ units)
    steps: int  # accepted steps
    rejected: int


def reference_solve(teacher: Denoiser, x_T: Tensor, times, rtol: float = 1e-8, atol: float = 1e-8, cond=None,
                    max_steps: int = 100_000) -> ReferenceSolution:
    """Solve the PF-ODE from x_T at times[0] through every time in `times` (decreasing) with error control.

    error_estimate is in units of the integrated state: x~ = x / alpha, or y = x / sigma for the stretch from a
    start at alpha = 0 up to lambda = 0."""
    sched = teacher.noise_schedule
    times = check_times(times, "reference times").to(torch.float64)
    to_zero = bool(times[-1] == sched.t_zero)
    lams = sched.lambda_(times[:-1] if to_zero else times)
    dtype = x_T.dtype
    calls = [0]

    def x0(lam: Tensor, x: Tensor) -> Tensor:
        calls[0] += 1
        t = sched.t_of_lambda(lam).to(dtype).expand(x.shape[0])
        return teacher.x0(x, t, cond)

    def in_lambda(lam: Tensor, y: Tensor) -> Tensor:  # y = x / alpha
        return x0(lam, sched.log_alpha_sigma(lam)[0].exp().to(dtype) * y) - y

    def in_u(u: Tensor, y: Tensor) -> Tensor:  # y = x / sigma, u = e^lambda
        lam = torch.log(u)
        return x0(lam, sched.log_alpha_sigma(lam)[1].exp().to(dtype) * y)

    log_alpha, log_sigma = sched.log_alpha_sigma(lams)
    ode = _Dopri(rtol, atol, max_steps)
    out = [x_T]
    if lams[0] == -math.inf:  # from alpha = 0: in u up to u = 1 (lambda = 0), then in lambda
        u_end = min(1.0, float(lams[-1].exp()))
        y, k = x_T / log_sigma[0].exp().to(dtype), 1
        s, slope, h = torch.zeros((), dtype=torch.float64), None, torch.tensor(0.01 * u_end, dtype=torch.float64)
        while k < len(lams) and lams[k] <= 0:
            s, y, slope, h = ode.advance(in_u, s, y, slope, lams[k].exp(), h)
            out.append(log_sigma[k].exp().to(dtype) * y)
            k += 1
        if k < len(lams):
            _, y, _, h = ode.advance(in_u, s, y, slope, torch.ones((), dtype=torch.float64), h)
            s, slope = torch.zeros((), dtype=torch.float64), None  # lambda = 0: alpha = sigma, so y is x~ too
            h = 0.01 * (lams[-1] - s)
    else:
        y, k, s, slope = x_T / log_alpha[0].exp().to(dtype), 1, lams[0], None
        h = 0.01 * (lams[-1] - lams[0]) if len(lams) > 1 else torch.zeros((), dtype=torch.float64)
    for k in range(k, len(lams)):
        s, y, slope, h = ode.advance(in_lambda, s, y, slope, lams[k], h)
        out.append(log_alpha[k].exp().to(dtype) * y)
    if to_zero:
        t_prev = times[-2].to(dtype).expand(y.shape[0])
        out.append(teacher.x0(out[-1], t_prev, cond))
        calls[0] += 1
    traj = torch.stack(out)
    return ReferenceSolution(traj[-1], traj, calls[0], ode.err_sum, ode.accepted, ode.rejected)


class _Dopri:
    """Adaptive Dormand-Prince 5(4) steps of dy/ds = f(s, y), counting accepted and rejected steps."""

    def __init__(self, rtol: float, atol: float, max_steps: int):
        self.rtol, self.atol, self.max_steps = rtol, atol, max_steps
        self.err_sum, self.accepted, self.rejected = 0.0, 0, 0

    def advance(self, f, s: Tensor, y: Tensor, k1: Tensor | None, target: Tensor, h: Tensor):
        """Integrate from s to exactly `target`: (target, y there, the slope there, the next step size)."""
        k1 = f(s, y) if k1 is None else k1
        while s < target:
            if self.accepted + self.rejected >= self.max_steps:
                raise RuntimeError(f"reference solver took more than {self.max_steps} steps; loosen rtol/atol")
            h = torch.minimum(h, target - s)
            ks = [k1]
            for c, a in zip(_C[1:], _A[1:]):
                ks.append(f(s + c * h, y + h * sum(w * k for w, k in zip(a, ks))))
            y_new = y + h * sum(w * k for w, k in zip(_A[6], ks))  # 7th stage is at the new point (FSAL)
            err = h * sum(w * k for w, k in zip(_E, ks))
            scale = self.atol + self.rtol * torch.maximum(y.abs(), y_new.abs())
            ratio = float(err.div(scale).pow(2).mean().sqrt())
            if ratio <= 1.0:
                s, y, k1 = s + h, y_new, ks[-1]
                self.err_sum += float(err.pow(2).mean().sqrt())
                self.accepted += 1
            else:
                self.rejected += 1
            h = h * min(5.0, max(0.2, 0.9 * (ratio + 1e-16) ** -0.2))
        return target, y, k1, h  # an exact hit (the last step was clipped to it)

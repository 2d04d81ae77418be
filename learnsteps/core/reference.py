"""High-accuracy reference solutions of the probability-flow ODE: adaptive Dormand-Prince 5(4) in float64.

The ODE is integrated in lambda on x~ = x / alpha, where it reads dx~/dlambda = x0(x, t(lambda)) - x~: smooth,
non-stiff (its linear part has rate 1) and free of the 1/sigma of the t-parameterisation. A grid that ends at
the schedule's t_zero ends with the same step the solvers take there, x = x0(x_{t_prev}), so solver and reference
are compared on equal terms.
"""
from __future__ import annotations

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
    """Solve the PF-ODE from x_T at times[0] through every time in `times` (decreasing) with error control."""
    sched = teacher.noise_schedule
    times = check_times(times, "reference times").to(torch.float64)
    to_zero = bool(times[-1] == sched.t_zero)
    lams = sched.lambda_(times[:-1] if to_zero else times)
    dtype = x_T.dtype
    nfe = 0

    def f(lam: Tensor, y: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        t = sched.t_of_lambda(lam)
        alpha = sched.alpha(t).to(dtype)
        return teacher.x0(alpha * y, t.to(dtype).expand(y.shape[0]), cond) - y

    def rms(v: Tensor) -> Tensor:
        return v.pow(2).mean().sqrt()

    y = x_T / sched.alpha(times[0]).to(dtype)
    out = [x_T]
    lam = lams[0]
    k1 = f(lam, y)
    h = 0.01 * (lams[-1] - lams[0]) if len(lams) > 1 else torch.zeros((), dtype=torch.float64)
    err_sum, accepted, rejected = 0.0, 0, 0
    for k in range(1, len(lams)):
        target = lams[k]
        while lam < target:
            if accepted + rejected >= max_steps:
                raise RuntimeError(f"reference solver took more than {max_steps} steps; loosen rtol/atol")
            h = torch.minimum(h, target - lam)
            ks = [k1]
            for c, a in zip(_C[1:], _A[1:]):
                ks.append(f(lam + c * h, y + h * sum(w * k for w, k in zip(a, ks))))
            y_new = y + h * sum(w * k for w, k in zip(_A[6], ks))  # 7th stage is at the new point (FSAL)
            err = h * sum(w * k for w, k in zip(_E, ks))
            scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
            ratio = float(rms(err / scale))
            if ratio <= 1.0:
                lam, y, k1 = lam + h, y_new, ks[-1]
                err_sum += float(rms(err))
                accepted += 1
            else:
                rejected += 1
            h = h * min(5.0, max(0.2, 0.9 * (ratio + 1e-16) ** -0.2))
        lam = target  # exact hit (the last step was clipped to it)
        out.append(sched.alpha(times[k]).to(dtype) * y)
    if to_zero:
        t_prev = times[-2].to(dtype).expand(y.shape[0])
        out.append(teacher.x0(out[-1], t_prev, cond))
        nfe += 1
    traj = torch.stack(out)
    return ReferenceSolution(traj[-1], traj, nfe, err_sum, accepted, rejected)

"""Time grids: where a sampler evaluates, as native times of a noise schedule, from t_max down to t_min.

`make(kind, steps, schedule)` returns steps + 1 decreasing times (float64). With to_zero=True the grid spaces
`steps` points from t_max to t_min and appends the schedule's t_zero (sigma = 0), as k-diffusion's
append_zero and diffusers' final_sigmas_type="zero" do; the last step is then x0(x).

A grid from a start where alpha = 0 (a flow schedule's t_max = 1, lambda = -inf) starts at that time, whatever
its kind. Kinds spaced in t (time_uniform, time_quadratic, shifted) space from it; kinds spaced in lambda or
sigma~ (logsnr, edm, and gits' fine edm grid), which cannot space from an infinite value, space from the
schedule's t_cap (the noisiest time of finite lambda, shift(1 - 1/n) for flow) and then put their first point
at the start.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .schedules import NoiseSchedule

KINDS = ("time_uniform", "time_quadratic", "logsnr", "edm", "ays", "gits", "shifted", "explicit")

# Align-Your-Steps sigma~ lists (Sabour et al. 2024, as diffusers' AysSchedules / NVIDIA's page give them),
# for the models they were optimised for; `make("ays", ...)` log-linearly interpolates them to any length.
AYS_SIGMAS = {
    "sd15": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
    "svd": [700.0, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002],
}


def applicable(kinds, schedule: NoiseSchedule) -> list[str]:
    """The grid kinds of `kinds` that `schedule` has: "shifted" only for flow-matching schedules."""
    return [k for k in kinds if k != "shifted" or getattr(schedule, "shift", None) is not None]


def _ramp(n: int) -> Tensor:
    return torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)


def loglinear_interp(sigmas, n: int) -> Tensor:
    """Interpolate a decreasing sigma~ list to n points, linearly in log sigma~ over a uniform index (AYS)."""
    sig = torch.as_tensor(sigmas, dtype=torch.float64)
    if sig.dim() != 1 or len(sig) < 2 or not (sig > 0).all() or not (sig[1:] < sig[:-1]).all():
        raise ValueError(f"an AYS sigma list must be positive and strictly decreasing, got {sig.tolist()}")
    x = torch.linspace(0, 1, len(sig), dtype=torch.float64)
    from .schedules import interp

    return interp(_ramp(n), x, sig.log()).exp()


def make(kind: str, steps: int, schedule: NoiseSchedule, *, t_max: float | None = None, t_min: float | None = None,
         to_zero: bool = False, rho: float = 7.0, sigmas=None, times=None, teacher=None, x_T: Tensor | None = None,
         fine_steps: int = 60, gits_coeff: float = 1.15) -> Tensor:
    """A grid of `steps` intervals of the given kind (see KINDS) for `schedule`.

    time_uniform / time_quadratic: uniform in t / in sqrt(t) (DPM-Solver, DEIS); logsnr: uniform in lambda;
    edm: Karras et al.'s rho-spacing of sigma~ (rho=7); ays: `sigmas` (a list or a key of AYS_SIGMAS)
    interpolated log-linearly, over the list's own range; shifted: a flow model's own default, uniform in the
    unshifted t then shifted by the schedule's `shift` (SD3, FLUX; time_uniform for shift 1); explicit: `times` as given; gits: GITS' dynamic programme over a fine edm grid
    of `fine_steps`, with the `teacher` integrated from `x_T` (Chen et al. 2024)."""
    if kind not in KINDS:
        raise ValueError(f"unknown grid kind {kind!r}: expected one of {KINDS}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"a grid needs at least 1 step, got {steps!r}")
    if kind == "explicit":
        if times is None:
            raise ValueError("an explicit grid needs times=[...]")
        t = torch.as_tensor(times, dtype=torch.float64)
        if len(t) != steps + 1:
            raise ValueError(f"explicit grid has {len(t)} times, {steps} steps need {steps + 1}")
        return t
    t_hi = schedule.t_max if t_max is None else float(t_max)
    t_lo = schedule.t_min if t_min is None else float(t_min)
    if not t_hi > t_lo:
        raise ValueError(f"t_max ({t_hi}) must exceed t_min ({t_lo})")
    n = steps if to_zero else steps + 1
    u = _ramp(n)
    t_hi_, t_lo_ = torch.tensor(t_hi, dtype=torch.float64), torch.tensor(t_lo, dtype=torch.float64)
    if kind in ("logsnr", "edm") and schedule.lambda_(t_hi_) == -math.inf:  # alpha = 0: space from t_cap
        if not schedule.t_cap > t_lo:
            raise ValueError(f"a {kind} grid from alpha = 0 spaces from t_cap = {schedule.t_cap}, which must exceed "
                             f"t_min ({t_lo})")
        t_hi_ = torch.tensor(schedule.t_cap, dtype=torch.float64)
    if kind == "time_uniform":
        t = t_hi_ + u * (t_lo_ - t_hi_)
    elif kind == "time_quadratic":
        t = (t_hi_.sqrt() + u * (t_lo_.sqrt() - t_hi_.sqrt())) ** 2
    elif kind == "shifted":
        shift = getattr(schedule, "shift", None)
        if shift is None:
            raise ValueError(f"a shifted grid needs a flow-matching schedule (one with a shift), not {schedule!r}")
        from .schedules import shift_sigma, unshift_sigma

        hi, lo = unshift_sigma(t_hi_, shift), unshift_sigma(t_lo_, shift)
        t = shift_sigma(hi + u * (lo - hi), shift)
    elif kind == "logsnr":
        lam_hi, lam_lo = schedule.lambda_(t_hi_), schedule.lambda_(t_lo_)
        t = schedule.t_of_lambda(lam_hi + u * (lam_lo - lam_hi))
    elif kind == "edm":
        s_hi, s_lo = schedule.sigma_tilde(t_hi_) ** (1 / rho), schedule.sigma_tilde(t_lo_) ** (1 / rho)
        t = schedule.t_of_sigma_tilde((s_hi + u * (s_lo - s_hi)) ** rho)
    elif kind == "ays":
        if sigmas is None:
            raise ValueError(f"an AYS grid needs sigmas=[...] or one of {sorted(AYS_SIGMAS)}")
        t = schedule.t_of_sigma_tilde(loglinear_interp(AYS_SIGMAS.get(sigmas, sigmas) if isinstance(sigmas, str)
                                                       else sigmas, n))
    else:
        return gits(steps, schedule, teacher, x_T, t_max=t_hi, t_min=t_lo, to_zero=to_zero,
                    fine_steps=fine_steps, coeff=gits_coeff, rho=rho)
    if kind != "ays":  # pin the ends to exactly what was asked (round trips through lambda move them an ulp)
        t[0] = t_hi
        if n > 1:
            t[-1] = t_lo
    if to_zero:
        t = torch.cat([t, t.new_full((1,), schedule.t_zero)])
    return t


def gits(steps: int, schedule: NoiseSchedule, teacher, x_T: Tensor, *, t_max: float, t_min: float,
         to_zero: bool = False, fine_steps: int = 60, coeff: float = 1.15, rho: float = 7.0) -> Tensor:
    """GITS (Chen et al. 2024, "On the trajectory regularity of ODE-based diffusion sampling").

    Integrate the teacher from x_T on a fine edm grid (iPNDM-4; DPM-Solver++(3M) from alpha = 0), price every
    jump i -> j by the mean squared distance between one DDIM step from the teacher's x_i and the teacher's x_j,
    and choose the `steps` jumps from the first to the last fine point that minimise
    V_k(j) = min_i coeff V_{k-1}(i) + C(i, j)."""
    from .sample import solve

    if teacher is None or x_T is None:
        raise ValueError("a GITS grid needs the teacher and a batch of noise: teacher=..., x_T=...")
    jumps = steps - 1 if to_zero else steps  # the step to sigma = 0 is appended after the last fine point
    if jumps < 1 or fine_steps < jumps:
        raise ValueError(f"GITS needs 1 <= {jumps} jumps <= fine_steps ({fine_steps}); use more steps or fine_steps")
    fine = make("edm", fine_steps, schedule, t_max=t_max, t_min=t_min, rho=rho)
    # GITS integrates with iPNDM-4, a noise-form solver; from alpha = 0 (a flow model's t = 1) DPM-Solver++(3M)
    solver = ("dpm_solver++", 3) if schedule.lambda_(fine[:1]) == -math.inf else ("ipndm", 4)
    with torch.no_grad():
        traj = solve(teacher, x_T, fine, solver[0], order=solver[1], return_trajectory=True).trajectory
        lam = schedule.lambda_(fine)
        alpha, sigma = schedule.alpha(fine), schedule.sigma(fine)
        x0 = torch.stack([teacher.x0(traj[i], fine[i].expand(len(x_T)).to(x_T)) for i in range(fine_steps)])
        cost = torch.full((fine_steps + 1, fine_steps + 1), math.inf, dtype=torch.float64)
        for i in range(fine_steps):
            j = torch.arange(i + 1, fine_steps + 1)
            shape = (-1,) + (1,) * x_T.dim()
            ddim = (sigma[j] / sigma[i]).reshape(shape) * traj[i] \
                - (alpha[j] * torch.expm1(lam[i] - lam[j])).reshape(shape) * x0[i]
            cost[i, j] = ((ddim - traj[j]) ** 2).flatten(1).mean(1).to(torch.float64)
    path = cheapest_path(cost, jumps, coeff)
    t = fine[torch.tensor(path)]
    if to_zero:
        t = torch.cat([t, t.new_full((1,), schedule.t_zero)])
    return t


def cheapest_path(cost: Tensor, jumps: int, coeff: float = 1.0) -> list[int]:
    """Indices 0 = i_0 < ... < i_jumps = M-1 minimising GITS' V_k(j) = min_i coeff V_{k-1}(i) + cost[i, j]
    over an (M, M) matrix of jump costs (inf where a jump is not allowed)."""
    m = cost.shape[0]
    value = torch.full((jumps + 1, m), math.inf, dtype=torch.float64)
    back = torch.zeros((jumps + 1, m), dtype=torch.long)
    value[0, 0] = 0.0
    for k in range(1, jumps + 1):
        value[k], back[k] = (coeff * value[k - 1][:, None] + cost).min(0)
    path = [m - 1]
    for k in range(jumps, 0, -1):
        path.append(int(back[k, path[-1]]))
    return path[::-1]

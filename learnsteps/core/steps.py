"""What every solver shares: a validated time grid with its log-SNR, the model evaluated at grid points, and the
exponential-integrator algebra of the data and noise forms.

Notation (docs/solvers.md): grid t_0 = t_max > t_1 > ... > t_N, lambda_i = lambda(t_i) increasing,
h_i = lambda_{i+1} - lambda_i. The probability-flow ODE has the exact variation-of-constants solutions

    data form:   x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^{lambda} x0(lambda) dlambda
    noise form:  x_t = (alpha_t / alpha_s) x_s - alpha_t int_{lambda_s}^{lambda_t} e^{-lambda} eps(lambda) dlambda

and every solver here is a way of approximating the integral from model outputs at grid points.
"""
from __future__ import annotations

import math
from functools import cached_property, lru_cache

import numpy as np
import torch
import torch.utils.checkpoint
from torch import Tensor

from .denoiser import Denoiser, convert
from .schedules import NoiseSchedule

# diffusers lowers the order of the last steps of short multistep runs (< 15 steps) for stability near t = 0.
LOWER_ORDER_FINAL_BELOW = 15


class Grid:
    """A time grid resolved against a noise schedule: times, model-evaluation times, lambda, alpha, sigma.

    `t` holds the N+1 integration times (strictly decreasing, finite). `t_eval` holds the times the model is
    called at for each grid point: equal to `t` by default, LD3's decoupled offsets otherwise. The solver reads
    the output of a call at t_eval[i] as the prediction at t[i] (converting eps <-> x0 with alpha, sigma of t[i]):
    exactly what a diffusers scheduler does with separate `timesteps` (model input) and `sigmas`, so that a
    decoupled schedule runs the same in diffusers as here. A grid may end
    exactly at the schedule's `t_zero` (sigma = 0): the last step is then the first-order data step x = x0(x).
    It may start where alpha = 0 (lambda = -inf: a flow model's t = 1, pure noise, where its pipelines start;
    `from_noise`): the data-form solvers take their exact limits there and the noise-form ones refuse.
    Coefficients are computed in float64 whatever the grid's dtype, and stay differentiable in `t` (but for an
    infinite end's own lambda, a constant kept out of the graph so that no inf * 0 reaches a gradient)."""

    def __init__(self, schedule: NoiseSchedule, t: Tensor, t_eval: Tensor | None = None):
        t = check_times(t, "grid")
        t_eval = t if t_eval is None else check_times(t_eval, "evaluation grid", monotone=False)
        if t_eval.shape != t.shape:
            raise ValueError(f"evaluation grid has {len(t_eval)} times, the grid {len(t)}")
        self.schedule, self.t, self.t_eval = schedule, t, t_eval
        self.n = len(t) - 1
        self.to_zero = bool(t[-1].detach() == schedule.t_zero)
        t64 = t.to(torch.float64)
        self.from_noise = bool(schedule.lambda_(t64[:1].detach()) == -math.inf)
        lam = schedule.lambda_(t64[int(self.from_noise): self.n + 1 - self.to_zero])
        # the infinite ends (alpha = 0 first, sigma = 0 last) are constants
        lam = torch.cat([lam.new_full((int(self.from_noise),), -math.inf), lam,
                         lam.new_full((int(self.to_zero),), math.inf)])
        finite = lam[int(self.from_noise): self.n + 1 - self.to_zero]
        if not torch.isfinite(finite).all():
            raise ValueError(f"grid times {t.tolist()} leave the domain of {schedule!r} (non-finite log-SNR)")
        if not (lam[1:] > lam[:-1]).all():
            raise ValueError("grid log-SNR must increase strictly along the grid")
        log_alpha, log_sigma = schedule.log_alpha_sigma(lam)
        self.vectors = dict(lam=lam, log_alpha=log_alpha, log_sigma=log_sigma)
        # Per-point values as tuples of 0-d tensors: solvers index them once per step, and indexing a tuple is
        # ~30x cheaper than indexing a tensor (the per-step overhead is what a sampler loop costs besides the model).
        self.lam, self.alpha, self.sigma = lam.unbind(), log_alpha.exp().unbind(), log_sigma.exp().unbind()
        if t_eval is not t:  # the model is called there: those times must lie in the schedule's domain (alpha = 0,
            te = t_eval[:-1] if self.to_zero else t_eval  # pure noise, included)
            lam_eval = schedule.lambda_(te.detach().to(torch.float64))
            if lam_eval.isnan().any() or (lam_eval == math.inf).any():
                raise ValueError(f"evaluation times {t_eval.tolist()} leave the domain of {schedule!r}")

    @cached_property
    def sigma_tilde(self) -> tuple[Tensor, ...]:
        """sigma / alpha = exp(-lambda) at every grid point."""
        return (-self.vectors["lam"]).exp().unbind()

    def is_zero(self, i: int) -> bool:
        return self.to_zero and i == self.n

    def is_noise(self, i: int) -> bool:
        """Whether grid point i is a start at alpha = 0 (lambda = -inf)."""
        return self.from_noise and i == 0

    def refuse_noise_start(self, solver: str, why: str = "works in the noise form, undefined where alpha = 0",
                           instead: str = "euler, dpm_solver++ or unipc (data form)") -> None:
        """ValueError (one line) for a solver that cannot start where alpha = 0, if this grid does."""
        if self.from_noise:
            start = float(self.t[0].detach())
            raise ValueError(f"{solver} {why}, and this grid starts at t = {start} (alpha = 0, pure "
                             f"noise): use {instead}, or start the grid at the schedule's t_cap = "
                             f"{self.schedule.t_cap:.6g} (grids.make(..., t_max=schedule.t_cap))")


def check_times(t, what: str = "grid", monotone: bool = True) -> Tensor:
    """A 1-D tensor of at least two finite times, strictly decreasing if `monotone`; ValueError otherwise."""
    t = torch.as_tensor(t)
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t.dim() != 1 or len(t) < 2:
        raise ValueError(f"{what} must be a 1-D sequence of at least 2 times, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} has non-finite times: {t.tolist()}")
    if monotone and not (t[1:] < t[:-1]).all():
        raise ValueError(f"{what} must decrease strictly from the noisiest time, got {t.tolist()}")
    return t


class Model:
    """The denoiser as the solvers see it: called at grid point i, counting every call (NFE)."""

    def __init__(self, denoiser: Denoiser, grid: Grid, cond=None, remat: bool = False):
        if grid.from_noise and denoiser.prediction == "epsilon":
            raise ValueError("an epsilon-prediction model has no data prediction where alpha = 0 (x0 = (x - sigma "
                             "eps) / alpha), where this grid starts: start it at the schedule's t_cap = "
                             f"{grid.schedule.t_cap:.6g}")
        self.denoiser, self.grid, self.cond, self.nfe, self.remat = denoiser, grid, cond, 0, remat

    def _predict(self, x: Tensor, i: int, want: str) -> Tensor:
        self.nfe += 1
        g = self.grid
        t = g.t_eval[i].to(x.dtype).expand(x.shape[0])
        if self.remat and torch.is_grad_enabled():
            # Rematerialisation: keep only this call's inputs for the backward pass and run the network again
            # there, so that backpropagating through N steps holds one network's activations, not N.
            out = torch.utils.checkpoint.checkpoint(self.denoiser, x, t, self.cond, use_reentrant=False)
        else:
            out = self.denoiser(x, t, self.cond)
        return convert(out, self.denoiser.prediction, want, x, g.alpha[i], g.sigma[i])

    def x0(self, x: Tensor, i: int) -> Tensor:
        return self._predict(x, i, "x0")

    def eps(self, x: Tensor, i: int) -> Tensor:
        return self._predict(x, i, "eps")


class ExpForm:
    """The data (x0) or noise (eps) form of the exponential integrator between grid points s < t.

    Both forms read x_t = ratio x_s - scale * sum_k g_k(hh) h^(k-1) m^(k-1)(lambda_s), with
    data:  ratio = sigma_t/sigma_s, scale = alpha_t, hh = -h;   noise: ratio = alpha_t/alpha_s, scale = sigma_t,
    hh = h, and g_1 = expm1(hh), g_{k+1} = g_k / hh - 1/k! (the "h phi_k" functions of DPM-Solver and UniPC).
    The coefficients of the grid's own steps i -> i+1 are computed once, vectorised (`step`)."""

    def __init__(self, grid: Grid, data: bool):
        if not data:
            grid.refuse_noise_start("the noise form of the exponential integrator", "is undefined where alpha = 0")
        self.g, self.data = grid, data
        v = grid.vectors
        n = grid.n - grid.to_zero  # steps with a finite end; the step to sigma = 0 is always x = x0
        lam, log_ratio = v["lam"][: n + 1], v["log_sigma" if data else "log_alpha"][: n + 1]
        hh = (lam[1:] - lam[:-1]) * (-1 if data else 1)
        scale = (v["log_alpha"] if data else v["log_sigma"])[1: n + 1].exp()
        self._steps = list(zip(hh.unbind(), (log_ratio[1:] - log_ratio[:-1]).exp().unbind(), scale.unbind(),
                               *[g.unbind() for g in phis(hh, 3)]))

    def step(self, i: int) -> tuple[Tensor, ...]:
        """(hh, ratio, scale, g1, g2, g3) of the step from grid point i to i+1."""
        return self._steps[i]

    def predict(self, model: Model, x: Tensor, i: int) -> Tensor:
        return model.x0(x, i) if self.data else model.eps(x, i)

    def hh(self, s: int, t: int) -> Tensor:
        h = self.g.lam[t] - self.g.lam[s]
        return -h if self.data else h

    def ratio(self, s: int, t: int) -> Tensor:
        g = self.g
        return g.sigma[t] / g.sigma[s] if self.data else g.alpha[t] / g.alpha[s]

    def scale(self, t: int) -> Tensor:
        return self.g.alpha[t] if self.data else self.g.sigma[t]

    def first_order(self, x: Tensor, s: int, t: int, m: Tensor) -> Tensor:
        """DDIM = DPM-Solver-1 = DPM-Solver++-1 = Euler in (x/alpha, sigma/alpha)."""
        if t == s + 1 and s < len(self._steps):
            _, ratio, scale, g1, _, _ = self._steps[s]
            return ratio * x - (scale * g1) * m
        return self.ratio(s, t) * x - (self.scale(t) * torch.expm1(self.hh(s, t))) * m

    def to_x0(self, x: Tensor, i: int, m: Tensor) -> Tensor:
        """The data prediction behind model output m at grid point i (m itself in the data form)."""
        return m if self.data else (x - self.g.sigma[i] * m) / self.g.alpha[i]


def phis(hh: Tensor, k: int) -> list[Tensor]:
    """[g_1, ..., g_k]: g_1 = expm1(hh), g_{j+1} = g_j / hh - 1/j!."""
    out = [torch.expm1(hh)]
    for j in range(1, k):
        out.append(out[-1] / hh - 1 / math.factorial(j))
    return out


def step_order(i: int, n: int, order: int, lower_order_final: bool = True) -> int:
    """Order of multistep step i of n: warm up from order 1 (i+1 outputs are known), and, as diffusers does,
    end short runs with orders ..., 2, 1."""
    p = min(order, i + 1)
    if lower_order_final and n < LOWER_ORDER_FINAL_BELOW:
        p = min(p, n - i)
    return p


@lru_cache(maxsize=None)
def _gauss_legendre(nodes: int, panels: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(nodes)
    left = np.arange(panels)[:, None] / panels
    return (left + (x + 1) / (2 * panels)).ravel(), np.tile(w / (2 * panels), panels)


def integrate_exp(f, lam_s: Tensor, lam_t: Tensor, nodes: int = 12, panels: int = 12) -> Tensor:
    """int_{lam_s}^{lam_t} e^{-lambda} f(lambda) dlambda by composite Gauss-Legendre (panels x nodes points).

    f maps a 1-D tensor of lambdas to values along its last axis (shape (..., Q)). Panels keep it exact to
    float64 rounding for the steep integrands of low-NFE steps (h up to about 10); gradients flow to lam_s, lam_t."""
    u, w = (torch.as_tensor(a, dtype=lam_s.dtype, device=lam_s.device) for a in _gauss_legendre(nodes, panels))
    h = lam_t - lam_s
    lam = lam_s + h * u
    return h * (f(lam) * torch.exp(-lam) * w).sum(-1)

"""The training-free solvers, each a generator over a Grid that yields the state at grid points 1..N.

Every solver has the same signature, `solver(model, x, grid, order, **options)`, calls the model only at grid
points (through `model`, which counts calls), and is differentiable with respect to the grid: coefficients
are torch expressions of lambda, never Python floats of the grid. A step whose target is the clean data
(sigma = 0) is always the first-order data step x = x0(x), which is where every published solver's higher-order
formula breaks down (0 * inf). A grid may also start where alpha = 0 (lambda = -inf, a flow model's t = 1):
each data-form formula is the exact integral of a polynomial interpolant of x0 in lambda against e^lambda, and a
node at lambda = -inf drops out of it, lowering its degree by one (its Lagrange basis polynomial vanishes like
1/|lambda_0| where e^lambda gives the interval finite weight); the solvers take those limits explicitly, so that no
inf * 0 reaches a value or a gradient. The noise-form solvers, and Heun's trapezoidal step in sigma~, have no
finite limit there and refuse such a grid. docs/solvers.md gives the derivations and the choices made for each
solver.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from torch import Tensor

from .steps import ExpForm, Grid, Model, integrate_exp, phis, step_order

Solver = Callable[..., Iterator[Tensor]]


def euler(model: Model, x: Tensor, g: Grid, order: int = 1, eta: float = 0.0,
          generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """DDIM (= Euler in x/alpha over sigma/alpha = DPM-Solver-1), stochastic with eta > 0 (eta = 1: DDPM).

    The deterministic step is taken in the model's native form (noise or data), which saves a conversion; a flow
    (velocity) model steps in the data form, where it is exactly FlowMatchEulerDiscreteScheduler's x + (t' - t) v,
    and so does every model on a grid from alpha = 0 (the first step is then x = sigma_1 x_T + alpha_1 x0).
    DDIM's sigma_eta = eta sqrt((1-abar_t)/(1-abar_s)) sqrt(1-abar_s/abar_t) equals eta sigma_t sqrt(1-e^{-2h})."""
    form = ExpForm(g, data=eta != 0 or g.from_noise or model.denoiser.prediction in ("x0", "edm", "flow"))
    for i in range(g.n):
        m = form.predict(model, x, i)
        if g.is_zero(i + 1):
            x = form.to_x0(x, i, m)
        elif eta == 0:
            x = form.first_order(x, i, i + 1, m)
        else:
            eps = (x - g.alpha[i] * m) / g.sigma[i]
            h = g.lam[i + 1] - g.lam[i]
            # sigma_eta^2 = eta^2 sigma_t^2 (1 - e^{-2h}); the share of sigma_t left to eps, written without the
            # difference sigma_t^2 - sigma_eta^2 that rounds below zero at eta = 1 and a long last step
            share = -torch.expm1(-2 * h)
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = g.alpha[i + 1] * m + g.sigma[i + 1] * (torch.sqrt((1 - eta**2 * share).clamp(min=0)) * eps
                                                       + eta * torch.sqrt(share) * noise)
        yield x


def heun(model: Model, x: Tensor, g: Grid, order: int = 2) -> Iterator[Tensor]:
    """EDM's Algorithm 1 (Karras et al. 2022) on x~ = x/alpha over sigma~: an Euler step, then the trapezoidal
    correction with the slope at its end, d = dx~/dsigma~ = eps. The step to sigma = 0 stays Euler: 2N-1 calls.
    From alpha = 0 the first interval in sigma~ is infinite and the correction ds (d_next - d) / 2 has no finite
    limit: such a grid is refused."""
    g.refuse_noise_start("heun", "takes EDM's trapezoidal step in sigma~ = sigma/alpha, infinite where alpha = 0 "
                         "(its correction has no finite limit)")
    for i in range(g.n):
        d = model.eps(x, i)
        x_tilde = x / g.alpha[i]
        ds = g.sigma_tilde[i + 1] - g.sigma_tilde[i]
        x_next = g.alpha[i + 1] * (x_tilde + ds * d)
        if not g.is_zero(i + 1):
            d_next = model.eps(x_next, i + 1)
            x_next = g.alpha[i + 1] * (x_tilde + ds * (d + d_next) / 2)
        x = x_next
        yield x


def dpm_multistep(model: Model, x: Tensor, g: Grid, order: int = 2, data: bool = True, variant: str = "midpoint",
                  lower_order_final: bool = True) -> Iterator[Tensor]:
    """DPM-Solver(2M, 3M) (data=False) and DPM-Solver++(2M, 3M) (data=True), Lu et al. 2022a/b.

    With r0 = h_{i-1}/h_i, D1_0 = (m_i - m_{i-1}) / r0 estimates h m'. Order 2 adds -scale (0.5 g1) D1 ("midpoint",
    DPM-Solver's "dpmsolver" type) or -scale g2 D1 ("taylor", diffusers' "heun"). Order 3 adds
    -scale (g2 D1 + g3 D2) with D2 = (D1_0 - D1_1)/(r0 + r1): half the exact second-derivative term, as
    published and as diffusers and k-diffusion compute it, which leaves 3M a second-order method (measured on a
    log-SNR grid: local slopes 2.4, 2.15, 2.05, 2.02 from 20 to 320 steps; docs/solvers.md).

    From alpha = 0 (lambda_0 = -inf) the history ratio r of that point is infinite: its divided difference
    (m_1 - m_0) / r tends to 0, so step 1 of 2M is DDIM's, and step 2 of 3M (D1 -> D1_0, D2 -> 0) adds -scale g2 D1_0,
    the taylor second-order step on the two finite points."""
    if not data:
        g.refuse_noise_start("dpm_solver", instead="dpm_solver++ (data prediction)")
    form = ExpForm(g, data)
    ms = [form.predict(model, x, 0)]
    for i in range(g.n):
        if g.is_zero(i + 1):
            x = form.to_x0(x, i, ms[-1])
            yield x
            return
        p = step_order(i, g.n, order, lower_order_final)
        _, _, scale, g1, g2, g3 = form.step(i)
        x_next = form.first_order(x, i, i + 1, ms[-1])
        if p == 3 and g.is_noise(i - 2):  # the oldest output is at lambda = -inf and drops out (see above)
            r0 = (g.lam[i] - g.lam[i - 1]) / (g.lam[i + 1] - g.lam[i])
            x_next = x_next - (scale * g2) * ((ms[-1] - ms[-2]) / r0)
        elif p >= 2 and not g.is_noise(i - 1):  # (p = 2 from lambda = -inf: D1 -> 0, DDIM's step)
            h = g.lam[i + 1] - g.lam[i]
            r0 = (g.lam[i] - g.lam[i - 1]) / h
            d1_0 = (ms[-1] - ms[-2]) / r0
            if p == 2:
                x_next = x_next - (scale * (0.5 * g1 if variant == "midpoint" else g2)) * d1_0
            else:
                r1 = (g.lam[i - 1] - g.lam[i - 2]) / h
                d1_1 = (ms[-2] - ms[-3]) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x_next = x_next - scale * (g2 * d1 + g3 * d2)
        x = x_next
        if i + 1 < g.n:
            ms = (ms + [form.predict(model, x, i + 1)])[-order:]
        yield x


def singlestep_plan(n: int, order: int, to_zero: bool = False) -> list[int]:
    """DPM-Solver-fast's split of n steps into singlestep groups of order <= `order` (Lu et al. 2022a, sec. 3.4),
    with the last group shortened to order 1 when it ends at sigma = 0."""
    if order == 3:
        k = n // 3 + 1
        plan = [3] * (k - 2) + [2, 1] if n % 3 == 0 else [3] * (k - 1) + [n % 3]
    elif order == 2:
        plan = [2] * (n // 2) + [1] * (n % 2)
    else:
        plan = [1] * n
    plan = [p for p in plan if p > 0]
    if to_zero and plan[-1] > 1:
        plan[-1:] = [plan[-1] - 1, 1]
    return plan


def dpm_singlestep(model: Model, x: Tensor, g: Grid, order: int = 2, data: bool = True, variant: str = "midpoint",
                   plan: list[int] | None = None) -> Iterator[Tensor]:
    """Singlestep DPM-Solver-1/2/3 (data=False) and DPM-Solver++ 1S/2S/3S (data=True), Lu et al. 2022a/b.

    Steps are grouped (`plan`, default DPM-Solver-fast's): a group of order k from grid point s takes its
    intermediate stages at the next k-1 grid points, each stage from x_s with the outputs known so far, so that
    r1, r2 are the actual lambda fractions of those points and NFE = N. Order-3 groups build their second stage
    with the "taylor" formula, as the original does (diffusers' "midpoint" does not).

    A group from alpha = 0 (lambda_s = -inf) has stage fractions r -> 1; its limits (`_stage_from_noise`) are the
    integral of the interpolant through the finite stages (taylor) or the formula's own limit (midpoint)."""
    if not data:
        g.refuse_noise_start("dpm_solver (singlestep)", instead="dpm_solver++ (data prediction)")
    plan = plan or singlestep_plan(g.n, order, g.to_zero)
    if sum(plan) != g.n or not all(1 <= k <= 3 for k in plan):
        raise ValueError(f"singlestep plan {plan} must split the grid's {g.n} steps into orders 1..3")
    if g.to_zero and plan[-1] != 1:
        raise ValueError("the last singlestep group must have order 1 when the grid ends at sigma = 0")
    form = ExpForm(g, data)
    s = 0
    for k in plan:
        ms = [form.predict(model, x, s)]
        x_s = x
        for j in range(1, k + 1):
            t = s + j
            if g.is_zero(t):
                x = form.to_x0(x_s, s, ms[0])
                yield x
                return
            if j > 1 and g.is_noise(s):
                x = _stage_from_noise(form, x_s, s, t, ms, variant == "taylor" or (k == 3 and j == 2))
                if j < k:
                    ms.append(form.predict(model, x, t))
                yield x
                continue
            g1, g2, g3 = phis(form.hh(s, t), 3)
            x = form.first_order(x_s, s, t, ms[0])
            h = g.lam[t] - g.lam[s]
            r = [(g.lam[s + q] - g.lam[s]) / h for q in range(1, j)]  # stage fractions within this stage
            if j == 2:
                d = (ms[1] - ms[0]) / r[0]
                taylor = variant == "taylor" or k == 3
                x = x - form.scale(t) * (g2 if taylor else 0.5 * g1) * d
            elif j == 3:
                if variant == "taylor":
                    d1_0, d1_1 = (ms[1] - ms[0]) / r[0], (ms[2] - ms[0]) / r[1]
                    d1 = (r[1] * d1_0 - r[0] * d1_1) / (r[1] - r[0])
                    d2 = 2 * (d1_1 - d1_0) / (r[1] - r[0])
                    x = x - form.scale(t) * (g2 * d1 + g3 * d2)
                else:
                    x = x - form.scale(t) * g2 * (ms[2] - ms[0]) / r[1]
            if j < k:
                ms.append(form.predict(model, x, t))
            yield x
        s += k


def _stage_from_noise(form: ExpForm, x_s: Tensor, s: int, t: int, ms: list[Tensor], taylor: bool) -> Tensor:
    """Stage t = s + 2 or s + 3 of a singlestep group from lambda_s = -inf (data form), in the limit of its formula.

    The stage fractions r_q = (lambda_{s+q} - lambda_s) / h tend to 1 and g1 -> -1, g2 -> -1, g3 -> -1/2, so
    order 2 gives x_t = r x_s + alpha_t m_1 (taylor) or r x_s + alpha_t (m_0 + m_1) / 2 (midpoint), and order 3
    midpoint r x_s + alpha_t m_2. Order 3 taylor's D1 and D2 diverge like h with cancelling leading terms; with
    a = lambda_t - lambda_1, b = lambda_t - lambda_2 its limit is the integral of the line through (lambda_1, m_1),
    (lambda_2, m_2) against e^lambda from -inf: x_t = r x_s + alpha_t ((1 - b) m_1 + (a - 1) m_2) / (a - b)."""
    g = form.g
    x = (g.sigma[t] / g.sigma[s]) * x_s
    if t == s + 2:
        return x + g.alpha[t] * (ms[1] if taylor else (ms[0] + ms[1]) / 2)
    if not taylor:
        return x + g.alpha[t] * ms[2]
    a, b = g.lam[t] - g.lam[s + 1], g.lam[t] - g.lam[s + 2]
    return x + g.alpha[t] * ((1 - b) * ms[1] + (a - 1) * ms[2]) / (a - b)


def unipc(model: Model, x: Tensor, g: Grid, order: int = 2, variant: str = "bh2", corrector: bool = True,
          data: bool = True, lower_order_final: bool = True) -> Iterator[Tensor]:
    """UniPC (Zhao et al. 2023): the UniP-p predictor and the UniC corrector, B(h) = hh ("bh1") or expm1(hh).

    Weights rho solve R rho = b with R[k, j] = r_j^k over the previous points' lambda fractions r_j (and r = 1 for
    the new point) and b_k = g_{k+1} k! / B(h), k = 1..p; as published, p = 2 uses rho_p = 1/2 and the order-1 corrector
    rho_c = 1/2. The model is called on the predicted point, the corrector reuses that output (NFE = N), the last
    step has no corrector, and the order ends as min(order, steps left).

    From alpha = 0 a history point at lambda = -inf has r = -inf: by Cramer's rule its weight vanishes like
    r^-(p-1) and the other weights tend to the solution of the system without that point and without its last
    row, so the point is dropped and the system shrinks by one (the p = 2 predictor's fixed 1/2 then multiplies a
    difference that tends to 0). bh1's first corrector, B(h) = hh = -inf times 1/2 (m_1 - m_0), has no finite
    limit: bh1 with the corrector refuses such a grid."""
    if not data:
        g.refuse_noise_start("unipc with data=False", instead="unipc with data=True")
    if variant == "bh1" and corrector and g.n > 1 and not g.is_zero(1):
        g.refuse_noise_start("unipc variant bh1 with the corrector", "multiplies its first corrector by B(h) = h, "
                             "infinite from alpha = 0", "variant bh2, corrector=False, euler or dpm_solver++")
    form = ExpForm(g, data)
    ms, idx = [form.predict(model, x, 0)], [0]
    for i in range(g.n):
        if g.is_zero(i + 1):
            x = form.to_x0(x, i, ms[-1])
            yield x
            return
        p = min(order, i + 1, g.n - i if lower_order_final else order)
        hh, _, scale, *_ = form.step(i)
        h = g.lam[i + 1] - g.lam[i]
        gs = phis(hh, p + 1)
        b_h = hh if variant == "bh1" else gs[0]
        back = [k for k in range(1, p) if not g.is_noise(idx[-1 - k])]  # a point at lambda = -inf drops out
        dropped = len(back) < p - 1
        rks = [(g.lam[idx[-1 - k]] - g.lam[i]) / h for k in back]
        d1s = [(ms[-1 - k] - ms[-1]) / r for k, r in zip(back, rks)]
        q = len(rks) + 1  # size of the corrector's system (p, or p - 1 with a point dropped)
        rk = torch.stack(rks + [torch.ones_like(h)])
        big_r = torch.stack([rk**k for k in range(q)])
        b = torch.stack([gs[k] * math.factorial(k) / b_h for k in range(1, q + 1)])
        x_lin = form.first_order(x, i, i + 1, ms[-1])

        def combine(rho, diffs):
            return sum(w * d for w, d in zip(rho, diffs))

        x_pred = x_lin
        if q >= 2:
            rho_p = [torch.full_like(h, 0.5)] if p == 2 and not dropped else torch.linalg.solve(big_r[:-1, :-1], b[:-1])
            x_pred = x_lin - (scale * b_h) * combine(rho_p, d1s)
        if i == g.n - 1:
            yield x_pred
            return
        m_new = form.predict(model, x_pred, i + 1)
        x = x_pred
        if corrector:
            rho_c = [torch.full_like(h, 0.5)] if p == 1 else torch.linalg.solve(big_r, b)
            x = x_lin - (scale * b_h) * combine(rho_c, d1s + [m_new - ms[-1]])
        ms, idx = (ms + [m_new])[-order:], (idx + [i + 1])[-order:]
        yield x


DEIS_BASES = ("tab", "logrho", "rhoab")


def deis(model: Model, x: Tensor, g: Grid, order: int = 3, basis: str = "tab",
         lower_order_final: bool = True) -> Iterator[Tensor]:
    """DEIS (Zhang & Chen 2023): eps as the Lagrange polynomial through the last `order` outputs, integrated
    exactly against the noise form's kernel: x_t = (alpha_t/alpha_s) x_s + sum_j C_j eps_j with
    C_j = -alpha_t int e^{-lambda} l_j(v(lambda)) dlambda. The polynomial's variable v names the variant:
    "tab" t (the paper's tAB; order = degree + 1), "logrho" lambda = -log rho (diffusers' DEISMultistepScheduler)
    and "rhoab" rho = sigma/alpha (rhoAB-DEIS, iPNDM with variable-step weights)."""
    if basis not in DEIS_BASES:
        raise ValueError(f"unknown DEIS basis {basis!r}: expected one of {DEIS_BASES}")
    g.refuse_noise_start("deis")
    variable = {"tab": lambda lam: g.schedule.t_of_lambda(lam), "logrho": lambda lam: lam,
                "rhoab": lambda lam: torch.exp(-lam)}[basis]
    form = ExpForm(g, data=False)
    eps, idx = [model.eps(x, 0)], [0]
    for i in range(g.n):
        if g.is_zero(i + 1):
            x = form.to_x0(x, i, eps[-1])
            yield x
            return
        p = step_order(i, g.n, order, lower_order_final)
        nodes = torch.stack([variable(g.lam[j]) for j in idx[-p:]])

        def lagrange(lam, nodes=nodes):  # (p, Q): every basis polynomial at the quadrature points
            v = variable(lam)
            rows = [torch.prod(torch.stack([(v - nodes[k]) / (nodes[j] - nodes[k]) for k in range(p) if k != j]
                                           or [torch.ones_like(v)]), 0) for j in range(p)]
            return torch.stack(rows)

        coef = -g.alpha[i + 1] * integrate_exp(lagrange, g.lam[i], g.lam[i + 1])
        x = form.step(i)[1] * x + sum(c * e for c, e in zip(coef.unbind(), eps[-p:]))
        if i + 1 < g.n:
            eps, idx = (eps + [model.eps(x, i + 1)])[-order:], (idx + [i + 1])[-order:]
        yield x


# Adams-Bashforth weights of iPNDM (Zhang & Chen 2023, after Liu et al. 2022), newest output first.
AB_WEIGHTS = ([1.0], [1.5, -0.5], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24])


def ipndm(model: Model, x: Tensor, g: Grid, order: int = 4) -> Iterator[Tensor]:
    """iPNDM: DDIM's step with eps replaced by the fixed-weight Adams-Bashforth combination of the last `order`
    outputs, warming up from order 1. DDIM's noise-form step is Euler in x~ over sigma~, so this is AB in sigma~:
    its order holds on grids uniform in sigma~ and drops towards 2 on others (deis(basis="rhoab") does not)."""
    g.refuse_noise_start("ipndm")
    form = ExpForm(g, data=False)
    eps = [model.eps(x, 0)]
    for i in range(g.n):
        if g.is_zero(i + 1):
            x = form.to_x0(x, i, eps[-1])
            yield x
            return
        weights = AB_WEIGHTS[min(order, i + 1) - 1]
        x = form.first_order(x, i, i + 1, sum(w * e for w, e in zip(weights, reversed(eps))))
        if i + 1 < g.n:
            eps = (eps + [model.eps(x, i + 1)])[-order:]
        yield x


# Noise-scale functions phi(sigma~) of ER-SDE-Solver (Cui et al. 2023); "ode" makes it DDIM, "sde" the reverse SDE.
NOISE_SCALES: dict[str, Callable[[Tensor], Tensor]] = {
    "ode": lambda s: s,
    "sde": lambda s: s**2,
    "sde1": lambda s: s * (torch.exp(-1 / s) + 10),
    "pow1.5": lambda s: s**1.5,
    "pow2.5": lambda s: s**2.5,
    "log": lambda s: s**0.9 * torch.log10(1 + 100 * s**1.5),
    "sde5": lambda s: s * (torch.exp(s**0.3) + 10),
}


def er_sde(model: Model, x: Tensor, g: Grid, order: int = 3, noise_scale: str = "sde5",
           generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """ER-SDE-Solver-1/2/3 (Cui et al. 2023) in VP form over sigma~, with x0 prediction:

        x~' = r x~ + (1 - r) x0 + Q1 D1 + Q2 D2 + sqrt(sigma~'^2 - r^2 sigma~^2) z,   r = phi(sigma~')/phi(sigma~)

    with D1, D2 the backward divided differences of x0 in sigma~ (D2 with the paper's factor 2),
    Q1 = (sigma~' - sigma~) + phi(sigma~') S0 and Q2 = (sigma~' - sigma~)^2/2 + phi(sigma~') S1, where
    S0 = int dsigma/phi and S1 = int (sigma - sigma~)/phi dsigma over [sigma~', sigma~] are integrated by
    Gauss-Legendre in lambda rather than the reference's 100-point Riemann sum."""
    if noise_scale not in NOISE_SCALES:
        raise ValueError(f"unknown ER-SDE noise scale {noise_scale!r}: expected one of {sorted(NOISE_SCALES)}")
    g.refuse_noise_start("er_sde", "steps in x~ = x/alpha over sigma~ = sigma/alpha, infinite where alpha = 0")
    phi = NOISE_SCALES[noise_scale]
    s = g.sigma_tilde
    x0s, d1_prev = [], None
    for i in range(g.n):
        x0 = model.x0(x, i)
        if g.is_zero(i + 1):
            yield x0
            return
        p = min(order, i + 1)
        r = phi(s[i + 1]) / phi(s[i])
        x_tilde = r * x / g.alpha[i] + (1 - r) * x0
        if p >= 2:
            d1 = (x0 - x0s[-1]) / (s[i] - s[i - 1])
            s0 = integrate_exp(lambda lam: 1 / phi(torch.exp(-lam)), g.lam[i], g.lam[i + 1])
            x_tilde = x_tilde + (s[i + 1] - s[i] + phi(s[i + 1]) * s0) * d1
            if p >= 3:
                d2 = 2 * (d1 - d1_prev) / (s[i] - s[i - 2])
                s1 = integrate_exp(lambda lam: (torch.exp(-lam) - s[i]) / phi(torch.exp(-lam)), g.lam[i], g.lam[i + 1])
                x_tilde = x_tilde + ((s[i + 1] - s[i]) ** 2 / 2 + phi(s[i + 1]) * s1) * d2
            d1_prev = d1
        variance = (s[i + 1] ** 2 - (r * s[i]) ** 2).clamp_min(0)  # phi(s)/s non-decreasing makes it >= 0
        if noise_scale != "ode":
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x_tilde = x_tilde + variance.sqrt() * noise
        x0s = (x0s + [x0])[-3:]
        x = g.alpha[i + 1] * x_tilde
        yield x


TABLE_FORMS = ("data", "noise")


def tabulated(model: Model, x: Tensor, g: Grid, order: int = 3, coefficients=None,
              form: str = "data") -> Iterator[Tensor]:
    """The generalized multistep solver: step i combines the current and the last order-1 model outputs with the
    per-step coefficients of a table c (N rows, `order` columns, newest output first):

        x_{i+1} = r_i x_i + alpha_{i+1} sum_j c[i, j] m_{i-j}

    data form: m = x0, r_i = sigma_{i+1}/sigma_i (DDIM's step is c[i] = [1 - e^{-h_i}, 0, ...]);
    noise form: m = eps, r_i = alpha_{i+1}/alpha_i (DDIM's step is c[i] = [sigma~_{i+1} - sigma~_i, 0, ...]).
    Every multistep solver of this module whose states are the points the model is called at is such a table on
    its grid (core/tables.py finds it); a learned solver is a table learned with its grid (ld3, learn=solver).
    Entries c[i, j] with j > i (outputs not computed yet) must be zero."""
    c = check_table(coefficients, g.n, order, table_scale(form, g.alpha[0], g.sigma[0]))
    data = form == "data"
    if not data:
        g.refuse_noise_start("the tabulated solver in the noise form", "scales by r = alpha_1/alpha_0, infinite where "
                             "alpha = 0", "its data form (form=data)")
    ms: list[Tensor] = []
    for i in range(g.n):
        ms = [model.x0(x, i) if data else model.eps(x, i)] + ms[: order - 1]
        r = g.sigma[i + 1] / g.sigma[i] if data else g.alpha[i + 1] / g.alpha[i]
        x = r * x + g.alpha[i + 1] * sum(c[i, j] * m for j, m in enumerate(ms))
        yield x


# The largest |c[i, j]| a table may hold: in the data form as it is (the coefficients are dimensionless; DDIM's are
# 1 - e^-h < 1), in the noise form in units of sigma~ = sigma / alpha at the grid's first time (DDIM's are
# differences of sigma~). The multistep solvers of the core stay far below it on every grid worth sampling
# (tests/test_tabulated.py measures them); a table beyond it makes each step many orders of magnitude larger than
# the whole trajectory, and from 1e308 on a first step overflows to inf. docs/schedule-format.md says so.
MAX_COEFFICIENT = 1e6


def table_scale(form: str, alpha0, sigma0) -> float:
    """The unit of MAX_COEFFICIENT for a table of `form` on a grid whose first time has alpha0, sigma0."""
    return 1.0 if form == "data" else float(sigma0) / float(alpha0)


def check_table(coefficients, steps: int, width: int, scale: float | None = None) -> Tensor:
    """The coefficient table as a float64 tensor of shape (steps, width), finite, zero where an output does not
    exist yet (c[i, j] for j > i) and, with `scale` (table_scale), at most MAX_COEFFICIENT x scale in magnitude;
    ValueError naming what is off."""
    if coefficients is None:
        raise ValueError("the tabulated solver needs its coefficients (options.coefficients: a table, N x order)")
    c = torch.as_tensor(coefficients, dtype=torch.float64)
    if c.shape != (steps, width):
        raise ValueError(f"coefficient table of shape {tuple(c.shape)}: the grid has {steps} steps and the order "
                         f"is {width}, so it must be ({steps}, {width})")
    if not torch.isfinite(c).all():
        raise ValueError("coefficient table has non-finite entries")
    future = torch.arange(width)[None, :] > torch.arange(steps)[:, None]
    if bool((c.detach()[future] != 0).any()):
        raise ValueError("coefficient table weights outputs not computed yet (c[i, j] != 0 for some j > i)")
    if scale is not None and c.numel():
        a = c.detach()
        i, j = divmod(int(a.abs().argmax()), width)
        if float(a[i, j].abs()) > MAX_COEFFICIENT * scale:
            unit = "" if scale == 1 else f" x sigma~(times[0]) = {MAX_COEFFICIENT * scale:.4g}"
            raise ValueError(f"coefficient c[{i}][{j}] = {float(a[i, j]):.4g} is beyond the bound of "
                             f"{MAX_COEFFICIENT:.0e}{unit} that no multistep solver reaches")
    return c

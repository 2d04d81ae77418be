"""Noise schedules: alpha(t), sigma(t) and the half log-SNR lambda(t) = log alpha - log sigma, with t(lambda).

The forward process is x_t = alpha_t x_0 + sigma_t eps. VP schedules keep alpha^2 + sigma^2 = 1; the VE (EDM)
schedule keeps alpha = 1 and uses sigma itself as time. Each schedule only has to say how lambda depends on its
native time t and back; alpha and sigma follow from lambda in closed form, written with softplus so that they
stay finite in float32 at both ends. All maps are torch functions, differentiable in their argument, so a
learned time grid can be pushed through them.

Every schedule names three times in its native units:
- t_max: the noisiest time a sampler starts from (for flow matching t = 1 itself, where alpha = 0 and
  lambda = -inf: pure noise, where the pipelines start; `t_cap` is then the noisiest time of finite lambda);
- t_min: the usual last time of a sampler that stops just short of the data (sigma > 0);
- t_zero: the time of the clean data, sigma = 0 and lambda = +inf, the target of a final step "to zero".
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def log_alpha_sigma_vp(lam: Tensor) -> tuple[Tensor, Tensor]:
    """alpha^2 + sigma^2 = 1: alpha^2 = sigmoid(2 lambda), sigma^2 = sigmoid(-2 lambda)."""
    return -0.5 * F.softplus(-2 * lam), -0.5 * F.softplus(2 * lam)


def log_alpha_sigma_ve(lam: Tensor) -> tuple[Tensor, Tensor]:
    """alpha = 1, sigma = exp(-lambda)."""
    return torch.zeros_like(lam), -lam


def log_alpha_sigma_flow(lam: Tensor) -> tuple[Tensor, Tensor]:
    """alpha + sigma = 1 (rectified flow): alpha = sigmoid(lambda), sigma = sigmoid(-lambda)."""
    return -F.softplus(-lam), -F.softplus(lam)


# How alpha and sigma follow from lambda on each kind of forward path: softplus keeps them finite at both ends.
PATHS = {"vp": log_alpha_sigma_vp, "ve": log_alpha_sigma_ve, "flow": log_alpha_sigma_flow}


def check_params(kind: str, integer: bool = False, **bounds) -> None:
    """ValueError unless each parameter, name=(value, low, high), is a finite number (an int if `integer`) in
    [low, high]: a schedule built from a file or a command line is checked before anything computes with it."""
    for name, (value, lo, hi) in bounds.items():
        if not isinstance(value, int if integer else (int, float)) or isinstance(value, bool) \
                or not math.isfinite(value) or not lo <= value <= hi:
            raise ValueError(f"{kind} schedule: {name}={value!r} must be {'an integer' if integer else 'a number'} "
                             f"in [{lo}, {hi}]")


class NoiseSchedule:
    kind: str = ""
    path: str = "vp"  # a key of PATHS
    t_max: float
    t_min: float
    t_zero: float

    @property
    def t_cap(self) -> float:
        """The noisiest time of finite log-SNR: t_max itself, unless lambda(t_max) = -inf (alpha = 0, a flow
        schedule's t = 1), where grids spaced in lambda or sigma~ start their spacing instead (docs/solvers.md)."""
        return self.t_max

    # --- what a schedule defines -----------------------------------------------------------------------
    def lambda_(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError

    # --- what follows from lambda ----------------------------------------------------------------------
    def log_alpha_sigma(self, lam: Tensor) -> tuple[Tensor, Tensor]:
        """(log alpha, log sigma) at log-SNR lambda."""
        return PATHS[self.path](lam)

    def log_alpha(self, t: Tensor) -> Tensor:
        return self.log_alpha_sigma(self.lambda_(t))[0]

    def log_sigma(self, t: Tensor) -> Tensor:
        return self.log_alpha_sigma(self.lambda_(t))[1]

    def alpha(self, t: Tensor) -> Tensor:
        return self.log_alpha(t).exp()

    def sigma(self, t: Tensor) -> Tensor:
        return self.log_sigma(t).exp()

    def sigma_tilde(self, t: Tensor) -> Tensor:
        """sigma / alpha = exp(-lambda): the "sigma" of k-diffusion, diffusers' Euler/DPM classes and EDM."""
        return (-self.lambda_(t)).exp()

    def t_of_sigma_tilde(self, sigma_tilde: Tensor) -> Tensor:
        return self.t_of_lambda(-torch.log(sigma_tilde))

    def init_noise_std(self) -> float:
        """Standard deviation of the noise x_T a sampler starts from (diffusers' init_noise_sigma)."""
        return 1.0 if self.path == "vp" else float(self.sigma(torch.tensor(self.t_max, dtype=torch.float64)))

    def fingerprint(self) -> str:
        return repr(sorted(self.config().items()))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "kind")
        return f"{type(self).__name__}({args})"


def _vp_lambda_from_log_alpha(log_alpha: Tensor) -> Tensor:
    """lambda = log alpha - log sigma with sigma^2 = 1 - alpha^2 = -expm1(2 log alpha), exact where alpha -> 1.

    log alpha is clamped to <= 0 first: at t_zero it must be exactly 0 (lambda = +inf), and a formula that
    rounds it to +1e-20 there (or a time an ulp before t_zero) would otherwise make sigma^2 < 0 and lambda NaN."""
    log_alpha = log_alpha.clamp(max=0)
    return log_alpha - 0.5 * torch.log(-torch.expm1(2 * log_alpha))


class VPLinear(NoiseSchedule):
    """Continuous VP with linear beta(t) = beta_min + t (beta_max - beta_min), t in [0, 1] (ScoreSDE)."""

    kind = "vp_linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0):
        check_params(self.kind, beta_min=(beta_min, 1e-6, 1e3), beta_max=(beta_max, 1e-6, 1e3), t_min=(t_min, 0.0, 1.0),
                     t_max=(t_max, 1e-9, 1.0))
        if not (beta_min < beta_max and t_min < t_max):
            raise ValueError(f"{self.kind} schedule: needs beta_min < beta_max and t_min < t_max")
        self.beta_min, self.beta_max, self.t_min, self.t_max, self.t_zero = beta_min, beta_max, t_min, t_max, 0.0

    def lambda_(self, t):
        return _vp_lambda_from_log_alpha(-(self.beta_max - self.beta_min) * t**2 / 4 - self.beta_min * t / 2)

    def t_of_lambda(self, lam):
        # Positive root of the quadratic in t, in the cancellation-free form of the DPM-Solver paper.
        db = self.beta_max - self.beta_min
        tmp = 2 * db * torch.logaddexp(-2 * lam, torch.zeros_like(lam))
        return tmp / (torch.sqrt(self.beta_min**2 + tmp) + self.beta_min) / db

    def config(self):
        return dict(kind=self.kind, beta_min=self.beta_min, beta_max=self.beta_max, t_min=self.t_min, t_max=self.t_max)


class VPCosine(NoiseSchedule):
    """Continuous VP cosine schedule of iDDPM, alpha_bar(t) = cos^2((t+s)/(1+s) pi/2) / cos^2(s/(1+s) pi/2).

    t_max defaults to 0.9946 (as DPM-Solver does): lambda diverges as t -> 1."""

    kind = "vp_cosine"

    def __init__(self, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946):
        check_params(self.kind, s=(s, 1e-6, 1.0), t_min=(t_min, 0.0, 0.9999), t_max=(t_max, 1e-9, 0.9999))
        if not t_min < t_max:
            raise ValueError(f"{self.kind} schedule: needs t_min < t_max")
        self.s, self.t_min, self.t_max, self.t_zero = s, t_min, t_max, 0.0
        self._a = s / (1 + s) * math.pi / 2  # alpha = cos(a + d) / cos(a) with d = t / (1 + s) pi / 2

    def lambda_(self, t):
        # alpha - 1 = cos d - 1 - tan(a) sin d = -2 sin^2(d/2) - tan(a) sin d: no difference of two logarithms
        # (which need not cancel to exactly 0 at t = 0 when two math libraries round differently), exact at d = 0.
        d = t / (1 + self.s) * (math.pi / 2)
        return _vp_lambda_from_log_alpha(torch.log1p(-2 * torch.sin(d / 2) ** 2 - math.tan(self._a) * torch.sin(d)))

    def t_of_lambda(self, lam):
        # Invert cos(a + d) = alpha cos(a) for d without cancellation: with sigma^2 = 1 - alpha^2,
        # sin d = cos(a) sigma^2 / (sqrt(1 - alpha^2 cos^2 a) + alpha sin a), so t = 0 exactly where sigma = 0.
        log_alpha, log_sigma = log_alpha_sigma_vp(lam)
        alpha, sigma2 = log_alpha.exp(), (2 * log_sigma).exp()
        ca, sa = math.cos(self._a), math.sin(self._a)
        sin_d = ca * sigma2 / (torch.sqrt(1 - (alpha * ca) ** 2) + alpha * sa)
        return torch.asin(sin_d.clamp(max=1)) * (2 * (1 + self.s) / math.pi)

    def config(self):
        return dict(kind=self.kind, s=self.s, t_min=self.t_min, t_max=self.t_max)


# learnsteps' defaults for beta_start, beta_end when a DDPM schedule leaves them out: DDPM's for "linear", Stable
# Diffusion's for "scaled_linear". A schedule always records the values it resolved to, so that a diffusers
# scheduler is configured with them rather than with its own class defaults (0.0001 and 0.02 for every kind).
DEFAULT_BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}


def ddpm_betas(kind: str, n: int = 1000, beta_start: float | None = None, beta_end: float | None = None) -> Tensor:
    """The discrete beta tables exactly as diffusers defines them (in float64)."""
    if kind in DEFAULT_BETAS:
        start, end = (d if v is None else v for v, d in zip((beta_start, beta_end), DEFAULT_BETAS[kind]))
        if kind == "linear":
            return torch.linspace(start, end, n, dtype=torch.float64)
        return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    if kind in ("squaredcos_cap_v2", "cosine"):
        def alpha_bar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                            dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {kind!r}: expected 'linear', 'scaled_linear' or 'squaredcos_cap_v2'")


def interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation through (xp, fp), xp increasing; linear extrapolation outside.

    Differentiable in x (the segment index itself carries no gradient)."""
    xp, fp = xp.to(x), fp.to(x)
    i = torch.searchsorted(xp, x.detach().contiguous()).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


class DiscreteDDPM(NoiseSchedule):
    """A discrete DDPM schedule of n training steps, time = the model's timestep index in [0, n-1].

    Fractional timesteps follow the convention of k-diffusion (`DiscreteSchedule.t_to_sigma`/`sigma_to_t`) and
    diffusers (`_sigma_to_t`): between integer steps log sigma_tilde, i.e. lambda, is linear in t, so a sigma
    list handed to either peer maps to the same model times here. The clean data sits one step before index 0,
    at t_zero = -1; on [-1, 0] sigma_tilde itself is linear in t (from 0 to sigma_tilde_0), the only way to reach
    sigma = 0 at a finite time. A final step to t_zero is diffusers' final_sigmas_type="zero", one to t_min = 0
    is "sigma_min". (diffusers' `set_timesteps(N)` for Euler/Heun with fractional timesteps interpolates sigma
    linearly instead: hand it our sigmas, as learnsteps.interop does, rather than its own.)"""

    kind = "ddpm"

    def __init__(self, betas: str = "linear", n: int = 1000, beta_start: float | None = None,
                 beta_end: float | None = None):
        if betas not in ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine"):
            raise ValueError(f"unknown beta schedule {betas!r}: expected 'linear', 'scaled_linear' or "
                             f"'squaredcos_cap_v2'")
        check_params(self.kind, integer=True, n=(n, 2, 100_000))
        for name, v in (("beta_start", beta_start), ("beta_end", beta_end)):
            if v is not None:
                check_params(self.kind, **{name: (v, 1e-8, 0.999)})
        if betas in DEFAULT_BETAS:  # resolved, so that config() and every file written from it say what was used
            beta_start, beta_end = (d if v is None else v for v, d in zip((beta_start, beta_end), DEFAULT_BETAS[betas]))
        self.betas_kind, self.n, self.beta_start, self.beta_end = betas, n, beta_start, beta_end
        self.betas = ddpm_betas(betas, n, beta_start, beta_end)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)
        # lambda at the knots: -log sigma_tilde = (log alpha_bar - log(1 - alpha_bar)) / 2, increasing in t
        self._knots = torch.arange(n, dtype=torch.float64)
        self._lam = 0.5 * (torch.log(self.alphas_cumprod) - torch.log1p(-self.alphas_cumprod))
        self.t_max, self.t_min, self.t_zero = float(n - 1), 0.0, -1.0

    def lambda_(self, t):
        lam0 = self._lam[0].to(t)
        inner = interp(t.clamp(min=0), self._knots, self._lam)
        # on [-1, 0): sigma_tilde = (1 + t) sigma_tilde_0, so lambda = lambda_0 - log1p(t); +inf at t <= -1
        clean_end = lam0 - torch.log1p(t.clamp(-1, 0))
        return torch.where(t >= 0, inner, clean_end)

    def t_of_lambda(self, lam):
        lam0 = self._lam[0].to(lam)
        inner = interp(-lam.clamp(max=lam0), -self._lam, self._knots)
        return torch.where(lam <= lam0, inner, torch.expm1(lam0 - lam.clamp(min=lam0)))

    def config(self):
        return dict(kind=self.kind, betas=self.betas_kind, n=self.n, beta_start=self.beta_start,
                    beta_end=self.beta_end)


class EDM(NoiseSchedule):
    """The VE schedule in EDM's parameterization: alpha = 1 and time is sigma itself (t = sigma, lambda = -log t)."""

    kind = "edm"
    path = "ve"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        check_params(self.kind, sigma_min=(sigma_min, 1e-9, 1e6), sigma_max=(sigma_max, 1e-9, 1e6))
        if not sigma_min < sigma_max:
            raise ValueError(f"{self.kind} schedule: needs sigma_min < sigma_max")
        self.t_min, self.t_max, self.t_zero = sigma_min, sigma_max, 0.0

    def lambda_(self, t):
        return -torch.log(t.clamp(min=0))  # sigma = 0 (lambda = +inf) at and below t_zero = 0, never NaN

    def t_of_lambda(self, lam):
        return torch.exp(-lam)

    def config(self):
        return dict(kind=self.kind, sigma_min=self.t_min, sigma_max=self.t_max)


def shift_sigma(sigma, shift: float):
    """SD3's timestep shift sigma' = s sigma / (1 + (s - 1) sigma) (FLUX's exponential shift with mu is s = e^mu):
    in log-SNR a constant offset, lambda' = lambda - log s, so it moves a grid towards noise without reshaping it."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def unshift_sigma(sigma, shift: float):
    """The inverse of `shift_sigma`."""
    return sigma / (shift - (shift - 1) * sigma)


def dynamic_shift_mu(image_seq_len: int, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX-style resolution-dependent mu, linear in the number of latent tokens (the pipelines' calculate_shift);
    the shift is then e^mu."""
    slope = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    return image_seq_len * slope + base_shift - slope * base_image_seq_len


class FlowMatching(NoiseSchedule):
    """Rectified flow, x_t = (1 - t) x0 + t eps on t in [0, 1]: alpha = 1 - t, sigma = t, lambda = log((1 - t)/t).

    t is diffusers' flow "sigma"; the network sees t * n (FlowMatchEulerDiscreteScheduler's timesteps). `shift` is
    the sampler's timestep shift (SD3: 3.0; FLUX: e^mu): it does not change the forward process, only where the
    model's own default grid ("shifted") puts its points and the default t_min = shift(1/n).

    t_max defaults to 1, where the pipelines start (FlowMatchEulerDiscreteScheduler's first sigma): alpha = 0 and
    lambda = -inf there, a valid start for every data-form solver (x0 = x - t v is finite) and refused by the
    noise-form ones. Grids spaced in lambda or sigma~ space from t_cap = shift(1 - 1/n) (the last time of finite
    lambda on the training table, where diffusers' DPM-Solver and UniPC with flow sigmas start) and put their
    first point at 1. An explicit t_max < 1 (the previous default was shift(1 - 1/n)) is kept as it is."""

    kind = "flow"
    path = "flow"

    def __init__(self, shift: float = 1.0, n: int = 1000, t_min: float | None = None, t_max: float | None = None):
        check_params(self.kind, shift=(shift, 1e-3, 1e3))
        check_params(self.kind, integer=True, n=(n, 2, 100_000))
        t_min = shift_sigma(1 / n, shift) if t_min is None else t_min
        t_max = 1.0 if t_max is None else t_max
        check_params(self.kind, t_min=(t_min, 1e-9, 1 - 1e-9), t_max=(t_max, 1e-9, 1.0))
        if not t_min < t_max:
            raise ValueError(f"{self.kind} schedule: needs t_min < t_max")
        self.shift, self.n, self.t_min, self.t_max, self.t_zero = float(shift), n, float(t_min), float(t_max), 0.0
        if not self.t_min < self.t_cap:
            raise ValueError(f"{self.kind} schedule: needs t_min = {self.t_min} below t_cap = shift(1 - 1/n) = "
                             f"{self.t_cap}, the noisiest time of finite log-SNR")

    @property
    def t_cap(self) -> float:
        return self.t_max if self.t_max < 1 else float(shift_sigma(1 - 1 / self.n, self.shift))

    def lambda_(self, t):
        t = t.clamp(0, 1)  # sigma = 0 (lambda = +inf) at and below t_zero, alpha = 0 (lambda = -inf) at 1: never NaN
        return torch.log1p(-t) - torch.log(t)

    def t_of_lambda(self, lam):
        return torch.sigmoid(-lam)

    def config(self):
        return dict(kind=self.kind, shift=self.shift, n=self.n, t_min=self.t_min, t_max=self.t_max)


SCHEDULES = {cls.kind: cls for cls in (VPLinear, VPCosine, DiscreteDDPM, EDM, FlowMatching)}


def make_schedule(kind: str | None = None, **params) -> NoiseSchedule:
    """Build a noise schedule from its kind and parameters (the inverse of `schedule.config()`)."""
    if not isinstance(kind, str) or kind not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {kind!r}: expected one of {sorted(SCHEDULES)}")
    try:
        return SCHEDULES[kind](**params)
    except TypeError as err:  # a parameter the schedule does not have
        raise ValueError(f"{kind} schedule: {err}") from None

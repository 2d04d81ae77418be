"""Noise schedules: alpha(t), sigma(t) and the half log-SNR lambda(t) = log alpha - log sigma, with t(lambda).

The forward process is x_t = alpha_t x_0 + sigma_t eps. VP schedules keep alpha^2 + sigma^2 = 1; the VE (EDM)
schedule keeps alpha = 1 and uses sigma itself as time. Each schedule only has to say how lambda depends on its
native time t and back; alpha and sigma follow from lambda in closed form, written with softplus so that they
stay finite in float32 at both ends. All maps are torch functions, differentiable in their argument, so a
learned time grid can be pushed through them.

Every schedule names three times in its native units:
- t_max: the noisiest time a sampler starts from;
- t_min: the usual last time of a sampler that stops just short of the data (sigma > 0);
- t_zero: the time of the clean data, sigma = 0 and lambda = +inf, the target of a final step "to zero".
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


class NoiseSchedule:
    kind: str = ""
    vp: bool = True
    t_max: float
    t_min: float
    t_zero: float

    # --- what a schedule defines -----------------------------------------------------------------------
    def lambda_(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError

    # --- what follows from lambda ----------------------------------------------------------------------
    def log_alpha(self, t: Tensor) -> Tensor:
        lam = self.lambda_(t)
        return -0.5 * F.softplus(-2 * lam) if self.vp else torch.zeros_like(lam)

    def log_sigma(self, t: Tensor) -> Tensor:
        lam = self.lambda_(t)
        return -0.5 * F.softplus(2 * lam) if self.vp else -lam

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
        return 1.0 if self.vp else float(self.sigma(torch.tensor(self.t_max, dtype=torch.float64)))

    def fingerprint(self) -> str:
        return repr(sorted(self.config().items()))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "kind")
        return f"{type(self).__name__}({args})"


def _vp_lambda_from_log_alpha(log_alpha: Tensor) -> Tensor:
    # sigma^2 = 1 - alpha^2 = -expm1(2 log alpha): exact near t = 0 where alpha -> 1.
    return log_alpha - 0.5 * torch.log(-torch.expm1(2 * log_alpha))


def _vp_log_alpha_from_lambda(lam: Tensor) -> Tensor:
    return -0.5 * F.softplus(-2 * lam)


class VPLinear(NoiseSchedule):
    """Continuous VP with linear beta(t) = beta_min + t (beta_max - beta_min), t in [0, 1] (ScoreSDE)."""

    kind = "vp_linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0):
        self.beta_min, self.beta_max, self.t_min, self.t_max, self.t_zero = beta_min, beta_max, t_min, t_max, 0.0

    def lambda_(self, t):
        log_alpha = -(self.beta_max - self.beta_min) * t**2 / 4 - self.beta_min * t / 2
        return _vp_lambda_from_log_alpha(log_alpha)

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
        self.s, self.t_min, self.t_max, self.t_zero = s, t_min, t_max, 0.0
        self._log_alpha_0 = math.log(math.cos(s / (1 + s) * math.pi / 2))

    def lambda_(self, t):
        log_alpha = torch.log(torch.cos((t + self.s) / (1 + self.s) * math.pi / 2)) - self._log_alpha_0
        return _vp_lambda_from_log_alpha(log_alpha)

    def t_of_lambda(self, lam):
        log_alpha = _vp_log_alpha_from_lambda(lam)
        return 2 * (1 + self.s) / math.pi * torch.arccos(torch.exp(log_alpha + self._log_alpha_0)) - self.s

    def config(self):
        return dict(kind=self.kind, s=self.s, t_min=self.t_min, t_max=self.t_max)


def ddpm_betas(kind: str, n: int = 1000, beta_start: float | None = None, beta_end: float | None = None) -> Tensor:
    """The discrete beta tables exactly as diffusers defines them (in float64)."""
    if kind == "linear":
        return torch.linspace(beta_start or 1e-4, beta_end or 0.02, n, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace((beta_start or 0.00085) ** 0.5, (beta_end or 0.012) ** 0.5, n, dtype=torch.float64) ** 2
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

    Between integer steps sigma_tilde = sqrt((1 - alpha_bar)/alpha_bar) is linear in t, exactly as diffusers'
    Euler/Heun schedulers interpolate it, so fractional timesteps mean the same thing here and there. The clean
    data sits one step before index 0, at t_zero = -1, where the interpolation reaches sigma_tilde = 0: a final
    step to t_zero is diffusers' final_sigmas_type="zero", one to t_min = 0 is "sigma_min"."""

    kind = "ddpm"

    def __init__(self, betas: str = "linear", n: int = 1000, beta_start: float | None = None,
                 beta_end: float | None = None):
        self.betas_kind, self.n, self.beta_start, self.beta_end = betas, n, beta_start, beta_end
        self.betas = ddpm_betas(betas, n, beta_start, beta_end)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)
        sigma_tilde = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self._knots = torch.arange(-1, n, dtype=torch.float64)
        self._sigma_tilde = torch.cat([torch.zeros(1, dtype=torch.float64), sigma_tilde])
        self.t_max, self.t_min, self.t_zero = float(n - 1), 0.0, -1.0

    def sigma_tilde(self, t):
        return interp(t, self._knots, self._sigma_tilde)

    def lambda_(self, t):
        return -torch.log(self.sigma_tilde(t))

    def t_of_lambda(self, lam):
        return interp(torch.exp(-lam), self._sigma_tilde, self._knots)

    def config(self):
        return dict(kind=self.kind, betas=self.betas_kind, n=self.n, beta_start=self.beta_start,
                    beta_end=self.beta_end)


class EDM(NoiseSchedule):
    """The VE schedule in EDM's parameterization: alpha = 1 and time is sigma itself (t = sigma, lambda = -log t)."""

    kind = "edm"
    vp = False

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.t_min, self.t_max, self.t_zero = sigma_min, sigma_max, 0.0

    def lambda_(self, t):
        return -torch.log(t)

    def t_of_lambda(self, lam):
        return torch.exp(-lam)

    def config(self):
        return dict(kind=self.kind, sigma_min=self.t_min, sigma_max=self.t_max)


SCHEDULES = {cls.kind: cls for cls in (VPLinear, VPCosine, DiscreteDDPM, EDM)}


def make_schedule(kind: str, **params) -> NoiseSchedule:
    """Build a noise schedule from its kind and parameters (the inverse of `schedule.config()`)."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {kind!r}: expected one of {sorted(SCHEDULES)}")
    return SCHEDULES[kind](**params)

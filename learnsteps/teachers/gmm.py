"""Exact teachers: Gaussian-mixture data, whose denoiser E[x0 | x_t] is closed form.

With x0 ~ sum_k pi_k N(mu_k, S_k) and x_t = alpha x0 + sigma eps, the noisy marginal is a mixture of
N(alpha mu_k, alpha^2 S_k + sigma^2 I), and in the eigenbasis S_k = U_k diag(s_k) U_k^T

    E[x0 | x_t, k] = mu_k + U_k diag(alpha s_k / (alpha^2 s_k + sigma^2)) U_k^T (x_t - alpha mu_k),

weighted by the posterior responsibilities of the components. The embedded default teacher is a mixture fitted
to scikit-learn's 8x8 digits (scaled to [-1, 1], shaped 1x8x8) and shipped in learnsteps/assets; it needs no
training and no download. Reproduce the asset with `python -m learnsteps.teachers.gmm`.
"""
from __future__ import annotations

import hashlib
import math
from importlib import resources

import torch
from torch import Tensor

from ..core.denoiser import Denoiser, per_sample
from ..core.schedules import NoiseSchedule, VPLinear
from ..files import read_safetensors, write_safetensors

DIGITS_ASSET = "gmm_digits.safetensors"


class GaussianMixture(Denoiser):
    """Exact x0-predicting denoiser of a Gaussian mixture with full covariances (float64 buffers)."""

    prediction = "x0"

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor, noise_schedule: NoiseSchedule | None = None,
                 shape: tuple[int, ...] | None = None):
        super().__init__()
        weights, means, covs = (torch.as_tensor(a, dtype=torch.float64) for a in (weights, means, covs))
        k, d = means.shape
        if weights.shape != (k,) or covs.shape != (k, d, d):
            raise ValueError(f"mixture shapes disagree: weights {tuple(weights.shape)}, means {tuple(means.shape)}, "
                             f"covs {tuple(covs.shape)}")
        evals, evecs = torch.linalg.eigh(covs)
        if evals.min() <= 0:
            raise ValueError("every covariance must be positive definite (add a floor to its eigenvalues)")
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))
        self.register_buffer("means", means)
        self.register_buffer("evals", evals)
        self.register_buffer("evecs", evecs)
        self.noise_schedule = noise_schedule or VPLinear()
        self.shape = tuple(shape) if shape is not None else (d,)
        if math.prod(self.shape) != d:
            raise ValueError(f"shape {self.shape} does not hold {d} dimensions")

    @property
    def covs(self) -> Tensor:
        return self.evecs @ torch.diag_embed(self.evals) @ self.evecs.transpose(-1, -2)

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        flat = x.reshape(x.shape[0], -1)
        alpha = per_sample(self.noise_schedule.alpha(t), flat)[..., None]  # (B|1, 1, 1)
        sigma = per_sample(self.noise_schedule.sigma(t), flat)[..., None]
        mu, s, u = (b.to(x) for b in (self.means, self.evals, self.evecs))
        y = torch.einsum("bkd,kde->bke", flat[:, None] - alpha * mu, u)  # coordinates in each eigenbasis
        var = alpha**2 * s + sigma**2
        log_p = self.log_weights.to(x) - 0.5 * (torch.log(var) + y**2 / var).sum(-1)
        resp = torch.softmax(log_p, dim=-1)  # (B, K)
        shrink = alpha * s / var * y
        x0 = mu + torch.einsum("bke,kde->bkd", shrink, u)
        return torch.einsum("bk,bkd->bd", resp, x0).reshape(x.shape)

    def log_prob(self, x: Tensor, t: Tensor) -> Tensor:
        """log p_t(x) of the noisy marginal at time t (per sample); its gradient gives the score."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        flat = x.reshape(x.shape[0], -1)
        alpha = per_sample(self.noise_schedule.alpha(t), flat)[..., None]
        sigma = per_sample(self.noise_schedule.sigma(t), flat)[..., None]
        mu, s, u = (b.to(x) for b in (self.means, self.evals, self.evecs))
        y = torch.einsum("bkd,kde->bke", flat[:, None] - alpha * mu, u)
        var = alpha**2 * s + sigma**2
        log_p = self.log_weights.to(x) - 0.5 * (torch.log(2 * math.pi * var) + y**2 / var).sum(-1)
        return torch.logsumexp(log_p, -1)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw n samples of x0 (float64)."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        x = self.means[k] + torch.einsum("bde,be->bd", self.evecs[k], self.evals[k].sqrt() * z)
        return x.reshape(n, *self.shape)

    def exact_flow(self, x: Tensor, t_from: Tensor, t_to: Tensor) -> Tensor:
        """The closed-form probability-flow ODE map from time t_from to t_to; single-Gaussian mixtures only.

        The ODE is linear then: each eigen-coordinate of x - alpha mu scales by the ratio of marginal stds."""
        if self.means.shape[0] != 1:
            raise ValueError("the probability-flow ODE has a closed form only for a single Gaussian")
        sched = self.noise_schedule
        t_from, t_to = (torch.as_tensor(v, dtype=x.dtype) for v in (t_from, t_to))
        a0, s0, a1, s1 = sched.alpha(t_from), sched.sigma(t_from), sched.alpha(t_to), sched.sigma(t_to)
        mu, ev, u = self.means[0].to(x), self.evals[0].to(x), self.evecs[0].to(x)
        y = (x.reshape(x.shape[0], -1) - a0 * mu) @ u
        scale = torch.sqrt((a1**2 * ev + s1**2) / (a0**2 * ev + s0**2))
        return (a1 * mu + (scale * y) @ u.T).reshape(x.shape)

    def fingerprint(self) -> str:
        """sha256 of the mixture's parameters, shape and noise schedule."""
        h = hashlib.sha256()
        for b in (self.log_weights, self.means, self.evals, self.evecs):
            h.update(b.detach().cpu().contiguous().numpy().tobytes())
        h.update(repr((self.shape, self.noise_schedule.fingerprint())).encode())
        return h.hexdigest()


def digits_data(dtype=torch.float64) -> Tensor:
    """scikit-learn's 1,797 8x8 digits, scaled from 0..16 to [-1, 1], shape (1797, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    x = torch.as_tensor(load_digits().data, dtype=dtype)
    return (x / 8 - 1).reshape(-1, 1, 8, 8)


def fit_digits_mixture(components: int = 20, reg_covar: float = 1e-3, seed: int = 0) -> dict[str, Tensor]:
    """Fit the full-covariance mixture to the digits (scikit-learn EM). reg_covar floors every variance so that
    the constant border pixels do not make a covariance singular."""
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    x = digits_data().reshape(-1, 64).numpy()
    gm = SkGaussianMixture(components, covariance_type="full", reg_covar=reg_covar, random_state=seed,
                           max_iter=500, n_init=2).fit(x)
    return {"weights": torch.as_tensor(gm.weights_), "means": torch.as_tensor(gm.means_),
            "covs": torch.as_tensor(gm.covariances_)}


def gmm_digits(noise_schedule: NoiseSchedule | None = None) -> GaussianMixture:
    """The embedded default exact teacher: the shipped mixture fit of the 8x8 digits, as 1x8x8 images."""
    with resources.as_file(resources.files("learnsteps.assets") / DIGITS_ASSET) as path:
        p = read_safetensors(path)
    return GaussianMixture(p["weights"], p["means"], p["covs"], noise_schedule, shape=(1, 8, 8))


def gaussian(dim: int = 8, seed: int = 0, noise_schedule: NoiseSchedule | None = None) -> GaussianMixture:
    """A single Gaussian with a random full covariance: its ODE has a closed form (exact_flow)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5
    cov = a @ a.T + 0.05 * torch.eye(dim, dtype=torch.float64)
    mean = torch.randn(dim, generator=g, dtype=torch.float64) * 0.5
    return GaussianMixture(torch.ones(1), mean[None], cov[None], noise_schedule)


def toy_mixture(dim: int = 6, components: int = 3, seed: int = 1,
                noise_schedule: NoiseSchedule | None = None) -> GaussianMixture:
    """A small mixture of broad, overlapping Gaussians: a non-linear but smooth probability-flow ODE, the
    teacher on which solvers show their asymptotic convergence orders at moderate step counts."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(components, dim, dim, generator=g, dtype=torch.float64) / dim**0.5
    covs = 0.3 * a @ a.transpose(-1, -2) + 0.2 * torch.eye(dim, dtype=torch.float64)
    means = 0.8 * torch.randn(components, dim, generator=g, dtype=torch.float64)
    weights = torch.arange(components, 0, -1, dtype=torch.float64)
    return GaussianMixture(weights, means, covs, noise_schedule)


def main() -> None:
    """Refit the digits mixture and write the shipped asset (python -m learnsteps.teachers.gmm)."""
    import argparse
    from pathlib import Path

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--components", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / DIGITS_ASSET)
    args = ap.parse_args()
    params = fit_digits_mixture(args.components)
    write_safetensors(args.out, params)
    print(f"wrote {args.out} ({args.components} components)")


if __name__ == "__main__":
    main()

"""A minimal stand-in of what ComfyUI does with a SIGMAS list and a SAMPLER, for CI (which has no ComfyUI).

It reproduces the conventions recorded from ComfyUI's own code in tests/fixtures/comfyui_conventions.json by
benchmarks/comfyui.py, and tests/test_comfyui.py checks it against that record (tables, timestep rounding, noise
scaling, and each recorded run's output), so it cannot drift from ComfyUI unnoticed:

- a model_sampling composed of a sampling class and a prediction class, named as ComfyUI names them
  (ModelSamplingDiscrete / ModelSamplingDiscreteFlow with EPS / CONST), which learnsteps' nodes identify it by;
- discrete models: a float32 table of sigma~ at the whole timesteps, the network called at the nearest whole
  timestep (in log sigma) on x_c / sqrt(sigma^2 + 1), x0 = x_c - sigma eps; flow models: the network at
  t * multiplier on x_c itself, x0 = x_c - sigma v;
- SamplerCustom's start: noise * sqrt(1 + sigma^2) when sigmas[0] is the model's sigma_max (relative 1e-5) or
  above, else noise * sigma (discrete); sigma * noise (flow); the result divided by 1 - sigma_last (flow);
- the sampler called as fn(model, x, sigmas, extra_args, callback, disable) with `model.inner_model.inner_model`
  the model whose model_sampling is used.
"""
from __future__ import annotations

import math

import torch


def _shape(sigma, x):
    return sigma.reshape(()) if sigma.numel() == 1 else sigma.reshape(-1, *[1] * (x.dim() - 1))


class EPS:
    def calculate_input(self, sigma, x):
        return x / (_shape(sigma, x) ** 2 + 1) ** 0.5

    def calculate_denoised(self, sigma, out, x):
        return x - out * _shape(sigma, out)

    def noise_scaling(self, sigma, noise, latent, max_denoise=False):
        s = _shape(sigma, noise)
        return noise * ((1 + s**2) ** 0.5 if max_denoise else s) + latent

    def inverse_noise_scaling(self, sigma, x):
        return x


class CONST:
    def calculate_input(self, sigma, x):
        return x

    def calculate_denoised(self, sigma, out, x):
        return x - out * _shape(sigma, out)

    def noise_scaling(self, sigma, noise, latent, max_denoise=False):
        s = _shape(sigma, noise)
        return s * noise + (1 - s) * latent

    def inverse_noise_scaling(self, sigma, x):
        return x / (1 - _shape(sigma, x))


class ModelSamplingDiscrete(torch.nn.Module):
    """sigma~ of a scaled-linear beta table ("linear" in ComfyUI's words), stored in float32."""

    def __init__(self, beta_start=0.00085, beta_end=0.012, n=1000):
        super().__init__()
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
        abar = torch.cumprod(1 - betas, 0)
        sigmas = ((1 - abar) / abar) ** 0.5
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())
        self.sigma_data = 1.0

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        return (sigma.log()[None] - self.log_sigmas[:, None]).abs().argmin(0).view(sigma.shape)


class ModelSamplingDiscreteFlow(torch.nn.Module):
    def __init__(self, shift=3.0, multiplier=1000):
        super().__init__()
        self.shift, self.multiplier = shift, multiplier

    @property
    def sigma_max(self):
        return torch.tensor(1.0)  # shift(t) at t = 1

    def timestep(self, sigma):
        return sigma * self.multiplier


def model_sampling(flow: bool, **kw):
    base, prediction = (ModelSamplingDiscreteFlow, CONST) if flow else (ModelSamplingDiscrete, EPS)
    return type("ModelSampling", (base, prediction), {})(**kw)


class BaseModel(torch.nn.Module):
    """The model: network input, timestep and x0 as its model_sampling says; `calls` records the timesteps."""

    def __init__(self, model_sampling, net):
        super().__init__()
        self.model_sampling, self.net, self.calls = model_sampling, net, []

    def apply_model(self, x, sigma):
        ms = self.model_sampling
        t = ms.timestep(sigma).float()
        self.calls.append(t.double().tolist())
        out = self.net(ms.calculate_input(sigma, x).float(), t).float()
        return ms.calculate_denoised(sigma, out, x)


class _Guider:  # CFGGuider at cfg 1: the model's prediction for the positive condition
    def __init__(self, base):
        self.inner_model = base

    def __call__(self, x, sigma, model_options=None, seed=None):
        return self.inner_model.apply_model(x, sigma)


class _Denoiser:  # KSamplerX0Inpaint without a mask: what a sampler function is handed as `model`
    def __init__(self, base):
        self.inner_model = _Guider(base)

    def __call__(self, x, sigma, denoise_mask=None, model_options=None, seed=None):
        return self.inner_model(x, sigma, model_options, seed)


def sample_custom(base: BaseModel, sampler_function, noise, sigmas, callback=None):
    """SamplerCustom with an empty latent and cfg 1: noise scaling, the sampler function, inverse noise scaling."""
    ms = base.model_sampling
    s0, top = float(sigmas[0]), float(ms.sigma_max)
    max_denoise = math.isclose(top, s0, rel_tol=1e-5) or s0 > top
    x = ms.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise)
    extra_args = {"model_options": {}, "seed": 0, "denoise_mask": None}
    out = sampler_function(_Denoiser(base), x, sigmas, extra_args=extra_args, callback=callback, disable=True)
    return ms.inverse_noise_scaling(sigmas[-1], out)

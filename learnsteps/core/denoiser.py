"""One interface for every diffusion model: a Denoiser knows its noise schedule and what its network predicts.

`denoiser(x, t)` returns the network's own output; `.x0(x, t)` and `.eps(x, t)` return the data and noise
predictions that the solvers' data and noise forms need (sec. 0 of docs/solvers.md), converted exactly:

    epsilon:  x0 = (x - sigma eps) / alpha
    x0:       eps = (x - alpha x0) / sigma
    v:        v = alpha eps - sigma x0,  so x0 = alpha x - sigma v and eps = sigma x + alpha v
    edm:      the network is D(x~; sigma~) on x~ = x / alpha, sigma~ = sigma / alpha, and D = x0
    flow:     the velocity v = dx/dt = eps - x0 of rectified flow (alpha + sigma = 1), so x0 = x - sigma v and
              eps = x + alpha v; written divided by alpha + sigma, the same numbers on the flow path
              (diffusers' "flow_prediction")

x is the VP state (for the EDM schedule alpha = 1 and x = x~). t is a tensor of the schedule's native times, one
per sample (shape (B,)) or one for all (shape ()).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .schedules import NoiseSchedule

PREDICTIONS = ("epsilon", "x0", "v", "edm", "flow")
# what a schedule file records of its teacher's prediction: diffusers' prediction_type where it has one
PREDICTION_TYPES = {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction", "flow": "flow_prediction", "edm": "edm"}


def per_sample(v: Tensor, x: Tensor) -> Tensor:
    """Broadcast a () or (B,) tensor of per-sample values against x of shape (B, ...)."""
    return v.reshape(v.shape + (1,) * (x.dim() - v.dim())) if v.dim() else v


def dtype_of(module: nn.Module) -> torch.dtype:
    """The floating dtype a module computes in (its first parameter's, else its first buffer's; float32 if none):
    the dtype to give its inputs, e.g. float64 for the exact mixtures. A teacher whose network runs in half
    precision says `state_dtype` (float32): the sampler's states and arithmetic stay there."""
    if getattr(module, "state_dtype", None) is not None:
        return module.state_dtype
    for t in list(module.parameters())[:1] + list(module.buffers())[:1]:
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def device_of(module: nn.Module) -> torch.device:
    """The device a module computes on (its first parameter's or buffer's; the CPU if it has none)."""
    for t in list(module.parameters())[:1] + list(module.buffers())[:1]:
        return t.device
    return torch.device("cpu")


class Denoiser(nn.Module):
    """Base class: subclasses set `noise_schedule` and `prediction` and implement `forward(x, t, cond=None)`."""

    noise_schedule: NoiseSchedule
    prediction: str = "epsilon"

    def _alpha_sigma(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        s = self.noise_schedule
        return per_sample(s.alpha(t), x), per_sample(s.sigma(t), x)

    def record(self, steps: int | None = None) -> dict:
        """What a schedule file records of the teacher it was made for, besides its fingerprint and name: the
        prediction type, in diffusers' words (a pipeline must run the file with it); `steps`: the file's steps
        (a pipeline teacher records the size-dependent shift its scheduler computes for them)."""
        return dict(prediction_type=PREDICTION_TYPES[self.prediction])

    def x0(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        return convert(self(x, t, cond), self.prediction, "x0", x, *self._alpha_sigma(x, t))

    def eps(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        return convert(self(x, t, cond), self.prediction, "eps", x, *self._alpha_sigma(x, t))


class EpsilonNetwork(nn.Module):
    """A denoiser seen as a user's epsilon network net(x, t) at its native time: the form that diffusers'
    schedulers and k-diffusion's wrappers take, so that peers can be run on a model whose outputs we know."""

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.denoiser.eps(x, t)


class VelocityNetwork(EpsilonNetwork):
    """A denoiser seen as a flow-matching network v(x, t) = eps - x0 (diffusers' "flow_prediction")."""

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.denoiser.eps(x, t) - self.denoiser.x0(x, t)


def convert(out: Tensor, prediction: str, want: str, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """A network output of type `prediction` at state x (VP, with alpha and sigma) as x0 or eps (`want`)."""
    if want == "x0":
        if prediction in ("x0", "edm"):
            return out
        if prediction == "flow":
            return (x - sigma * out) / (alpha + sigma)
        return (x - sigma * out) / alpha if prediction == "epsilon" else alpha * x - sigma * out
    if prediction == "epsilon":
        return out
    if prediction == "flow":
        return (x + alpha * out) / (alpha + sigma)
    return sigma * x + alpha * out if prediction == "v" else (x - alpha * out) / sigma


class NetworkDenoiser(Denoiser):
    """Wrap a plain network `net(x, t[, cond])` whose output is `prediction` under `noise_schedule`.

    For prediction="edm" the network is called as net(x / alpha, sigma / alpha[, cond]) and returns D = x0."""

    def __init__(self, net: nn.Module, noise_schedule: NoiseSchedule, prediction: str = "epsilon"):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {prediction!r}: expected one of {PREDICTIONS}")
        self.net, self.noise_schedule, self.prediction = net, noise_schedule, prediction

    def forward(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        args = (cond,) if cond is not None else ()
        if self.prediction == "edm":
            alpha = per_sample(self.noise_schedule.alpha(t), x)
            return self.net(x / alpha, self.noise_schedule.sigma_tilde(t), *args)
        return self.net(x, t, *args)


# The classifier-free guidance scales learnsteps takes: [0, MAX_GUIDANCE]. Pipelines are run at 1-15 (SD 7.5, DiT 4,
# SD3 7, FLUX 3.5) and ComfyUI's KSampler stops at 100; far beyond, the guided output is scale x (cond - uncond)
# and the samples blow up instead of saturating (docs/reliability.md).
MAX_GUIDANCE = 100.0


def guided(net, x: Tensor, t: Tensor, cond: Tensor, null: Tensor, scale: float, combine=None) -> Tensor:
    """Classifier-free guidance, uncond + scale (cond - uncond), with net(x, t, c) called once on a batch of 2B.

    The combination has weights summing to one, so guiding eps, x0, v or a flow velocity gives the same sampler.
    `combine(cond_out, uncond_out, scale)`: a pipeline's own combination instead (a rescaled CFG), applied to the
    network's outputs as the pipeline applies it."""
    t = t.expand(x.shape[0])
    out_c, out_u = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null])).chunk(2)
    return out_u + scale * (out_c - out_u) if combine is None else combine(out_c, out_u, scale)


class ClassifierFreeGuidance(Denoiser):
    """A denoiser guided with `scale`; `null_cond` is what the model takes as "no condition" (e.g. the extra
    class index)."""

    def __init__(self, denoiser: Denoiser, scale: float, null_cond):
        super().__init__()
        self.inner, self.scale, self.null_cond = denoiser, scale, null_cond
        self.noise_schedule, self.prediction = denoiser.noise_schedule, denoiser.prediction

    def forward(self, x, t, cond=None):
        if cond is None:
            raise ValueError("classifier-free guidance needs a condition: pass cond=")
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        null = torch.as_tensor(self.null_cond, device=cond.device, dtype=cond.dtype).expand_as(cond)
        return guided(self.inner, x, t, cond, null, self.scale)

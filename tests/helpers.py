"""Shared test fixtures: small exact teachers and the reference solution they are measured against."""
import torch

from learnsteps.core.denoiser import Denoiser

F64 = torch.float64


class CountingDenoiser(Denoiser):
    """Wraps a denoiser and records every forward call's times (to count NFE and check evaluation times)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.noise_schedule, self.prediction = inner, inner.noise_schedule, inner.prediction
        self.calls = []

    def forward(self, x, t, cond=None):
        self.calls.append(torch.as_tensor(t).detach().reshape(-1)[0].item())
        return self.inner(x, t, cond)


def noise(shape, seed=0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))

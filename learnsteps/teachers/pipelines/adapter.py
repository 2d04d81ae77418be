"""What a diffusers pipeline family has to say to be a teacher: one `PipelineNet` subclass per family.

A family adapter is the family's network call, written once, as our core calls a network: `net(x, t, c)` with x
our state (the VAE's latents, (B, C, H, W) for images, (B, C, F, H, W) for video; packing into tokens happens
inside the call), t our time (a flow model's t in [0, 1], a DDPM model's timestep index) and c the condition
index of each sample into the adapter's condition tables (the last row is the unconditional / negative input).
Its class methods say how the pipeline's own code builds what the call needs (`encode`: the pipeline's own
encode_prompt into tables; `latent_shape`: the latents for a height, width and frame count; `mu`: the
resolution-dependent shift), and `decode` how latents become pixels. The instance holds the network and the
tables and nothing else of the pipeline (its text encoders are gone after `encode`), so that another module
(a DSNO student on the teacher's own backbone) reuses the call as it is. docs/pipelines.md: how to add a family.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

FAMILIES: dict[str, type["PipelineNet"]] = {}  # diffusers pipeline class name -> its adapter


class FamilyError(ValueError):
    """A pipeline, size or option that the family cannot take; the message says what to use instead."""


def register(cls: type["PipelineNet"]) -> type["PipelineNet"]:
    for name in cls.pipelines:
        FAMILIES[name] = cls
    return cls


def call_default(pipe, name: str, fallback=None):
    """The default of `name` in the pipeline's own __call__ (what a user's `pipe(prompt)` runs with), e.g. the
    max_sequence_length its prompts are padded to."""
    p = inspect.signature(type(pipe).__call__).parameters.get(name)
    return fallback if p is None or p.default is inspect.Parameter.empty else p.default


class PipelineNet(nn.Module):
    """A pipeline family's network called as net(x, t, c); see the module docstring. Subclasses set the class
    attributes and implement `call` and `encode` (and whatever of the rest their pipeline does differently)."""

    pipelines: tuple[str, ...] = ()  # the diffusers pipeline classes this adapter serves
    summary = ""  # one line: the network, its conditions and its prediction, for messages and docs
    denoiser = "transformer"  # the pipeline attribute that holds the network
    class_conditional = False  # conditions are class labels (else prompts)
    true_cfg = False  # CFG is the pipeline's `true_cfg_scale` (a second pass with a negative prompt), not guidance
    guidance_input = False  # guidance is the network's input where its config says `guidance_embeds` (distilled)
    sigma_timestep = False  # a flow network takes t itself (FLUX: timestep / 1000), not t * num_train_timesteps
    timestep_in_network_dtype = False  # the pipeline casts the timestep to the latents' dtype (FLUX), not float32
    size_keys = ("height", "width")  # frames too for video
    multiple = 8  # height and width: multiples of this (vae_scale_factor, times 2 where latents are packed)

    def __init__(self, net: nn.Module, tables: dict[str, Tensor], shape: tuple[int, ...], timestep_scale: float = 1.0,
                 guidance: float | None = None, guidance_rescale: float = 0.0):
        super().__init__()
        self.net, self.shape, self.timestep_scale = net, tuple(shape), float(timestep_scale)
        self.guidance, self.guidance_rescale = guidance, float(guidance_rescale)  # guidance: an embedded input
        dtype = self.dtype
        for name, table in tables.items():  # embeddings in the network's dtype, as the pipelines cast them
            self.register_buffer(name, table.to(dtype) if table.is_floating_point() else table)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    # ---- the network call ----------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        """The network's output at our state x and time t for condition indices c, in x's layout and dtype (a
        learned variance, if any, dropped: not the ODE's business)."""
        dtype = self.dtype
        timestep = (t * self.timestep_scale).to(dtype if self.timestep_in_network_dtype else torch.float32)
        out = self.call(x.to(dtype), timestep.expand(len(x)), c)
        return out[:, : x.shape[1]].to(x.dtype)

    def call(self, x: Tensor, timestep: Tensor, c: Tensor) -> Tensor:
        """The pipeline's own network call on x (network dtype) at the network's timestep, rows c of the tables."""
        raise NotImplementedError

    def embedded_guidance(self, n: int, like: Tensor) -> Tensor | None:
        """A guidance-distilled model's guidance input (B,), float32 as the pipelines pass it; None without."""
        return None if self.guidance is None else torch.full((n,), self.guidance, dtype=torch.float32,
                                                             device=like.device)

    def combine(self, cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
        """Classifier-free guidance as the pipeline combines its two outputs: uncond + scale (cond - uncond), then
        (guidance_rescale > 0, SD / SDXL) rescaled towards the conditional output's std (Lin et al. 2024, 3.4)."""
        out = uncond + scale * (cond - uncond)
        if self.guidance_rescale > 0:
            from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

            out = rescale_noise_cfg(out, cond, guidance_rescale=self.guidance_rescale)
        return out

    # ---- set-up from the pipeline (the pipeline is not kept) ------------------------------------------------
    @classmethod
    def default_size(cls, pipe) -> dict[str, int]:
        """The pixel size a plain `pipe(prompt)` samples at."""
        s = pipe.default_sample_size * pipe.vae_scale_factor
        return dict(height=s, width=s)

    @classmethod
    def latent_shape(cls, pipe, size: dict[str, int]) -> tuple[int, ...]:
        """Our state's shape (C, H, W) for a pixel size, as the pipeline's prepare_latents makes it."""
        f = pipe.vae_scale_factor
        return (getattr(pipe, cls.denoiser).config.in_channels, size["height"] // f, size["width"] // f)

    def mu(self, scheduler_config: dict, steps: int) -> float | None:
        """The shift parameter mu the pipeline hands its scheduler at this adapter's latent shape for `steps`
        steps, computed by the pipeline's own function; None where the scheduler does not shift with the size."""
        return None

    @classmethod
    def encode(cls, pipe, prompts: list[str], negative: str | None, length: int | None) -> dict[str, Tensor]:
        """The condition tables: the pipeline's own encode_prompt of the prompts (rows 0..K-1) and of the negative
        prompt (row K; None: the pipeline's own default when no negative prompt is given), padded or cut to the
        pipeline's max_sequence_length `length` (None for pipelines without one)."""
        raise NotImplementedError

    @classmethod
    def build(cls, pipe, tables: dict[str, Tensor], shape: tuple[int, ...], size: dict[str, int], **kwargs):
        """The adapter for one size (subclasses add what the pipeline derives from it: SDXL's time ids, FLUX's
        image ids)."""
        return cls(getattr(pipe, cls.denoiser), tables, shape, **kwargs)

    # ---- the pipeline's own latents ------------------------------------------------------------------------
    @staticmethod
    def to_pipeline(x: Tensor) -> Tensor:
        """Our state as the pipeline's `latents=` argument (FLUX.1 and Qwen-Image take packed tokens)."""
        return x

    @staticmethod
    def from_pipeline(latents: Tensor, shape: tuple[int, ...]) -> Tensor:
        """A pipeline's output_type="latent" result as our state of `shape` (C, ...)."""
        return latents

    # ---- pixels --------------------------------------------------------------------------------------------
    @staticmethod
    def decode(vae, z: Tensor) -> Tensor:
        """Latents to images in [-1, 1] as the pipeline decodes them: z / scaling_factor + shift_factor."""
        c = vae.config
        return vae.decode(z / c.scaling_factor + (c.get("shift_factor") or 0.0)).sample


def latents_normalised(vae, z: Tensor) -> Tensor:
    """z * std + mean per channel (Wan's and Qwen-Image's VAEs: `latents_mean`, `latents_std` in their config), on
    (B, C, F, H, W) latents."""
    c = vae.config
    mean = torch.tensor(c.latents_mean, dtype=z.dtype, device=z.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(c.latents_std, dtype=z.dtype, device=z.device).view(1, -1, 1, 1, 1)
    return z * std + mean


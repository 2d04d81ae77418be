"""The DSNO student: the teacher's UNet with the time axis folded into the batch and Fourier temporal
convolutions after its residual blocks.

Given x_T, every one of the M output times t_m gets its own copy of the input, conditioned (FiLM) on t_m's
embedding; after each residual block the M copies are mixed by a temporal convolution in Fourier space:

    T(h) = h + LeakyReLU(irfft(W_k rfft(h, over m)_k, k < J))     (DSNO, sec. 3; W complex, C x C per mode)

with J kept modes, weights shared over pixels, small at initialisation (the student starts as M copies of
the backbone), and the FFT in float32 even under autocast. The output (B, M, C, H, W) predicts the targets at
the M output times; sampling keeps the last one.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from ..files import load_weights, read_json, write_json, write_safetensors
from ..teachers.unet import UNet, UNetConfig

FORMAT, VERSION = "learnsteps-dsno", 1


class TemporalConv(nn.Module):
    """Residual Fourier convolution over the M output times of (B, M, C, H, W) features."""

    def __init__(self, channels: int, num_times: int, modes: int = 2):
        super().__init__()
        self.modes = min(modes, num_times // 2 + 1)
        scale = 1.0 / (channels * channels)
        self.weight = nn.Parameter(scale * torch.rand(channels, channels, self.modes, dtype=torch.cfloat))

    def forward(self, h: Tensor) -> Tensor:
        m = h.shape[1]
        with torch.autocast(device_type=h.device.type, enabled=False):
            spec = torch.fft.rfft(h.float(), dim=1)[:, : self.modes]
            mixed = torch.einsum("bkchw,cok->bkohw", spec, self.weight)
            out = torch.fft.irfft(mixed, n=m, dim=1)
        return h + nn.functional.leaky_relu(out).to(h.dtype)


class WithTemporal(nn.Module):
    """A UNet block (h, emb) -> h followed by a temporal convolution over the M folded copies."""

    def __init__(self, block: nn.Module, channels: int, num_times: int, modes: int):
        super().__init__()
        self.block, self.num_times = block, num_times
        self.temporal = TemporalConv(channels, num_times, modes)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        h = self.block(h, emb)
        h = rearrange(h, "(b m) c x y -> b m c x y", m=self.num_times)
        return rearrange(self.temporal(h), "b m c x y -> (b m) c x y")


@dataclass
class StudentConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    output_times: list[float] = field(default_factory=list)  # the M times, decreasing, in the teacher's time
    time_input: list[float] = field(default_factory=list)  # what the backbone's time embedding gets for each
    modes: int = 2
    temporal: bool = True  # False: M independent copies (with M = 1, plain one-step distillation)


class DSNOStudent(nn.Module):
    def __init__(self, cfg: StudentConfig, backbone: UNet | None = None):
        super().__init__()
        self.cfg = cfg
        self.unet = copy.deepcopy(backbone) if backbone is not None else UNet(cfg.unet)
        self.unet.train().requires_grad_(True)  # a copy of a frozen teacher arrives in eval mode
        m = len(cfg.output_times)
        if m < 1 or len(cfg.time_input) != m:
            raise ValueError("a DSNO student needs its output times and their time inputs")
        if cfg.temporal and m > 1:
            for blocks in (self.unet.down, self.unet.mid, self.unet.up):
                for i, level in enumerate(blocks):
                    blocks[i] = WithTemporal(level, level.res.conv2.out_channels, m, cfg.modes)
        self.register_buffer("time_input", torch.tensor(cfg.time_input, dtype=torch.float32))

    @property
    def num_times(self) -> int:
        return len(self.cfg.output_times)

    def forward(self, x_T: Tensor, y: Tensor | None = None) -> Tensor:
        """(B, C, H, W) noise -> (B, M, C, H, W) predictions at the M output times."""
        b, m = x_T.shape[0], self.num_times
        x = repeat(x_T.to(self.time_input.dtype), "b c h w -> (b m) c h w", m=m)
        t = repeat(self.time_input, "m -> (b m)", b=b)
        emb = self.unet.embed(t, None if y is None else repeat(y, "b -> (b m)", m=m))
        return rearrange(self.unet.backbone(x, emb), "(b m) c h w -> b m c h w", m=m)

    @torch.no_grad()
    def sample(self, x_T: Tensor, y: Tensor | None = None) -> Tensor:
        """One pass: the prediction at the last output time."""
        return self(x_T, y)[:, -1].to(x_T.dtype)


class StudentError(ValueError):
    """A DSNO student directory that cannot be loaded; the message names the file and the problem."""


def save_student(directory: str | Path, student: DSNOStudent, meta: dict) -> Path:
    d = Path(directory)
    write_safetensors(d / "model.safetensors", student.state_dict())
    write_json(d / "student.json", dict(format=FORMAT, version=VERSION, student=asdict(student.cfg), **meta))
    return d


def load_student(directory: str | Path) -> DSNOStudent:
    """A one-step checkpoint written by `train.py mode=dsno`, ready to sample (eval mode); StudentError if the
    directory holds none, or one that is damaged (checksums) or malformed."""
    d = Path(directory)
    if not (d / "student.json").is_file():
        raise StudentError(f"{d} holds no DSNO student (student.json)")
    info = read_json(d / "student.json", StudentError)
    try:
        if info.get("format") != FORMAT or info.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} v{VERSION} checkpoint")
        s = info["student"]
        cfg = StudentConfig(unet=UNetConfig(**s["unet"]), output_times=s["output_times"], time_input=s["time_input"],
                            modes=s["modes"], temporal=s["temporal"])
        student = DSNOStudent(cfg)
    except (KeyError, TypeError, ValueError) as err:
        raise StudentError(f"{d / 'student.json'}: {type(err).__name__}: {err}") from None
    load_weights(student, d / "model.safetensors", StudentError, "student.json")
    student.info = info
    return student.eval().requires_grad_(False)

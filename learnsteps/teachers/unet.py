"""learnsteps' own small UNet: an epsilon-predicting network for small images (the digits teacher's backbone).

A DDPM-style UNet: residual blocks with FiLM time (and class) conditioning, self-attention at the coarse
levels, skip connections between the down and up paths. Residual blocks are separate modules in `down`,
`mid` and `up` with the signature `block(h, emb)`, so a student (DSNO) can wrap each one, e.g. to add a
temporal layer after it, without touching this file.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn

from ..config import at_least, each, fraction, positive


@dataclass
class UNetConfig:
    in_channels: int = 1
    image_size: int = 8
    channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])
    blocks_per_level: int = 2
    attention_levels: list[int] = field(default_factory=lambda: [1])  # level 0 is full resolution
    num_classes: int = 0  # > 0: class-conditional; label num_classes means "no label" (classifier-free guidance)
    dropout: float = 0.0
    time_scale: float = 1000.0  # continuous t in [0, 1] is embedded as t * time_scale
    RULES: ClassVar = dict(
        in_channels=at_least(1), image_size=at_least(1), blocks_per_level=at_least(1), num_classes=at_least(0),
        channels=lambda v: None if isinstance(v, int) and v >= 8 and v % 8 == 0 else "must be a multiple of 8 (>= 8)",
        channel_mult=each(at_least(1), non_empty=True), attention_levels=each(at_least(0)), dropout=fraction,
        time_scale=positive)

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of (B,) times, as in DDPM / "Attention is all you need"."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice; the embedding sets a per-channel scale and shift after the second norm."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.norm2, self.conv2 = norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # start as the identity map: stable early training
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        scale, shift = rearrange(self.film(nn.functional.silu(emb)), "b (two c) -> two b c 1 1", two=2)
        h = nn.functional.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.dropout(h))


class Attention(nn.Module):
    """Single-head self-attention over the pixels of a feature map, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm, self.qkv, self.out = norm(channels), nn.Conv2d(channels, 3 * channels, 1), nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h, w = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b (h w) c", three=3)
        a = nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.out(rearrange(a, "b (h w) c -> b c h w", h=h, w=w))


class Level(nn.Module):
    """A residual block, followed by attention at the levels that have it."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, attention: bool, dropout: float):
        super().__init__()
        self.res = ResBlock(c_in, c_out, emb_dim, dropout)
        self.attn = Attention(c_out) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


def check_unet(cfg: UNetConfig) -> None:
    """ValueError for a configuration the UNet cannot be built with (each level but the last halves the image)."""
    levels = len(cfg.channel_mult)
    if cfg.image_size % 2 ** (levels - 1):
        raise ValueError(f"unet.image_size={cfg.image_size} cannot be halved {levels - 1} times "
                         f"(unet.channel_mult has {levels} levels)")
    if any(lvl >= levels for lvl in cfg.attention_levels):
        raise ValueError(f"unet.attention_levels={cfg.attention_levels} names a level beyond the {levels} of "
                         f"unet.channel_mult")


class UNet(nn.Module):
    """net(x, t[, y]) -> epsilon, for x of shape (B, C, H, W), continuous times t in [0, 1] of shape (B,)."""

    def __init__(self, config: UNetConfig | None = None, **overrides):
        super().__init__()
        cfg = config or UNetConfig(**overrides)
        self.config = cfg
        c, emb_dim = cfg.channels, 4 * cfg.channels
        self.time_mlp = nn.Sequential(nn.Linear(c, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels, c, 3, padding=1)
        widths = [c * m for m in cfg.channel_mult]
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skips, ch = [c], c
        for lvl, width in enumerate(widths):
            for _ in range(cfg.blocks_per_level):
                self.down.append(Level(ch, width, emb_dim, lvl in cfg.attention_levels, cfg.dropout))
                ch = width
                skips.append(ch)
            if lvl < len(widths) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = nn.ModuleList([Level(ch, ch, emb_dim, True, cfg.dropout), Level(ch, ch, emb_dim, False, cfg.dropout)])
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for lvl, width in reversed(list(enumerate(widths))):
            for _ in range(cfg.blocks_per_level + 1):
                self.up.append(Level(ch + skips.pop(), width, emb_dim, lvl in cfg.attention_levels, cfg.dropout))
                ch = width
            if lvl > 0:
                self.upsample.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                   nn.Conv2d(ch, ch, 3, padding=1)))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, cfg.in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def embed(self, t: Tensor, y: Tensor | None = None) -> Tensor:
        cfg = self.config
        emb = self.time_mlp(timestep_embedding(t * cfg.time_scale, cfg.channels).to(self.conv_in.weight.dtype))
        if self.label_emb is not None:
            y = torch.full_like(t, cfg.num_classes, dtype=torch.long) if y is None else y
            emb = emb + self.label_emb(y)
        return emb

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        emb = self.embed(t.expand(x.shape[0]) if t.dim() == 0 else t, y)
        return self.backbone(x, emb)

    def backbone(self, x: Tensor, emb: Tensor) -> Tensor:
        cfg = self.config
        h = self.conv_in(x.to(self.conv_in.weight.dtype))
        skips = [h]
        blocks = iter(self.down)
        for lvl in range(len(cfg.channel_mult)):
            for _ in range(cfg.blocks_per_level):
                h = next(blocks)(h, emb)
                skips.append(h)
            if lvl < len(cfg.channel_mult) - 1:
                h = self.downsample[lvl](h)
                skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        blocks, ups = iter(self.up), iter(self.upsample)
        for lvl in reversed(range(len(cfg.channel_mult))):
            for _ in range(cfg.blocks_per_level + 1):
                h = next(blocks)(torch.cat([h, skips.pop()], dim=1), emb)
            if lvl > 0:
                h = next(ups)(h)
        return self.out(h)

"""DSNO's temporal convolution inside any backbone: one short adapter per backbone kind.

The student runs the teacher's own network on its M output times folded into the batch ((b m) samples). A
temporal layer sits after a block of that network as a forward hook: it unfolds the block's output to
(B, M, channels, positions), mixes the M copies in Fourier space and folds them back, so the backbone's own forward
(diffusers' code, learnsteps' UNet) runs unchanged and its weights keep their names:

    T(h) = h + LeakyReLU(irfft(W_k rfft(h, over m)_k, k < J))     (DSNO, sec. 3; W complex, C x C per mode)

W is shared over positions (pixels or tokens) and starts at zero, so the untrained student is exactly M copies of
the backbone (LeakyReLU(0) = 0); its gradient there is LeakyReLU'(0) = 0.01 times the usual one, which Adam's
normalised step does not feel. The FFT runs in at least float32, even under autocast.

A *site* is where a layer may go: the module whose output is a block's output. `sites(net)` finds the outermost
backbone in `net` (a pipeline adapter's or a NetworkDenoiser's wrapper is searched through) and lists its sites by
level; `place(levels, placement)` picks: every site, every other one (the last of each level kept), or one per level
(the last). Backbone kinds:

- learnsteps' UNet: every residual block (+ attention) of the down, middle and up paths, a level per resolution;
- diffusers UNets (UNet2DModel, UNet2DConditionModel: SD, SDXL): each resnet + attention unit of every down, mid
  and up block (the attention's output where the unit has one), a level per block;
- diffusers transformers (DiT / PixArt Transformer2DModel, SD3, FLUX's double and single blocks, Qwen-Image, Wan
  and the others that keep their blocks in `transformer_blocks`, `single_transformer_blocks` or `blocks`): every
  block's image-token output (the last tensor of a (encoder_hidden_states, hidden_states) pair), a level per list.

Channels are per position: dim 1 of an (N, C, H, W[, ...]) feature map, the last dim of (N, L, C) tokens.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

PLACEMENTS = ("every", "every_other", "one_per_level")
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")  # diffusers' transformer block lists


class TemporalConv(nn.Module):
    """Residual Fourier convolution over the M output times of (B, M, C, P) features; zero at initialisation."""

    def __init__(self, channels: int, num_times: int, modes: int = 2):
        super().__init__()
        self.num_times, self.modes = num_times, min(modes, num_times // 2 + 1)
        self.weight = nn.Parameter(torch.zeros(channels, channels, self.modes, dtype=torch.cfloat))

    def forward(self, h: Tensor) -> Tensor:
        work = torch.promote_types(h.dtype, torch.float32)  # float32 under autocast, float64 stays float64
        with torch.autocast(device_type=h.device.type, enabled=False):
            spec = torch.fft.rfft(h.to(work), dim=1)[:, : self.modes]
            mixed = torch.einsum("bkcp,cok->bkop", spec, self.weight.to(spec.dtype))
            out = torch.fft.irfft(mixed, n=h.shape[1], dim=1)
        return h + nn.functional.leaky_relu(out).to(h.dtype)

    def on_features(self, h: Tensor) -> Tensor:
        """The layer on a block's folded output: (b m, C, ...) feature maps or (b m, L, C) tokens."""
        tokens = h.dim() == 3
        x = h.transpose(1, 2) if tokens else h  # channels at dim 1
        shape = x.shape
        x = x.reshape(shape[0] // self.num_times, self.num_times, shape[1], -1)
        x = self(x).reshape(shape)
        return x.transpose(1, 2) if tokens else x


def hidden_of(output):
    """(the block's hidden-state tensor, a function putting a new one back in its place) for a block output that is
    a tensor, a tuple ending in it (diffusers' (encoder_hidden_states, hidden_states) and (sample,)), or an output
    object with `.sample`."""
    if isinstance(output, Tensor):
        return output, lambda h: h
    if isinstance(output, tuple):
        i = max(k for k, v in enumerate(output) if isinstance(v, Tensor))
        return output[i], lambda h: output[:i] + (h,) + output[i + 1:]
    if isinstance(getattr(output, "sample", None), Tensor):
        return output.sample, lambda h: type(output)(**{**output, "sample": h})
    raise TypeError(f"a DSNO site returned {type(output).__name__}, not a tensor, tuple or output with .sample")


def temporal_hook(module: nn.Module, args, output):
    """Forward hook of a site: its `dsno_temporal` layer on its output (a plain function, so that a deep copy of the
    student, e.g. its EMA, runs its own layers)."""
    h, put = hidden_of(output)
    return put(module.dsno_temporal.on_features(h))


# ---- where the layers go: one adapter per backbone kind ------------------------------------------------------------
def _learnsteps_unet(net, prefix: str) -> list[list[str]] | None:
    from ..teachers.unet import UNet

    if not isinstance(net, UNet):
        return None
    cfg, n = net.config, net.config.blocks_per_level
    down = [[f"{prefix}down.{lvl * n + i}" for i in range(n)] for lvl in range(len(cfg.channel_mult))]
    up = [[f"{prefix}up.{lvl * (n + 1) + i}" for i in range(n + 1)] for lvl in range(len(cfg.channel_mult))]
    return down + [[f"{prefix}mid.{i}" for i in range(len(net.mid))]] + up


def _diffusers_unet(net, prefix: str) -> list[list[str]] | None:
    if not (hasattr(net, "down_blocks") and hasattr(net, "up_blocks")):
        return None
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(net.down_blocks)]
    blocks += [("mid_block", net.mid_block)] if getattr(net, "mid_block", None) is not None else []
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(net.up_blocks)]
    levels = []
    for name, block in blocks:
        attentions = list(getattr(block, "attentions", None) or [])
        resnets = list(block.resnets)
        if name == "mid_block":  # resnets[0], then (attentions[i], resnets[i + 1]) pairs
            units = [("attentions", i) if a is not None else ("resnets", i) for i, a in enumerate(attentions)]
            units.append(("resnets", len(resnets) - 1))
        else:  # (resnets[i], attentions[i]) pairs
            units = [("attentions", i) if i < len(attentions) and attentions[i] is not None else ("resnets", i)
                     for i in range(len(resnets))]
        levels.append([f"{prefix}{name}.{kind}.{i}" for kind, i in units])
    return levels


def _diffusers_transformer(net, prefix: str) -> list[list[str]] | None:
    lists = [name for name in BLOCK_LISTS if isinstance(getattr(net, name, None), nn.ModuleList)
             and len(getattr(net, name))]
    if not lists:
        return None
    return [[f"{prefix}{name}.{i}" for i in range(len(getattr(net, name)))] for name in lists]


ADAPTERS = {"learnsteps_unet": _learnsteps_unet, "diffusers_unet": _diffusers_unet,
            "transformer": _diffusers_transformer}


def sites(net: nn.Module) -> tuple[str, list[list[str]]]:
    """(backbone kind, its sites by level) for the outermost backbone in `net`; ValueError if none is known."""
    for name, module in net.named_modules():
        for kind, adapter in ADAPTERS.items():
            levels = adapter(module, f"{name}." if name else "")
            if levels:
                return kind, levels
    raise ValueError(f"no known backbone in {type(net).__name__} for DSNO's temporal layers (learnsteps' UNet, a "
                     f"diffusers UNet with down_blocks / up_blocks, or a transformer with {' / '.join(BLOCK_LISTS)})")


def place(levels: list[list[str]], placement: str) -> list[str]:
    """The sites that get a temporal layer: every one, every other one (counted back from each level's last), or
    the last of each level."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}: expected one of {PLACEMENTS}")
    step = {"every": 1, "every_other": 2}.get(placement)
    return [s for level in levels for s in (level[::-1][::step][::-1] if step else level[-1:])]


@torch.no_grad()
def probe_channels(net: nn.Module, names: list[str], call) -> dict[str, int]:
    """The channel count of each site's hidden state, from one call of the network (`call()`, batch 1)."""
    found, handles = {}, []
    for name in names:
        def record(module, args, output, name=name):
            h = hidden_of(output)[0]
            found[name] = int(h.shape[-1] if h.dim() == 3 else h.shape[1])
        handles.append(net.get_submodule(name).register_forward_hook(record))
    try:
        call()
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"DSNO sites {missing} were not called by the network's forward")
    return found


def add_temporal(net: nn.Module, channels: dict[str, int], num_times: int, modes: int) -> None:
    """A zero-initialised temporal layer after each site (`dsno_temporal`, a child of the site, so it is saved with
    the network's state dict under the site's name)."""
    for name, c in channels.items():
        site = net.get_submodule(name)
        site.add_module("dsno_temporal", TemporalConv(c, num_times, modes))
        site.register_forward_hook(temporal_hook)

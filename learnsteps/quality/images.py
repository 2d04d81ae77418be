"""Sample grids as pictures: what training modes, LD3, DSNO and eval.py write for a person to look at."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..files import write_atomically

MAX_TILE = 256  # pixels: larger images (SDXL's, FLUX's 1024) are shown downsampled, a picture to look at
MAX_FRAMES = 8  # frames of a video shown in its row


def as_frames(video: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Videos (N, C, F, H, W) as N rows of up to MAX_FRAMES evenly spaced frames: ((N * F', C, H, W), F')."""
    f = video.shape[2]
    idx = torch.linspace(0, f - 1, min(f, MAX_FRAMES)).round().long().unique()
    return video[:, :, idx].transpose(1, 2).flatten(0, 1), len(idx)


def tile(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """Images in [-1, 1], shape (N, C, H, W) with C = 1 (grey) or 3 (RGB), as one (C, H', W') canvas in [0, 1] with
    a one-pixel white border around each: large images (SDXL's, FLUX's 1024) downsampled to MAX_TILE, videos
    (N, C, F, H, W) one per row."""
    if images.dim() == 5:
        images, nrow = as_frames(images)
    images = images.detach().float().cpu()
    if max(images.shape[-2:]) > MAX_TILE:
        f = MAX_TILE / max(images.shape[-2:])
        images = F.interpolate(images, size=[max(1, round(s * f)) for s in images.shape[-2:]], mode="area")
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    canvas = torch.ones(c, rows * (h + 1) + 1, nrow * (w + 1) + 1)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        canvas[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + col * (w + 1): 1 + col * (w + 1) + w] = (img + 1) / 2
    return canvas.clamp(0, 1)


def save_image_grid(images: torch.Tensor, path: Path, nrow: int = 8, scale: int = 4) -> None:
    """`tile(images, nrow)` as one PNG, small images nearest-neighbour upscaled by `scale`."""
    from PIL import Image

    canvas = tile(images, nrow)
    scale = scale if max(images.shape[-2:]) * scale <= 128 else 1
    pixels = (canvas * 255).round().byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels[..., 0] if canvas.shape[0] == 1 else pixels)
    image = image.resize((canvas.shape[2] * scale, canvas.shape[1] * scale), Image.NEAREST)
    write_atomically(Path(path), lambda tmp: image.save(tmp, format="PNG"))

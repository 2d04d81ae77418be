"""Sample grids as pictures: what training modes, LD3, DSNO and eval.py write for a person to look at."""
from __future__ import annotations

from pathlib import Path

import torch

from ..files import write_atomically


def save_image_grid(images: torch.Tensor, path: Path, nrow: int = 8, scale: int = 4) -> None:
    """Images in [-1, 1], shape (N, C, H, W) with C = 1 (grey) or 3 (RGB), as one PNG (nearest-neighbour upscaled)."""
    from PIL import Image

    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    canvas = torch.ones(c, rows * (h + 1) + 1, nrow * (w + 1) + 1)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        canvas[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + col * (w + 1): 1 + col * (w + 1) + w] = (img + 1) / 2
    pixels = (canvas.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
    image = image.resize((canvas.shape[2] * scale, canvas.shape[1] * scale), Image.NEAREST)
    write_atomically(Path(path), lambda tmp: image.save(tmp, format="PNG"))

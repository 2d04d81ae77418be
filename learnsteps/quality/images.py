"""Sample grids as pictures: what training modes, LD3, DSNO and eval.py write for a person to look at."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..files import write_atomically

MAX_TILE = 256  # pixels: larger images (SDXL's, FLUX's 1024) are shown downsampled, a picture to look at
MAX_FRAMES = 8  # frames of a video shown in its row
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_REFERENCE = 5000  # reference images read (sorted by name): enough for a data term or FID's statistics


class ReferenceImagesError(ValueError):
    """A reference image folder that cannot be used; the message names the folder or file and the problem."""


def reference_files(directory: str | Path, limit: int = MAX_REFERENCE) -> list[Path]:
    """The first `limit` image files of a folder, by name (at least 2)."""
    folder = Path(directory)
    if not folder.is_dir():
        raise ReferenceImagesError(f"reference images {folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:limit]
    if len(files) < 2:
        raise ReferenceImagesError(f"reference images {folder}: {len(files)} image files "
                                   f"({', '.join(IMAGE_SUFFIXES)}); at least 2 are needed")
    return files


def iter_reference(directory: str | Path, size: tuple[int, int] | None = None, channels: int | None = None,
                   limit: int = MAX_REFERENCE, batch: int = 64):
    """The images of a folder (your data: what a data term or FID compares samples with) in batches of (B, C, H, W)
    in [-1, 1], the first `limit` by name, never all in memory at once (a thousand 1024^2 images are 12 GB as
    floats); resized (bicubic on the short side, then centre-cropped) to `size` when given, else all must share the
    first's size; `channels` 1 (grey) or 3 (RGB), default the first image's. Every file is checked before the first
    batch is made, so a bad folder fails before any work."""
    from PIL import Image, UnidentifiedImageError

    files = reference_files(directory, limit)
    sizes = []
    for path in files:
        try:
            with Image.open(path) as img:
                sizes.append((img.height, img.width))
                channels = channels or (1 if img.mode in ("L", "1", "I;16") else 3)
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise ReferenceImagesError(f"reference image {path}: cannot be read ({err})") from None
        if size is None and sizes[-1] != sizes[0]:
            raise ReferenceImagesError(f"reference image {path}: {sizes[-1]} pixels, the first {sizes[0]}; "
                                       f"pass a size to resize them")

    def load(path: Path) -> torch.Tensor:
        try:
            with Image.open(path) as img:
                img = img.convert("L" if channels == 1 else "RGB")
                if size is not None:
                    h, w = size
                    scale = max(h / img.height, w / img.width)
                    img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))),
                                     Image.BICUBIC)
                    left, top = (img.width - w) // 2, (img.height - h) // 2
                    img = img.crop((left, top, left + w, top + h))
                return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, -1)
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise ReferenceImagesError(f"reference image {path}: cannot be read ({err})") from None

    for b in range(0, len(files), batch):
        yield torch.stack([load(p) for p in files[b: b + batch]]).permute(0, 3, 1, 2).float() / 127.5 - 1


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

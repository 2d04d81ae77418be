"""Per-sample distances between student and teacher samples."""
from __future__ import annotations

import math

import torch
from torch import Tensor

LOSSES = ("l2", "l1", "pseudo_huber", "lpips", "features", "spread")
PIXEL_LOSSES = ("lpips", "features")  # on a latent teacher, computed on the VAE's images


def pixel_space(teacher, loss: str = "lpips") -> dict:
    """For a latent teacher (one with `decode`) and a loss with a pixel term, what `distance` needs to compute it on
    the teacher's images: the decoder and the image shape ((C, F, H, W) for video); {} for a teacher that samples
    images directly, or a loss that stays in latent space (the VAE is then never run)."""
    decode = getattr(teacher, "decode", None)
    if decode is None or not set(str(loss).split("+")) & set(PIXEL_LOSSES):
        return {}
    with torch.no_grad():
        image = decode(torch.zeros(1, *teacher.shape))
    return dict(decode=decode, image_shape=tuple(image.shape[1:]))


def check_loss_name(name) -> str | None:
    """A config rule: one of LOSSES, or several joined by "+" (e.g. "l2+features")."""
    parts = name.split("+") if isinstance(name, str) else [None]
    ok = all(p in LOSSES for p in parts) and len(set(parts)) == len(parts)
    return None if ok else f"must be one of {', '.join(LOSSES)}, or several joined by '+' (e.g. 'l2+features')"


class Sum:
    """Several distances added, each weighted by 1 / its mean on a calibration set (`calibrate`, e.g. the initial
    grid's validation outputs), so that every term starts at 1 whatever its units (features are ~20x l2 here)."""

    def __init__(self, parts: dict):
        self.parts, self.weights = parts, {k: 1.0 for k in parts}

    @torch.no_grad()
    def calibrate(self, x: Tensor, y: Tensor) -> None:
        self.weights = {k: 1.0 / max(float(d(x, y).mean()), 1e-12) for k, d in self.parts.items()}

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return sum(self.weights[k] * d(x, y) for k, d in self.parts.items())


def distance(name: str, shape: tuple[int, ...] | None = None, feature_net: str = "", decode=None,
             image_shape: tuple[int, ...] | None = None):
    """A function (x, y) -> (B,) distances between samples of `shape` (checked now when given). l2: mean squared
    error; l1: mean absolute error; pseudo_huber: sqrt(|x-y|^2 + c^2) - c with c = 0.00054 sqrt(d) (Song &
    Dhariwal 2023); lpips: LPIPS-VGG (needs the lpips package and its weights on disk); features: mean squared
    distance in a digits classifier's feature space (`feature_net`, a directory written by `train.py
    mode=features`; default the shipped loss network, trained apart from FID's; 1x8x8 images), a perceptual loss
    that needs no download; "a+b": the Sum of both, each normalised by calibration. With `decode` (a latent
    teacher's VAE, see `pixel_space`) lpips and features compare the decoded images (of `image_shape`); the
    others stay in latent space, where no decoding is paid."""
    if "+" in name:
        if (problem := check_loss_name(name)) is not None:
            raise ValueError(f"unknown loss {name!r}: {problem}")
        return Sum({part: distance(part, shape, feature_net, decode, image_shape) for part in name.split("+")})
    if name in PIXEL_LOSSES and decode is not None:
        if image_shape is not None and len(image_shape) == 4:  # video: the loss of each frame, averaged per clip
            on_frames = distance(name, (image_shape[0], *image_shape[2:]), feature_net)
            return lambda x, y: per_frame(on_frames, decode(x), decode(y)).to(x.dtype)
        on_images = distance(name, image_shape, feature_net)
        return lambda x, y: on_images(decode(x), decode(y)).to(x.dtype)
    if name == "l2":
        return lambda x, y: (x - y).pow(2).flatten(1).mean(1)
    if name == "l1":
        return lambda x, y: (x - y).abs().flatten(1).mean(1)
    if name == "pseudo_huber":
        def huber(x, y):
            c = 0.00054 * math.sqrt(x[0].numel())
            return torch.sqrt((x - y).pow(2).flatten(1).sum(1) + c**2) - c
        return huber
    if name == "lpips":
        return _lpips()
    if name == "features":
        return _features(shape, feature_net)
    if name == "spread":
        return spread
    raise ValueError(f"unknown loss {name!r}: expected one of {LOSSES}")


def per_frame(dist, x: Tensor, y: Tensor) -> Tensor:
    """An image distance on videos (B, C, F, H, W): the mean over the F frames of each clip, (B,)."""
    b, f = x.shape[0], x.shape[2]
    frames = [v.transpose(1, 2).flatten(0, 1) for v in (x, y)]
    return dist(*frames).view(b, f).mean(1)


def _lpips():
    try:
        import lpips
    except ImportError:
        raise ValueError("loss=lpips needs the lpips package and its VGG weights on this machine (they are "
                         "downloaded on first use, which needs internet): pip install lpips, run it once online, "
                         "or choose loss=l2, l1 or pseudo_huber") from None
    try:
        net = lpips.LPIPS(net="vgg", verbose=False).eval().requires_grad_(False)
    except Exception as err:  # the torchvision VGG weights are fetched from the network when not cached
        raise ValueError(f"LPIPS weights are not available locally ({type(err).__name__}: {err}); run once with "
                         f"internet or choose loss=l2, l1 or pseudo_huber") from None

    def dist(x: Tensor, y: Tensor) -> Tensor:
        if x.shape[1] == 1:  # LPIPS expects RGB
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        return net.to(x.device, torch.float32)(x.float(), y.float()).flatten()

    return dist


def _features(shape: tuple[int, ...] | None, directory: str):
    from .features import LOSS_ASSET, load_feature_net

    def check(shape):
        if tuple(shape) != (1, 8, 8):
            raise ValueError(f"loss=features uses the digits feature network, which reads 1x8x8 images, not "
                             f"{tuple(shape)}: choose loss=l2, l1, pseudo_huber or lpips")

    if shape is not None:
        check(shape)
    net = load_feature_net(directory or LOSS_ASSET)

    def dist(x: Tensor, y: Tensor) -> Tensor:
        check(x.shape[1:])
        net.to(x.device)
        return (net(x.float())[0] - net(y.float())[0]).pow(2).mean(1).to(x.dtype)

    return dist


def spread(x: Tensor, y: Tensor) -> Tensor:
    """How far the student's samples are from being as far apart from each other as the teacher's, sample by
    sample: for sample i, the mean over the batch of (|x_i - x_j| - |y_i - y_j|)^2, over the batch's mean squared
    teacher distance. A paired L2 loss is minimised, where the student cannot follow the teacher, by pulling its
    samples towards their mean (less diversity, which FID against the data punishes); this term is zero for any
    student whose batch has the teacher's pairwise geometry, and grows with that contraction."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf, yf = x.flatten(1).to(dtype), y.flatten(1).to(dtype)
    dx, dy = torch.cdist(xf, xf), torch.cdist(yf, yf)
    return ((dx - dy).pow(2).mean(1) / dy.pow(2).mean().clamp_min(1e-12)).to(x.dtype)


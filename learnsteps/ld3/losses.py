"""Per-sample distances between student and teacher samples."""
from __future__ import annotations

import math

import torch
from torch import Tensor

LOSSES = ("l2", "l1", "pseudo_huber", "lpips", "features")


def distance(name: str, shape: tuple[int, ...] | None = None, feature_net: str = ""):
    """A function (x, y) -> (B,) distances between samples of `shape` (checked now when given). l2: mean squared
    error; l1: mean absolute error; pseudo_huber: sqrt(|x-y|^2 + c^2) - c with c = 0.00054 sqrt(d) (Song &
    Dhariwal 2023); lpips: LPIPS-VGG (needs the lpips package and its weights on disk); features: mean squared
    distance in a digits classifier's feature space (`feature_net`, a directory written by `train.py
    mode=features`; default the shipped loss network, trained apart from FID's; 1x8x8 images), a perceptual loss
    that needs no download."""
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
    raise ValueError(f"unknown loss {name!r}: expected one of {LOSSES}")


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
    from ..eval.features import LOSS_ASSET, load_feature_net

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

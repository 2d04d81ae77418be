"""Feature extractors for FID / KID, registered with torch-fidelity.

"digits": a small CNN classifier of scikit-learn's 8x8 digits that the project trains and ships
(learnsteps/assets/digits_features; reproduce with `python train.py mode=features`); its 128-d penultimate
layer plays the role of Inception's pool3. "inception": torch-fidelity's Inception-v3 (FID's standard), whose
weights must be cached or given by path; offline without them, a clear error.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar
from pathlib import Path

import torch
import torch_fidelity
from torch import Tensor, nn

from ..config import at_least
from ..files import load_weights, read_json, write_json, write_safetensors

ASSET = Path(__file__).resolve().parents[1] / "assets" / "digits_features"
# A second digits network, trained the same way with seed 1 (`python train.py mode=features seed=1
# export_dir=learnsteps/assets/digits_loss_features`): LD3's loss=features uses it, so that a schedule is not
# trained on the very network FID is then measured with.
LOSS_ASSET = ASSET.parent / "digits_loss_features"
DIGITS_EXTRACTOR = "learnsteps-digits"


@dataclass
class FeatureNetConfig:
    channels: int = 32
    features: int = 128
    classes: int = 10
    RULES: ClassVar = dict(
        channels=lambda v: None if isinstance(v, int) and v >= 8 and v % 8 == 0 else "must be a multiple of 8 (>= 8)",
        features=at_least(1), classes=at_least(2))


class DigitsFeatureNet(nn.Module):
    """1x8x8 images in [-1, 1] -> (features (B, 128), logits (B, 10))."""

    def __init__(self, cfg: FeatureNetConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or FeatureNetConfig()
        c = cfg.channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1, stride=2), nn.GroupNorm(8, 2 * c), nn.SiLU(),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.GroupNorm(8, 2 * c), nn.SiLU(),
            nn.Flatten(), nn.Linear(2 * c * 16, cfg.features), nn.SiLU())
        self.head = nn.Linear(cfg.features, cfg.classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.body(x)
        return f, self.head(f)


class FeatureNetError(ValueError):
    """A feature network directory that cannot be loaded; the message names the file and the problem."""


def save_feature_net(directory: Path, net: DigitsFeatureNet, extra: dict) -> None:
    write_safetensors(directory / "model.safetensors", net.state_dict())
    write_json(directory / "features.json", dict(format="learnsteps-features", version=1, config=asdict(net.cfg),
                                                 **extra))


def load_feature_net(directory: Path = ASSET) -> DigitsFeatureNet:
    directory = Path(directory)
    if not (directory / "features.json").is_file():
        raise FeatureNetError(f"no digits feature network in {directory}: train one with "
                              f"`python train.py mode=features`")
    meta = read_json(directory / "features.json", FeatureNetError)
    try:
        if meta.get("format") != "learnsteps-features" or meta.get("version") != 1:
            raise ValueError("not a learnsteps-features v1 network")
        net = DigitsFeatureNet(FeatureNetConfig(**meta["config"]))
    except (KeyError, TypeError, ValueError) as err:
        raise FeatureNetError(f"{directory / 'features.json'}: {err}") from None
    load_weights(net, directory / "model.safetensors", FeatureNetError, "features.json")
    return net.eval().requires_grad_(False)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class VisionFeatures(nn.Module):
    """A transformers vision model (DINOv2, CLIP's vision tower, ViT, ...) as a differentiable feature map for
    images of any size: (B, C, H, W) in [-1, 1] (grey repeated to RGB) -> ((B, D) features,), resized (bicubic)
    to the model's input size and normalised as its image processor does; the features are its pooled output
    (DINOv2: the normalised CLS token; CLIP: the projected image embedding), else the first token's state."""

    def __init__(self, model, size: int, mean, std):
        super().__init__()
        self.model, self.size = model.eval().requires_grad_(False), int(size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> tuple[Tensor]:
        x = x.float().expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.float()
        x = torch.nn.functional.interpolate((x + 1) / 2, size=(self.size, self.size), mode="bicubic",
                                            antialias=True, align_corners=False)
        x = (x - self.mean) / self.std
        if hasattr(self.model, "get_image_features"):  # a whole CLIP / SigLIP model: its image embedding
            f = self.model.get_image_features(pixel_values=x)
            return (f if isinstance(f, Tensor) else f.pooler_output,)
        out = self.model(pixel_values=x)
        pooled = getattr(out, "image_embeds", None)
        pooled = getattr(out, "pooler_output", None) if pooled is None else pooled
        if pooled is None:
            pooled = out.last_hidden_state[:, 0]
        return (pooled.flatten(1),)


def load_vision_net(directory: Path) -> VisionFeatures:
    """A transformers vision model saved in `directory` (save_pretrained's config.json and weights, e.g. a local
    copy of facebook/dinov2-small), loaded without the network; FeatureNetError names what is wrong."""
    import transformers

    directory = Path(directory)
    config = read_json(directory / "config.json", FeatureNetError, checksum="optional")
    processor = directory / "preprocessor_config.json"
    pre = read_json(processor, FeatureNetError, checksum="optional") if processor.is_file() else {}
    try:
        model = transformers.AutoModel.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise FeatureNetError(f"{directory}: not a transformers vision model that loads offline "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    crop = pre.get("crop_size", pre.get("size"))
    size = (crop.get("height", crop.get("shortest_edge")) if isinstance(crop, dict) else crop) or \
        config.get("vision_config", config).get("image_size")
    if not isinstance(size, int) or size < 1:
        raise FeatureNetError(f"{directory}: no input size in its config.json or preprocessor_config.json")
    return VisionFeatures(model, size, pre.get("image_mean", IMAGENET_MEAN), pre.get("image_std", IMAGENET_STD))


def load_any_feature_net(directory: Path) -> nn.Module:
    """A learnsteps digits feature network (features.json) or a transformers vision model (config.json)."""
    directory = Path(directory)
    if (directory / "features.json").is_file():
        return load_feature_net(directory)
    if (directory / "config.json").is_file():
        return load_vision_net(directory)
    raise FeatureNetError(f"no feature network in {directory}: neither a digits feature network (features.json, from "
                          f"`python train.py mode=features`) nor a transformers vision model (config.json, e.g. a "
                          f"local copy of facebook/dinov2-small)")


class DigitsFeatureExtractor(torch_fidelity.FeatureExtractorBase):
    """torch-fidelity's interface around the digits network: uint8 (N, 1, 8, 8) in, features out."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net = load_feature_net(Path(feature_extractor_weights_path) if feature_extractor_weights_path else ASSET)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "features"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        f, logits = self.net(x.float() / 127.5 - 1)
        out = {"features": f, "logits": logits}
        return tuple(out[k] for k in self.features_list)


torch_fidelity.register_feature_extractor(DIGITS_EXTRACTOR, DigitsFeatureExtractor)

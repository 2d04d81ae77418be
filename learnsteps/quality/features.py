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

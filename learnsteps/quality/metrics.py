"""FID and KID through torch-fidelity, from in-memory images in [-1, 1], with cached reference features."""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch
from torch import Tensor
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from ..files import read_safetensors, sha256_file, write_safetensors
from .features import ASSET, DIGITS_EXTRACTOR

EXTRACTORS = ("digits", "inception")


def pixels(teacher, x: Tensor) -> Tensor:
    """What is judged: images (a latent teacher's samples decoded by its VAE, others as they are)."""
    decode = getattr(teacher, "decode", None)
    return x if decode is None else decode(x)


def to_uint8(images: Tensor) -> Tensor:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class Features:
    """A feature extractor for FID/KID: "digits" (shipped) or "inception" (torch-fidelity's, weights by path)."""

    def __init__(self, name: str = "digits", weights: str | None = None, device: str = "cpu"):
        if name not in EXTRACTORS:
            raise ValueError(f"unknown feature extractor {name!r}: expected one of {EXTRACTORS}")
        self.name, self.device = name, device
        if name == "digits":
            from .features import DigitsFeatureExtractor

            self.net = DigitsFeatureExtractor(DIGITS_EXTRACTOR, ["features"], weights)
            self.fingerprint = sha256_file(Path(weights or ASSET) / "model.safetensors")
        else:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

            if weights is None:
                hub = Path(torch.hub.get_dir()) / "checkpoints"
                cached = sorted(hub.glob("weights-inception-2015-12-05-*.pth")) if hub.is_dir() else []
                if not cached:
                    raise ValueError("the Inception-v3 feature extractor needs its weights "
                                     "(weights-inception-2015-12-05-6726825d.pth, 91 MB), which are not cached in "
                                     f"{hub} and cannot be downloaded offline: download them where there is internet "
                                     "and pass feature_weights=<path> (or put the file in that folder)")
                weights = str(cached[0])
            if not Path(weights).is_file():
                raise ValueError(f"Inception-v3 weights {weights} do not exist")
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                   feature_extractor_weights_path=weights)
            self.fingerprint = sha256_file(Path(weights))
        self.net.eval().to(device)

    @torch.no_grad()
    def __call__(self, images: Tensor, batch_size: int = 500) -> Tensor:
        """(N, D) float64 features of images in [-1, 1] (grey images are repeated to RGB for Inception); videos
        (N, C, F, H, W) are scored frame by frame: (N F, D), FID over the frames of the clips."""
        if images.dim() == 5:
            images = images.transpose(1, 2).flatten(0, 1)
        out = []
        for b in range(0, len(images), batch_size):
            x = to_uint8(images[b: b + batch_size]).to(self.device)
            if self.name == "inception" and x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            out.append(self.net(x)[0].double().cpu())
        return torch.cat(out)


def fid_features(f1: Tensor, f2: Tensor) -> float:
    """FID between two feature sets (torch-fidelity's statistics and distance)."""
    return float(fid_statistics_to_metric(fid_features_to_statistics(f1), fid_features_to_statistics(f2),
                                          verbose=False)["frechet_inception_distance"])


def fid_kid(f1: Tensor, f2: Tensor, kid_subsets: int = 50, seed: int = 0) -> dict[str, float]:
    """FID, KID (mean, std over subsets), precision and recall (k = 3 neighbourhoods) of generated features f1
    against real features f2, computed by torch-fidelity."""
    kid = kid_features_to_metric(f1, f2, kid_subsets=kid_subsets, kid_subset_size=min(1000, len(f1), len(f2)),
                                 kid_degree=3, kid_gamma=None, kid_coef0=1, rng_seed=seed, verbose=False)
    return dict(fid=fid_features(f1, f2), kid=kid["kernel_inception_distance_mean"],
                kid_std=kid["kernel_inception_distance_std"], **precision_recall(f1, f2))


def precision_recall(f1: Tensor, f2: Tensor) -> dict[str, float]:
    """Precision (how many generated samples lie on the real manifold: sharpness, fidelity) and recall (how much
    of the real manifold the generated samples cover: diversity) of f1 against f2, k = 3 neighbourhoods
    (Kynkaanniemi et al. 2019, torch-fidelity's implementation); NaN for a set of k samples or fewer, where a
    sample has no k-th neighbour (a run's report on a handful of held-out pairs)."""
    if min(len(f1), len(f2)) <= 3:
        return dict(precision=math.nan, recall=math.nan)
    prc = prc_features_to_metric(f1.float(), f2.float(), prc_neighborhood=3, prc_batch_size=10000,
                                 save_cpu_ram=True, verbose=False)
    return dict(precision=prc["precision"], recall=prc["recall"])


def cache_dir() -> Path:
    return Path(os.environ.get("LEARNSTEPS_CACHE", Path.home() / ".cache" / "learnsteps")) / "fidelity"


def reference_features(dataset: str, features: Features, image_shape: tuple[int, ...] | None = None) -> Tensor:
    """Features of a data set: "digits" (embedded) or a folder of your images (read at `image_shape`'s size and
    channels, the samples'), computed once and cached under a key of the data's and the extractor's hashes (so a
    changed data set or extractor is recomputed, never confused)."""
    digest = hashlib.sha256()
    if dataset == "digits":
        from ..teachers.gmm import digits_data

        batches = [digits_data(torch.float32)]
        digest.update(batches[0].numpy().tobytes())
    elif Path(dataset).is_dir():
        from .images import iter_reference, reference_files

        size, channels = (tuple(image_shape[-2:]), image_shape[0]) if image_shape else (None, None)  # video: frames
        for file in reference_files(dataset):  # the files and how they are read: a streamed set, featurised once
            digest.update(file.name.encode() + file.read_bytes())
        digest.update(f"{size} {channels}".encode())
        batches = iter_reference(dataset, size, channels, batch=500)
    else:
        raise ValueError(f"unknown reference data set {dataset!r}: 'digits' (embedded) or a folder of your images")
    key = digest.hexdigest()[:16] + "-" + features.fingerprint[:16]
    name = dataset if dataset == "digits" else "images"
    path = cache_dir() / f"{name}-{features.name}-{key}.safetensors"
    if path.is_file():
        try:
            return read_safetensors(path)["features"]
        except (ValueError, KeyError):  # a damaged cache entry is recomputed
            pass
    f = torch.cat([features(data) for data in batches])
    write_safetensors(path, {"features": f})
    return f

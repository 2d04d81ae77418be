"""Frozen neural teachers: learnsteps' own UNet, diffusers UNet2DModel checkpoints, and EDM-style D(x; sigma)
networks, each behind the Denoiser interface with a fingerprint recorded in everything derived from it."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from ..core.denoiser import NetworkDenoiser
from ..core.schedules import EDM, DiscreteDDPM, NoiseSchedule, make_schedule
from ..files import load_weights, parse_json, read_json, write_json, write_safetensors
from ..hf import hub_reachable
from .unet import UNet, UNetConfig

TEACHER_FORMAT, TEACHER_VERSION = "learnsteps-teacher", 1


class TeacherLoadError(ValueError):
    """A teacher that cannot be loaded: the message says what is missing and how to supply it."""


def fingerprint(module: nn.Module, config: dict) -> str:
    """sha256 of a module's weights (names, dtypes, shapes, bytes, in name order) and its config."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    return h.hexdigest()


class NetworkTeacher(NetworkDenoiser):
    """A network wrapped as a frozen teacher: eval mode, no gradients to its weights, and a fingerprint."""

    def __init__(self, net: nn.Module, noise_schedule: NoiseSchedule, prediction: str, config: dict):
        super().__init__(net, noise_schedule, prediction)
        self.config = dict(config, noise_schedule=noise_schedule.config(), prediction=prediction)
        self.eval().requires_grad_(False)
        self._fingerprint = None

    def train(self, mode: bool = True):  # a teacher stays in eval mode inside any training loop
        return super().train(False)

    def fingerprint(self) -> str:
        """Of the weights and the configuration, not of where they were read from (`model`: a hub id, its cache
        path, a copy elsewhere or another checkout's shipped asset are one teacher, whose files all accept)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.net, {k: v for k, v in self.config.items() if k != "model"})
        return self._fingerprint

    def located_fingerprint(self) -> str | None:
        """The fingerprint learnsteps recorded before 2026-12-06, which also hashed where the pipeline was read
        from (`model`): files made then are accepted where they were made (`made_for`)."""
        return fingerprint(self.net, self.config) if "model" in self.config else None


def made_for(teacher, recorded: str | None) -> bool:
    """Whether a file that records the fingerprint `recorded` (a schedule, a student, trajectories) was made for
    `teacher`: its fingerprint, or its located one (files of earlier versions); True where either side has none.
    The located one, a second hash of the weights, is computed only when the first does not match."""
    if not recorded or not hasattr(teacher, "fingerprint") or recorded == teacher.fingerprint():
        return True
    return hasattr(teacher, "located_fingerprint") and recorded == teacher.located_fingerprint()


def save_unet_teacher(directory: str | Path, net: UNet, noise_schedule: NoiseSchedule, extra: dict | None = None,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Write model.safetensors and teacher.json into `directory` (each written to a temporary file, then renamed)."""
    d = Path(directory)
    write_safetensors(d / "model.safetensors", {k: v.to(dtype) for k, v in net.state_dict().items()})
    meta = dict(format=TEACHER_FORMAT, version=TEACHER_VERSION, kind="unet", unet=net.config.to_dict(),
                noise_schedule=noise_schedule.config(), prediction="epsilon", **(extra or {}))
    write_json(d / "teacher.json", meta)
    meta["fingerprint"] = learnsteps_teacher(d, check=False).fingerprint()  # of the weights as stored
    write_json(d / "teacher.json", meta)
    return d


def _load_user_state(path: Path) -> dict[str, Tensor]:
    """A user's own weights file (safetensors, or a torch state dict read with weights_only=True)."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch raise their own types for truncated or corrupt files
        raise TeacherLoadError(f"{path} is not a readable weights file ({type(err).__name__}: {err})") from None


def learnsteps_teacher(path: Path, check: bool) -> NetworkTeacher:
    meta = read_json(path / "teacher.json", TeacherLoadError)
    if meta.get("format") != TEACHER_FORMAT or meta.get("version") != TEACHER_VERSION:
        raise TeacherLoadError(f"{path / 'teacher.json'}: unknown teacher format "
                               f"{meta.get('format')!r} version {meta.get('version')!r}")
    try:
        net = UNet(UNetConfig(**meta["unet"]))
        schedule = make_schedule(**meta["noise_schedule"])
    except (KeyError, TypeError, ValueError) as err:
        raise TeacherLoadError(f"{path / 'teacher.json'}: malformed ({type(err).__name__}: {err})") from None
    load_weights(net, path / "model.safetensors", TeacherLoadError, "teacher.json's UNet", lambda v: v.float())
    teacher = NetworkTeacher(net, schedule, "epsilon", dict(kind="unet", unet=meta["unet"]))
    teacher.shape = (net.config.in_channels, net.config.image_size, net.config.image_size)
    if check and "fingerprint" in meta and meta["fingerprint"] != teacher.fingerprint():
        raise TeacherLoadError(f"{path}: weights do not match the fingerprint in teacher.json")
    return teacher


class DiffusersUNet(nn.Module):
    """diffusers' UNet2DModel called as net(x, t[, y]) -> its first in_channels outputs (a learned variance,
    if the model has one, is dropped: samplers of the probability-flow ODE do not use it)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        p = next(self.unet.parameters())
        out = self.unet(x.to(p.dtype), t.to(p.dtype), class_labels=y).sample
        return out[:, : x.shape[1]].to(x.dtype)


PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}


def diffusers_teacher(model: str, scheduler_config: dict | None = None, subfolder: str | None = None,
                      local_files_only: bool | None = None, dtype: torch.dtype = torch.float32) -> NetworkTeacher:
    """A diffusers UNet2DModel with its DDPM scheduler config, from a local directory or a hub id.

    A pipeline directory (model_index.json) has the UNet in unet/ and the config in scheduler/; a bare UNet
    directory needs `scheduler_config` (or a scheduler_config.json beside it). Offline (HF_HUB_OFFLINE=1, or no
    network) a hub id must already be in the Hugging Face cache."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise TeacherLoadError("loading a diffusers teacher needs diffusers: pip install 'learnsteps[diffusers]'") from None
    path = Path(model)
    if subfolder is None and (path / "model_index.json").is_file():
        subfolder = "unet"
    offline = local_files_only if local_files_only is not None else os.environ.get("HF_HUB_OFFLINE") == "1"
    if not offline and not path.exists() and not hub_reachable():
        offline = True  # the cache or nothing: one clear line now, not half a minute of retries and warnings
    try:
        with warnings.catch_warnings():  # hub client deprecation notices: not the user's business
            warnings.simplefilter("ignore")
            unet = UNet2DModel.from_pretrained(model, subfolder=subfolder, local_files_only=offline, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        where = "no such local directory, and " if not path.exists() else ""
        raise TeacherLoadError(
            f"could not load the diffusers UNet {model!r}: {where}it is not in the Hugging Face cache"
            f"{' and the hub is not reachable (offline)' if offline or not path.exists() else ''}. Download it where "
            f"there is internet (e.g. `huggingface-cli download {model}`) and pass the local directory, or set "
            f"HF_HOME to a cache that holds it. ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if scheduler_config is None:
        for candidate in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
            if candidate.is_file():
                try:
                    scheduler_config = parse_json(candidate.read_bytes())
                except ValueError as err:
                    raise TeacherLoadError(f"{candidate}: not valid JSON ({err})") from None
                break
        else:
            raise TeacherLoadError(f"{model!r}: no scheduler config found; pass scheduler_config= (the DDPM "
                                   f"scheduler's num_train_timesteps, beta_schedule, beta_start, beta_end, "
                                   f"prediction_type)")
    sc = scheduler_config
    if sc.get("trained_betas") is not None:
        raise TeacherLoadError("schedulers with trained_betas are not supported yet")
    # a config without beta_start/beta_end means diffusers' class defaults, 0.0001 and 0.02 whatever the kind
    schedule = DiscreteDDPM(sc.get("beta_schedule", "linear"), sc.get("num_train_timesteps", 1000),
                            sc.get("beta_start", 0.0001), sc.get("beta_end", 0.02))
    prediction = sc.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise TeacherLoadError(f"prediction_type {prediction!r} is not supported: expected one of {list(PREDICTION_TYPES)}")
    teacher = NetworkTeacher(DiffusersUNet(unet), schedule, PREDICTION_TYPES[prediction],
                             dict(kind="diffusers", model=str(model), unet=dict(unet.config)))
    size = unet.config.sample_size
    teacher.shape = (unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
    return teacher


def edm_teacher(net: nn.Module, weights: str | Path | None = None, sigma_min: float = 0.002, sigma_max: float = 80.0):
    """Any network D(x~, sigma~[, y]) -> x0 (EDM's denoiser), with weights from a safetensors or torch state dict
    (torch.load with weights_only=True)."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise TeacherLoadError(f"EDM weights {path} do not exist")
        net.load_state_dict(_load_user_state(path))
    return NetworkTeacher(net, EDM(sigma_min, sigma_max), "edm", dict(kind="edm", net=type(net).__name__))

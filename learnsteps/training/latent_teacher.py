"""`python train.py mode=latent_teacher export_dir=learnsteps/assets/digits_latent_flow`: the shipped modern default.

A model of the kind users now bring, at the size of the 8x8 digits: latent, class-conditional, flow matching,
made of diffusers components and saved in diffusers' DiTPipeline layout, so that `teacher=digits_latent_flow`
goes through exactly the pipeline path (learnsteps.teachers.pipelines) a user's own model takes.

Stage 1, `vae/`: an AutoencoderKL (1 x 8 x 8 images <-> 4 x 4 x 4 latents), reconstruction MSE + kl_weight * KL.
Stage 2, `flow/`: a DiT (diffusers' Transformer2DModel, adaLN-zero, patch 1: 16 latent tokens) on the scaled
latents z = scaling_factor * vae.encode(x), rectified flow z_t = (1 - t) z + t eps with the velocity loss
|| v_theta(z_t, t, y) - (eps - z) ||^2 (SD3: t logit-normal), the label replaced by DiT's null class 1000 with
probability label_dropout so that the same network is the unconditional model of classifier-free guidance.
The EMA weights are exported. Each stage is a Lightning fit with its own checkpoints; a rerun resumes the stage
it was in. Why a DiT and not a conditional UNet: a DiTPipeline layout is the standard class-conditional latent
model in diffusers, and its transformer is the architecture family (DiT, SD3, FLUX) the issue targets.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import lightning as L
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..config import at_least, between, each, fraction, guidance_scale, not_a_file, one_of, positive
from ..files import sha256_file, write_json
from ..loaders import BatchDraws
from ..hf import quiet_diffusers
from .common import LossCurve, RunConfig, cosine_warmup, fit, make_logger, make_trainer, prepare_run
from ..quality.images import save_image_grid
from .teacher import DigitsDataModule

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NULL_CLASS = 1000  # DiTPipeline's unconditional label


@dataclass
class VAEConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64])  # one down-sampling per entry after the first
    latent_channels: int = 4
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    kl_weight: float = 1e-4
    RULES: ClassVar = dict(channels=each(at_least(8), non_empty=True), latent_channels=between(1, 64),
                           steps=at_least(1), batch_size=at_least(1), lr=positive, kl_weight=at_least(0))


@dataclass
class DiTConfig:
    width: int = 128  # hidden size = heads * head_dim
    head_dim: int = 32
    layers: int = 4
    RULES: ClassVar = dict(width=at_least(8), head_dim=at_least(4), layers=between(1, 64))


@dataclass
class LatentTeacherConfig(RunConfig):
    data: str = "digits"
    vae: VAEConfig = field(default_factory=VAEConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    shift: float = 1.0  # the scheduler's shift (docs/benchmarks.md: chosen by FID for 16 latent tokens)
    label_dropout: float = 0.1
    time_sampling: str = "logit_normal"  # logit_normal (SD3) | uniform
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    guidance: float = 1.25  # for the sample grid written at the end
    export_dir: str = ""  # also write the pipeline here (e.g. learnsteps/assets/digits_latent_flow)
    export_dtype: str = "float16"  # the shipped weights' storage (a pipeline loads them as float32)
    RULES: ClassVar = dict(RunConfig.RULES, data=one_of("digits"), shift=between(0.1, 20), label_dropout=fraction,
                           time_sampling=one_of("logit_normal", "uniform"), batch_size=at_least(1), lr=positive,
                           warmup_steps=at_least(0), ema_decay=fraction, guidance=guidance_scale,
                           export_dir=not_a_file, export_dtype=one_of("float16", "float32"))


def make_vae(cfg: VAEConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.channels)
    return AutoencoderKL(in_channels=1, out_channels=1, latent_channels=cfg.latent_channels,
                         block_out_channels=tuple(cfg.channels), down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1,
                         norm_num_groups=min(8, min(cfg.channels)), sample_size=8)


def make_dit(cfg: DiTConfig, latent_channels: int, latent_size: int):
    from diffusers import Transformer2DModel

    if cfg.width % cfg.head_dim:
        raise ValueError(f"dit.width={cfg.width} must be a multiple of dit.head_dim={cfg.head_dim}")
    return Transformer2DModel(sample_size=latent_size, num_layers=cfg.layers, patch_size=1,
                              attention_head_dim=cfg.head_dim, num_attention_heads=cfg.width // cfg.head_dim,
                              in_channels=latent_channels, out_channels=latent_channels,
                              activation_fn="gelu-approximate", num_embeds_ada_norm=NULL_CLASS,
                              norm_type="ada_norm_zero", norm_elementwise_affine=False)


def check_latent_teacher(cfg: LatentTeacherConfig) -> None:
    """ValueError for VAE and DiT sizes that cannot be built or run on the 8x8 digits, before anything is written:
    the rules stated, then both networks built on the meta device and run on a meta batch (shapes only, no memory,
    no time), so that whatever else diffusers refuses is refused now too."""
    channels, levels = cfg.vae.channels, len(cfg.vae.channels)
    if levels > 4:  # each entry after the first halves the side: 8 -> 4 -> 2 -> 1
        raise ValueError(f"vae.channels={channels}: each entry after the first halves the 8x8 digits, so {levels} "
                         f"entries go below one latent pixel (at most 4 entries)")
    groups = min(8, min(channels))  # make_vae's GroupNorm
    if any(c % groups for c in channels):
        raise ValueError(f"vae.channels={channels}: the VAE's GroupNorm splits every level into min(8, smallest "
                         f"entry) = {groups} groups, so every entry must be a multiple of {groups}")
    try:
        with torch.device("meta"):
            z = make_vae(cfg.vae).encode(torch.zeros(2, 1, 8, 8)).latent_dist.mean
            make_dit(cfg.dit, cfg.vae.latent_channels, z.shape[-1])(
                z, timestep=torch.zeros(2), class_labels=torch.zeros(2, dtype=torch.long))
    except ValueError:
        raise
    except Exception as err:  # diffusers and torch raise several types for sizes they cannot build
        raise ValueError(f"vae={channels} / latent_channels={cfg.vae.latent_channels}, dit.width={cfg.dit.width} / "
                         f"head_dim={cfg.dit.head_dim}: cannot be built ({type(err).__name__}: "
                         f"{str(err).splitlines()[0]})") from None


class VAETraining(L.LightningModule):
    LR_KEYS = {"lr": 0}

    def __init__(self, cfg: LatentTeacherConfig):
        super().__init__()
        self.cfg, self.vae = cfg, make_vae(cfg.vae)
        self.lr = cfg.vae.lr

    def training_step(self, batch, batch_idx):
        x, _ = batch
        posterior = self.vae.encode(x).latent_dist
        draws = BatchDraws(self.cfg.seed, self.global_step, len(x), x.device)
        z = posterior.mean + posterior.std * draws.randn(*posterior.mean.shape[1:]).to(x.dtype)
        recon = (self.vae.decode(z).sample - x).pow(2).mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = recon + self.cfg.vae.kl_weight * kl
        self.log_dict({"vae/loss": loss, "vae/recon": recon, "vae/kl": kl}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.vae.parameters(), lr=self.cfg.vae.lr, weight_decay=0.0)
        return dict(optimizer=opt, lr_scheduler=dict(scheduler=cosine_warmup(opt, 100, self.cfg.vae.steps),
                                                     interval="step"))


class FlowTraining(L.LightningModule):
    """Class-conditional rectified flow on fixed VAE posteriors (mean, std of every image, scaled)."""

    LR_KEYS = {"lr": 0}

    def __init__(self, cfg: LatentTeacherConfig, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.net = make_dit(cfg.dit, mean.shape[1], mean.shape[-1])
        self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def training_step(self, batch, batch_idx):
        index, y = batch
        draws = BatchDraws(self.cfg.seed, self.global_step, len(index), self.mean.device)
        z0 = self.mean[index] + self.std[index] * draws.randn(*self.mean.shape[1:]).to(self.mean.dtype)
        eps = draws.randn(*self.mean.shape[1:]).to(z0.dtype)
        u = draws.randn() if self.cfg.time_sampling == "logit_normal" else None
        t = (torch.sigmoid(u) if u is not None else draws.rand()).to(z0.dtype)
        y = torch.where(draws.rand() < self.cfg.label_dropout, torch.full_like(y, NULL_CLASS), y)
        z_t = (1 - t)[:, None, None, None] * z0 + t[:, None, None, None] * eps
        v = self.net(z_t, timestep=t * 1000, class_labels=y).sample
        loss = (v - (eps - z0)).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)  # the EMA follows each step before any checkpoint (teacher.py)
        self.ema.update_parameters(self.net)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.cfg.lr, weight_decay=0.0)
        return dict(optimizer=opt, lr_scheduler=dict(scheduler=cosine_warmup(opt, self.cfg.warmup_steps,
                                                                             self.cfg.trainer.max_steps),
                                                     interval="step"))


class IndexedDigits(DigitsDataModule):
    """The digits as (index, label): the flow stage draws each latent from its image's stored posterior."""

    def setup(self, stage=None):
        super().setup(stage)
        labels = self.train_set.tensors[1]
        self.train_set = torch.utils.data.TensorDataset(torch.arange(len(labels)), labels)


def stage(cfg: LatentTeacherConfig, run_dir: Path, name: str, steps: int, batch_size: int):
    """A copy of the config for one stage: its step budget, batch size and W&B run name."""
    c = copy.deepcopy(cfg)
    c.trainer.max_steps, c.batch_size = steps, batch_size
    c.wandb.name = f"{cfg.wandb.name or run_dir.name}-{name}"
    return c


def save_pipeline(directory: Path, transformer, vae, shift: float, dtype: torch.dtype, summary: dict) -> Path:
    """The DiTPipeline layout (with id2label, as hub DiT models ship it) and learnsteps.json, the sha256 of every
    file, written into a temporary directory that then replaces `directory` (never half-written); the pipeline
    loader verifies the checksums."""
    from diffusers import DiTPipeline, FlowMatchEulerDiscreteScheduler

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        with quiet_diffusers():
            pipe = DiTPipeline(transformer=copy.deepcopy(transformer).to(dtype), vae=copy.deepcopy(vae).to(dtype),
                               scheduler=FlowMatchEulerDiscreteScheduler(shift=shift))
            pipe.save_pretrained(tmp, safe_serialization=True)
        index = json.loads((tmp / "model_index.json").read_text())
        index["id2label"] = {str(i): name for i, name in enumerate(DIGIT_NAMES)}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        write_json(tmp / "learnsteps.json", dict(format="learnsteps-pipeline", version=1, files=files, **summary))
        old = directory.with_name(f".{directory.name}-old")
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def train_latent_teacher(cfg: LatentTeacherConfig) -> Path:
    check_latent_teacher(cfg)
    run_dir = prepare_run(cfg)
    # stage 1: the autoencoder
    vae_cfg = stage(cfg, run_dir, "vae", cfg.vae.steps, cfg.vae.batch_size)
    vae_module = VAETraining(vae_cfg)
    vae_logger = make_logger(vae_cfg, run_dir / "vae")
    trainer = make_trainer(vae_cfg, run_dir / "vae", [LossCurve(run_dir / "vae", "vae/loss")], vae_logger)
    fit(trainer, vae_module, DigitsDataModule(cfg.vae.batch_size, cfg.seed), run_dir=run_dir / "vae")
    if vae_logger is not None:  # one W&B run per stage (a second WandbLogger would otherwise reuse this one)
        vae_logger.experiment.finish()
    vae = vae_module.vae.cpu().eval().requires_grad_(False)
    data = DigitsDataModule()
    data.setup()
    images, labels = data.train_set.tensors
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        recon = float((vae.decode(posterior.mode()).sample - images).pow(2).mean())
    scaling = 1.0 / float(posterior.mean.std())  # unit-variance latents, as SD's scaling_factor
    vae.register_to_config(scaling_factor=scaling)
    # stage 2: the class-conditional flow model on the scaled latents
    flow_cfg = stage(cfg, run_dir, "flow", cfg.trainer.max_steps, cfg.batch_size)
    flow = FlowTraining(flow_cfg, posterior.mean * scaling, posterior.std * scaling)
    logger = make_logger(flow_cfg, run_dir / "flow")
    trainer = make_trainer(flow_cfg, run_dir / "flow", [LossCurve(run_dir / "flow")], logger)
    fit(trainer, flow, IndexedDigits(cfg.batch_size, cfg.seed), run_dir=run_dir / "flow")
    if trainer.global_rank != 0:
        return run_dir
    summary = dict(trained=dict(vae_steps=cfg.vae.steps, flow_steps=trainer.global_step, vae_recon_mse=recon,
                                final_loss=float(trainer.callback_metrics.get("train/loss", float("nan"))),
                                seed=cfg.seed, command=cfg.command))
    dtype = getattr(torch, cfg.export_dtype)
    export = [run_dir / "pipeline"] + ([Path(cfg.export_dir)] if cfg.export_dir else [])
    for d in export:
        save_pipeline(d, flow.ema.module.cpu(), vae, cfg.shift, dtype, summary)
    from ..teachers import load_teacher

    teacher = load_teacher(str(export[0]), guidance=cfg.guidance)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(80, *teacher.shape, generator=g) * teacher.noise_schedule.init_noise_std()
    from ..core.grids import make
    from ..core.sample import sample

    with torch.no_grad():
        z = sample(teacher, x_T, make("shifted", 20, teacher.noise_schedule, to_zero=True), "unipc", 2,
                   cond=torch.arange(80) % 10)
        save_image_grid(teacher.decode(z), run_dir / "samples.png", nrow=10)
    if logger is not None:
        logger.log_image("samples", [str(run_dir / "samples.png")])
    print(f"latent teacher exported to {', '.join(map(str, export))} (VAE reconstruction MSE {recon:.4f}); "
          f"samples in {run_dir / 'samples.png'}")
    return run_dir

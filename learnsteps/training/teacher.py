"""`python train.py mode=teacher data=digits`: train learnsteps' own UNet as an epsilon-predicting VP model.

The loss is DDPM's: || eps - eps_theta(alpha_t x0 + sigma_t eps, t) ||^2 with t ~ U(t_min, t_max) of the
continuous schedule. An exponential moving average of the weights is what gets exported and sampled.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import lightning as L
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import TensorDataset

from ..config import at_least, fraction, not_a_file, one_of, positive
from ..core.schedules import make_schedule
from ..teachers.gmm import digits_data
from ..teachers.network import NetworkTeacher, save_unet_teacher
from ..teachers.unet import UNet, UNetConfig, check_unet
from ..loaders import BatchDraws, train_loader
from ..quality.images import save_image_grid
from .common import RunConfig, ScheduleConfig, cosine_warmup, fit, make_logger, make_trainer, prepare_run


@dataclass
class TeacherTrainConfig(RunConfig):
    data: str = "digits"
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    class_conditional: bool = False  # train with labels (dropped 10% of the time, for classifier-free guidance)
    export_dir: str = ""  # also write the exported teacher here (e.g. learnsteps/assets/digits_unet)
    sample_steps: int = 20  # UniPC steps for the sample grid logged at the end
    RULES: ClassVar = dict(RunConfig.RULES, data=one_of("digits"), batch_size=at_least(1), lr=positive,
                           warmup_steps=at_least(0), ema_decay=fraction, export_dir=not_a_file,
                           sample_steps=at_least(1))


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's 8x8 digits in [-1, 1] (and their labels), shuffled mini-batches."""

    def __init__(self, batch_size: int = 128, seed: int = 0):
        super().__init__()
        self.batch_size, self.seed = batch_size, seed

    def setup(self, stage=None):
        from sklearn.datasets import load_digits

        self.train_set = TensorDataset(digits_data(torch.float32), torch.as_tensor(load_digits().target))

    def train_dataloader(self):
        return train_loader(self.train_set, self.batch_size, self.seed, drop_last=True)


class DiffusionTraining(L.LightningModule):
    LR_KEYS = {"lr": 0}  # a resume with another lr applies it

    def __init__(self, cfg: TeacherTrainConfig):
        super().__init__()
        self.cfg = cfg
        unet_cfg = UNetConfig(**{**cfg.unet.to_dict(), "num_classes": 10 if cfg.class_conditional else 0})
        self.net = UNet(unet_cfg)
        self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)  # updated by hand, not by gradients (and DDP must not wait for them)
        self.schedule = make_schedule(cfg.schedule.kind, **cfg.schedule.params)

    def training_step(self, batch, batch_idx):
        x0, y = batch
        s, draws = self.schedule, BatchDraws(self.cfg.seed, self.global_step, len(x0), x0.device)
        t = (s.t_min + (s.t_max - s.t_min) * draws.rand()).to(x0.dtype)
        eps = draws.randn(*x0.shape[1:]).to(x0.dtype)
        x_t = s.alpha(t)[:, None, None, None] * x0 + s.sigma(t)[:, None, None, None] * eps
        if self.cfg.class_conditional:  # drop 10% of the labels: the null class 10 trains the unconditional model
            y = torch.where(draws.rand() < 0.1, torch.full_like(y, 10), y)
            pred = self.net(x_t, t, y)
        else:
            pred = self.net(x_t, t)
        loss = (pred - eps).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, *args, **kwargs):
        # The EMA follows each optimizer step here rather than in on_train_batch_end, which Lightning
        # calls after the callbacks': a checkpoint saved there would miss this step's EMA update.
        super().optimizer_step(*args, **kwargs)
        self.ema.update_parameters(self.net)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.cfg.lr, weight_decay=0.0)
        cosine = cosine_warmup(opt, self.cfg.warmup_steps, self.cfg.trainer.max_steps)
        return dict(optimizer=opt, lr_scheduler=dict(scheduler=cosine, interval="step"))

    def teacher(self) -> NetworkTeacher:
        """The EMA network as a frozen teacher."""
        return NetworkTeacher(self.ema.module, self.schedule, "epsilon", dict(kind="unet", unet=self.net.config.to_dict()))


def sample_grid(teacher, n: int = 64, steps: int = 20, seed: int = 0, cond=None) -> torch.Tensor:
    """n samples of a teacher by UniPC-3 on a logSNR grid to sigma = 0, clipped to [-1, 1]."""
    from ..core.grids import make
    from ..core.sample import sample

    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, *teacher.shape, generator=g)
    grid = make("logsnr", steps, teacher.noise_schedule, to_zero=True)
    with torch.no_grad():
        return sample(teacher, x_T, grid, "unipc", 3, cond=cond).clamp(-1, 1)


def train_teacher(cfg: TeacherTrainConfig) -> Path:
    make_schedule(cfg.schedule.kind, **cfg.schedule.params)  # bad schedule parameters: refused before any write
    check_unet(cfg.unet)
    run_dir = prepare_run(cfg)
    module = DiffusionTraining(cfg)
    logger = make_logger(cfg, run_dir)
    trainer = make_trainer(cfg, run_dir, [], logger)
    fit(trainer, module, DigitsDataModule(cfg.batch_size, cfg.seed), run_dir=run_dir)
    if trainer.global_rank != 0:
        return run_dir
    teacher = module.teacher().cpu()
    teacher.shape = (module.net.config.in_channels, module.net.config.image_size, module.net.config.image_size)
    export = [run_dir / "teacher"] + ([Path(cfg.export_dir)] if cfg.export_dir else [])
    loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
    summary = dict(trained=dict(steps=trainer.global_step, final_loss=loss, seed=cfg.seed, command=cfg.command))
    for d in export:
        save_unet_teacher(d, teacher.net, teacher.noise_schedule, extra=summary)
    images = sample_grid(teacher, steps=cfg.sample_steps)
    save_image_grid(images, run_dir / "samples.png")
    if logger is not None:
        logger.log_image("samples", [str(run_dir / "samples.png")])
    print(f"teacher exported to {', '.join(map(str, export))}; samples in {run_dir / 'samples.png'}")
    return run_dir


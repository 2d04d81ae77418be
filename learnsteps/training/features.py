"""`python train.py mode=features data=digits`: train the digits feature network that FID/KID use here.

A classifier of the 8x8 digits (80% train, 20% held out, seeded split) with random one-pixel shifts and
a little Gaussian noise as augmentation; its penultimate layer is the feature space. Exported, with its
held-out accuracy, to run_dir/features (and `export_dir`, e.g. learnsteps/assets/digits_features).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from ..config import all_of, at_least, between, not_a_file, one_of, positive
from ..quality.features import DigitsFeatureNet, FeatureNetConfig, save_feature_net
from ..teachers.gmm import digits_data
from ..loaders import train_loader
from .common import RunConfig, fit, make_logger, make_trainer, prepare_run


@dataclass
class FeatureTrainConfig(RunConfig):
    data: str = "digits"
    net: FeatureNetConfig = field(default_factory=FeatureNetConfig)
    batch_size: int = 128
    lr: float = 2e-3
    holdout: float = 0.2
    export_dir: str = ""
    RULES: ClassVar = dict(RunConfig.RULES, data=one_of("digits"), batch_size=at_least(1), lr=positive,
                           holdout=all_of(positive, between(0, 0.5)), export_dir=not_a_file)


def digits_split(holdout: float, seed: int = 0):
    from sklearn.datasets import load_digits

    x, y = digits_data(torch.float32), torch.as_tensor(load_digits().target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(holdout * len(x)))
    return (x[perm[n_test:]], y[perm[n_test:]]), (x[perm[:n_test]], y[perm[:n_test]])


class Classifier(L.LightningModule):
    LR_KEYS = {"lr": 0}  # a resume with another lr applies it

    def __init__(self, cfg: FeatureTrainConfig):
        super().__init__()
        self.cfg, self.net = cfg, DigitsFeatureNet(cfg.net)

    def training_step(self, batch, batch_idx):
        x, y = batch
        shift = torch.randint(-1, 2, (2,)).tolist()  # one-pixel shifts, padded with the background (-1)
        x = torch.roll(torch.nn.functional.pad(x, (1, 1, 1, 1), value=-1), shift, dims=(2, 3))[..., 1:-1, 1:-1]
        x = x + 0.05 * torch.randn_like(x)
        loss = torch.nn.functional.cross_entropy(self.net(x)[1], y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/accuracy", (self.net(x)[1].argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=self.cfg.lr, weight_decay=1e-4)


def train_features(cfg: FeatureTrainConfig) -> Path:
    run_dir = prepare_run(cfg)
    train, test = digits_split(cfg.holdout, cfg.seed)
    module = Classifier(cfg)
    trainer = make_trainer(cfg, run_dir, [], make_logger(cfg, run_dir), val_check_interval=None,
                           check_val_every_n_epoch=5)
    fit(trainer, module, train_loader(TensorDataset(*train), cfg.batch_size, cfg.seed, drop_last=True),
        DataLoader(TensorDataset(*test), batch_size=512), run_dir=run_dir)
    net = module.net.eval()
    with torch.no_grad():
        accuracy = float((net(test[0])[1].argmax(1) == test[1]).float().mean())
    extra = dict(holdout_accuracy=accuracy, holdout=len(test[0]), steps=trainer.global_step, seed=cfg.seed,
                 command=cfg.command)
    for d in [run_dir / "features"] + ([Path(cfg.export_dir)] if cfg.export_dir else []):
        save_feature_net(d, net, extra)
    print(f"digits feature network: held-out accuracy {accuracy:.4f} on {len(test[0])} digits")
    return run_dir

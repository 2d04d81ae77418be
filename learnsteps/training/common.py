"""What every training mode shares: the run configuration, W&B (offline by default), the Lightning Trainer."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..config import to_yaml
from ..files import write_atomically, write_text
from ..loaders import SeededShuffle


@dataclass
class TrainerConfig:
    max_steps: int = 2000
    accelerator: str = "auto"  # cpu | gpu | auto
    devices: Any = 1  # an int, a list of indices, or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # ddp for several devices (torchrun or SLURM set the ranks)
    precision: str = "32-true"  # "16-mixed" / "bf16-mixed" on GPUs
    log_every_n_steps: int = 25
    val_check_interval: int = 500  # steps between validations
    checkpoint_every: int = 100  # steps between checkpoints (a rerun in the same run_dir resumes from the last)
    progress_bar: bool = True


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline (sync later with `wandb sync`), online, or disabled
    project: str = "learnsteps"
    name: str | None = None


@dataclass
class ScheduleConfig:
    kind: str = "vp_linear"
    params: dict = field(default_factory=dict)


@dataclass
class RunConfig:
    mode: str = ""
    seed: int = 0
    run_dir: str = ""  # default: runs/<mode>
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    command: str = ""  # filled in by train.py: the command line that made this run, recorded in its outputs


def run_path(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir or f"runs/{cfg.mode}")


def prepare_run(cfg: RunConfig) -> Path:
    """Create the run directory, save the resolved config in it, seed everything."""
    run_dir = run_path(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", to_yaml(cfg))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return run_dir


def make_logger(cfg: RunConfig, run_dir: Path):
    """A W&B logger writing under the run directory (offline unless asked), or None when disabled."""
    mode = os.environ.get("WANDB_MODE", cfg.wandb.mode)
    if mode == "disabled":
        return None
    from lightning.pytorch.loggers import WandbLogger

    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        os.environ.setdefault(var, str(run_dir.resolve() / "wandb-files"))
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(project=cfg.wandb.project, name=cfg.wandb.name or run_dir.name, save_dir=str(run_dir),
                       mode=mode, log_model=False)


def make_trainer(cfg: RunConfig, run_dir: Path, callbacks: list, logger=None, find_unused_parameters: bool = False,
                 **kwargs) -> L.Trainer:
    """A Trainer that checkpoints every `trainer.checkpoint_every` steps into run_dir/checkpoints (atomically),
    resumes exactly (ExactResume; training loaders come from `train_loader`, which shards over DDP ranks itself)
    and stops on a NaN or Inf training loss before that step is checkpointed. `find_unused_parameters`: for
    modules whose parameters are not all in every step's graph (DDP must then look for them)."""
    t = cfg.trainer
    several = t.num_nodes > 1 or (len(t.devices) if isinstance(t.devices, (list, tuple)) else t.devices) not in (1, "1")
    ddp = t.strategy == "ddp" or (t.strategy == "auto" and several)
    strategy = "ddp_find_unused_parameters_true" if ddp and find_unused_parameters else t.strategy
    ckpt = ModelCheckpoint(dirpath=last_checkpoint(run_dir).parent, save_last=True,
                           every_n_train_steps=t.checkpoint_every)
    return L.Trainer(
        default_root_dir=str(run_dir), max_steps=t.max_steps, accelerator=t.accelerator, devices=t.devices,
        num_nodes=t.num_nodes, strategy=strategy, precision=t.precision, log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.progress_bar, logger=logger if logger is not None else False,
        callbacks=[StopOnNonFiniteLoss(), ExactResume(), *callbacks, ckpt], plugins=[AtomicCheckpointIO()],
        enable_model_summary=False, use_distributed_sampler=False, **kwargs)


def last_checkpoint(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def fit(trainer: L.Trainer, module, *data, run_dir: Path) -> None:
    """trainer.fit, resuming from run_dir/checkpoints/last.ckpt when an earlier run left one."""
    last = last_checkpoint(run_dir)
    trainer.fit(module, *data, ckpt_path=str(last) if last.exists() else None)


class NonFiniteLoss(ValueError):
    """Training produced a NaN or Inf loss (the CLI reports it and exits with code 2)."""


class StopOnNonFiniteLoss(Callback):
    """Raise NonFiniteLoss at the first NaN or Inf training loss. It runs before the checkpoint callbacks
    (Lightning orders those last), so the step that produced it is never saved: last.ckpt stays the last good
    state, and a rerun with a smaller learning rate (or other data) can resume from it."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            last = last_checkpoint(trainer.default_root_dir)
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was saved yet"
            raise NonFiniteLoss(f"the training loss is {float(loss)} at step {trainer.global_step}; training stopped "
                                f"and {kept} (a smaller learning rate may help)")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save, to a temporary file renamed over the target: a kill mid-write keeps the old file.
    Loading is torch.load with weights_only=True whatever the Lightning version: a checkpoint holds tensors and
    plain values only, so a tampered one cannot run code."""

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        write_atomically(Path(path), lambda tmp: super(AtomicCheckpointIO, self).save_checkpoint(checkpoint, tmp,
                                                                                                  storage_options))


class ExactResume(Callback):
    """Counts the samples trained on into the training loader's SeededShuffle (which Lightning checkpoints
    through ResumableLoader) and saves the random generators' states with every checkpoint, putting them back
    before the first batch after a resume: on one process a resumed run continues exactly as if never
    stopped. Checkpoint callbacks run after this one (Lightning orders them last), so the count includes the
    batch being checkpointed."""

    def __init__(self):
        self.pending = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.pending is not None:  # after the data of the first batch are fetched, as in the uninterrupted run
            torch.set_rng_state(self.pending["torch"])
            kind, key, pos, has_gauss, gauss = self.pending["numpy"]
            np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(self.pending["python"])
            if torch.cuda.is_available() and self.pending["cuda"]:
                torch.cuda.set_rng_state_all(self.pending["cuda"])
            self.pending = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sampler = getattr(trainer.train_dataloader, "sampler", None)
        if isinstance(sampler, SeededShuffle):
            sampler.consumed += len(next(iter(batch.values())) if isinstance(batch, dict) else batch[0])

    def state_dict(self):
        kind, key, pos, has_gauss, gauss = np.random.get_state()  # as a tensor: checkpoints load weights_only
        return dict(torch=torch.get_rng_state(), numpy=(kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss,
                                                        gauss),
                    python=random.getstate(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])

    def load_state_dict(self, state):
        self.pending = state

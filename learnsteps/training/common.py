"""What every training mode shares: the run configuration, W&B (offline by default), the Lightning Trainer."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L

from ..config import to_yaml


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
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
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


def make_trainer(cfg: RunConfig, run_dir: Path, callbacks: list, logger=None, **kwargs) -> L.Trainer:
    t = cfg.trainer
    return L.Trainer(
        default_root_dir=str(run_dir), max_steps=t.max_steps, accelerator=t.accelerator, devices=t.devices,
        num_nodes=t.num_nodes, strategy=t.strategy, precision=t.precision, log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.progress_bar, logger=logger if logger is not None else False, callbacks=callbacks,
        enable_model_summary=False, **kwargs)

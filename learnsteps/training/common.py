"""What every training mode shares: the run configuration, W&B (offline by default), the Lightning Trainer."""
from __future__ import annotations

import fcntl
import hashlib
import math
import os
import random
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import OmegaConf

from ..config import at_least, not_a_file, one_of, to_yaml
from ..core.schedules import SCHEDULES
from ..files import checksum_path, verify_checksum, write_checksummed, write_text
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
    RULES: ClassVar = dict(
        max_steps=at_least(-1), accelerator=one_of("cpu", "gpu", "cuda", "mps", "auto"), num_nodes=at_least(1),
        devices=lambda v: None if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1) or (
            isinstance(v, list) and v and all(isinstance(i, int) and i >= 0 for i in v))
        else "must be a count >= 1, a list of device indices, or 'auto'",
        strategy=one_of("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp"),
        precision=one_of("32-true", "32", "64-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"),
        log_every_n_steps=at_least(1), val_check_interval=at_least(1), checkpoint_every=at_least(1))


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline (sync later with `wandb sync`), online, or disabled
    project: str = "learnsteps"
    name: str | None = None
    RULES: ClassVar = dict(mode=one_of("offline", "online", "disabled"))


@dataclass
class ScheduleConfig:
    kind: str = "vp_linear"
    params: dict = field(default_factory=dict)
    RULES: ClassVar = dict(kind=one_of(*SCHEDULES))


@dataclass
class RunConfig:
    mode: str = ""
    seed: int = 0
    run_dir: str = ""  # default: runs/<mode>
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    command: str = ""  # filled in by train.py: the command line that made this run, recorded in its outputs
    restart: bool = False  # empty an existing run_dir and start over (instead of resuming it)
    RULES: ClassVar = dict(run_dir=not_a_file)


def teacher_device(cfg: RunConfig) -> torch.device:
    """Where a frozen teacher computes (its pairs, trajectories, and in training): the accelerator the trainer
    uses (this process's GPU under DDP), else the CPU."""
    a = cfg.trainer.accelerator
    if a in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        devices = cfg.trainer.devices
        first = devices[0] if isinstance(devices, list) else 0
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", first)))
    if a in ("mps", "auto") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def run_path(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir or f"runs/{cfg.mode}")


class RunDirError(ValueError):
    """A run directory that this run may not use: another process holds it, or it holds another run."""


# What a rerun in the same run directory may change and still resume: how it reports, how long it trains, and
# learning rates (applied on resume by ApplyChangedLearningRates, so that "rerun with a smaller rate" works).
RESUMABLE_CHANGES = {"command", "restart", "trainer.progress_bar", "trainer.log_every_n_steps",
                     "trainer.checkpoint_every", "trainer.max_steps", "wandb.mode", "wandb.name", "wandb.project"}
LEARNING_RATES = {"lr", "lr_theta", "lr_xi"}
_LOCKS: dict[str, int] = {}  # run directories this process holds, kept open (and locked) until it exits


def _primary_process() -> bool:
    """Whether this is global rank 0 (or no DDP launcher set a rank): the process that owns the run directory."""
    return all(int(os.environ.get(k, "0") or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _lock(run_dir: Path) -> None:
    """Hold an exclusive lock on the directory itself (no file is created) until this process exits."""
    key = str(run_dir.resolve())
    if key in _LOCKS:
        return
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RunDirError(f"{run_dir} is in use by another learnsteps process (it holds the directory's lock); wait "
                          f"for it to finish, or choose another run_dir") from None
    _LOCKS[key] = fd


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _checksum_line(body: str) -> str:
    """config.yaml's last line: the sha256 of everything above it (without the final newline)."""
    return f"# sha256: {hashlib.sha256(body.rstrip(chr(10)).encode()).hexdigest()}"


def read_run_config(path: Path) -> dict:
    """The flattened configuration a run directory's config.yaml records, after checking its checksum line."""
    body, _, last = path.read_text().rstrip("\n").rpartition("\n")
    if last != _checksum_line(body):
        raise RunDirError(f"{path} is damaged or was edited (its checksum line does not match): restart=true to start "
                          f"over in {path.parent}")
    return _flat(yaml.safe_load(body) or {})


def resume_conflicts(cfg: RunConfig, run_dir: Path) -> list[str]:
    """The settings in which `cfg` differs from the run already in run_dir, other than those a resume may change."""
    old = read_run_config(run_dir / "config.yaml")
    new = _flat(OmegaConf.to_container(OmegaConf.structured(cfg)))
    default = _flat(OmegaConf.to_container(OmegaConf.structured(type(cfg))))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES and k not in LEARNING_RATES
            and not (k not in old and new.get(k) == default.get(k))]  # a setting added since, at its default


def prepare_run(cfg: RunConfig) -> Path:
    """Take the run directory: lock it against other processes; refuse it if it holds a run of another
    configuration (unless cfg.restart, which empties it); save the resolved config (with a checksum line); seed
    everything. Called after all input checks, so a refused run creates nothing."""
    run_dir = run_path(cfg)
    primary = _primary_process()
    if run_dir.is_dir() and primary:
        _lock(run_dir)
        if cfg.restart:
            for entry in run_dir.iterdir():
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        elif (run_dir / "config.yaml").is_file():
            conflicts = resume_conflicts(cfg, run_dir)
            if conflicts:
                raise RunDirError(f"{run_dir} holds a run of another configuration ({'; '.join(conflicts)}): choose "
                                  f"another run_dir, or restart=true to start over there")
            if last_checkpoint(run_dir).exists():  # the run will resume from it: checked now, before any work
                AtomicCheckpointIO.verify(last_checkpoint(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    if primary:
        _lock(run_dir)
        text = to_yaml(cfg)
        write_text(run_dir / "config.yaml", f"{text}{_checksum_line(text)}\n")
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
    ckpt = StepCheckpoint(dirpath=last_checkpoint(run_dir).parent, save_last=True,
                          every_n_train_steps=t.checkpoint_every)
    return L.Trainer(
        default_root_dir=str(run_dir), max_steps=t.max_steps, accelerator=t.accelerator, devices=t.devices,
        num_nodes=t.num_nodes, strategy=strategy, precision=t.precision, log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.progress_bar, logger=logger if logger is not None else False,
        callbacks=[StopOnNonFiniteLoss(), StopOnDivergence(), ExactResume(), ApplyChangedLearningRates(), *callbacks,
                   StopOnSignal(), ckpt],  # StopOnSignal after every callback that records the step
        plugins=[AtomicCheckpointIO()],
        enable_model_summary=False, use_distributed_sampler=False, **kwargs)


def last_checkpoint(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def validation_follows(trainer: L.Trainer) -> bool:
    """Whether the training loop validates right after the batch that just ended (Lightning's own decision)."""
    loop = trainer.fit_loop
    return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint every `every_n_train_steps`, except that a step with a validation right after it
    is saved after that validation. Lightning resumes a checkpoint saved at the end of a training batch by skipping
    the validation due after that batch, and LD3's best grid (and its learning-rate decay) depends on every
    validation: a resume from such a checkpoint did not end where the uninterrupted run did."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        if due and validation_follows(trainer):
            self._defer_save_until_validation = not self._should_skip_saving_checkpoint(trainer)
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def resume_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a rerun resumes from: last.ckpt, or an hpc_ckpt_<n>.ckpt of Lightning's SLURM requeue (saved
    when SLURM sends its requeue signal) where that is newer; None for a new run."""
    found = [p for p in [last_checkpoint(run_dir), *Path(run_dir).glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def fit(trainer: L.Trainer, module, *data, run_dir: Path) -> None:
    """trainer.fit, resuming from the checkpoint an earlier run left (resume_checkpoint)."""
    start = resume_checkpoint(run_dir)
    trainer.fit(module, *data, ckpt_path=str(start) if start else None)


class Interrupted(SystemExit):
    """A run stopped by SIGTERM (a scheduler's pre-emption or time limit) or SIGINT (Ctrl+C). It exits with code
    128 + the signal's number, the shell's convention for a process a signal ended (143, 130): a job script sees a
    failure, and a rerun of the same command resumes."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(128 + signum)
        self.signum = signum
        self.message = message or f"interrupted by {signal.Signals(signum).name}"

    def __str__(self) -> str:
        return self.message


def raise_interrupted(signum, frame) -> None:
    """A signal handler: stop here with Interrupted (the command lines install it for SIGTERM and SIGINT; writes are
    atomic, so stopping anywhere leaves finished files and no half-written one)."""
    raise Interrupted(signum)


class StopOnSignal(Callback):
    """SIGTERM or SIGINT while training: the step in progress finishes (with the validation due after it, if any),
    is checkpointed as last.ckpt, and the run stops with Interrupted. Lightning's own SIGTERM handling (which stops at the next step without a checkpoint
    and exits with code 0) is replaced while the training loop runs; SIGUSR1, with which SLURM asks Lightning to
    save an hpc checkpoint and requeue the job (auto_requeue), is left to Lightning. A second SIGINT stops at once
    (the last checkpoint is then the periodic one). On several ranks the decision is reduced over them every step,
    so all stop after the same step; rank 0 writes the checkpoint."""

    def __init__(self):
        self.received, self.previous, self.after_validation = None, {}, None

    def on_train_start(self, trainer, pl_module):
        self.received = self.after_validation = None
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise Interrupted(signum, "interrupted by a second SIGINT in the middle of a step (the last checkpoint "
                                      "is the last periodic one)")
        self.received = signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        signum = self.received or signal.SIGTERM  # a rank the signal did not reach stops with its sender
        if validation_follows(trainer):  # the step is done once its validation is (StepCheckpoint says why)
            self.after_validation = signum
        else:
            self._stop(trainer, signum)

    def on_validation_end(self, trainer, pl_module):
        if self.after_validation is not None and not trainer.sanity_checking:
            self._stop(trainer, self.after_validation)

    def _stop(self, trainer, signum: int):
        last = last_checkpoint(trainer.default_root_dir)
        trainer.save_checkpoint(last, weights_only=False)
        raise Interrupted(signum, f"interrupted by {signal.Signals(signum).name} after step {trainer.global_step}, "
                                  f"checkpointed in {last}")

    def _restore(self, *_, **__):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    on_train_end = on_exception = teardown = _restore


class StopOnDivergence(Callback):
    """A diverged run is never exported: a validation loss (`key`, what LD3 and DSNO log) that is NaN or Inf, or
    more than FACTOR times the size of the run's first validation loss above it, stops it with NonFiniteLoss. The
    first one (LD3: its starting grid's, before any step) sets the scale; a run that learns does not go FACTOR x
    beyond it (LD3's restarts start from the best baseline grids), while one whose learning rate makes it blow up
    goes there within a few validations. A loss may be negative (an unbiased MMD term, `class_mmd`, is below zero
    where the batch is as spread as the data), so the scale is its size, not its value. The checkpoints then hold
    the diverged state: the advice is to start over."""

    FACTOR = 1e3

    def __init__(self, key: str = "val/loss"):
        self.key, self.first = key, None

    def on_validation_end(self, trainer, pl_module):
        value = trainer.callback_metrics.get(self.key)
        if value is None:
            return
        value, step = float(value), trainer.global_step
        if self.first is None and math.isfinite(value):
            self.first = value
        elif self.first is None or not math.isfinite(value) or value > self.first + self.FACTOR * abs(self.first):
            keys = sorted(k for k in LEARNING_RATES if hasattr(getattr(pl_module, "cfg", None), k))
            what = (f"{value}" if not math.isfinite(value) or self.first is None
                    else f"{value:.4g}, {(value - self.first) / abs(self.first):.3g}x the size of the first "
                         f"validation's {self.first:.4g} above it")
            advice = ("the first validation is not finite: the teacher's samples or the starting point are at fault "
                      "(check the teacher, its guidance and dtype)" if self.first is None else
                      f"training diverged; the checkpoints hold the diverged state, so start over with a smaller "
                      f"{' / '.join(keys) or 'learning rate'} and restart=true")
            raise NonFiniteLoss(f"the validation loss ({self.key}) is {what} at step {step}: stopped, nothing "
                                f"exported ({advice})")

    def state_dict(self) -> dict:
        return dict(first=self.first)

    def load_state_dict(self, state: dict) -> None:
        self.first = state.get("first")


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
            keys = sorted(k for k in LEARNING_RATES if hasattr(getattr(pl_module, "cfg", None), k))
            advice = (f"rerun the same command with a smaller {' / '.join(keys)}: it resumes from {last} with the "
                      f"new rate" if last.exists() else f"no checkpoint was saved yet; rerun with a smaller "
                      f"{' / '.join(keys) or 'learning rate'}")
            raise NonFiniteLoss(f"the training loss is {float(loss)} at step {trainer.global_step}; training "
                                f"stopped ({advice})")


class CheckpointError(ValueError):
    """A checkpoint that fails its checksum or cannot be read."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save, to a temporary file renamed over the target (a kill mid-write keeps the old file),
    with its sha256 beside it; loading verifies that checksum first (a flipped bit or a truncated file is a
    CheckpointError, never a silent resume into something else), then torch.load with weights_only=True whatever
    the Lightning version: a checkpoint holds tensors and plain values only, so a tampered one cannot run code."""

    @staticmethod
    def _advice(path) -> str:
        return f"restart=true starts the run over in {Path(path).parent.parent}"

    @staticmethod
    def verify(path) -> None:
        try:
            verify_checksum(path, CheckpointError)
        except CheckpointError as err:
            raise CheckpointError(f"{err}: {AtomicCheckpointIO._advice(path)}") from None

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        self.verify(path)
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a file it cannot unpickle
            raise CheckpointError(f"{path} cannot be read ({type(err).__name__}): {self._advice(path)}") from None

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        write_checksummed(Path(path), lambda tmp: super(AtomicCheckpointIO, self).save_checkpoint(checkpoint, tmp,
                                                                                                   storage_options))

    def remove_checkpoint(self, path):
        super().remove_checkpoint(path)
        checksum_path(Path(path)).unlink(missing_ok=True)


class ApplyChangedLearningRates(Callback):
    """Checkpoints record the learning rates of the configuration (`cfg.lr`, `lr_theta`, `lr_xi`); a resume whose
    configuration asks for another one scales that optimizer's rates (and its scheduler's base rates) by new / old,
    keeping any decay the run had applied. The module says which optimizer each key drives (LR_KEYS)."""

    def __init__(self):
        self.module, self.saved = None, {}

    def setup(self, trainer, pl_module, stage):
        self.module = pl_module

    def _current(self) -> dict:
        cfg = getattr(self.module, "cfg", None)
        return {k: float(getattr(cfg, k)) for k in getattr(self.module, "LR_KEYS", {}) if hasattr(cfg, k)}

    def state_dict(self):
        return dict(lrs=self._current())

    def load_state_dict(self, state):
        self.saved = dict(state.get("lrs", {}))

    def on_train_start(self, trainer, pl_module):
        for key, new in self._current().items():
            old = self.saved.get(key)
            if old is None or old == new or old <= 0:
                continue
            factor, opt = new / old, trainer.optimizers[pl_module.LR_KEYS[key]]
            for group in opt.param_groups:
                group["lr"] *= factor
                if "initial_lr" in group:
                    group["initial_lr"] *= factor
            for config in trainer.lr_scheduler_configs:
                if config.scheduler.optimizer is opt:
                    config.scheduler.base_lrs = [b * factor for b in config.scheduler.base_lrs]
            print(f"resuming with {key}={new} (the checkpoint's run used {old}): learning rates scaled x{factor:.4g}")
        self.saved = {}


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


class LossCurve(Callback):
    """The training loss (`key`) at every optimizer step, kept in the checkpoints (a resumed run's curve is whole),
    written at the end of the fit as curve.csv and curve.png (raw, and a moving average) into `directory`."""

    def __init__(self, directory: Path, key: str = "train/loss", smooth: int = 100):
        self.directory, self.key, self.smooth, self.points = Path(directory), key, smooth, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.points.append((trainer.global_step, float(loss)))

    def state_dict(self) -> dict:
        return dict(points=self.points)

    def load_state_dict(self, state: dict) -> None:
        self.points = [tuple(p) for p in state.get("points", [])]

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank != 0 or not self.points:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ..files import save_figure, write_csv

        write_csv(self.directory / "curve.csv", [dict(step=s, loss=v) for s, v in self.points])
        steps, values = np.array(self.points).T
        k = min(self.smooth, len(values))
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot(steps, values, lw=0.5, alpha=0.35, label=self.key)
        ax.plot(steps[k - 1:], np.convolve(values, np.ones(k) / k, mode="valid"), lw=1.5, label=f"moving average ({k})")
        ax.set(xlabel="step", ylabel=self.key, yscale="log")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        fig.tight_layout()
        save_figure(fig, self.directory / "curve.png", dpi=110)
        plt.close(fig)


def warmup_schedule(opt, warmup: int, decay_at: int = 0):
    """Linear warm-up over `warmup` steps, then a constant rate (decay_at = 0) or a cosine decay to 0 at step
    `decay_at` (the teacher modes' schedule)."""
    def factor(k):
        warm = min(1.0, (k + 1) / max(1, warmup))
        if decay_at <= 0:
            return warm
        return warm * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * min(k, decay_at) / decay_at)).item())
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def cosine_warmup(opt, warmup: int, total: int):
    """Linear warm-up over `warmup` steps, then a cosine decay to 0 at step `total`."""
    return warmup_schedule(opt, warmup, total)

"""`python train.py mode=dsno`: distil a teacher into a one-pass DSNO student.

Data: teacher trajectories from seeded noise (learnsteps.trajectories) at M output times, with the teacher's
x0-predictions there (DSNO's targets; `targets=states` uses the states). Loss: sum over the M points of
w(t_m) d(pred_m, target_m) with DSNO's clamped sqrt-SNR weight w = clamp(alpha/sigma, 1, 1e4) (the clean end gets
1e4) or uniform weights. Adam with warm-up, then a constant rate or a cosine decay to 0; EMA of the weights with
warm-up (what is exported), mixed precision on GPUs by `trainer.precision`, resumable from the run's last
checkpoint.
"""
from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import lightning as L
import torch
from torch.optim.swa_utils import AveragedModel

from ..config import TeacherOptions, all_of, at_least, between, existing_dir, fraction, not_a_file, one_of, positive
from ..quality.losses import check_loss_name, distance, pixel_space
from ..teachers import load_teacher
from ..teachers.network import NetworkTeacher
from ..teachers.unet import UNetConfig, check_unet
from ..files import read_json
from ..trajectories import TrajectoryDataModule, TrajectoryError, TrajectorySpec, check_directory
from ..training.common import (RunConfig, fit, make_logger, make_trainer, prepare_run, run_path,
                               teacher_device, warmup_schedule)
from .backbones import PLACEMENTS, place, sites
from .student import DSNOStudent, StudentConfig, build_student, fresh_unet, read_time, save_student


@dataclass
class DSNOConfig(RunConfig, TeacherOptions):
    teacher: str = "digits_unet"  # with TeacherOptions: conditions, guidance, height, width, teacher_dtype, ...
    times: str = "quadratic"  # spacing of the M output times: quadratic | uniform (in t) | logsnr
    num_times: int = 4  # M, the output times after x_T (M = 1 with temporal=false: plain one-step distillation)
    output_times: list[float] = field(default_factory=list)  # explicit, decreasing, ending at the clean data
    targets: str = "x0"  # x0 (the teacher's x0-predictions, as DSNO) or states
    trajectories: TrajectorySpec = field(default_factory=lambda: TrajectorySpec(
        n=2048, shard_size=512, solver="unipc", order=3, steps_per_interval=10, batch_size=512))
    data_dir: str = ""  # default <run_dir>/trajectories; reusable by any run whose times it holds
    modes: int = 2  # Fourier modes kept by the temporal convolutions
    temporal: bool = True
    export_every: int = 0  # > 0: the EMA student every that many steps to run_dir/curve (a training curve)
    placement: str = "every"  # temporal layers after every block | every_other | one_per_level (dsno/backbones.py)
    backbone: str = "auto"  # auto (the teacher's own network when it has one) | teacher | unet (a fresh UNet)
    unet: UNetConfig = field(default_factory=UNetConfig)  # the fresh UNet's (backbone=unet, or a teacher without one)
    # l2 | l1 | pseudo_huber | lpips | features | contraction | feature_contraction, or a sum such as
    # "l2+3*feature_contraction": each term weighted by its factor as it is (no calibration; pixel terms on a latent
    # teacher's decoded images, as LD3's); a batch term (contraction) keeps the student's samples as far apart as
    # the teacher's where a paired loss alone pulls them together (docs/dsno.md)
    loss: str = "l2"
    feature_net: str = ""  # the feature terms' network, as LD3's: digits (default) or a transformers vision model
    data_reference: str = ""  # data_mmd, class_mmd: a folder of your images (default for 1x8x8 teachers: the digits)
    weighting: str = "snr"  # snr (DSNO's clamp(alpha/sigma, 1, 1e4)) | uniform
    batch_size: int = 64
    lr: float = 2e-4
    lr_schedule: str = "constant"  # constant after the warm-up | cosine (to 0 at trainer.max_steps)
    warmup_steps: int = 100
    ema_decay: float = 0.999
    val_fraction: float = 0.05
    RULES: ClassVar = dict(
        RunConfig.RULES, **TeacherOptions.RULES, times=one_of("quadratic", "uniform", "logsnr"), num_times=between(1, 64),
        targets=one_of("x0", "states"), data_dir=not_a_file, modes=at_least(1), loss=check_loss_name,
        feature_net=existing_dir, data_reference=existing_dir,
        placement=one_of(*PLACEMENTS), export_every=at_least(0), backbone=one_of("auto", "teacher", "unet"),
        weighting=one_of("snr", "uniform"), batch_size=at_least(1), lr=positive,
        lr_schedule=one_of("constant", "cosine"), warmup_steps=at_least(0),
        ema_decay=fraction, val_fraction=all_of(positive, fraction))


SPACINGS = ("quadratic", "uniform", "logsnr")
# the student's backbone runs in eval mode on purpose (DSNOStudent.train): no dropout, no class-label dropout
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


def ema_update(decay: float):
    """The EMA's update, with diffusers' EMAModel warm-up: decay_n = min(decay, (1 + n) / (10 + n)) after n updates,
    so that a short run's (or a training curve's early) export is not mostly its initial weights. Integer buffers (a
    pipeline's class-label table) are copied, never averaged."""
    @torch.no_grad()
    def update(ema: list, current: list, n) -> None:
        if torch.is_floating_point(ema[0]) or torch.is_complex(ema[0]):
            torch._foreach_lerp_(ema, current, 1 - min(decay, (1 + float(n)) / (10 + float(n))))
        else:
            torch._foreach_copy_(ema, current)
    return update


class DSNOModule(L.LightningModule):
    """`index`: where the student's M times sit among the stored trajectory times."""

    LR_KEYS = {"lr": 0}  # the configuration's learning rate -> its optimizer (applied anew on a resume that changes it)

    def __init__(self, cfg: DSNOConfig, student: DSNOStudent, weights: torch.Tensor, index: torch.Tensor,
                 dist=None):
        super().__init__()
        self.cfg, self.student = cfg, student
        self.ema = AveragedModel(student, multi_avg_fn=ema_update(cfg.ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)  # updated by hand, not by gradients (and DDP must not wait for them)
        self.register_buffer("weights", weights / weights.sum())
        self.register_buffer("index", index)
        self.dist = dist or distance(cfg.loss)  # (a pixel loss on a latent teacher: loss_of(cfg, teacher))

    def _loss(self, net, batch):
        target = batch["x0" if self.cfg.targets == "x0" else "trajectory"][:, self.index].float()
        pred = net(batch["x_T"].float(), batch.get("cond"))  # a conditional teacher's condition index per sample
        per_time = torch.stack([self.dist(pred[:, m], target[:, m]).mean() for m in range(pred.shape[1])])
        return (self.weights * per_time).sum(), per_time, (pred[:, -1] - target[:, -1]).pow(2).mean().sqrt()

    def training_step(self, batch, batch_idx):
        loss, per_time, _ = self._loss(self.student, batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/loss_t{m}": v for m, v in enumerate(per_time)})
        return loss

    def optimizer_step(self, *args, **kwargs):
        # The EMA follows each optimizer step here rather than in on_train_batch_end, which Lightning
        # calls after the callbacks': a checkpoint saved there would miss this step's EMA update.
        super().optimizer_step(*args, **kwargs)
        self.ema.update_parameters(self.student)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        """Loader 0: held-out trajectories (val/loss); loader 1: as many it trains on (val/loss_seen)."""
        loss, _, rmse_last = self._loss(self.ema.module, batch)  # rmse_last: at the last output time, whatever the loss
        if dataloader_idx == 1:
            self.log("val/loss_seen", loss, add_dataloader_idx=False)
            return
        self.log("val/loss", loss, prog_bar=True, add_dataloader_idx=False)
        self.log("val/rmse_last", rmse_last, add_dataloader_idx=False)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.student.parameters(), lr=self.cfg.lr)
        decay_at = self.trainer.max_steps if self.cfg.lr_schedule == "cosine" else 0
        schedule = warmup_schedule(opt, self.cfg.warmup_steps, decay_at)
        return dict(optimizer=opt, lr_scheduler=dict(scheduler=schedule, interval="step"))


class ExportCurve(L.Callback):
    """The EMA student every `every` optimizer steps, to directory/step-NNNNNN (the training curve benchmarks score;
    a resumed run adds to it)."""

    def __init__(self, every: int, directory: Path, meta: dict):
        self.every, self.directory, self.meta = every, directory, meta

    def on_train_batch_end(self, trainer, module, *args):
        step, where = trainer.global_step, self.directory / f"step-{trainer.global_step:06d}"
        if step % self.every == 0 and trainer.is_global_zero and not (where / "student.json").exists():
            save_student(where, module.ema.module, dict(self.meta, training=dict(steps=step)))


def student_times(cfg: DSNOConfig, schedule) -> torch.Tensor:
    """The M output times after x_T (at t_max), ending at the clean data. Spaced by u_m = 1 - m/M in t, in t
    squared (DSNO's CIFAR-10 times when t_min = 0: 0.5625, 0.25, 0.0625, 0) or in lambda; the last is t_zero.
    Depending on m/M only, M's times are among 2M's: one trajectory set serves the whole M ablation."""
    if cfg.output_times:
        t = torch.tensor(cfg.output_times, dtype=torch.float64)
    else:
        if cfg.times not in SPACINGS:
            raise ValueError(f"unknown output time spacing {cfg.times!r}: expected one of {SPACINGS}")
        if cfg.num_times < 1:
            raise ValueError(f"num_times must be >= 1, got {cfg.num_times}")
        u = 1 - torch.arange(1, cfg.num_times, dtype=torch.float64) / cfg.num_times
        lo, hi = torch.tensor(schedule.t_min, dtype=torch.float64), torch.tensor(schedule.t_max, dtype=torch.float64)
        if cfg.times == "logsnr":
            t = schedule.t_of_lambda(schedule.lambda_(lo) + u * (schedule.lambda_(hi) - schedule.lambda_(lo)))
        else:
            t = lo + (hi - lo) * (u**2 if cfg.times == "quadratic" else u)
        t = torch.cat([t, torch.tensor([schedule.t_zero], dtype=torch.float64)])
    ok = torch.isfinite(t).all() and (t[1:] < t[:-1]).all() and t[0] < schedule.t_max
    if not ok or t[-1] != schedule.t_zero:
        raise ValueError(f"DSNO output times must decrease strictly from below t_max = {schedule.t_max} to the "
                         f"clean data t_zero = {schedule.t_zero}; got {t.tolist()}")
    return t


def stored_index(data_times: torch.Tensor, times: torch.Tensor, where: Path) -> torch.Tensor:
    """Positions of the student's times among a trajectory set's stored times (x_T first)."""
    index = []
    for t in times.tolist():
        hit = torch.nonzero((data_times - t).abs() <= 1e-9 * max(1.0, abs(t))).flatten()
        if len(hit) == 0:
            raise ValueError(f"the trajectories in {where} do not hold output time {t:.6g} (they hold "
                             f"{[round(x, 6) for x in data_times.tolist()]}); use another data_dir")
        index.append(int(hit[0]))
    return torch.tensor(index)


def time_weights(cfg: DSNOConfig, schedule, times: torch.Tensor) -> torch.Tensor:
    if cfg.weighting == "uniform":
        return torch.ones(len(times))
    if cfg.weighting != "snr":
        raise ValueError(f"unknown weighting {cfg.weighting!r}: expected 'snr' or 'uniform'")
    ratio = schedule.alpha(times) / schedule.sigma(times)  # inf at t_zero
    return torch.clamp(torch.nan_to_num(ratio, posinf=1e4), 1.0, 1e4).float()


def loss_of(cfg: DSNOConfig, teacher):
    """d(pred, target) -> (B,): cfg.loss, its pixel terms on a latent teacher's decoded images. A sum is not
    calibrated (Sum.calibrate): its factors are its weights, the paired terms in the model's own units."""
    return distance(cfg.loss, getattr(teacher, "shape", None), cfg.feature_net, reference=cfg.data_reference,
                    **pixel_space(teacher, cfg.loss))


def own_network(cfg: DSNOConfig, teacher) -> bool:
    """Whether the student is the teacher's own network (else a fresh UNet): backbone=auto takes one if there is."""
    has = isinstance(teacher, NetworkTeacher)
    if cfg.backbone == "teacher" and not has:
        raise ValueError(f"backbone=teacher: teacher {cfg.teacher!r} has no network to copy (use backbone=unet)")
    return has and cfg.backbone != "unet"


def make_student(cfg: DSNOConfig, teacher, times: torch.Tensor) -> DSNOStudent:
    """The teacher's own network (weights copied, called as the teacher calls it, unguided) with temporal layers at
    the chosen placement, or a fresh UNet (read as x0) for a teacher without a network or with backbone=unet. For a
    conditional teacher the student takes the condition index (its condition table, or one class per condition)."""
    s, own = teacher.noise_schedule, own_network(cfg, teacher)
    k = len(teacher.conditions) if getattr(teacher, "conditional", False) else 0
    unet = {} if own else {**cfg.unet.to_dict(), "in_channels": teacher.shape[0], "image_size": teacher.shape[-1],
                           "num_classes": k}
    prediction = teacher.prediction if own else "x0"
    # the network's time input for the clean end t_zero: its smallest trained time (t_min)
    time_input = [float(t) if t != s.t_zero else float(s.t_min) for t in times]
    scfg = StudentConfig(output_times=times.tolist(), time_input=time_input, input_time=float(s.t_max),
                         read_time=read_time(s, prediction, float(s.t_max)), prediction=prediction,
                         noise_schedule=s.config(), targets=cfg.targets, backbone="teacher" if own else "unet",
                         unet=unet, shape=list(teacher.shape), num_conditions=k, modes=cfg.modes,
                         temporal=cfg.temporal, placement=cfg.placement)
    net = copy.deepcopy(teacher.net) if own else fresh_unet(scfg)
    return build_student(scfg, net, probe_cond=bool(k))


def check_dsno(cfg: DSNOConfig):
    """Everything that can be wrong with a DSNO run's input, found before anything is written: (teacher, the
    student's times, the trajectory spec, the data directory, where the times sit among the stored ones)."""
    if cfg.lr_schedule == "cosine" and cfg.trainer.max_steps < 1:
        raise ValueError(f"lr_schedule=cosine decays to 0 at trainer.max_steps, which is {cfg.trainer.max_steps}: "
                         f"give the run a length")
    teacher = load_teacher(cfg.teacher, **cfg.teacher_options())
    loss_of(cfg, teacher)  # fail now, not after generating trajectories
    shape = tuple(getattr(teacher, "shape", ()))
    if own_network(cfg, teacher):
        if cfg.temporal and cfg.num_times > 1:
            place(sites(teacher.net)[1], cfg.placement)  # a backbone the temporal layers know
    elif len(shape) == 4:
        raise ValueError(f"DSNO's fresh student is learnsteps' 2-D UNet, and teacher {cfg.teacher!r} samples video "
                         f"latents {shape} (C, F, H, W): the student on the teacher's own network (backbone=teacher) "
                         f"takes them")
    elif len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"DSNO's fresh student is learnsteps' UNet over square images; teacher {cfg.teacher!r} "
                         f"samples shape {shape or None}")
    else:
        check_unet(UNetConfig(**{**cfg.unet.to_dict(), "in_channels": teacher.shape[0],
                                 "image_size": teacher.shape[-1]}))
    sched = teacher.noise_schedule
    times = student_times(cfg, sched)
    spec = copy.deepcopy(cfg.trajectories)
    spec.output_times = [float(sched.t_max)] + times.tolist()
    spec.store_x0, spec.to_zero = cfg.targets == "x0", True
    data_dir = Path(cfg.data_dir) if cfg.data_dir else run_path(cfg) / "trajectories"
    if (data_dir / "manifest.json").is_file():  # a finished set: any whose times include the student's will do
        manifest = read_json(data_dir / "manifest.json", TrajectoryError)
        try:
            data_times = torch.tensor(manifest["output_times"], dtype=torch.float64)
        except (KeyError, TypeError, ValueError) as err:
            raise TrajectoryError(f"{data_dir / 'manifest.json'}: malformed ({type(err).__name__}: {err})") from None
    else:  # generated (or resumed) here: it must be this spec
        check_directory(data_dir, spec, teacher, cfg.teacher)
        data_times = torch.tensor(spec.output_times, dtype=torch.float64)
    return teacher, times, spec, data_dir, stored_index(data_times, times, data_dir)


def train_dsno(cfg: DSNOConfig) -> Path:
    teacher, times, spec, data_dir, index = check_dsno(cfg)
    sched = teacher.noise_schedule
    run_dir = prepare_run(cfg)
    teacher.to(teacher_device(cfg))  # its trajectories and sample pictures on the accelerator training uses
    data = TrajectoryDataModule(data_dir, batch_size=cfg.batch_size, val_fraction=cfg.val_fraction, seed=cfg.seed,
                                teacher=teacher, spec=spec, teacher_name=cfg.teacher, seen=True)
    student = make_student(cfg, teacher, times)
    module = DSNOModule(cfg, student, time_weights(cfg, sched, times), index, loss_of(cfg, teacher))
    logger = make_logger(cfg, run_dir)
    guidance = float(getattr(teacher, "cfg", getattr(teacher, "guidance", 1.0)))  # a pipeline's CFG scale
    meta = dict(teacher=dict(fingerprint=teacher.fingerprint(), name=cfg.teacher, **teacher.record()),
                noise_schedule=teacher.noise_schedule.config(), targets=cfg.targets,
                # a guided teacher's trajectories are learned: the student samples in one unguided pass
                guidance_distilled=guidance if guidance != 1 else None, network_calls_per_sample=1)
    curve = [ExportCurve(cfg.export_every, run_dir / "curve", meta)] if cfg.export_every else []
    trainer = make_trainer(cfg, run_dir, curve, logger)
    t0 = time.perf_counter()
    fit(trainer, module, data, run_dir=run_dir)
    seconds = time.perf_counter() - t0
    if trainer.global_rank != 0:
        return run_dir
    ema = module.ema.module.cpu().eval()
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    meta["training"] = dict(steps=trainer.global_step, seconds=round(seconds, 1), loss=cfg.loss,
                            weighting=cfg.weighting, trajectories=spec.n, validation=val, seed=cfg.seed,
                            command=cfg.command)
    save_student(run_dir / "student", ema, meta)
    _samples(cfg, teacher, ema, run_dir, logger)
    print(f"one-step student: {run_dir / 'student'} (validation {json.dumps(val)})")
    if (note := memorising(val, spec.n)) is not None:
        print(note)
    return run_dir


def memorising(val: dict, n: int, ratio: float = 2.0) -> str | None:
    """A line when the held-out loss is `ratio` times or more the loss on as many training trajectories: the
    student has learned its trajectories rather than the teacher's map, and more of them help more than more steps
    (the latent DiT at 4096 trajectories, docs/benchmarks.md)."""
    held_out, seen = val.get("val/loss"), val.get("val/loss_seen")
    if held_out is None or not seen or held_out < ratio * seen:
        return None
    return (f"note: the held-out loss is {held_out / seen:.1f}x the loss on trajectories the student trained on: it "
            f"memorises its {n} trajectories; more of them (trajectories.n) will help more than more steps")


def _samples(cfg, teacher, student, run_dir: Path, logger) -> None:
    """Student (one pass) beside the teacher (UniPC-3, 40 steps) on the same noise."""
    from ..core.grids import make
    from ..core.sample import sample
    from ..trajectories import sample_noise
    from ..quality.images import save_image_grid

    from ..trajectories import conditions_of

    from ..core.denoiser import device_of

    index = torch.arange(10**6, 10**6 + 32)
    device = device_of(teacher)
    x_T = sample_noise(index.tolist(), teacher.shape, cfg.seed, teacher.noise_schedule.init_noise_std()).float()
    x_T, cond = x_T.to(device), conditions_of(teacher, index)
    cond = None if cond is None else cond.to(device)
    with torch.no_grad():
        ours = student.to(device).sample(x_T, cond)
        ref = sample(teacher, x_T, make("logsnr", 40, teacher.noise_schedule, to_zero=True), "unipc", 3,
                     cond=cond).float()
        if hasattr(teacher, "decode"):  # a latent teacher: its VAE's images
            ours, ref = teacher.decode(ours), teacher.decode(ref)
    pairs = torch.stack([ours.clamp(-1, 1), ref.clamp(-1, 1)], 1).flatten(0, 1)
    if pairs.dim() == 4 and pairs.shape[1] in (1, 3):
        save_image_grid(pairs, run_dir / "samples.png", nrow=16)
        if logger is not None:
            logger.log_image("dsno/student_vs_teacher", [str(run_dir / "samples.png")])

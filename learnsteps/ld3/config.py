"""LD3's configuration (`python train.py mode=ld3`, configs/ld3.yaml): the schema, its checks, what `auto` means
for a teacher, and the hand grids LD3 starts from and is compared with."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..config import (TeacherOptions, at_least, between, each, existing_dir, existing_file, not_a_file, one_of,
                      positive)
from ..core.denoiser import device_of, dtype_of
from ..core.grids import make as make_grid
from ..core.schedules import NoiseSchedule
from ..quality.losses import check_loss_name
from ..teachers.model_index import HUGE_TEACHER, LARGE_TEACHER
from ..trajectories import sample_noise
from ..training.common import RunConfig

# the hand grids LD3 starts from and compares with; "shifted": flow teachers only; "gits" (the teacher's own
# trajectory-regularity grid, Chen et al. 2024; a few dozen teacher calls to find) when asked for
BASELINES = ("time_uniform", "time_quadratic", "logsnr", "edm", "shifted", "gits")
DEFAULT_BASELINES = BASELINES[:-1]


def or_auto(rule):
    """`rule`, or the value "auto" (chosen by the teacher's size: AUTO_SETTINGS)."""
    return lambda v: None if v == "auto" else rule(v)


@dataclass
class PairsConfig:
    train: Any = 50  # auto: AUTO_SETTINGS
    val: Any = 50
    test: Any = 200  # held-out pairs for the final comparison with the baseline grids; 0: none (a run whose
                     # schedule another run starts from and compares, as `make demo`'s LD3 run)
    seed: int = 0
    solver: str = "unipc"  # the teacher's solver: a solver of the core, or "reference" (adaptive dopri5)
    order: int = 3
    steps: Any = 40  # its steps from t_max to t_min (LD3's own teachers use UniPC-3 with 20)
    rtol: float = 1e-5  # tolerance of the reference solver
    directory: str = ""  # default <run_dir>/pairs; reusable across runs with the same teacher
    batch_size: Any = 128  # the teacher's batch when it makes pairs and LD3 scores grids without gradients
    RULES: ClassVar = dict(train=or_auto(at_least(1)), val=or_auto(at_least(1)),
                           test=or_auto(lambda v: None if v == 0 else at_least(2)(v)), order=at_least(1),
                           steps=or_auto(between(1, 10_000)), rtol=positive, directory=not_a_file,
                           batch_size=or_auto(at_least(1)))


@dataclass
class LD3Config(RunConfig, TeacherOptions):
    teacher: str = "digits_unet"  # with TeacherOptions: conditions, guidance, height, width, teacher_dtype, ...
    solver: str = "dpm_solver++"
    order: int = 3
    options: dict = field(default_factory=dict)
    nfe: int = 6
    to_zero: bool = True  # the last step goes to sigma = 0 (x = x0)
    time_mode: str = "lambda"  # learn the grid in lambda (log-SNR) or in t
    init: str = "best"  # initial grid: a baseline kind, "uniform" (LD3's: uniform in lambda or t), or "best"
    # (the baseline with the lowest validation loss; LD3 then starts from, and never exports worse than, it)
    decoupled: bool = True  # learn LD3's model-evaluation offsets xi in phase 2
    window: float = 0.5  # xi clip: this fraction of the smallest grid gap
    t_min: float = 0.0  # the learned grid's last time before its step to zero; 0: the schedule's own (docs/ld3.md)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    loss: str = "auto"  # auto | l2 | l1 | pseudo_huber | lpips | features | spread | contraction |
    # feature_contraction | data_mmd (to the digits data, not the teacher) | class_mmd (the same within each class),
    # or a sum with optional factors: l2+features, l2+300*feature_contraction+300*class_mmd
    # the feature terms' network: a digits feature network directory (default: the shipped loss network) or a
    # transformers vision model's folder (e.g. a local copy of facebook/dinov2-small: any image size)
    feature_net: str = ""
    data_reference: str = ""  # data_mmd, class_mmd: a folder of your images (default for 1x8x8 teachers: the digits)
    soft_forcing: bool = True
    gamma: float = 0.001  # ball radius r = gamma * d / NFE^2
    shift_lr: float = 0.0  # step of x'_T; 0: the official 12 / NFE
    batch_size: Any = 2  # auto: AUTO_SETTINGS
    rounds_theta: int = 2  # phase 1 epochs (grid only)
    rounds_joint: int = 5  # phase 2 epochs (grid and offsets)
    restarts: int = 1  # train this many times, from the best `restarts` baseline grids (init=best); export the best
    lr_theta: float = 0.005
    optimizer: str = "rmsprop"  # for theta: rmsprop (the official code's, momentum 0.9) or adam (bias-corrected)
    lr_xi: float = 0.1  # divided by NFE, as the official code does
    patience: int = 5
    lr_decay: float = 0.8
    min_lr_theta: float = 5e-5
    min_lr_xi: float = 1e-6
    val_every_n_steps: Any = 5
    remat: str = "auto"  # recompute each network call in the backward pass: true | false | auto (REMAT_ABOVE)
    baselines: list[str] = field(default_factory=lambda: list(DEFAULT_BASELINES))
    # learn=solver: the solver's coefficients too (the generalized multistep solver, initialised as `solver`)
    learn: str = "grid"  # grid | solver
    lr_coefficients: float = 0.05  # Adam, for the table's corrections
    coefficient_penalty: float = 0.01  # weight of the L2 penalty on the corrections
    init_schedule: str = ""  # start from this schedule file's grid and model times (an LD3 run's schedule.json)
    RULES: ClassVar = dict(
        RunConfig.RULES, **TeacherOptions.RULES, order=at_least(1), nfe=between(1, 100), time_mode=one_of("lambda", "time"),
        init=one_of("uniform", "best", *BASELINES), window=between(0, 0.5), t_min=at_least(0),
        loss=lambda v: None if v == "auto" else check_loss_name(v), remat=one_of("auto", "True", "False", "true", "false"),
        feature_net=existing_dir, data_reference=existing_dir, gamma=at_least(0), shift_lr=at_least(0),
        batch_size=or_auto(at_least(1)),
        rounds_theta=at_least(0), rounds_joint=at_least(0), restarts=between(1, 10), lr_theta=positive,
        optimizer=one_of("rmsprop", "adam"), lr_xi=at_least(0), patience=at_least(1),
        lr_decay=between(1e-6, 1), min_lr_theta=at_least(0), min_lr_xi=at_least(0), val_every_n_steps=or_auto(at_least(1)),
        baselines=each(one_of(*BASELINES), non_empty=True), learn=one_of("grid", "solver"),
        lr_coefficients=positive, coefficient_penalty=at_least(0), init_schedule=existing_file)


# loss=auto: the sum of L2 (paired accuracy) and the digits feature distance (what FID sees) for 1x8x8 teachers,
# whose feature network ships; L2 elsewhere (docs/ld3.md says why).
AUTO_LOSS = {(1, 8, 8): "l2+features"}
# remat=auto rematerialises for teachers of at least this many parameters: below it the graph of N network calls
# is small, and recomputing them costs a quarter of a training step.
REMAT_ABOVE = 5_000_000


# The settings `auto` stands for (configs/ld3.yaml), by the teacher's size. Small (the digits models): the recipe of
# issue #21's robustness table. Large (LARGE_TEACHER parameters or more: SD1.5, SDXL) and huge (HUGE_TEACHER or more:
# FLUX.1, Wan, Qwen-Image): what learns a schedule in about an hour on one 80 GB GPU, from the per-call costs of
# docs/scaling.md (issue #31): LD3's own batch 2, 100 (huge: 32) training pairs, its teachers' UniPC-3 with 20 steps
# for the pairs, fewer validations, a few pairs per no-gradient batch (pair making, validation, the report).
AUTO_SETTINGS = {
    "small": dict(batch_size=32, val_every_n_steps=10,
                  pairs=dict(train=200, val=200, test=200, steps=40, batch_size=128)),
    "large": dict(batch_size=2, val_every_n_steps=25, pairs=dict(train=100, val=50, test=50, steps=20, batch_size=4)),
    "huge": dict(batch_size=2, val_every_n_steps=25, pairs=dict(train=32, val=16, test=32, steps=20, batch_size=2)),
}


def size_of(params: int) -> str:
    """A teacher's size class (AUTO_SETTINGS' key) by its parameter count."""
    return "huge" if params >= HUGE_TEACHER else "large" if params >= LARGE_TEACHER else "small"


def resolve_auto(cfg: LD3Config, teacher) -> None:
    """Replace every `auto` by what it means for this teacher (recorded so in config.yaml): loss, remat, and the
    AUTO_SETTINGS of its size, saying so for a large teacher."""
    if cfg.loss == "auto":
        cfg.loss = AUTO_LOSS.get(tuple(getattr(teacher, "shape", ())), "l2")
    params = sum(p.numel() for p in teacher.parameters())
    if cfg.remat == "auto":
        cfg.remat = str(params >= REMAT_ABOVE).lower()
    cfg.remat = str(cfg.remat).lower()
    size = size_of(params)
    chosen = []
    for owner, values in ((cfg, AUTO_SETTINGS[size]), (cfg.pairs, AUTO_SETTINGS[size]["pairs"])):
        for k, v in values.items():
            if getattr(owner, k) == "auto":  # (cfg.pairs itself is a PairsConfig, never "auto")
                setattr(owner, k, v)
                chosen.append(f"{'pairs.' if owner is cfg.pairs else ''}{k}={v}")
    if size != "small" and chosen:
        dtype = getattr(teacher, "config", {}).get("dtype", "")
        print(f"LD3: a {size} teacher ({params / 1e6:.0f} M parameters{', ' + dtype if dtype else ''}): auto settings "
              f"{' '.join(chosen)} remat={cfg.remat} (docs/scaling.md: about an hour on one GPU; set any of them to "
              f"override)", flush=True)


def learned_ends(cfg: LD3Config, schedule: NoiseSchedule) -> NoiseSchedule:
    """The schedule whose ends the learned grid spans: the teacher's, with its last time t_min = cfg.t_min where set
    (the grid then stops there and steps to zero from it, as diffusers' flow pipelines stop at 1 / steps)."""
    if not cfg.t_min:
        return schedule
    if not schedule.t_zero < cfg.t_min < getattr(schedule, "t_cap", schedule.t_max):
        raise ValueError(f"t_min = {cfg.t_min} must lie between the schedule's t_zero = {schedule.t_zero} and its "
                         f"noisiest time of finite log-SNR, {getattr(schedule, 't_cap', schedule.t_max)}")
    ends = copy.copy(schedule)
    ends.t_min = float(cfg.t_min)
    return ends


def baseline_grid(cfg: LD3Config, teacher, kind: str, steps: int, learned_end: bool = False) -> torch.Tensor:
    """A hand grid of `kind` (to the learned grid's t_min with learned_end, as a start for it; else to the
    schedule's own, the grid users have); GITS' is found on the teacher's trajectories from 64 noises of their
    own seed."""
    s = learned_ends(cfg, teacher.noise_schedule) if learned_end else teacher.noise_schedule
    if kind != "gits":
        return make_grid(kind, steps, s, to_zero=cfg.to_zero)
    x_T = sample_noise(range(64), tuple(teacher.shape), cfg.seed + 7919, s.init_noise_std())
    x_T = x_T.to(device_of(teacher), dtype_of(teacher))
    return make_grid("gits", steps, s, to_zero=cfg.to_zero, teacher=teacher, x_T=x_T)

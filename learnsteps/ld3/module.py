"""`python train.py mode=ld3`: learn the time grid of a solver at a given NFE from teacher pairs (LD3).

Algorithm (Tong et al., "Learning to Discretize Denoising Diffusion ODEs", ICLR 2025; ../shared brief sec. 1):
- teacher pairs (x_T, x_0) from the reference solver of the core; half train, half validation;
- student: the chosen solver on the LD3Grid, backpropagated through (with per-step rematerialisation);
- soft teacher forcing: each training sample's start x'_T may move inside the ball of radius
  r = gamma d / NFE^2 (in units of the prior's std) around x_T, by a projected gradient step that is kept only
  where that sample's loss goes down;
- phase 1 trains the grid (theta) alone, phase 2 the grid and the decoupled offsets (xi); RMSprop for theta,
  SGD for xi, gradient norms clipped to 1, both learning rates decayed x0.8 after `patience` validations
  without improvement (restarting from the best grid), and the best-validation grid is what gets exported.
Deviation from the official code, on purpose: validation measures the unrelaxed objective (the true x_T of
held-out pairs), so model selection is not scored on soft-optimised latents.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from ..core.denoiser import dtype_of
from ..core.grids import applicable, make as make_grid
from ..config import at_least, between, each, existing_dir, existing_file, not_a_file, one_of, positive
from ..core.sample import check_options, check_order, get_solver, nfe as nfe_of, solve
from ..core.steps import Grid
from ..files import save_figure, write_csv, write_text
from ..loaders import train_loader
from ..quality.losses import check_loss_name, distance, pixel_space
from ..schedule import Schedule, ScheduleError, load_schedule, save_schedule
from ..teachers.network import load_teacher
from ..trajectories import TrajectoryDataset, TrajectorySpec, check_directory, generate, sample_noise
from ..training.common import RunConfig, fit, make_logger, make_trainer, prepare_run, run_path
from .grid import LD3Grid
from .solver import LearnedTable, base_form

# the hand grids LD3 starts from and compares with; "shifted": flow teachers only; "gits" (the teacher's own
# trajectory-regularity grid, Chen et al. 2024; a few dozen teacher calls to find) when asked for
BASELINES = ("time_uniform", "time_quadratic", "logsnr", "edm", "shifted", "gits")
DEFAULT_BASELINES = BASELINES[:-1]


@dataclass
class PairsConfig:
    train: int = 50
    val: int = 50
    test: int = 200  # held-out pairs for the final comparison with the baseline grids
    seed: int = 0
    solver: str = "unipc"  # the teacher's solver: a solver of the core, or "reference" (adaptive dopri5)
    order: int = 3
    steps: int = 40  # its steps from t_max to t_min (LD3's own teachers use UniPC-3 with 20)
    rtol: float = 1e-5  # tolerance of the reference solver
    directory: str = ""  # default <run_dir>/pairs; reusable across runs with the same teacher
    RULES: ClassVar = dict(train=at_least(1), val=at_least(1), test=at_least(2), order=at_least(1),
                           steps=between(1, 10_000), rtol=positive, directory=not_a_file)


@dataclass
class LD3Config(RunConfig):
    teacher: str = "digits_unet"
    conditions: Any = field(default_factory=list)  # a conditional pipeline's class labels or prompts (or a prompt file)
    guidance: float = 1.0  # its classifier-free guidance scale
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
    pairs: PairsConfig = field(default_factory=PairsConfig)
    loss: str = "auto"  # auto | l2 | l1 | pseudo_huber | lpips | features, or a sum such as l2+features (see below)
    feature_net: str = ""  # loss=features: a digits feature network directory (default: the shipped loss network)
    soft_forcing: bool = True
    gamma: float = 0.001  # ball radius r = gamma * d / NFE^2
    shift_lr: float = 0.0  # step of x'_T; 0: the official 12 / NFE
    batch_size: int = 2
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
    val_every_n_steps: int = 5
    remat: str = "auto"  # recompute each network call in the backward pass: true | false | auto (REMAT_ABOVE)
    baselines: list[str] = field(default_factory=lambda: list(DEFAULT_BASELINES))
    # learn=solver: the solver's coefficients too (the generalized multistep solver, initialised as `solver`)
    learn: str = "grid"  # grid | solver
    lr_coefficients: float = 0.05  # Adam, for the table's corrections
    coefficient_penalty: float = 0.01  # weight of the L2 penalty on the corrections
    init_schedule: str = ""  # start from this schedule file's grid and model times (an LD3 run's schedule.json)
    RULES: ClassVar = dict(
        RunConfig.RULES, order=at_least(1), nfe=between(1, 100), time_mode=one_of("lambda", "time"),
        init=one_of("uniform", "best", *BASELINES), window=between(0, 0.5),
        loss=lambda v: None if v == "auto" else check_loss_name(v), remat=one_of("auto", "True", "False", "true", "false"),
        feature_net=existing_dir, gamma=at_least(0), shift_lr=at_least(0), batch_size=at_least(1),
        rounds_theta=at_least(0), rounds_joint=at_least(0), restarts=between(1, 10), lr_theta=positive,
        optimizer=one_of("rmsprop", "adam"), lr_xi=at_least(0), patience=at_least(1),
        lr_decay=between(1e-6, 1), min_lr_theta=at_least(0), min_lr_xi=at_least(0), val_every_n_steps=at_least(1),
        baselines=each(one_of(*BASELINES), non_empty=True), learn=one_of("grid", "solver"),
        lr_coefficients=positive, coefficient_penalty=at_least(0), init_schedule=existing_file)


def steps_for_nfe(solver: str, nfe: int, to_zero: bool) -> int:
    if nfe < 1:
        raise ValueError(f"nfe must be at least 1, got {nfe}")
    steps = (nfe + int(to_zero)) // 2 if solver == "heun" else nfe
    if nfe_of(solver, steps, to_zero) != nfe:
        raise ValueError(f"{solver} cannot spend exactly {nfe} model calls"
                         f"{' with a final step to sigma = 0' if to_zero else ''}")
    return steps


class LD3(L.LightningModule):
    LR_KEYS = {"lr_theta": 0, "lr_xi": 1, "lr_coefficients": 2}  # -> optimizers (a resume applies changed rates)

    def __init__(self, cfg: LD3Config, teacher, x_T_train: torch.Tensor):
        super().__init__()
        resolve_auto(cfg, teacher)
        self.cfg, self.starts = cfg, []
        self.__dict__["teacher"] = teacher  # frozen and not ours: kept out of the state dict and the optimisers
        self.steps = steps_for_nfe(cfg.solver, cfg.nfe, cfg.to_zero)
        check_order(cfg.solver, cfg.order, self.steps)
        self.grid = LD3Grid(teacher.noise_schedule, self.steps, cfg.time_mode, cfg.to_zero, cfg.window)
        self.table = None
        if cfg.learn == "solver":
            form, width = base_form(cfg.solver, cfg.order, cfg.options, Grid(teacher.noise_schedule, *self.grid(False)))
            self.table = LearnedTable(cfg.solver, cfg.order, cfg.options, self.steps, form, width)
        self.register_buffer("x_prime", x_T_train.clone())  # soft-forced starts, saved in checkpoints
        self.register_buffer("x_start", x_T_train.clone())
        d = x_T_train[0].numel()
        self.radius = cfg.gamma * d / cfg.nfe**2 * teacher.noise_schedule.init_noise_std()
        self.dist = distance(cfg.loss, feature_net=cfg.feature_net, **pixel_space(teacher))
        self.automatic_optimization = False
        self.best = dict(loss=math.inf, state=self.snapshot(), step=0)
        self.best_of_start = dict(self.best)
        self.bad_validations, self.val_losses, self.started = 0, [], 0

    def snapshot(self) -> dict:
        """What is learned (the grid and offsets; the coefficient corrections with learn=solver), copied."""
        state = dict(grid=self.grid.state_dict(), **({} if self.table is None else dict(table=self.table.state_dict())))
        return copy.deepcopy(state)

    def restore(self, state: dict) -> None:
        self.grid.load_state_dict(state["grid"])
        if self.table is not None:
            self.table.load_state_dict(state["table"])

    def start_from(self, start) -> None:
        """A start: a grid, or (grid, model-evaluation times); the coefficient corrections go back to zero."""
        t, t_eval = start if isinstance(start, tuple) else (start, None)
        self.grid.init_from(t, t_eval)
        if self.table is not None:
            with torch.no_grad():
                self.table.delta.zero_()

    def set_starts(self, starts: list) -> None:
        """The grids the restarts begin from, in order (none: the grid's own uniform initialisation)."""
        self.starts = list(starts)
        if self.starts:
            self.start_from(self.starts[0])
            self.best["state"] = self.snapshot()
            self.best_of_start = dict(self.best)

    @property
    def epochs_per_start(self) -> int:
        return self.cfg.rounds_theta + self.cfg.rounds_joint

    def phase(self) -> int:
        return 1 if self.current_epoch % self.epochs_per_start < self.cfg.rounds_theta else 2

    def on_train_epoch_start(self):
        """A restart: the grid goes back to its next starting grid, the optimisers to their first state. The
        best grid so far is kept (it is what gets exported); `started` makes a resumed epoch not restart twice."""
        start = self.current_epoch // self.epochs_per_start
        if start <= self.started:
            return
        self.started = start
        self.start_from(self.starts[start])
        self.best_of_start = dict(loss=math.inf, state=self.snapshot(), step=self.global_step)
        for opt, lr in zip(self.optimizers(), self.initial_lrs()):
            opt.optimizer.state.clear()
            for group in opt.param_groups:
                group["lr"] = lr
        self.bad_validations = 0
        self.x_prime.copy_(self.x_start)

    def student(self, x_T: torch.Tensor, cond: torch.Tensor | None = None,
                decoupled: bool | None = None) -> torch.Tensor:
        decoupled = self.cfg.decoupled and (self.phase() == 2 if decoupled is None else decoupled)
        t, t_eval = self.grid(decoupled)
        return solve(self.teacher, x_T.to(self.x_prime.dtype), t, eval_grid=t_eval, cond=condition(cond),
                     remat=self.cfg.remat == "true", **self.solver_kwargs(t, t_eval)).x

    def solver_kwargs(self, t: torch.Tensor, t_eval: torch.Tensor) -> dict:
        """The solver on grid (t, t_eval): the configured one, or with learn=solver the tabulated solver with the
        learned table on that grid."""
        if self.table is None:
            return dict(solver=self.cfg.solver, order=self.cfg.order, **self.cfg.options)
        table = self.table(Grid(self.teacher.noise_schedule, t, t_eval))
        return dict(solver="tabulated", order=self.table.width, coefficients=table, form=self.table.form)

    def training_step(self, batch, batch_idx):
        idx, _, target, cond = batch
        opts = self.optimizers()
        x = self.x_prime[idx].clone().requires_grad_(self.cfg.soft_forcing)
        loss_each = self.dist(self.student(x, cond), target)
        loss = loss_each.mean()
        penalty = 0.0 if self.table is None else self.cfg.coefficient_penalty * self.table.penalty()
        for opt in opts:
            opt.zero_grad()
        self.manual_backward(loss + penalty)
        for p in self.learned_parameters():
            torch.nn.utils.clip_grad_norm_([p], 1.0)
        opts[0].step()
        if self.phase() == 2 and self.cfg.decoupled:
            opts[1].step()
        if self.table is not None:  # the coefficients learn in both phases, with the grid
            opts[2].step()
        if self.cfg.soft_forcing:
            self.soft_forcing_step(idx, x, target, cond, loss_each.detach())
        self.log_dict({"train/loss": loss, "train/phase": float(self.phase()),
                       "train/lr_theta": opts[0].param_groups[0]["lr"]}, prog_bar=True)
        return loss.detach()  # seen by StopOnNonFiniteLoss

    @torch.no_grad()
    def soft_forcing_step(self, idx, x, target, cond, loss_before):
        """x' <- project(x' - lr grad) onto the ball around x_T; kept where that sample's loss goes down."""
        lr = self.cfg.shift_lr or 12.0 / self.cfg.nfe
        start = self.x_start[idx]
        cand = x.detach() - lr * x.grad
        delta = cand - start
        norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, *[1] * (x.dim() - 1))
        cand = start + delta * torch.clamp(self.radius / norm, max=1.0)
        keep = self.dist(self.student(cand, cond), target) < loss_before
        if self.trainer.world_size > 1:  # every rank applies every rank's moves (DDP broadcasts rank 0's buffers)
            idx, cand, keep = (self.all_gather(v).flatten(0, 1) for v in (idx, cand, keep))
        self.x_prime[idx[keep]] = cand[keep]
        self.log("train/soft_forcing_kept", keep.float().mean())

    def validation_step(self, batch, batch_idx):
        _, x_T, target, cond = batch
        with torch.no_grad():
            self.val_losses.append(self.dist(self.student(x_T, cond), target))

    def on_validation_epoch_end(self):
        if not self.val_losses:
            return
        val = float(self.all_gather(torch.cat(self.val_losses)).mean())
        self.val_losses = []
        self.log("val/loss", val, prog_bar=True, sync_dist=False)
        state = dict(loss=val, state=self.snapshot(), step=self.global_step)
        if val < self.best["loss"]:  # the best of all starts: what gets exported
            self.best = state
        if val < self.best_of_start["loss"]:  # the best of this start: where a plateau sends it back
            self.best_of_start, self.bad_validations = state, 0
        elif not self.trainer.sanity_checking:
            self.bad_validations += 1
            if self.bad_validations >= self.cfg.patience:  # decay, and go back to this start's best grid
                for opt, floor in zip(self.optimizers(), (self.cfg.min_lr_theta, self.cfg.min_lr_xi, 0.0)):
                    for group in opt.param_groups:
                        group["lr"] = max(floor, group["lr"] * self.cfg.lr_decay)
                self.restore(self.best_of_start["state"])
                self.bad_validations = 0
        self.log("val/best", self.best["loss"])

    def learned_parameters(self) -> list[torch.nn.Parameter]:
        """theta, xi (and the coefficient corrections): one optimiser each, in this order."""
        return [self.grid.theta, self.grid.xi] + ([] if self.table is None else [self.table.delta])

    def initial_lrs(self) -> tuple[float, ...]:
        """The learning rates of theta, xi (and the corrections) at the start of each restart (xi's divided by
        NFE, as the official code does)."""
        return (self.cfg.lr_theta, self.cfg.lr_xi / self.cfg.nfe) + (() if self.table is None
                                                                     else (self.cfg.lr_coefficients,))

    def configure_optimizers(self):
        lr_theta = self.initial_lrs()[0]
        theta = (torch.optim.RMSprop([self.grid.theta], lr=lr_theta, momentum=0.9)
                 if self.cfg.optimizer == "rmsprop" else torch.optim.Adam([self.grid.theta], lr=lr_theta))
        opts = [theta, torch.optim.SGD([self.grid.xi], lr=self.initial_lrs()[1])]
        if self.table is not None:
            opts.append(torch.optim.Adam([self.table.delta], lr=self.cfg.lr_coefficients))
        return opts

    def on_save_checkpoint(self, checkpoint):
        checkpoint["ld3_best"] = self.best
        checkpoint["ld3_bad_validations"] = self.bad_validations
        checkpoint["ld3_started"] = self.started
        checkpoint["ld3_best_of_start"] = self.best_of_start

    def on_load_checkpoint(self, checkpoint):
        self.best = checkpoint["ld3_best"]
        self.bad_validations = checkpoint["ld3_bad_validations"]
        self.started = checkpoint.get("ld3_started", 0)
        self.best_of_start = checkpoint.get("ld3_best_of_start", self.best)

    def best_run(self) -> dict:
        """The best validation state as `solve` keywords: grid, eval_grid, solver, order and its options (the
        learned table with learn=solver), detached."""
        current = self.snapshot()
        self.restore(self.best["state"])
        with torch.no_grad():
            t, t_eval = self.grid(self.cfg.decoupled)
            run = dict(grid=t, eval_grid=t_eval, **self.solver_kwargs(t, t_eval))
        self.restore(current)
        return run


def initial_grids(cfg: LD3Config, teacher, module: LD3, val_set) -> list[torch.Tensor]:
    """The grids LD3 starts from: none for LD3's uniform one (init=uniform), a baseline kind, or the `restarts`
    best baselines on `val_set` (init=best), best first. A sum of losses is calibrated here, on the validation
    outputs of the candidate grids."""
    if cfg.init_schedule:
        s = init_schedule(cfg, teacher)
        grids = {cfg.init_schedule: (s.grid, s.eval_grid)}
    else:
        kinds = applicable(cfg.baselines, teacher.noise_schedule) if cfg.init == "best" else [] \
            if cfg.init == "uniform" else [cfg.init]
        grids = {kind: baseline_grid(cfg, teacher, kind, module.steps) for kind in kinds}
    if cfg.init == "uniform" and not cfg.init_schedule:
        grids["uniform"] = module.grid(False)[0].detach()
    _, x_T, target, cond = (torch.stack([val_set[i][k] for i in range(len(val_set))]) for k in range(4))
    outs = {}
    for kind, g in grids.items():
        t, t_eval = g if isinstance(g, tuple) else (g, None)
        with torch.no_grad():
            outs[kind] = solve(teacher, x_T, t, cfg.solver, cfg.order, eval_grid=t_eval, cond=condition(cond),
                               **cfg.options).x
    if hasattr(module.dist, "calibrate"):  # a sum of losses: each term normalised over all candidates' outputs
        module.dist.calibrate(torch.cat(list(outs.values())), target.repeat(len(outs), *[1] * (target.dim() - 1)))
    if cfg.init == "uniform" and not cfg.init_schedule:
        return []
    scores = {kind: float(module.dist(out, target).mean()) for kind, out in outs.items()}
    ranked = sorted(scores, key=scores.get)[: cfg.restarts]
    print(f"LD3 starts from the {' / '.join(ranked)} grid{'s' if len(ranked) > 1 else ''} (validation {cfg.loss}: "
          + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()) + ")")
    return [grids[kind] for kind in ranked]


def init_schedule(cfg: LD3Config, teacher) -> Schedule:
    """The schedule file a run starts from (init_schedule): for this solver, order, NFE and teacher; ValueError
    naming what does not fit."""
    try:
        s = load_schedule(cfg.init_schedule, solver=cfg.solver, order=cfg.order, nfe=cfg.nfe,
                          noise_schedule=teacher.noise_schedule)
    except ScheduleError as err:
        raise ValueError(f"init_schedule: {err}") from None
    grid = LD3Grid(teacher.noise_schedule, steps_for_nfe(cfg.solver, cfg.nfe, cfg.to_zero), cfg.time_mode,
                   cfg.to_zero, cfg.window)
    if s.to_zero != cfg.to_zero or s.times[0] != grid.t_max or s.times[-1 - cfg.to_zero] != grid.t_min:
        raise ValueError(f"init_schedule {cfg.init_schedule}: its grid runs from {s.times[0]} to {s.times[-1]}, the "
                         f"learned one from {grid.t_max} to {grid.t_min}{' and then to sigma = 0' if cfg.to_zero else ''}")
    return s


def baseline_grid(cfg: LD3Config, teacher, kind: str, steps: int) -> torch.Tensor:
    """A hand grid of `kind`; GITS' is found on the teacher's trajectories from 64 noises of their own seed."""
    s = teacher.noise_schedule
    if kind != "gits":
        return make_grid(kind, steps, s, to_zero=cfg.to_zero)
    x_T = sample_noise(range(64), tuple(teacher.shape), cfg.seed + 7919, s.init_noise_std()).to(dtype_of(teacher))
    return make_grid("gits", steps, s, to_zero=cfg.to_zero, teacher=teacher, x_T=x_T)


def pairs_spec(cfg: LD3Config, teacher, n: int, seed: int) -> TrajectorySpec:
    """The trajectory spec of n teacher pairs (x_T at t_max, the teacher's sample at t_min or t_zero)."""
    s, p = teacher.noise_schedule, cfg.pairs
    times = [s.t_max, s.t_min] + ([s.t_zero] if cfg.to_zero else [])
    return TrajectorySpec(n=n, shard_size=max(1, min(n, 256)), seed=seed, output_times=times, solver=p.solver,
                          order=p.order, steps_per_interval=p.steps, rtol=p.rtol, batch_size=128)


def pairs_path(cfg: LD3Config) -> Path:
    """Where the teacher pairs live: pairs.directory, or the run directory's pairs/."""
    return Path(cfg.pairs.directory) if cfg.pairs.directory else run_path(cfg) / "pairs"


def pair_sets(cfg: LD3Config, teacher) -> dict[str, TrajectorySpec]:
    p = cfg.pairs
    return {"train": pairs_spec(cfg, teacher, p.train + p.val, p.seed), "test": pairs_spec(cfg, teacher, p.test, p.seed + 1)}


def teacher_pairs(teacher, cfg: LD3Config, directory: Path, spec: TrajectorySpec, name: str) -> TensorDataset:
    generate(teacher, directory / name, spec, teacher_name=cfg.teacher, progress=cfg.trainer.progress_bar)
    return pairs_dataset(TrajectoryDataset(directory / name, dtype=dtype_of(teacher)).tensors)


def pairs_dataset(tensors: dict, n: int | None = None) -> TensorDataset:
    """(index, x_T, the teacher's sample, condition) of the first n stored pairs (all for None); the condition is
    NO_CONDITION for an unconditional teacher's."""
    cond = tensors.get("cond", torch.full_like(tensors["index"], NO_CONDITION))
    return TensorDataset(tensors["index"][:n], tensors["x_T"][:n], tensors["trajectory"][:n, -1], cond[:n])


NO_CONDITION = -1  # the condition column of an unconditional teacher's pairs


def condition(cond: torch.Tensor | None) -> torch.Tensor | None:
    """A batch's condition indices for the teacher, or None for an unconditional teacher's pairs."""
    return None if cond is None or bool((cond == NO_CONDITION).all()) else cond


def evaluate_grids(cfg: LD3Config, teacher, learned: dict, test: TensorDataset) -> list[dict]:
    """On the held-out pairs, for the learned run (`solve` keywords: grid, eval_grid, solver, order, options) and
    every baseline grid with the configured solver (same NFE): RMSE to the teacher and, for 1x8x8 teachers, FID
    (digits feature network) against the teacher's samples and against the data."""
    from ..quality.metrics import Features, fid_features, pixels, reference_features

    _, x_T, target, cond = test.tensors
    steps = steps_for_nfe(cfg.solver, cfg.nfe, cfg.to_zero)
    runs = {"ld3 (learned)" if learned["solver"] != "tabulated" else "ld3 (learned solver)": learned}
    for kind in applicable(cfg.baselines, teacher.noise_schedule):
        runs[kind] = dict(grid=baseline_grid(cfg, teacher, kind, steps), solver=cfg.solver, order=cfg.order,
                          **cfg.options)
    with torch.no_grad():
        images = pixels(teacher, target)  # a latent teacher's decoded by its VAE
    digits = tuple(images.shape[1:]) == (1, 8, 8) and len(target) >= 2
    if digits:
        features = Features("digits")
        f_teacher, f_data = features(images.float()), reference_features("digits", features)
    rows = []
    with torch.no_grad():
        for name, run in runs.items():
            out = solve(teacher, x_T, cond=condition(cond), **run).x
            rows.append(dict(grid=name, rmse=float((out - target).pow(2).mean().sqrt())))
            if digits:
                f = features(pixels(teacher, out).float())
                rows[-1].update(fid_teacher=fid_features(f, f_teacher), fid_data=fid_features(f, f_data))
    for key in [k for k in rows[0] if k != "grid"]:
        best = min(r[key] for r in rows[1:]) if len(rows) > 1 else math.nan
        for r in rows:
            r[f"{key}_vs_best"] = r[key] / best
    return rows


def plot_grids(cfg: LD3Config, teacher, learned: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = teacher.noise_schedule
    steps = steps_for_nfe(cfg.solver, cfg.nfe, cfg.to_zero)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    n_finite = steps if cfg.to_zero else steps + 1
    for kind in applicable(cfg.baselines, teacher.noise_schedule):
        g = baseline_grid(cfg, teacher, kind, steps)[:n_finite]
        ax.plot(range(n_finite), s.lambda_(g), marker=".", alpha=0.6, label=kind)
    t, t_eval = learned["grid"], learned["eval_grid"]
    ax.plot(range(n_finite), s.lambda_(t[:n_finite]), marker="o", color="k", lw=2, label="LD3 (integration)")
    if cfg.decoupled:
        ax.plot(range(n_finite), s.lambda_(t_eval[:n_finite]), marker="x", ls="--", color="crimson",
                label="LD3 (model evaluation)")
    ax.set(xlabel="step", ylabel="log-SNR lambda", title=f"{cfg.solver} order {cfg.order}, NFE {cfg.nfe}"
           + (" (+ final step to sigma = 0)" if cfg.to_zero else "") + (", learned solver" if cfg.learn == "solver" else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


# loss=auto: the sum of L2 (paired accuracy) and the digits feature distance (what FID sees) for 1x8x8 teachers,
# whose feature network ships; L2 elsewhere (docs/ld3.md says why).
AUTO_LOSS = {(1, 8, 8): "l2+features"}
# remat=auto rematerialises for teachers of at least this many parameters: below it the graph of N network calls
# is small, and recomputing them costs a quarter of a training step.
REMAT_ABOVE = 5_000_000


def resolve_auto(cfg: LD3Config, teacher) -> None:
    """Replace loss=auto and remat=auto by what they mean for this teacher (recorded so in config.yaml)."""
    if cfg.loss == "auto":
        cfg.loss = AUTO_LOSS.get(tuple(getattr(teacher, "shape", ())), "l2")
    if cfg.remat == "auto":
        cfg.remat = str(sum(p.numel() for p in teacher.parameters()) >= REMAT_ABOVE).lower()
    cfg.remat = str(cfg.remat).lower()


def check_ld3(cfg: LD3Config):
    """Everything that can be wrong with an LD3 run's input, found before anything is written: the teacher."""
    get_solver(cfg.solver)
    check_options(cfg.solver, cfg.options)
    if cfg.solver == "er_sde" and cfg.options.get("noise_scale", "sde5") != "ode":
        raise ValueError("LD3 learns grids for deterministic solvers; er_sde needs options.noise_scale=ode")
    if cfg.options.get("eta"):
        raise ValueError("LD3 learns grids for deterministic solvers; stochastic DDIM (eta > 0) is not one")
    if cfg.rounds_theta + cfg.rounds_joint < 1:
        raise ValueError("rounds_theta + rounds_joint must be at least 1: LD3 would export its initial grid untrained")
    if cfg.restarts > 1 and (cfg.init != "best" or cfg.restarts > len(cfg.baselines)):
        raise ValueError(f"restarts={cfg.restarts} start from the best baseline grids: it needs init=best and at "
                         f"least as many baselines ({len(cfg.baselines)} given)")
    steps = steps_for_nfe(cfg.solver, cfg.nfe, cfg.to_zero)
    check_order(cfg.solver, cfg.order, steps)
    if cfg.init_schedule and cfg.restarts > 1:
        raise ValueError("init_schedule gives one start: restarts must be 1")
    teacher = load_teacher(cfg.teacher, conditions=cfg.conditions, guidance=cfg.guidance)
    resolve_auto(cfg, teacher)
    grid = LD3Grid(teacher.noise_schedule, steps, cfg.time_mode, cfg.to_zero, cfg.window)  # a point to learn
    if cfg.learn == "solver":
        base_form(cfg.solver, cfg.order, cfg.options, Grid(teacher.noise_schedule, *grid(False)))
    if cfg.init_schedule:
        init_schedule(cfg, teacher)
    distance(cfg.loss, getattr(teacher, "shape", None), cfg.feature_net, **pixel_space(teacher))  # fail now
    pairs_dir = pairs_path(cfg)
    for name, spec in pair_sets(cfg, teacher).items():
        check_directory(pairs_dir / name, spec, teacher, cfg.teacher)
    return teacher


def train_ld3(cfg: LD3Config) -> Path:
    teacher = check_ld3(cfg)
    run_dir = prepare_run(cfg)
    pairs_dir = pairs_path(cfg)
    p = cfg.pairs
    specs = pair_sets(cfg, teacher)
    pairs = teacher_pairs(teacher, cfg, pairs_dir, specs["train"], "train")
    test = teacher_pairs(teacher, cfg, pairs_dir, specs["test"], "test")
    train_set = torch.utils.data.Subset(pairs, range(p.train))
    val_set = torch.utils.data.Subset(pairs, range(p.train, p.train + p.val))
    module = LD3(cfg, teacher, pairs.tensors[1])
    module.set_starts(initial_grids(cfg, teacher, module, val_set))
    logger = make_logger(cfg, run_dir)
    cfg.trainer.max_steps = -1
    trainer = make_trainer(cfg, run_dir, [], logger, find_unused_parameters=True,  # xi waits for phase 2
                           max_epochs=module.epochs_per_start * max(1, len(module.starts)),
                           val_check_interval=min(cfg.val_every_n_steps, max(1, p.train // cfg.batch_size)),
                           num_sanity_val_steps=-1)  # the sanity pass scores the initial (uniform) grid
    fit(trainer, module, train_loader(train_set, cfg.batch_size, cfg.seed), DataLoader(val_set, batch_size=64),
        run_dir=run_dir)
    if trainer.global_rank != 0:
        return run_dir
    learned = module.best_run()
    options = {k: v for k, v in learned.items() if k not in ("grid", "eval_grid", "solver", "order")}
    provenance = dict(method="ld3", loss=cfg.loss, validation={f"{cfg.loss}": module.best["loss"]},
                      best_step=module.best["step"], seed=cfg.seed, time_mode=cfg.time_mode,
                      soft_forcing=cfg.soft_forcing, pairs=dict(train=p.train, val=p.val))
    if cfg.learn == "solver":
        provenance.update(learn="solver", base=dict(solver=cfg.solver, order=cfg.order, options=cfg.options),
                          coefficient_penalty=cfg.coefficient_penalty)
    schedule = Schedule.from_grid(
        learned["grid"], teacher.noise_schedule, learned["solver"], learned["order"], eval_grid=learned["eval_grid"],
        options=options, provenance=provenance,
        teacher=dict(fingerprint=teacher.fingerprint(), name=cfg.teacher, **getattr(teacher, "record", dict)()))
    save_schedule(run_dir / "schedule.json", schedule)
    plot_grids(cfg, teacher, learned, run_dir / "grid.png")
    rows = evaluate_grids(cfg, teacher, learned, test)
    write_csv(run_dir / "results.csv", rows)
    table = results_table(cfg, rows, p.test)
    write_text(run_dir / "results.md", "\n".join(table) + "\n")
    _log_outputs(logger, run_dir, module, teacher, test, learned, rows)
    print("\n".join(table))
    print(f"schedule: {run_dir / 'schedule.json'}   grid plot: {run_dir / 'grid.png'}")
    return run_dir


def results_table(cfg: LD3Config, rows: list[dict], n: int) -> list[str]:
    """The held-out comparison as markdown lines: each metric and its ratio to the best baseline grid."""
    fid = "fid_teacher" in rows[0]
    lines = [f"{cfg.solver} order {cfg.order}, NFE {cfg.nfe}, on {n} held-out teacher pairs: RMSE to the teacher"
             + ("; FID (digits features) against the teacher's samples and against the data" if fid else ""),
             "| grid | RMSE | / best baseline |" + (" FID (teacher) | / best | FID (data) | / best |" if fid else ""),
             "|---|---|---|" + ("---|---|---|---|" if fid else "")]
    for r in rows:
        cells = [r["grid"], f"{r['rmse']:.4g}", f"{r['rmse_vs_best']:.3f}"]
        if fid:
            cells += [f"{r['fid_teacher']:.2f}", f"{r['fid_teacher_vs_best']:.3f}", f"{r['fid_data']:.2f}",
                      f"{r['fid_data_vs_best']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _log_outputs(logger, run_dir: Path, module: LD3, teacher, test, learned, rows) -> None:
    from ..training.teacher import save_image_grid

    _, x_T, target, cond = test.tensors
    n = min(32, len(x_T))
    with torch.no_grad():
        student = solve(teacher, x_T[:n], cond=condition(cond[:n]), **learned).x
    decode = getattr(teacher, "decode", None)  # a latent teacher: the VAE's images, decoded only here
    if decode is not None:
        student, target = decode(student), decode(target[:n])
    if x_T.dim() == 4 and (x_T.shape[1] == 1 or decode is not None):  # images: each student sample beside its teacher's
        both = torch.stack([student.clamp(-1, 1), target[:n].clamp(-1, 1)], 1).flatten(0, 1).float()
        save_image_grid(both, run_dir / "samples.png", nrow=16)
    if logger is None:
        return
    import wandb

    logger.log_table("results", columns=list(rows[0]), data=[list(r.values()) for r in rows])
    logger.log_image("ld3/grid", [str(run_dir / "grid.png")])
    if (run_dir / "samples.png").exists():
        logger.log_image("ld3/student_vs_teacher", [str(run_dir / "samples.png")])
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"schedule-{module.cfg.solver}-{module.cfg.order}-nfe{module.cfg.nfe}")
    artifact = wandb.Artifact(name, type="schedule")
    artifact.add_file(str(run_dir / "schedule.json"))
    logger.experiment.log_artifact(artifact)

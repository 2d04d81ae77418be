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

import lightning as L
import torch

from ..core.sample import check_order, solve, steps_for_nfe
from ..core.steps import Grid
from ..quality.losses import distance, pixel_space
from .config import LD3Config, learned_ends, resolve_auto
from .grid import LD3Grid
from .solver import LearnedTable, base_form

NO_CONDITION = -1  # the condition column of an unconditional teacher's pairs


def condition(cond: torch.Tensor | None) -> torch.Tensor | None:
    """A batch's condition indices for the teacher, or None for an unconditional teacher's pairs."""
    return None if cond is None or bool((cond == NO_CONDITION).all()) else cond


class LD3(L.LightningModule):
    LR_KEYS = {"lr_theta": 0, "lr_xi": 1, "lr_coefficients": 2}  # -> optimizers (a resume applies changed rates)

    def __init__(self, cfg: LD3Config, teacher, x_T_train: torch.Tensor):
        super().__init__()
        resolve_auto(cfg, teacher)
        self.cfg, self.starts = cfg, []
        self.__dict__["teacher"] = teacher  # frozen and not ours: kept out of the state dict and the optimisers
        self.steps = steps_for_nfe(cfg.solver, cfg.nfe, cfg.to_zero)
        check_order(cfg.solver, cfg.order, self.steps)
        self.grid = LD3Grid(learned_ends(cfg, teacher.noise_schedule), self.steps, cfg.time_mode, cfg.to_zero,
                           cfg.window)
        self.table = None
        if cfg.learn == "solver":
            form, width = base_form(cfg.solver, cfg.order, cfg.options, Grid(teacher.noise_schedule, *self.grid(False)))
            self.table = LearnedTable(cfg.solver, cfg.order, cfg.options, self.steps, form, width)
        self.register_buffer("x_prime", x_T_train.clone())  # soft-forced starts, saved in checkpoints
        self.register_buffer("x_start", x_T_train.clone())
        d = x_T_train[0].numel()
        self.radius = cfg.gamma * d / cfg.nfe**2 * teacher.noise_schedule.init_noise_std()
        self.dist = distance(cfg.loss, feature_net=cfg.feature_net, reference=cfg.data_reference,
                             **pixel_space(teacher, cfg.loss))
        self.automatic_optimization = False
        self.best = dict(loss=math.inf, state=self.snapshot(), step=0)
        self.best_of_start = dict(self.best)
        self.bad_validations, self.val_losses, self.started = 0, [], 0

    def on_fit_start(self):
        self.teacher.to(self.device)  # not a submodule (frozen, not in the state dict): it follows the module

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

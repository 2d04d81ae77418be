"""The LD3 run: check everything, make the teacher pairs, pick the starting grids, train, export the schedule file
and compare it with the hand grids on held-out pairs (report.py)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from ..core.denoiser import device_of, dtype_of
from ..core.grids import applicable
from ..core.sample import check_options, check_order, get_solver, solve_in_batches, start_time, steps_for_nfe
from ..core.steps import Grid
from ..files import write_csv, write_text
from ..loaders import train_loader
from ..quality.losses import distance, pixel_space
from ..schedule import Schedule, ScheduleError, load_schedule, save_schedule
from ..teachers import load_teacher
from ..teachers.network import made_for
from ..trajectories import TrajectoryDataset, TrajectorySpec, check_directory, generate
from ..training.common import fit, make_logger, make_trainer, prepare_run, run_path, teacher_device
from .config import LD3Config, baseline_grid, learned_ends, resolve_auto
from .grid import LD3Grid
from .module import LD3, NO_CONDITION, condition
from .report import (evaluate_grids, hand_grids, images_of, learned_label, log_outputs, plot_comparison, plot_grids,
                     results_table)
from .solver import base_form

def check_ld3(cfg: LD3Config):
    """Everything that can be wrong with an LD3 run's input, found before anything is written: the teacher."""
    get_solver(cfg.solver)
    if cfg.solver == "tabulated":  # its table belongs to one grid; LD3 moves the grid
        raise ValueError("solver=tabulated: LD3 learns a tabulated solver's table itself, from a multistep solver's: "
                         "e.g. solver=dpm_solver++ learn=solver")
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
    teacher = load_teacher(cfg.teacher, **cfg.teacher_options())
    resolve_auto(cfg, teacher)
    s = teacher.noise_schedule
    if start_time(s, cfg.solver, cfg.options) != s.t_max:
        named = cfg.solver + (f" {cfg.options}" if cfg.options else "")
        raise ValueError(f"{named} cannot start at t = {s.t_max}, where this teacher's sampling starts (alpha = 0, "
                         f"pure noise: its pipelines start there too); learn the schedule for a data-form solver: "
                         f"dpm_solver++, unipc (bh2) or euler")
    grid = LD3Grid(learned_ends(cfg, s), steps, cfg.time_mode, cfg.to_zero, cfg.window)  # a point to learn
    if cfg.learn == "solver":
        base_form(cfg.solver, cfg.order, cfg.options, Grid(teacher.noise_schedule, *grid(False)))
    if cfg.init_schedule:
        init_schedule(cfg, teacher)
    distance(cfg.loss, getattr(teacher, "shape", None), cfg.feature_net, reference=cfg.data_reference,
             **pixel_space(teacher, cfg.loss))  # fail now
    pairs_dir = pairs_path(cfg)
    for name, spec in pair_sets(cfg, teacher).items():
        check_directory(pairs_dir / name, spec, teacher, cfg.teacher)
    return teacher


def train_ld3(cfg: LD3Config) -> Path:
    teacher = check_ld3(cfg)
    run_dir = prepare_run(cfg)
    teacher.to(teacher_device(cfg))  # pairs, starts and the report on the accelerator training uses
    pairs_dir = pairs_path(cfg)
    p = cfg.pairs
    specs = pair_sets(cfg, teacher)
    pairs = teacher_pairs(teacher, cfg, pairs_dir, specs["train"], "train")
    test = teacher_pairs(teacher, cfg, pairs_dir, specs["test"], "test") if "test" in specs else None
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
    fit(trainer, module, train_loader(train_set, cfg.batch_size, cfg.seed),
        DataLoader(val_set, batch_size=min(64, p.batch_size)),
        run_dir=run_dir)
    if trainer.global_rank != 0:
        return run_dir
    learned = module.best_run()
    options = {k: v for k, v in learned.items() if k not in ("grid", "eval_grid", "solver", "order")}
    provenance = dict(method="ld3", loss=cfg.loss, validation={f"{cfg.loss}": module.best["loss"]},
                      best_step=module.best["step"], seed=cfg.seed, time_mode=cfg.time_mode,
                      soft_forcing=cfg.soft_forcing, pairs=dict(train=p.train, val=p.val))
    if hasattr(module.dist, "calibrate"):  # a sum's weights, which a run started from this file takes as they are
        provenance["loss_weights"] = dict(module.dist.weights)
    if cfg.learn == "solver":
        provenance.update(learn="solver", base=dict(solver=cfg.solver, order=cfg.order, options=cfg.options),
                          coefficient_penalty=cfg.coefficient_penalty)
    schedule = Schedule.from_grid(
        learned["grid"], teacher.noise_schedule, learned["solver"], learned["order"], eval_grid=learned["eval_grid"],
        options=options, provenance=provenance,
        teacher=dict(fingerprint=teacher.fingerprint(), name=cfg.teacher, **teacher.record(steps=module.steps)))
    save_schedule(run_dir / "schedule.json", schedule)
    hand = hand_grids(cfg, teacher)
    plot_grids(cfg, teacher, learned, hand, run_dir / "grid.png")
    rows = samples = None
    where = "   (pairs.test=0: not compared with the hand grids)"
    if test is not None:
        start = {}
        if cfg.init_schedule:  # the schedule the run started from: one row more
            began = init_schedule(cfg, teacher).solve_kwargs
            start = {learned_label(began) if began["solver"] != learned["solver"] else "ld3 (init_schedule)": began}
        rows, samples = evaluate_grids(cfg, teacher, learned, test, start, hand)
        write_csv(run_dir / "results.csv", rows)
        table = results_table(cfg, rows, p.test)
        write_text(run_dir / "results.md", "\n".join(table) + "\n")
        print("\n".join(table))
        where = ""
        if images_of(teacher, samples["teacher"][:1]):
            plot_comparison(cfg, teacher, learned, hand, rows, samples, run_dir / "comparison.png", start)
            where = f"   samples side by side: {run_dir / 'comparison.png'}"
    log_outputs(logger, run_dir, module, teacher, samples, rows)
    print(f"schedule: {run_dir / 'schedule.json'}   grid plot: {run_dir / 'grid.png'}{where}")
    print(how_to_use(run_dir / "schedule.json", schedule))
    return run_dir


def how_to_use(path: Path, schedule: Schedule) -> str:
    """The one line that samples with the file where its teacher lives: its diffusers pipeline, or our core."""
    if schedule.teacher.get("pipeline"):
        return (f"in your {schedule.teacher['pipeline']}:  from learnsteps.interop.diffusers import apply_schedule; "
                f"images = pipe(..., **apply_schedule(pipe, \"{path}\")).images")
    return (f"with learnsteps' core:  from learnsteps.schedule import load_schedule; "
            f"x = learnsteps.sample(teacher, x_T, **load_schedule(\"{path}\").solve_kwargs)")


def initial_grids(cfg: LD3Config, teacher, module: LD3, val_set) -> list[torch.Tensor]:
    """The grids LD3 starts from: none for LD3's uniform one (init=uniform), a baseline kind, the `restarts` best
    baselines on `val_set` (init=best), or the init_schedule file's. A sum of losses is calibrated here on the hand
    grids' validation outputs whatever the start, so that a factor means the same in every run; a run started from
    a file of the same loss takes that run's weights from it as they were (a learned solver after LD3: calibrated
    on its own start, much closer to the teacher than the hand grids, its paired term would weigh several times
    more against a term without units)."""
    start = init_schedule(cfg, teacher) if cfg.init_schedule else None
    calibrate = hasattr(module.dist, "calibrate") and not reuse_weights(module.dist, cfg.loss, start)
    kinds = applicable(cfg.baselines, teacher.noise_schedule) if calibrate or (start is None and cfg.init == "best") \
        else [cfg.init] if start is None and cfg.init != "uniform" else []
    hand = {kind: baseline_grid(cfg, teacher, kind, module.steps, learned_end=True) for kind in kinds}
    if start is not None:
        starts = {cfg.init_schedule: (start.grid, start.eval_grid)}
    elif cfg.init == "uniform":
        starts = {"uniform": module.grid(False)[0].detach()}
    else:
        starts = hand if cfg.init == "best" else {cfg.init: hand[cfg.init] if cfg.init in hand else
                                                   baseline_grid(cfg, teacher, cfg.init, module.steps, True)}
    device = device_of(teacher)
    _, x_T, target, cond = (torch.stack([val_set[i][k] for i in range(len(val_set))]).to(device) for k in range(4))
    outs = {}
    for kind, g in {**(hand if calibrate else {}), **starts}.items():
        t, t_eval = g if isinstance(g, tuple) else (g, None)
        outs[kind] = solve_in_batches(teacher, x_T, cfg.pairs.batch_size, condition(cond), grid=t, solver=cfg.solver,
                                      order=cfg.order, eval_grid=t_eval, **cfg.options)
    if calibrate:  # a sum of losses: each term normalised over the hand grids' outputs
        module.dist.calibrate([outs[kind] for kind in hand], target)
    if cfg.init == "uniform" and start is None:
        return []
    scores = {kind: float(module.dist(outs[kind], target).mean()) for kind in starts}
    ranked = sorted(scores, key=scores.get)[: cfg.restarts]
    print(f"LD3 starts from the {' / '.join(ranked)} grid{'s' if len(ranked) > 1 else ''} (validation {cfg.loss}: "
          + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()) + ")")
    return [starts[kind] for kind in ranked]


def reuse_weights(dist, loss: str, start: Schedule | None) -> bool:
    """Give a sum of losses the weights its start's run calibrated, recorded in that file (provenance.loss_weights)
    for the same loss; False where there are none to take (another loss, a file from elsewhere)."""
    weights = start.provenance.get("loss_weights") if start is not None and start.provenance.get("loss") == loss \
        else None
    if not (isinstance(weights, dict) and set(weights) == set(dist.weights)
            and all(isinstance(w, (int, float)) and math.isfinite(w) and w > 0 for w in weights.values())):
        return False
    dist.weights = {k: float(w) for k, w in weights.items()}
    return True


def init_schedule(cfg: LD3Config, teacher) -> Schedule:
    """The schedule file a run starts from (init_schedule): for this solver, order, NFE and teacher (its fingerprint,
    when the file records one, as eval.py checks it; a file written by hand without one only needs the teacher's
    noise schedule); ValueError naming what does not fit."""
    try:
        s = load_schedule(cfg.init_schedule, solver=cfg.solver, order=cfg.order, nfe=cfg.nfe,
                          noise_schedule=teacher.noise_schedule)
    except ScheduleError as err:
        raise ValueError(f"init_schedule: {err}") from None
    if not made_for(teacher, s.teacher.get("fingerprint")):
        raise ValueError(f"init_schedule {cfg.init_schedule}: learned for another teacher "
                         f"({s.teacher.get('name') or 'fingerprint ' + str(s.teacher['fingerprint'])[:12]}), "
                         f"not {cfg.teacher}")
    grid = LD3Grid(learned_ends(cfg, teacher.noise_schedule), steps_for_nfe(cfg.solver, cfg.nfe, cfg.to_zero),
                   cfg.time_mode, cfg.to_zero, cfg.window)
    if s.to_zero != cfg.to_zero or s.times[0] != grid.t_max or s.times[-1 - cfg.to_zero] != grid.t_min:
        raise ValueError(f"init_schedule {cfg.init_schedule}: its grid runs from {s.times[0]} to {s.times[-1]}, the "
                         f"learned one from {grid.t_max} to {grid.t_min}{' and then to sigma = 0' if cfg.to_zero else ''}")
    return s


def pairs_spec(cfg: LD3Config, teacher, n: int, seed: int) -> TrajectorySpec:
    """The trajectory spec of n teacher pairs (x_T at t_max, the teacher's sample at t_min or t_zero)."""
    s, p = teacher.noise_schedule, cfg.pairs
    times = [s.t_max, s.t_min] + ([s.t_zero] if cfg.to_zero else [])
    return TrajectorySpec(n=n, shard_size=max(1, min(n, 256)), seed=seed, output_times=times, solver=p.solver,
                          order=p.order, steps_per_interval=p.steps, rtol=p.rtol, batch_size=p.batch_size)


def pairs_path(cfg: LD3Config) -> Path:
    """Where the teacher pairs live: pairs.directory, or the run directory's pairs/."""
    return Path(cfg.pairs.directory) if cfg.pairs.directory else run_path(cfg) / "pairs"


def pair_sets(cfg: LD3Config, teacher) -> dict[str, TrajectorySpec]:
    p = cfg.pairs
    sets = {"train": pairs_spec(cfg, teacher, p.train + p.val, p.seed)}
    if p.test:
        sets["test"] = pairs_spec(cfg, teacher, p.test, p.seed + 1)
    return sets


def teacher_pairs(teacher, cfg: LD3Config, directory: Path, spec: TrajectorySpec, name: str) -> TensorDataset:
    generate(teacher, directory / name, spec, teacher_name=cfg.teacher, progress=cfg.trainer.progress_bar)
    return pairs_dataset(TrajectoryDataset(directory / name, dtype=dtype_of(teacher)).tensors)


def pairs_dataset(tensors: dict, n: int | None = None) -> TensorDataset:
    """(index, x_T, the teacher's sample, condition) of the first n stored pairs (all for None); the condition is
    NO_CONDITION for an unconditional teacher's."""
    cond = tensors.get("cond", torch.full_like(tensors["index"], NO_CONDITION))
    return TensorDataset(tensors["index"][:n], tensors["x_T"][:n], tensors["trajectory"][:n, -1], cond[:n])

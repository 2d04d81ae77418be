"""Solver benchmark: error to the reference ODE solution versus NFE for every solver x grid, and the per-step
overhead of our solvers against diffusers' on a no-op model.

    python benchmarks/solvers.py                       # configs/solvers.yaml
    python benchmarks/solvers.py nfe=[4,6,8] samples=64 overhead=false

Writes errors.csv, errors.md, errors.png, overhead.md and config.yaml to out_dir.
"""
from __future__ import annotations

import csv
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import learnsteps as ls  # noqa: E402
from learnsteps.config import CONFIG_DIR, SolverChoice, load_config, to_yaml  # noqa: E402
from learnsteps.core.denoiser import Denoiser  # noqa: E402
from learnsteps.core.sample import start_time  # noqa: E402
from learnsteps.core.schedules import DiscreteDDPM, make_schedule  # noqa: E402
from learnsteps.training.common import ScheduleConfig  # noqa: E402


@dataclass
class SolverBenchConfig:
    teacher: str = "gmm_digits"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # of the exact mixtures
    conditions: Any = field(default_factory=list)  # a pipeline teacher's (its own schedule then)
    guidance: float = 1.0
    solvers: list[SolverChoice] = field(default_factory=list)
    grids: list[str] = field(default_factory=lambda: ["time_uniform", "time_quadratic", "logsnr", "edm", "gits"])
    nfe: list[int] = field(default_factory=lambda: list(range(2, 21)))
    table_nfe: list[int] = field(default_factory=lambda: [4, 6, 8, 10, 15, 20])
    samples: int = 256
    seed: int = 0
    reference_rtol: float = 1e-9
    gits_fine_steps: int = 60
    overhead: bool = True
    overhead_steps: int = 20
    overhead_repeats: int = 21
    out_dir: str = "runs/solvers"


def steps_for(case: SolverChoice, nfe: int) -> int | None:
    """Grid steps that spend exactly `nfe` model calls, or None if the solver cannot."""
    if case.solver == "heun":
        return nfe // 2 if nfe % 2 == 0 else None
    return nfe if nfe >= case.order else None


def error_table(cfg: SolverBenchConfig, out: Path) -> list[dict]:
    if cfg.conditions or cfg.guidance != 1.0:  # a pipeline: its own noise schedule, its conditions in turn
        teacher = ls.teachers.load_teacher(cfg.teacher, conditions=cfg.conditions, guidance=cfg.guidance)
        schedule = teacher.noise_schedule
    else:
        schedule = make_schedule(cfg.schedule.kind, **cfg.schedule.params)
        teacher = ls.teachers.load_teacher(cfg.teacher, noise_schedule=schedule)
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = getattr(teacher, "shape", (64,))
    x_T = torch.randn(cfg.samples, *shape, generator=gen, dtype=torch.float64) * schedule.init_noise_std()
    x_cal = torch.randn(cfg.samples, *shape, generator=gen, dtype=torch.float64) * schedule.init_noise_std()
    # each solver from t_max, or, where it cannot start there (a flow teacher's t = 1, alpha = 0: the noise-form
    # ones), from t_cap, against the reference from the same start
    refs = {}
    for start in sorted({start_time(schedule, c.solver, c.options) for c in cfg.solvers}):
        t0 = time.perf_counter()
        ends = torch.tensor([start, schedule.t_min], dtype=torch.float64)
        refs[start] = ref = ls.reference_solve(teacher, x_T, ends, rtol=cfg.reference_rtol, atol=cfg.reference_rtol)
        print(f"reference from t = {start:.6g}: dopri5 rtol={cfg.reference_rtol:g}, {ref.nfe} calls, error estimate "
              f"{ref.error_estimate:.1e}, {time.perf_counter() - t0:.1f}s")
    rows = []
    jobs = [(g, n) for g in cfg.grids for n in cfg.nfe]
    for grid_kind, nfe in tqdm(jobs, desc="solver x grid x NFE", unit="grid"):
        grids = {}
        for case in cfg.solvers:
            steps = steps_for(case, nfe)
            if steps is None:
                continue
            start = start_time(schedule, case.solver, case.options)
            if (steps, start) not in grids:
                extra = dict(teacher=teacher, x_T=x_cal, fine_steps=cfg.gits_fine_steps) if grid_kind == "gits" else {}
                grids[steps, start] = ls.grids.make(grid_kind, steps, schedule, t_max=start, **extra)
            sol = ls.solve(teacher, x_T, grids[steps, start], case.solver, case.order, **case.options)
            assert sol.nfe == nfe, (case, nfe, sol.nfe)
            rmse = float((sol.x - refs[start].x).pow(2).mean().sqrt())
            rows.append(dict(solver=case.label, grid=grid_kind, nfe=nfe, rmse=rmse))
    with open(out / "errors.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["solver", "grid", "nfe", "rmse"])
        w.writeheader()
        w.writerows(rows)
    return rows


def write_error_markdown(cfg: SolverBenchConfig, rows: list[dict], out: Path) -> str:
    cols = [n for n in cfg.table_nfe if n in cfg.nfe]
    lookup = {(r["solver"], r["grid"], r["nfe"]): r["rmse"] for r in rows}
    lines = ["| solver | grid | " + " | ".join(f"NFE {n}" for n in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for case in cfg.solvers:
        for grid in cfg.grids:
            cells = [f"{lookup[(case.label, grid, n)]:.2e}" if (case.label, grid, n) in lookup else "–" for n in cols]
            lines.append(f"| {case.label} | {grid} | " + " | ".join(cells) + " |")
    # the best grid per solver and NFE, for reading at a glance
    lines += ["", "Best grid per solver (RMSE):", "",
              "| solver | " + " | ".join(f"NFE {n}" for n in cols) + " |", "|---|" + "---|" * len(cols)]
    for case in cfg.solvers:
        cells = []
        for n in cols:
            cand = [(lookup[(case.label, g, n)], g) for g in cfg.grids if (case.label, g, n) in lookup]
            cells.append(f"{min(cand)[0]:.2e} ({min(cand)[1]})" if cand else "–")
        lines.append(f"| {case.label} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "errors.md").write_text(text)
    return text


def plot_errors(cfg: SolverBenchConfig, rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = cfg.grids + ["best grid"]
    cols = 3
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 4.2 * rows_n), sharey=True, squeeze=False)
    cmap = plt.get_cmap("tab10")
    style = {c.label: (cmap(i % 10), "-" if i < 10 else "--") for i, c in enumerate(cfg.solvers)}
    for ax, panel in zip(axes.flat, panels):
        for case in cfg.solvers:
            pts = {}
            for r in rows:
                if r["solver"] == case.label and (r["grid"] == panel or panel == "best grid"):
                    pts[r["nfe"]] = min(pts.get(r["nfe"], math.inf), r["rmse"])
            if pts:
                color, ls_ = style[case.label]
                ax.plot(*zip(*sorted(pts.items())), marker=".", color=color, linestyle=ls_, label=case.label)
        ax.set(title=f"grid: {panel}", xlabel="NFE", yscale="log")
        ax.grid(alpha=0.3, which="both")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    low = min(r["rmse"] for r in rows)
    axes[0, 0].set_ylim(low / 1.5, 1.0)  # shared; solvers that blow up at low NFE leave the top
    for ax in axes[:, 0]:
        ax.set_ylabel(f"RMSE to the reference ({cfg.teacher})")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out / "errors.png", dpi=100)
    plt.close(fig)


class NoOp(Denoiser):
    """A model that costs nothing, so that only the sampler's own work is timed."""

    prediction = "epsilon"

    def __init__(self, schedule):
        super().__init__()
        self.noise_schedule = schedule

    def forward(self, x, t, cond=None):
        return torch.zeros_like(x)


def overhead_table(cfg: SolverBenchConfig, out: Path) -> str:
    """Time of a whole sampling loop (grid set-up included) per step, ours and diffusers', interleaved runs."""
    import diffusers

    torch.set_num_threads(1)
    schedule = DiscreteDDPM("linear")
    noop = NoOp(schedule)
    x_T = torch.randn(1, 4, 32, 32)
    n = cfg.overhead_steps
    betas = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)

    def ours(solver, order, **opts):
        def run():
            ls.solve(noop, x_T, ls.grids.make("time_uniform", n, schedule, to_zero=True), solver, order, **opts)
        return run

    def theirs(scheduler):
        def run():
            scheduler.set_timesteps(n)
            x = x_T * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                x = scheduler.step(noop(scheduler.scale_model_input(x, t), t), t, x).prev_sample
        return run

    pairs = [
        ("DPM-Solver++(2M)", ours("dpm_solver++", 2), diffusers.DPMSolverMultistepScheduler(**betas)),
        ("DPM-Solver++(3M)", ours("dpm_solver++", 3), diffusers.DPMSolverMultistepScheduler(**betas, solver_order=3)),
        ("DPM-Solver(2M)", ours("dpm_solver", 2), diffusers.DPMSolverMultistepScheduler(
            **betas, algorithm_type="dpmsolver", final_sigmas_type="sigma_min")),
        ("DPM-Solver++(3S)", ours("dpm_solver++", 3, method="singlestep", variant="taylor"),
         diffusers.DPMSolverSinglestepScheduler(**betas, solver_order=3, solver_type="heun", lower_order_final=True)),
        ("UniPC-3 (bh2)", ours("unipc", 3), diffusers.UniPCMultistepScheduler(**betas, solver_order=3)),
        ("DEIS-3 (log-rho)", ours("deis", 3, basis="logrho"), diffusers.DEISMultistepScheduler(**betas, solver_order=3)),
        ("Euler", ours("euler", 1), diffusers.EulerDiscreteScheduler(**betas)),
        ("Heun", ours("heun", 2), diffusers.HeunDiscreteScheduler(**betas)),
    ]
    lines = [f"Sampling loop time per step, {n} steps, no-op model, x of shape {tuple(x_T.shape)}, one thread, "
             f"median of {cfg.overhead_repeats} interleaved runs.", "",
             "| solver | ours (µs/step) | diffusers (µs/step) | ours / diffusers |", "|---|---|---|---|"]
    ratios = []
    for label, mine, sched in tqdm(pairs, desc="overhead", unit="solver"):
        run_theirs = theirs(sched)
        mine(), run_theirs()  # warm up
        t_ours, t_theirs = [], []
        for _ in range(cfg.overhead_repeats):
            t0 = time.perf_counter()
            mine()
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run_theirs()
            t_theirs.append(time.perf_counter() - t0)
        a, b = statistics.median(t_ours) / n * 1e6, statistics.median(t_theirs) / n * 1e6
        ratios.append(a / b)
        lines.append(f"| {label} | {a:.0f} | {b:.0f} | {a / b:.2f} |")
    geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
    lines.append(f"| geometric mean | | | {geo:.2f} |")
    text = "\n".join(lines) + "\n"
    (out / "overhead.md").write_text(text)
    return text


def main(argv: list[str]) -> None:
    cfg = load_config(SolverBenchConfig, [CONFIG_DIR / "solvers.yaml"], argv)
    out = ROOT / cfg.out_dir if not Path(cfg.out_dir).is_absolute() else Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    rows = error_table(cfg, out)
    print(write_error_markdown(cfg, rows, out))
    plot_errors(cfg, rows, out)
    if cfg.overhead:
        print(overhead_table(cfg, out))
    print(f"results in {out}/ (errors.csv, errors.md, errors.png" + (", overhead.md)" if cfg.overhead else ")"))


if __name__ == "__main__":
    main(sys.argv[1:])

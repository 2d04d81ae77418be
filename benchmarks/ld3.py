"""LD3 benchmark: learned grids against every baseline grid, training time, backward-pass memory, and how robust
the outcome is to the seed and to the CPU's kernel path.

    python benchmarks/ld3.py                                  # paired + memory (about 30 min on 2 cores)
    python benchmarks/ld3.py part=memory                      # peak memory only
    python benchmarks/ld3.py teachers=[gmm_digits] nfe=[4,6]  # a subset
    python benchmarks/ld3.py part=paired "ld3_args=[loss=features]" out_dir=runs/bench_ld3_features
    python benchmarks/ld3.py part=demo                        # `make demo` over seeds x kernel paths x threads
    python benchmarks/ld3.py part=robustness                  # seeds x CPU kernel paths x NFE (about 30 min)
    python benchmarks/ld3.py part=solver                      # learned solver vs LD3 (about 70 min)
    python benchmarks/ld3.py part=data                        # judged against the data (issue #33)
    python benchmarks/ld3.py part=frontier                    # every 4-NFE grid of a lattice against the data
    python benchmarks/ld3.py part=ceiling                     # the converged teacher with guidance changed

paired: `train.py mode=ld3` (its defaults) for every teacher x solver x NFE (pairs shared per teacher, 2000
held-out), each reporting, for the learned grid against the best baseline grid on those held-out pairs, the
paired RMSE to the teacher and, for the 8x8 teachers, FID against the teacher's samples and against the data
(digits feature network); paired.md / paired.csv.
memory: peak resident memory of one forward + backward pass through the sampler (DPM-Solver++(3M), batch 4)
with a 3x32x32 UNet of 64 channels, with and without per-step rematerialisation, each in a fresh process.
demo: `make demo`'s two runs (the Makefile's DEMO with DEMO_LD3, then with DEMO_SOLVER: LD3, then the learned solver
from its schedule) for every seed x CPU kernel path x torch thread count (`demo_threads`), seed s with its own
training and held-out pairs (pairs.seed = s), shared by the paths and thread counts; each run's own report on its
2000 held-out pairs: learned / best hand grid on paired RMSE, FID against the teacher's samples and against the data
(median, worst, best) against the demo's bars; demo.md / demo.csv.
robustness: `train.py mode=ld3` with its defaults (the digits UNet: `make demo`'s run before issue #33) for every
seed x CPU kernel path (ATEN_CPU_CAPABILITY: default, avx2, avx512 where the CPU has them) x NFE; seed s draws its
own teacher pairs (pairs.seed = s), shared by the kernel paths. Each learned grid and every baseline grid is scored
on that run's 200 held-out pairs (paired RMSE, as it prints it) and on 2000 (FID against the teacher's samples and
against the data, digits feature network): median, worst and best of learned / best baseline; robustness.md.
data: LD3 (its defaults, or `ld3_args`) and the learned solver warm-started from it, judged against the data
(issue #33): for every guidance x solver x NFE x seed of `data_*` on `data_teacher`, with each seed's own training
pairs and one held-out set of `bench_test` teacher pairs per guidance shared by every run: paired RMSE, FID against
the teacher's samples and against the data (and against its odd-indexed half alone, which the data terms never
see), precision / recall against the data, for the learned schedule, every hand grid and the teacher itself;
data.md / data.csv: medians and ranges over the seeds, the targets of issue #33. `heldout_seed=<n>` in an out_dir
with the runs copied into it judges them on another draw of held-out noises.
frontier: what any grid of one solver at NFE 4 can reach on `data_teacher` (first of `data_guidances`): every grid
(1, a, b, t_min, 0) of the `frontier_*` lattices, the hand grids and `frontier_schedules` (schedule files, e.g. LD3
runs of part=data), on that guidance's held-out pairs of part=data: paired RMSE, FID against the teacher's samples
and the data, recall, and the contraction of the samples in the digits features (mean distance to their k = 3
nearest teacher neighbours, learned over teacher); frontier.csv and frontier.png (FID against the data over RMSE).
ceiling: where samplers of the guided teacher (`ceiling_guidance`) land between its own samples and the data (issue
#33's target (a) is a box in that plane): its converged solve with guidance only on t <= c (1 above) for each of
`ceiling_intervals`, and at each of `ceiling_scales` everywhere (no discretisation error), every hand grid of
`ceiling_solver` at `ceiling_nfe`, and `ceiling_schedules` (schedule files, e.g. LD3 runs of part=data; each also
sampled with guidance on t <= c only for c in `ceiling_schedule_intervals`), on the held-out pairs of part=data: FID
against the teacher's samples and the data, recall, paired RMSE; ceiling.md, ceiling.csv and ceiling.png with the box.
solver: the learned solver (learn=solver) against LD3 on the same pairs, for every teacher x NFE x seed: LD3 with
its defaults (DPM-Solver++(3M)), then the learned solver started from LD3's schedule (grid, offsets and 3M's table;
`solver_args`), both scored on the 2000 held-out pairs (paired RMSE, FID against the teacher's samples and the
data) beside the best hand grid; solver.md / solver.csv: median and range over the seeds of learned solver / LD3.
In part=data and part=solver, `solver_args` that change the pairs' numbers (e.g. `pairs.val=1000`) give the learned
solver pairs of their own beside the seed's (the same first noises).
"""
from __future__ import annotations

import csv
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learnsteps.config import SolverChoice, load_config  # noqa: E402
from learnsteps.files import read_json, save_figure, write_csv, write_json, write_text  # noqa: E402
from learnsteps.ld3.config import BASELINES  # noqa: E402


@dataclass
class Config:
    part: str = "all"  # all (paired and memory) | paired | memory | demo | robustness | solver | data | frontier
    teachers: list[str] = field(default_factory=lambda: ["gmm_digits", "digits_unet"])
    solvers: list[SolverChoice] = field(default_factory=lambda: [
        SolverChoice("dpm_solver++", 3), SolverChoice("unipc", 3, {"variant": "bh1"}), SolverChoice("ipndm", 4)])
    nfe: list[int] = field(default_factory=lambda: [4, 6, 8, 10])
    memory_nfe: list[int] = field(default_factory=lambda: [4, 6, 8, 10])
    out_dir: str = "runs/bench_ld3"
    ld3_args: list[str] = field(default_factory=list)  # passed to every `train.py mode=ld3`, e.g. [loss=features]
    # part=robustness
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    cpu_paths: list[str] = field(default_factory=list)  # ATEN_CPU_CAPABILITY values; default: all this CPU runs
    robust_nfe: list[int] = field(default_factory=lambda: [4, 6])
    demo_test: int = 200  # held-out pairs of `make demo` (paired RMSE)
    bench_test: int = 2000  # held-out pairs of the benchmark size (FID)
    # part=solver
    solver_teachers: list[str] = field(default_factory=lambda: ["gmm_digits", "digits_unet", "digits_latent_flow"])
    solver_nfe: list[int] = field(default_factory=lambda: [3, 4, 5, 6])
    solver_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    solver_args: list[str] = field(default_factory=lambda: ["rounds_theta=0", "rounds_joint=6"])
    teacher_args: dict[str, list[str]] = field(default_factory=lambda: {"digits_latent_flow": ["guidance=1.15"]})
    # part=data (issue #33): judged against the data, on a latent guided teacher
    data_teacher: str = "digits_latent_flow"
    data_guidances: list[float] = field(default_factory=lambda: [1.0, 1.15])
    data_solvers: list[SolverChoice] = field(default_factory=lambda: [SolverChoice("dpm_solver++", 2),
                                                                      SolverChoice("unipc", 2)])
    data_nfe: list[int] = field(default_factory=lambda: [4, 6])
    data_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    data_learned_solver: bool = True  # also the learned solver, warm-started from each LD3 schedule
    heldout_seed: int = 10_000  # the held-out pairs' seed, apart from every training seed; another value judges
    # the same runs, copied into a new out_dir, on a fresh draw of noises (a setting chosen on one, checked on another)
    # part=frontier: grids (1, a, b, t_min, 0) for a in frontier_a, b in frontier_b (b < a), t_min in frontier_t_min
    frontier_solver: SolverChoice = field(default_factory=lambda: SolverChoice("dpm_solver++", 2))
    frontier_a: list[float] = field(default_factory=lambda: [0.98, 0.9, 0.8, 0.7, 0.6])
    frontier_b: list[float] = field(default_factory=lambda: [0.6, 0.45, 0.3, 0.2])
    frontier_t_min: list[float] = field(default_factory=lambda: [0.001, 0.015, 0.03, 0.06])
    frontier_schedules: list[str] = field(default_factory=list)
    # part=ceiling: what a sampler of the teacher reaches without discretisation error, with guidance changed
    ceiling_guidance: float = 1.15  # the teacher's guidance (its held-out pairs of part=data are the reference)
    ceiling_intervals: list[float] = field(default_factory=lambda: [0.7, 0.5, 0.3, 0.15, 0.05])  # guided on t <= c
    ceiling_scales: list[float] = field(default_factory=lambda: [1.0, 0.9, 0.8])  # one scale everywhere
    ceiling_solver: SolverChoice = field(default_factory=lambda: SolverChoice("unipc", 2))  # the hand grids' case
    ceiling_nfe: int = 6
    ceiling_schedules: list[str] = field(default_factory=list)  # schedule files placed in the plane (LD3 runs)
    ceiling_schedule_intervals: list[float] = field(default_factory=list)  # and each sampled guided on t <= c only
    # part=demo: `make demo`'s runs (the Makefile's own arguments) for every seed x kernel path x thread count
    demo_threads: list[int] = field(default_factory=lambda: [1, 2])
    workers: int = 2  # runs at a time (paired, robustness and solver)
    threads: int = 1  # torch threads per run (OMP_NUM_THREADS)


MEMORY_PROBE = r"""
import resource, sys, torch
import learnsteps as ls
from learnsteps.core.schedules import VPLinear
from learnsteps.ld3.grid import LD3Grid
from learnsteps.teachers.network import NetworkTeacher
from learnsteps.teachers.unet import UNet, UNetConfig
nfe, remat = int(sys.argv[1]), sys.argv[2] == "1"
torch.manual_seed(0)
teacher = NetworkTeacher(UNet(UNetConfig(in_channels=3, image_size=32, channels=64, channel_mult=[1, 2, 2],
                                         attention_levels=[2])), VPLinear(), "epsilon", {})
grid = LD3Grid(teacher.noise_schedule, nfe, "lambda", to_zero=True)
x = torch.randn(4, 3, 32, 32)
with torch.no_grad():  # warm up the allocator and the kernels
    ls.sample(teacher, x, grid()[0], "dpm_solver++", 3)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t, t_eval = grid()
ls.sample(teacher, x, t, "dpm_solver++", 3, eval_grid=t_eval, remat=remat).pow(2).mean().backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) / 1024)
"""


def memory(cfg: Config, out: Path) -> str:
    rows = []
    for remat in (False, True):
        for nfe in cfg.memory_nfe:
            res = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(nfe), str(int(remat))], capture_output=True,
                                 text=True, check=True, cwd=ROOT)
            rows.append(dict(remat=remat, nfe=nfe, peak_mb=float(res.stdout.split()[-1])))
            print(rows[-1], flush=True)
    lines = ["Peak resident memory added by one forward + backward pass through DPM-Solver++(3M) "
             "(UNet 3x32x32, 64 channels, batch 4; MB above the warmed-up process):", "",
             "| rematerialisation | " + " | ".join(f"NFE {n}" for n in cfg.memory_nfe) + " | NFE "
             f"{cfg.memory_nfe[-1]} / NFE {cfg.memory_nfe[0]} |", "|---|" + "---|" * (len(cfg.memory_nfe) + 1)]
    for remat in (False, True):
        vals = [r["peak_mb"] for r in rows if r["remat"] == remat]
        lines.append(f"| {'on' if remat else 'off'} | " + " | ".join(f"{v:.0f}" for v in vals)
                     + f" | {vals[-1] / vals[0]:.2f} |")
    text = "\n".join(lines) + "\n"
    write_text(out / "memory.md", text)
    return text


def train_ld3(args: list[str], run_dir: Path, pairs_dir: Path, threads: int, cpu_path: str = "", report: bool = True,
              all_rows: bool = False) -> dict:
    """`train.py mode=ld3` in a subprocess (skipped when run_dir already holds a schedule); the learned grid's row of
    the run's own results table, with the ratios to the best baseline as `<metric>_vs_best`, and the seconds (with
    all_rows: {"rows": the table's rows, "seconds"}; report=False: a run with pairs.test=0, only the seconds)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if cpu_path:
        env["ATEN_CPU_CAPABILITY"] = cpu_path
    t0 = time.perf_counter()
    if not (run_dir / "schedule.json").is_file():
        res = subprocess.run([sys.executable, str(ROOT / "train.py"), "mode=ld3", *args, f"run_dir={run_dir}",
                              f"pairs.directory={pairs_dir}", "trainer.progress_bar=false", "wandb.mode=disabled"],
                             capture_output=True, text=True, cwd=ROOT, env=env)
        if res.returncode != 0:
            raise SystemExit(f"ld3 run failed: {run_dir}\n{res.stderr[-3000:]}")
    seconds = round(time.perf_counter() - t0, 1)
    if not report:
        return dict(seconds=seconds)
    with open(run_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for i, r in enumerate(rows):  # a results.csv from before the report named each row's role
        r.setdefault("role", "learned" if i == 0 else "teacher" if r["grid"] == "teacher" else "hand")
    if all_rows:
        return dict(rows=rows, seconds=seconds)
    learned = {k: float(v) for k, v in rows[0].items() if k not in ("grid", "role")}
    best = min((r for r in rows if r["role"] == "hand"), key=lambda r: float(r["rmse"]))
    return dict(learned, best_baseline=best["grid"], best_rmse=float(best["rmse"]), seconds=seconds)


def run_all(jobs: list, run, workers: int, first_of) -> list[dict]:
    """run(*job) for every job, `workers` at a time; the first job of each `first_of(job)` group runs before the
    rest of its group, so that it generates the pairs the group shares."""
    firsts = list({first_of(j): j for j in reversed(jobs)}.values())[::-1]
    with ThreadPoolExecutor(workers) as pool:  # the groups' first jobs are independent of each other
        rows = list(pool.map(lambda j: run(*j), firsts))
        rows += list(pool.map(lambda j: run(*j), [j for j in jobs if j not in firsts]))
    return rows


def paired(cfg: Config, out: Path) -> str:
    def run(teacher: str, case: SolverChoice, nfe: int) -> dict:
        args = [f"teacher={teacher}", f"solver={case.solver}", f"order={case.order}", f"nfe={nfe}",
                f"pairs.test={cfg.bench_test}", *[f"options.{k}={v}" for k, v in case.options.items()], *cfg.ld3_args]
        r = train_ld3(args, out / teacher / f"{case.solver}{case.order}" / f"nfe{nfe}", out / teacher / "pairs",
                      cfg.threads)
        row = dict(teacher=teacher, solver=f"{case.solver}-{case.order}", nfe=nfe, **r)
        print(row, flush=True)
        return row

    jobs = [(t, c, n) for t in cfg.teachers for c in cfg.solvers for n in cfg.nfe]
    rows = run_all(jobs, run, cfg.workers, first_of=lambda j: j[0])
    rows.sort(key=lambda r: [(j[0], f"{j[1].solver}-{j[1].order}", j[2]) for j in jobs].index(
        (r["teacher"], r["solver"], r["nfe"])))
    write_csv(out / "paired.csv", rows)
    fid = "fid_teacher" in rows[0]
    lines = ["| teacher | solver | NFE | LD3 RMSE | best baseline | its RMSE | LD3 / best |"
             + (" FID (teacher) / best | FID (data) / best |" if fid else "") + " run time (s) |",
             "|---|---|---|---|---|---|---|" + ("---|---|" if fid else "") + "---|"]
    lines += [f"| {r['teacher']} | {r['solver']} | {r['nfe']} | {r['rmse']:.4f} | {r['best_baseline']} | "
              f"{r['best_rmse']:.4f} | {r['rmse_vs_best']:.3f} |"
              + (f" {r['fid_teacher_vs_best']:.3f} | {r['fid_data_vs_best']:.3f} |" if fid else "")
              + f" {r['seconds']} |" for r in rows]
    text = "\n".join(lines) + "\n"
    write_text(out / "paired.md", text)
    if fid:
        plot_paired(rows, out / "paired.png")
    return text


def plot_paired(rows: list[dict], path: Path) -> None:
    """Learned / best baseline against NFE: one column per teacher, paired RMSE above, FID against the teacher's
    samples below, one line per solver; below 1 the learned grid wins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teachers = list(dict.fromkeys(r["teacher"] for r in rows))
    fig, axes = plt.subplots(2, len(teachers), figsize=(4.2 * len(teachers), 6), sharex=True, squeeze=False)
    for col, teacher in enumerate(teachers):
        for solver in dict.fromkeys(r["solver"] for r in rows):
            rs = sorted((r for r in rows if (r["teacher"], r["solver"]) == (teacher, solver)), key=lambda r: int(r["nfe"]))
            for ax, key in zip(axes[:, col], ("rmse_vs_best", "fid_teacher_vs_best")):
                ax.plot([int(r["nfe"]) for r in rs], [float(r[key]) for r in rs], marker="o", label=solver)
        for ax, label in zip(axes[:, col], ("RMSE / best baseline", "FID (teacher) / best baseline")):
            ax.axhline(1.0, color="grey", ls=":", lw=1)
            ax.set(title=teacher if label.startswith("RMSE") else None, ylabel=label)
            ax.grid(alpha=0.3)
        axes[1, col].set_xlabel("NFE")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


PATH_PROBE = "import torch; print(torch.backends.cpu.get_cpu_capability().lower())"


def cpu_paths() -> list[str]:
    """The kernel paths torch really runs here, the native one (the best this CPU has) first, then those below it
    (torch takes a path above it too, and dies of SIGILL in its first kernel; a path it ignores falls back)."""
    native = subprocess.run([sys.executable, "-c", PATH_PROBE], capture_output=True, text=True).stdout.strip()
    paths, order = [native], ("default", "avx2", "avx512")
    for cap in order[:order.index(native)] if native in order else ():
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
        got = subprocess.run([sys.executable, "-c", PATH_PROBE], env=env, capture_output=True, text=True).stdout.strip()
        if got == cap and cap not in paths:
            paths.append(cap)
    return paths


SCORING = threading.Lock()


def score(run_dir: Path, pairs_dir: Path, n: int) -> dict:
    """Learned / best baseline by RMSE and FID on the first n held-out pairs of the run (its own table's metrics)."""
    from learnsteps.core.denoiser import dtype_of
    from learnsteps.ld3 import LD3Config
    from learnsteps.ld3.report import evaluate_grids
    from learnsteps.ld3.run import pairs_dataset
    from learnsteps.schedule import load_schedule
    from learnsteps.teachers import load_teacher
    from learnsteps.trajectories import TrajectoryDataset

    cfg = load_config(LD3Config, [run_dir / "config.yaml"])
    with SCORING:  # runs finish together in run_all's threads; diffusers' lazy imports are not thread-safe
        teacher = load_teacher(cfg.teacher, conditions=cfg.conditions, guidance=cfg.guidance)
    test = pairs_dataset(TrajectoryDataset(pairs_dir / "test", dtype=dtype_of(teacher)).tensors, n)
    s = load_schedule(run_dir / "schedule.json")
    learned = evaluate_grids(cfg, teacher, s.solve_kwargs, test)[0][0]
    return {k.removesuffix("_vs_best"): v for k, v in learned.items() if k.endswith("_vs_best")}


def robustness(cfg: Config, out: Path) -> str:
    paths = cfg.cpu_paths or cpu_paths()
    root = out / "robustness"

    def run(seed: int, path: str, nfe: int) -> dict:
        run_dir, pairs_dir = root / f"seed{seed}" / path / f"nfe{nfe}", root / f"seed{seed}" / "pairs"
        r = train_ld3([f"nfe={nfe}", f"seed={seed}", f"pairs.seed={seed}", f"pairs.test={cfg.bench_test}",
                       *cfg.ld3_args], run_dir, pairs_dir, cfg.threads, path, all_rows=True)
        table = r["rows"]
        learned = {k: float(v) for k, v in table[0].items() if k not in ("grid", "role")}
        row = dict(seed=seed, path=path, nfe=nfe, seconds=r["seconds"])
        row.update({f"demo_{k}": v for k, v in score(run_dir, pairs_dir, cfg.demo_test).items()})
        row.update({f"bench_{k.removesuffix('_vs_best')}": v for k, v in learned.items() if k.endswith("_vs_best")})
        # FID against the data itself: the learned grid, the best hand grid and the teacher's own samples
        row.update(fid_data=learned["fid_data"], hand_fid_data=min(float(t["fid_data"]) for t in table
                                                                    if t["role"] == "hand"),
                   teacher_fid_data=next((float(t["fid_data"]) for t in table if t["role"] == "teacher"), math.nan))
        print(row, flush=True)
        return row

    jobs = [(s, p, n) for s in cfg.seeds for p in paths for n in cfg.robust_nfe]
    rows = run_all(jobs, run, cfg.workers, first_of=lambda j: j[0])
    rows.sort(key=lambda r: (r["nfe"], r["seed"], paths.index(r["path"])))
    write_csv(root / "robustness.csv", rows)
    text = robustness_table(cfg, rows, paths)
    write_text(root / "robustness.md", text)
    return text


def robustness_table(cfg: Config, rows: list[dict], paths: list[str]) -> str:
    """part=robustness's runs: learned / best hand grid (median, worst, best) per NFE, every run's cell, and FID
    against the data itself beside the teacher's own."""
    metrics = [("demo_rmse", f"paired RMSE, {cfg.demo_test} pairs"),
               ("bench_rmse", f"paired RMSE, {cfg.bench_test} pairs"),
               ("bench_fid_teacher", f"FID vs teacher, {cfg.bench_test}"),
               ("bench_fid_data", f"FID vs data, {cfg.bench_test}")]
    lines = [f"LD3 defaults{' ' + ' '.join(cfg.ld3_args) if cfg.ld3_args else ''}: learned / best hand grid over "
             f"seeds {cfg.seeds} x kernel paths {paths} ({len(cfg.seeds) * len(paths)} runs a cell; "
             f"{cfg.threads} thread(s) a run)", "",
             "| NFE | measure | median | worst | best |", "|---|---|---|---|---|"]
    for nfe in cfg.robust_nfe:
        for key, label in metrics:
            vals = [r[key] for r in rows if r["nfe"] == nfe and key in r]
            if vals:
                lines.append(f"| {nfe} | {label} | {statistics.median(vals):.3f} | {max(vals):.3f} | {min(vals):.3f} |")
    lines += ["", "| NFE | seed | " + " | ".join(paths) + " |", "|---|---|" + "---|" * len(paths)]
    for nfe in cfg.robust_nfe:
        for seed in cfg.seeds:
            cells = [next((f"{r['demo_rmse']:.3f} / {r.get('bench_fid_teacher', float('nan')):.3f}" for r in rows
                           if (r["nfe"], r["seed"], r["path"]) == (nfe, seed, p)), "") for p in paths]
            lines.append(f"| {nfe} | {seed} | " + " | ".join(cells) + " |")
    lines.append("\n(per-run cells: paired RMSE ratio on the demo's pairs / FID-vs-teacher ratio on the benchmark's)")
    lines += ["", f"FID against the data, {cfg.bench_test} held-out pairs, median (range) over the runs:", "",
              "| NFE | teacher | best hand grid | learned | runs: learned ≤ best hand grid | learned ≤ teacher |",
              "|---|---|---|---|---|---|"]
    for nfe in cfg.robust_nfe:
        rs = [r for r in rows if r["nfe"] == nfe]
        cells = [f"{statistics.median(v):.2f} ({min(v):.2f}–{max(v):.2f})"
                 for v in ([r[k] for r in rs] for k in ("teacher_fid_data", "hand_fid_data", "fid_data"))]
        lines.append(f"| {nfe} | " + " | ".join(cells) + f" | {sum(r['fid_data'] <= r['hand_fid_data'] for r in rs)}"
                     f" of {len(rs)} | {sum(r['fid_data'] <= r['teacher_fid_data'] for r in rs)} of {len(rs)} |")
    return "\n".join(lines) + "\n"


METRICS = ("rmse", "fid_teacher", "fid_data")


def demo_args() -> tuple[list[str], list[str]]:
    """`make demo`'s arguments as the Makefile has them: DEMO + DEMO_LD3 (its LD3 run's), DEMO + DEMO_SOLVER (the
    learned solver's)."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    found = {k: shlex.split(v) for k, v in re.findall(r"^(DEMO\w*) := (.*)$", text, re.M)}
    return found["DEMO"] + found["DEMO_LD3"], found["DEMO"] + found["DEMO_SOLVER"]


def demo(cfg: Config, out: Path) -> str:
    """`make demo`'s two runs (LD3, then the learned solver from its schedule) for every seed x CPU kernel path x
    torch thread count; each judged by its own report on its 2000 held-out pairs against the best hand grid."""
    paths = cfg.cpu_paths or cpu_paths()
    ld3_args, solver_args = (
        [a for a in args if not a.startswith(("pairs.directory=", "init_schedule="))] for args in demo_args())
    root = out / "demo"

    def run(seed: int, path: str, threads: int) -> dict:
        where = root / f"seed{seed}"
        cell = where / path / f"threads{threads}"
        seeds = [f"seed={seed}", f"pairs.seed={seed}"]
        ld3 = train_ld3([*ld3_args, *seeds], cell / "ld3", where / "pairs", threads, path, report=False)
        rows = train_ld3([*solver_args, *seeds, f"init_schedule={cell / 'ld3' / 'schedule.json'}"], cell / "solver",
                         where / "pairs", threads, path, all_rows=True)
        row = dict(seed=seed, path=path, threads=threads, seconds=ld3["seconds"] + rows["seconds"])
        by_role = {r["role"]: r for r in rows["rows"]}  # the learned solver, LD3 (its start), the teacher
        for m in METRICS:
            row.update({f"hand_{m}": min(float(r[m]) for r in rows["rows"] if r["role"] == "hand"),
                        f"ld3_{m}": float(by_role["start"][m]), f"solver_{m}": float(by_role["learned"][m])})
        row["teacher_fid_data"] = float(by_role["teacher"]["fid_data"])
        print(row, flush=True)
        return row

    jobs = [(s, p, t) for s in cfg.seeds for p in paths for t in cfg.demo_threads]
    rows = run_all(jobs, run, cfg.workers, first_of=lambda j: j[0])
    rows.sort(key=lambda r: (r["seed"], paths.index(r["path"]), r["threads"]))
    write_csv(root / "demo.csv", rows)
    text = demo_table(rows)
    write_text(root / "demo.md", text)
    return text


def demo_table(rows: list[dict]) -> str:
    """part=demo's runs: each method / the best hand grid (median, worst, best) against the demo's bars, every run."""
    seeds, paths, threads = (sorted({r[k] for r in rows}) for k in ("seed", "path", "threads"))
    lines = [f"`make demo` over seeds {seeds} x kernel paths {paths} x threads {threads}: {len(rows)} runs, each "
             f"judged on its own 2000 held-out pairs", "",
             "| method | measure | / best hand grid: median | worst | best | the demo's bar (worst) | met |",
             "|---|---|---|---|---|---|---|"]
    bars = dict(rmse=0.85, fid_teacher=0.85, fid_data=1.0)
    for method in ("ld3", "solver"):
        for m in METRICS:
            ratios = [r[f"{method}_{m}"] / r[f"hand_{m}"] for r in rows]
            lines.append(f"| {'LD3' if method == 'ld3' else 'learned solver'} | {m.replace('_', ' ')} | "
                         f"{statistics.median(ratios):.3f} | {max(ratios):.3f} | {min(ratios):.3f} | <= {bars[m]} | "
                         f"{'yes' if max(ratios) <= bars[m] else 'no'} |")
    med = {k: statistics.median(r[k] for r in rows) for k in ("teacher_fid_data", "hand_fid_data", "ld3_fid_data",
                                                              "solver_fid_data")}
    lines += ["", f"FID against the data (median over the runs): teacher {med['teacher_fid_data']:.2f}, best hand grid "
              f"{med['hand_fid_data']:.2f}, LD3 {med['ld3_fid_data']:.2f}, learned solver {med['solver_fid_data']:.2f}",
              "", "| seed | path | threads | FID (data): teacher / best hand / LD3 / learned solver | LD3 / hand: RMSE, "
              "FID (teacher), FID (data) | learned solver / hand: the same |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratios = {m: " / ".join(f"{r[f'{m}_{k}'] / r[f'hand_{k}']:.3f}" for k in METRICS) for m in ("ld3", "solver")}
        lines.append(f"| {r['seed']} | {r['path']} | {r['threads']} | {r['teacher_fid_data']:.2f} / "
                     f"{r['hand_fid_data']:.2f} / {r['ld3_fid_data']:.2f} / {r['solver_fid_data']:.2f} | "
                     f"{ratios['ld3']} | {ratios['solver']} |")
    return "\n".join(lines) + "\n"


def learned_solver(cfg: Config, out: Path) -> str:
    def run(teacher: str, seed: int, nfe: int) -> dict:
        where = out / "solver" / teacher / f"seed{seed}"
        args = [f"teacher={teacher}", f"nfe={nfe}", f"seed={seed}", f"pairs.seed={seed}", f"pairs.test={cfg.bench_test}",
                *cfg.teacher_args.get(teacher, []), *cfg.ld3_args]
        ld3 = train_ld3(args, where / f"nfe{nfe}" / "ld3", where / "pairs", cfg.threads)
        init = where / f"nfe{nfe}" / "ld3" / "schedule.json"
        solver = train_ld3([*args, "learn=solver", f"init_schedule={init}", *cfg.solver_args],
                           where / f"nfe{nfe}" / "solver", pairs_dir(where, cfg.solver_args), cfg.threads)
        row = dict(teacher=teacher, nfe=nfe, seed=seed, ld3_seconds=ld3["seconds"], solver_seconds=solver["seconds"])
        for m in METRICS:
            row.update({f"ld3_{m}": ld3[m], f"solver_{m}": solver[m], f"hand_{m}": ld3[m] / ld3[f"{m}_vs_best"]})
        print(row, flush=True)
        return row

    jobs = [(t, s, n) for t in cfg.solver_teachers for s in cfg.solver_seeds for n in cfg.solver_nfe]
    rows = run_all(jobs, run, cfg.workers, first_of=lambda j: j[:2])
    write_csv(out / "solver.csv", rows)

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):.3f} ({min(values):.2f}–{max(values):.2f})"

    lines = ["| teacher | NFE | FID (teacher) solver / LD3 | FID (data) solver / LD3 | RMSE solver / LD3 | "
             "FID (teacher) solver / best hand | LD3 / best hand | FID (teacher): hand / LD3 / solver | "
             "time (LD3 + solver) / LD3 |", "|---|---|---|---|---|---|---|---|---|"]
    for teacher in cfg.solver_teachers:
        for nfe in cfg.solver_nfe:
            rs = [r for r in rows if r["teacher"] == teacher and r["nfe"] == nfe]
            ratio = {m: [r[f"solver_{m}"] / r[f"ld3_{m}"] for r in rs] for m in METRICS}
            med = {k: statistics.median(r[k] for r in rs) for k in ("hand_fid_teacher", "ld3_fid_teacher",
                                                                    "solver_fid_teacher")}
            lines.append(f"| {teacher} | {nfe} | {spread(ratio['fid_teacher'])} | {spread(ratio['fid_data'])} | "
                         f"{spread(ratio['rmse'])} | "
                         f"{spread([r['solver_fid_teacher'] / r['hand_fid_teacher'] for r in rs])} | "
                         f"{spread([r['ld3_fid_teacher'] / r['hand_fid_teacher'] for r in rs])} | "
                         f"{med['hand_fid_teacher']:.2f} / {med['ld3_fid_teacher']:.2f} / {med['solver_fid_teacher']:.2f} | "
                         f"{spread([(r['ld3_seconds'] + r['solver_seconds']) / r['ld3_seconds'] for r in rs])} |")
    text = (f"Median (min–max) over seeds {cfg.solver_seeds}; {cfg.bench_test} held-out pairs per seed; FID on digits "
            "features; LD3 = DPM-Solver++(3M) grid + offsets, solver = the learned solver started from it.\n\n"
            + "\n".join(lines) + "\n")
    write_text(out / "solver.md", text)
    return text


def heldout_pairs(cfg: Config, guidance: float, root: Path):
    """The teacher at `guidance` and its held-out pairs (made once, shared by every run of that guidance)."""
    from learnsteps.core.denoiser import dtype_of
    from learnsteps.ld3 import LD3Config
    from learnsteps.ld3.config import resolve_auto
    from learnsteps.ld3.run import pairs_dataset, pairs_spec
    from learnsteps.teachers import load_teacher
    from learnsteps.trajectories import TrajectoryDataset, TrajectoryError, generate

    ld3 = load_config(LD3Config, [ROOT / "configs" / "ld3.yaml"], [f"teacher={cfg.data_teacher}", f"guidance={guidance}"])
    teacher = load_teacher(ld3.teacher, guidance=guidance)
    resolve_auto(ld3, teacher)  # pairs.steps and the rest of the `auto` settings, as train.py's runs resolve them
    spec = pairs_spec(ld3, teacher, cfg.bench_test, cfg.heldout_seed)
    try:
        generate(teacher, root / "heldout", spec, teacher_name=ld3.teacher, progress=True)
    except TrajectoryError as err:  # another draw's (heldout_seed), bench_test's or teacher's pairs
        raise SystemExit(f"{err} (heldout_seed={cfg.heldout_seed}, bench_test={cfg.bench_test})") from None
    return teacher, pairs_dataset(TrajectoryDataset(root / "heldout", dtype=dtype_of(teacher)).tensors)


def judge(run_dir: Path, teacher, heldout) -> list[dict]:
    """The run's schedule, every hand grid and the teacher on the held-out pairs (LD3's own report), each row with
    its FID against the odd-indexed digits as well (`fid_unseen`: the half the data terms never see)."""
    import torch

    from learnsteps.ld3 import LD3Config
    from learnsteps.ld3.report import evaluate_grids
    from learnsteps.quality.metrics import Features, fid_features, pixels, reference_features
    from learnsteps.schedule import load_schedule

    ld3 = load_config(LD3Config, [run_dir / "config.yaml"])
    rows, samples = evaluate_grids(ld3, teacher, load_schedule(run_dir / "schedule.json").solve_kwargs, heldout,
                                   keep=len(heldout))
    features = Features("digits")
    odd = reference_features("digits", features)[1::2]
    with torch.no_grad():
        for row in rows:
            row["fid_unseen"] = fid_features(features(pixels(teacher, samples[row["grid"]]).float()), odd)
    return rows


def against_data(cfg: Config, out: Path) -> str:
    root = out / "data"
    data_rows(root, cfg.ld3_args)  # a case already run is reused as it is (train_ld3 skips it): same arguments only
    held = {g: heldout_pairs(cfg, g, root / f"guidance{g}") for g in cfg.data_guidances}

    def run(g: float, seed: int, case: SolverChoice, nfe: int) -> list[dict]:
        where = root / f"guidance{g}" / f"seed{seed}"  # the seed's own training and validation pairs
        cell = where / f"{case.solver}{case.order}" / f"nfe{nfe}"
        args = [f"teacher={cfg.data_teacher}", f"guidance={g}", f"solver={case.solver}", f"order={case.order}",
                f"nfe={nfe}", f"seed={seed}", f"pairs.seed={seed}", "pairs.test=2",
                f"baselines=[{','.join(BASELINES)}]",  # every hand grid, GITS' included
                *[f"options.{k}={v}" for k, v in case.options.items()], *cfg.ld3_args]
        runs = {"ld3": train_ld3(args, cell / "ld3", where / "pairs", cfg.threads)}
        if cfg.data_learned_solver:
            runs["solver"] = train_ld3([*args, "learn=solver", f"init_schedule={cell / 'ld3' / 'schedule.json'}",
                                        *cfg.solver_args], cell / "solver", pairs_dir(where, cfg.solver_args),
                                       cfg.threads)
        out_rows = []
        for method, r in runs.items():
            rows = judge(cell / method, *held[g])
            hand = [x for x in rows if x["role"] == "hand"]
            best = {k: min(hand, key=lambda x: x[k]) for k in ("rmse", "fid_teacher", "fid_data")}
            teacher_row = rows[-1]
            out_rows.append(dict(
                guidance=g, solver=f"{case.solver}-{case.order}", nfe=nfe, seed=seed, method=method,
                seconds=r["seconds"], **{k: rows[0][k] for k in ("rmse", "fid_teacher", "fid_data", "precision",
                                                                    "recall")},
                teacher_fid_data=teacher_row["fid_data"], teacher_recall=teacher_row["recall"],
                **{f"hand_{k}": best[k][k] for k in best}, hand_fid_data_grid=best["fid_data"]["grid"],
                hand_recall=best["fid_data"]["recall"], fid_unseen=rows[0]["fid_unseen"],
                hand_fid_unseen=best["fid_data"]["fid_unseen"], teacher_fid_unseen=teacher_row["fid_unseen"]))
            print(out_rows[-1], flush=True)
        write_json(cell / "rows.json", {"ld3_args": list(cfg.ld3_args), "rows": out_rows})
        return out_rows

    jobs = [(g, s, c, n) for g in cfg.data_guidances for s in cfg.data_seeds for c in cfg.data_solvers
            for n in cfg.data_nfe]
    run_all(jobs, run, cfg.workers, first_of=lambda j: j[:2])
    rows = data_rows(root, cfg.ld3_args)
    write_csv(root / "data.csv", rows)
    text = data_table(cfg, rows)
    write_text(root / "data.md", text)
    return text


def pairs_dir(where: Path, args: list[str]) -> Path:
    """The pairs a run with `args` trains on: the seed's own (where/pairs), or, when args change their number (e.g.
    the learned solver's `pairs.val=1000`), a folder of their own beside them (the noises of the first ones are the
    same: sample j's noise is seeded by (seed, j))."""
    changed = sorted(a for a in args if a.startswith("pairs."))
    return where / "-".join(["pairs", *(re.sub(r"[^\w]+", "", a.removeprefix("pairs.")) for a in changed)])


def data_rows(root: Path, ld3_args: list[str]) -> list[dict]:
    """Every case judged so far under `root` (each case's rows.json), so that an invocation for some of the cases adds
    to data.csv and data.md instead of replacing what earlier invocations in the same out_dir measured; all of them
    made with `ld3_args` (one out_dir, one recipe: its runs are reused, not retrained, by a later invocation)."""
    rows = []
    for path in root.glob("guidance*/seed*/*/nfe*/rows.json"):
        made = read_json(path, SystemExit)
        if made["ld3_args"] != list(ld3_args):
            raise SystemExit(f"{path.parent} was made with ld3_args={made['ld3_args']}, not {list(ld3_args)}: "
                             f"use another out_dir")
        rows += made["rows"]
    return sorted(rows, key=lambda r: (r["guidance"], r["solver"], r["nfe"], r["method"] != "ld3", r["seed"]))


class HeldOut:
    """What part=frontier and part=ceiling judge samplers on: the teacher at guidance `g`, its held-out pairs of
    part=data, the digits features of the data and of the teacher's samples, and the LD3 config of one case (its
    hand grids)."""

    def __init__(self, cfg: Config, g: float, case: SolverChoice, nfe: int, out: Path):
        import torch

        from learnsteps.ld3 import LD3Config
        from learnsteps.ld3.config import resolve_auto
        from learnsteps.quality.metrics import Features, pixels, reference_features

        self.teacher, held = heldout_pairs(cfg, g, out / "data" / f"guidance{g}")
        _, self.x_T, self.target, self.cond = held.tensors
        self.features = Features("digits")
        self.f_data = reference_features("digits", self.features)
        with torch.no_grad():
            self.f_teacher = self.features(pixels(self.teacher, self.target).float())
        self.ld3 = load_config(LD3Config, [ROOT / "configs" / "ld3.yaml"],
                               [f"teacher={cfg.data_teacher}", f"guidance={g}", f"solver={case.solver}",
                                f"order={case.order}", f"nfe={nfe}"])
        resolve_auto(self.ld3, self.teacher)

    def score(self, x) -> tuple[dict, object]:
        """(paired RMSE, FID against the teacher's samples and the data, recall against the data), x's features."""
        import torch

        from learnsteps.quality.metrics import fid_features, pixels, precision_recall

        with torch.no_grad():
            f = self.features(pixels(self.teacher, x).float())
        return dict(rmse=float((x - self.target).pow(2).mean().sqrt()), fid_teacher=fid_features(f, self.f_teacher),
                    fid_data=fid_features(f, self.f_data), recall=precision_recall(f, self.f_data)["recall"]), f


def frontier(cfg: Config, out: Path) -> str:
    import torch

    from learnsteps.core.sample import solve_in_batches
    from learnsteps.ld3.config import baseline_grid
    from learnsteps.quality.losses import log_scale
    from learnsteps.quality.metrics import fid_features
    from learnsteps.schedule import load_schedule

    g, case = cfg.data_guidances[0], cfg.frontier_solver
    h = HeldOut(cfg, g, case, 4, out)
    teacher, x_T, cond, f_teacher = h.teacher, h.x_T, h.cond, h.f_teacher
    hand = ("time_uniform", "logsnr", "edm", "gits")
    grids = {name: ("hand", dict(grid=baseline_grid(h.ld3, teacher, name, 4))) for name in hand}
    for path in cfg.frontier_schedules:
        schedule = load_schedule(path)
        p = schedule.provenance
        name = f"{'learned solver' if p.get('learn') == 'solver' else p.get('method', '?')}, {p.get('loss', '?')}"
        grids[f"{name}, t_min {schedule.times[-2]:g} ({path})"] = ("schedule", schedule.solve_kwargs)
    for c in cfg.frontier_t_min:
        for a in cfg.frontier_a:
            for b in (b for b in cfg.frontier_b if b < a):
                grids[f"{a},{b},{c}"] = ("lattice", dict(grid=torch.tensor([1.0, a, b, c, 0.0], dtype=torch.float64)))
    rows = []
    for name, (kind, kw) in grids.items():
        x = solve_in_batches(teacher, x_T, 256, cond, **dict(dict(solver=case.solver, order=case.order,
                                                                  **case.options), **kw))
        row, f = h.score(x)
        scale = math.exp(float(log_scale(f.double(), f_teacher.double())))  # > 1: spread out, < 1: contracted
        rows.append(dict(grid=name, kind=kind, t_min=float(kw["grid"][-2]), **row, feature_scale=scale))
        print(rows[-1], flush=True)
    teacher_fid = fid_features(f_teacher, h.f_data)
    write_csv(out / "frontier.csv", rows)
    plot_frontier(rows, teacher_fid, out / "frontier.png", f"{cfg.data_teacher} guidance {g}, {case.solver}-"
                  f"{case.order}, NFE 4, {len(h.target)} held-out pairs")
    best = min((r for r in rows if r["kind"] == "lattice"), key=lambda r: r["fid_data"])
    best_hand = min((r for r in rows if r["kind"] == "hand"), key=lambda r: r["fid_data"])
    return (f"teacher FID (data) {teacher_fid:.2f}; best hand grid {best_hand['grid']} {best_hand['fid_data']:.2f}; "
            f"best lattice grid {best['grid']} {best['fid_data']:.2f} (RMSE {best['rmse']:.4f}); frontier.png")


def interval_guidance(inside, outside, until: float):
    """The teacher at one guidance scale on t <= `until` and at another above it (guidance in a limited interval,
    Kynkäänniemi et al. 2024): `inside` and `outside` are the same network loaded at the two scales."""
    import torch

    from learnsteps.core.denoiser import Denoiser

    class IntervalGuidance(Denoiser):
        def __init__(self):
            super().__init__()
            self.inside, self.outside = inside, outside
            self.noise_schedule, self.prediction = inside.noise_schedule, inside.prediction

        def forward(self, x, t, cond=None):
            return (self.inside if float(torch.as_tensor(t).flatten()[0]) <= until else self.outside)(x, t, cond)

    return IntervalGuidance()


def ceiling(cfg: Config, out: Path) -> str:
    """Where samplers of the guided teacher land in the plane of FID against the teacher's samples and against the
    data (issue #33's target (a) is a box in it): the teacher's own solve (the held-out pairs' solver and steps) with
    guidance only on t <= c for each of `ceiling_intervals` (1 above), and at each of `ceiling_scales` everywhere,
    so without discretisation error; every hand grid of `ceiling_solver` at `ceiling_nfe`; `ceiling_schedules`, each
    also with guidance on t <= c only for `ceiling_schedule_intervals`. ceiling.md, ceiling.csv, ceiling.png."""
    import torch

    from learnsteps.core.sample import solve_in_batches
    from learnsteps.ld3.config import baseline_grid
    from learnsteps.ld3.run import pairs_spec
    from learnsteps.schedule import load_schedule
    from learnsteps.teachers import load_teacher
    from learnsteps.trajectories import integrate

    g, case = cfg.ceiling_guidance, cfg.ceiling_solver
    h = HeldOut(cfg, g, case, cfg.ceiling_nfe, out)
    teacher, x_T, cond, ld3 = h.teacher, h.x_T, h.cond, h.ld3
    spec = pairs_spec(ld3, teacher, len(x_T), cfg.heldout_seed)
    times = torch.tensor(spec.output_times, dtype=torch.float64)
    scales = {s: load_teacher(cfg.data_teacher, guidance=s) for s in {1.0, *cfg.ceiling_scales}}

    def converged(model):
        with torch.no_grad():
            return torch.cat([integrate(model, x_T[i:i + 256], times, spec, cond[i:i + 256])[-1]
                              for i in range(0, len(x_T), 256)])

    runs = {f"the teacher, guidance {g} on t <= 1 (its own solve)": ("teacher", lambda: converged(teacher))}
    for c in cfg.ceiling_intervals:
        runs[f"guidance {g} on t <= {c:g}, 1 above"] = (
            "interval", lambda c=c: converged(interval_guidance(teacher, scales[1.0], c)))
    for s in cfg.ceiling_scales:
        runs[f"guidance {s:g} everywhere"] = ("scale", lambda s=s: converged(scales[s]))
    for name in BASELINES:
        grid = baseline_grid(ld3, teacher, name, cfg.ceiling_nfe)
        runs[f"{name}, {case.solver}-{case.order} NFE {cfg.ceiling_nfe}"] = ("hand", lambda grid=grid: solve_in_batches(
            teacher, x_T, 256, cond, grid=grid, solver=case.solver, order=case.order, **case.options))
    for path in cfg.ceiling_schedules:
        kw = load_schedule(path).solve_kwargs
        runs[str(path)] = ("schedule", lambda kw=kw: solve_in_batches(teacher, x_T, 256, cond, **kw))
        for c in cfg.ceiling_schedule_intervals:  # the same schedule, sampled with guidance on t <= c only
            runs[f"{path}, guidance {g} on t <= {c:g}"] = ("schedule, interval", lambda kw=kw, c=c: solve_in_batches(
                interval_guidance(teacher, scales[1.0], c), x_T, 256, cond, **kw))
    rows = []
    for name, (kind, run) in runs.items():
        rows.append(dict(sampler=name, kind=kind, **h.score(run())[0]))
        print(rows[-1], flush=True)
    write_csv(out / "ceiling.csv", rows)
    box = target_a(rows)
    plot_ceiling(rows, box, out / "ceiling.png", f"{cfg.data_teacher} guidance {g}, {len(x_T)} held-out pairs; "
                 f"hand grids: {case.solver}-{case.order}, NFE {cfg.ceiling_nfe}")
    lines = ["| sampler | FID (teacher) | FID (data) | recall | RMSE | in (a)'s box |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['fid_teacher']:.3f} | {r['fid_data']:.3f} | {r['recall']:.3f} | "
              f"{r['rmse']:.4f} | {'yes' if r['fid_teacher'] <= box[0] and r['fid_data'] <= box[1] else 'no'} |"
              for r in rows]
    text = (f"(a)'s box: FID (teacher) <= {box[0]:.3f}, FID (data) <= {box[1]:.3f} ({box[2]})\n\n"
            + "\n".join(lines) + "\n")
    write_text(out / "ceiling.md", text)
    return text


def target_a(rows: list[dict]) -> tuple[float, float, str]:
    """Issue #33's target (a) as a box (FID against the teacher, against the data, which grids set it): <= 0.6x the
    best hand grid's FID against the teacher, and <= the best hand grid's FID against the data and 1.1x the teacher's
    (rows[0])."""
    hand = [r for r in rows if r["kind"] == "hand"]
    best_t, best_d = min(hand, key=lambda r: r["fid_teacher"]), min(hand, key=lambda r: r["fid_data"])
    fid_data = min(best_d["fid_data"], 1.1 * rows[0]["fid_data"])
    name = lambda r: r["sampler"].split(",")[0]  # noqa: E731
    why = (f"0.6x {name(best_t)}'s {best_t['fid_teacher']:.2f} against the teacher, "
           f"{name(best_d)}'s {best_d['fid_data']:.2f} against the data")
    return 0.6 * best_t["fid_teacher"], fid_data, why


def plot_ceiling(rows: list[dict], box: tuple[float, float, str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    ax.fill_between([0, box[0]], 0, box[1], color="tab:green", alpha=0.15, label=f"issue #33's target (a): {box[2]}")
    style = {"teacher": ("k", "o", "the teacher (converged)"),
             "interval": ("tab:blue", "o", "converged, guidance on t <= c only"),
             "scale": ("tab:purple", "D", "converged, one scale everywhere"),
             "hand": ("k", "s", "hand grids"),
             "schedule": ("crimson", "*", "schedule files (LD3 runs)"),
             "schedule, interval": ("tab:orange", "*", "the same schedules, guidance on t <= c only")}
    for kind, (color, marker, label) in style.items():
        rs = [r for r in rows if r["kind"] == kind]
        if rs:
            ax.scatter([r["fid_teacher"] for r in rs], [r["fid_data"] for r in rs], color=color, marker=marker,
                       s=90 if kind.startswith("schedule") else 36, label=label, zorder=3)
        for r in rs:
            if not kind.startswith("schedule"):
                ax.annotate(r["sampler"].split(",")[0].replace("guidance ", "g "), (r["fid_teacher"], r["fid_data"]),
                            fontsize=6, xytext=(3, 3), textcoords="offset points")
    near = [r for r in rows if r["fid_teacher"] <= 4 * box[0] and r["fid_data"] <= 3 * box[1]]  # far grids: off
    ax.set(xlabel="FID against the teacher's samples", ylabel="FID against the data (digits features)", title=title,
           xlim=(0, 1.1 * max(r["fid_teacher"] for r in near)), ylim=(0, 1.1 * max(r["fid_data"] for r in near)))
    ax.title.set_fontsize(8)
    ax.legend(fontsize=7)
    save_figure(fig, path)
    plt.close(fig)


def plot_frontier(rows: list[dict], teacher_fid: float, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    lattice = [r for r in rows if r["kind"] == "lattice"]
    ends = sorted({r["t_min"] for r in lattice})
    for i, end in enumerate(ends):
        rs = [r for r in lattice if r["t_min"] == end]
        ax.scatter([r["rmse"] for r in rs], [r["fid_data"] for r in rs], s=18, alpha=0.7,
                   color=plt.cm.viridis(i / max(1, len(ends) - 1)), label=f"grids ending at t = {end:g}")
    for r in rows:
        if r["kind"] != "lattice":
            star = r["kind"] == "schedule"
            ax.scatter([r["rmse"]], [r["fid_data"]], marker="*" if star else "s", s=120 if star else 40,
                       color="crimson" if star else "k", zorder=3)
            label = r["grid"].split(" (")[0]
            ax.annotate(label, (r["rmse"], r["fid_data"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.axhline(teacher_fid, color="k", ls="--", lw=1, label="the teacher's own samples")
    ax.set(xlabel="paired RMSE to the teacher", ylabel="FID against the data (digits features)", yscale="log",
           title=title, ylim=(0.8 * teacher_fid, 8 * teacher_fid))  # the grids that matter, not the far outliers
    ax.legend(fontsize=7)
    save_figure(fig, path)
    plt.close(fig)


def data_table(cfg: Config, rows: list[dict]) -> str:
    """Per guidance x solver x NFE x method: medians (and ranges) over the seeds, beside the teacher's own FID and
    the best hand grid's, and whether issue #33's targets hold: (a) FID (data) <= the best hand grid's and <= 1.1x the
    teacher's, FID (teacher) <= 0.6x the best hand grid's; (b) where the best hand grid is >= 1.25x the teacher's FID
    (data), <= 0.8x it."""
    def med(vals):
        return statistics.median(vals)

    def unseen(rs):  # rows judged before the column was added have none
        keys = ("teacher_fid_unseen", "hand_fid_unseen", "fid_unseen")
        return " / ".join(f"{med([r[k] for r in rs]):.2f}" for k in keys) if all(k in rs[0] for k in keys) else "–"

    lines = ["| guidance | solver | NFE | method | FID (data): teacher / best hand (grid) / learned (range) | learned / "
             "best hand | learned / teacher | FID (teacher): learned / best hand | recall: teacher / hand / learned | "
             "RMSE / best hand | (a) | (b) | FID (unseen odd digits): teacher / hand / learned |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["guidance"], r["solver"], r["nfe"], r["method"]) for r in rows))
    for g, solver, nfe, method in keys:
        rs = [r for r in rows if (r["guidance"], r["solver"], r["nfe"], r["method"]) == (g, solver, nfe, method)]
        teacher, hand, fd = (med([r[k] for r in rs]) for k in ("teacher_fid_data", "hand_fid_data", "fid_data"))
        ft = med([r["fid_teacher"] / r["hand_fid_teacher"] for r in rs])
        a = fd <= hand and fd <= 1.1 * teacher and ft <= 0.6
        b = "–" if hand < 1.25 * teacher else ("yes" if fd <= 0.8 * hand else "no")
        grid = max(set(r["hand_fid_data_grid"] for r in rs), key=[r["hand_fid_data_grid"] for r in rs].count)
        lines.append(
            f"| {g} | {solver} | {nfe} | {method} | {teacher:.2f} / {hand:.2f} ({grid}) / {fd:.2f} "
            f"({min(r['fid_data'] for r in rs):.2f}–{max(r['fid_data'] for r in rs):.2f}) | {fd / hand:.3f} | "
            f"{fd / teacher:.3f} | {ft:.3f} | {med([r['teacher_recall'] for r in rs]):.3f} / "
            f"{med([r['hand_recall'] for r in rs]):.3f} / {med([r['recall'] for r in rs]):.3f} | "
            f"{med([r['rmse'] / r['hand_rmse'] for r in rs]):.3f} | {'yes' if a else 'no'} | {b} | {unseen(rs)} |")
    seeds = sorted(set(r["seed"] for r in rows))
    return (f"{cfg.data_teacher}, seeds {', '.join(map(str, seeds))} (median, range), {cfg.bench_test} held-out "
            f"pairs per guidance; LD3 args: {' '.join(cfg.ld3_args) or 'the defaults'}\n\n" + "\n".join(lines) + "\n")


PARTS = {"all": (memory, paired), "memory": (memory,), "paired": (paired,), "demo": (demo,),
         "robustness": (robustness,), "solver": (learned_solver,), "data": (against_data,), "frontier": (frontier,),
         "ceiling": (ceiling,)}


def main(argv):
    cfg = load_config(Config, [], argv)
    if cfg.part not in PARTS:  # before anything is created
        raise SystemExit(f"part={cfg.part}: one of {', '.join(PARTS)}")
    out = ROOT / cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    for part in PARTS[cfg.part]:
        print(part(cfg, out))
    write_json(out / "config.json", dict(argv=argv))


if __name__ == "__main__":
    main(sys.argv[1:])

"""DSNO benchmark: one-pass students against the teacher's samplers, the M / temporal-layer ablation, and cost.

    python benchmarks/dsno.py                                   # all of it (about an hour on 2 CPU cores)
    python benchmarks/dsno.py part=cost                         # cost per sample only
    python benchmarks/dsno.py teachers=[gmm_digits] steps=300   # a smaller run

train: `train.py mode=dsno` for every teacher x variant at the same budget (optimizer steps, batch, data,
backbone, seed). Every variant of a teacher reads one trajectory set, generated once at the largest M's output
times (DSNO's quadratic times nest: M's times are among 2M's).
eval: `eval.py` on held-out noise (a seed the trajectories never used): every student, the baseline samplers at
1, 2, 4 and 8 NFE on several grids, LD3 schedules when given, the teacher (UniPC-3, 40 steps) and the FID floor.
cost: forward FLOPs (torch.utils.flop_counter) and CPU time per sample of each student against one teacher
evaluation, timed interleaved in one process.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learnsteps.config import SolverChoice, load_config  # noqa: E402


@dataclass
class Variant:
    num_times: int = 4
    temporal: bool = True

    @property
    def name(self) -> str:
        return f"dsno-M{self.num_times}" if self.temporal and self.num_times > 1 else f"one-step-M{self.num_times}"


@dataclass
class Config:
    part: str = "all"  # all | train | eval | cost
    teachers: list[str] = field(default_factory=lambda: ["digits_unet", "gmm_digits"])
    variants: list[Variant] = field(default_factory=lambda: [Variant(8), Variant(4), Variant(2), Variant(1, False)])
    ablation_teachers: list[str] = field(default_factory=lambda: ["digits_unet"])  # the others: M = 4 and M = 1 only
    steps: int = 1500
    batch_size: int = 32
    trajectories: int = 4096
    solvers: list[SolverChoice] = field(default_factory=lambda: [
        SolverChoice("euler", 1), SolverChoice("dpm_solver++", 2), SolverChoice("unipc", 3, {"variant": "bh1"}),
        SolverChoice("ipndm", 4)])
    grids: list[str] = field(default_factory=lambda: ["time_uniform", "logsnr", "edm"])
    nfe: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    schedules: list[str] = field(default_factory=list)  # LD3 schedule files to compare with
    samples: int = 2000
    eval_seed: int = 7  # held-out noise: the trajectories use seed 0
    out_dir: str = "runs/bench_dsno"
    teacher_args: list[str] = field(default_factory=list)  # e.g. [guidance=2.0] for a conditional pipeline teacher


def variants_for(cfg: Config, teacher: str) -> list[Variant]:
    chosen = cfg.variants if teacher in cfg.ablation_teachers else [
        v for v in cfg.variants if (v.num_times, v.temporal) in ((4, True), (1, False))]
    return sorted(chosen, key=lambda v: -v.num_times)  # the largest M generates the shared trajectories


def train(cfg: Config, out: Path) -> None:
    for teacher in cfg.teachers:
        for v in variants_for(cfg, teacher):
            run_dir = out / teacher / v.name
            if (run_dir / "student" / "student.json").is_file():
                continue
            cmd = [sys.executable, str(ROOT / "train.py"), "mode=dsno", f"teacher={teacher}",
                   f"num_times={v.num_times}", f"temporal={str(v.temporal).lower()}", f"run_dir={run_dir}",
                   f"data_dir={out / teacher / 'trajectories'}", f"trajectories.n={cfg.trajectories}",
                   f"batch_size={cfg.batch_size}", f"trainer.max_steps={cfg.steps}",
                   f"trainer.val_check_interval={min(250, cfg.steps)}", "trainer.progress_bar=false",
                   "wandb.mode=disabled", *cfg.teacher_args]
            print(" ".join(cmd[1:]), flush=True)
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if res.returncode != 0:
                print(res.stdout[-2000:], res.stderr[-4000:])
                raise SystemExit(f"dsno run failed: {run_dir}")


def evaluate(cfg: Config, out: Path) -> None:
    from learnsteps.schedule import load_schedule

    for teacher in cfg.teachers:
        students = [str(out / teacher / v.name / "student") for v in variants_for(cfg, teacher)]
        cmd = [sys.executable, str(ROOT / "eval.py"), f"teachers=[{teacher}]", f"samples={cfg.samples}",
               f"seed={cfg.eval_seed}", f"nfe=[{','.join(map(str, cfg.nfe))}]", f"grids=[{','.join(cfg.grids)}]",
               f"students=[{','.join(students)}]", f"out_dir={out / teacher / 'eval'}", "wandb.mode=disabled",
               *cfg.teacher_args]
        cmd += [f"solvers=[{','.join(_solver_arg(s) for s in cfg.solvers)}]"]
        mine = [s for s in cfg.schedules if load_schedule(s).teacher.get("name") == teacher]
        if mine:
            cmd.append(f"schedules=[{','.join(mine)}]")
        print(" ".join(cmd[1:]), flush=True)
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if res.returncode != 0:
            print(res.stderr[-4000:])
            raise SystemExit(f"evaluation failed for {teacher}")


def _solver_arg(s: SolverChoice) -> str:
    opts = ", ".join(f"{k}: {v}" for k, v in s.options.items())
    return f"{{solver: {s.solver}, order: {s.order}" + (f", options: {{{opts}}}" if opts else "") + "}"


def cost(cfg: Config, out: Path) -> list[dict]:
    """FLOPs and CPU time per sample, students against one teacher evaluation, timed interleaved."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from learnsteps.dsno.student import load_student
    from learnsteps.teachers import load_teacher

    rows = []
    for teacher_name in cfg.teachers:
        teacher = load_teacher(teacher_name)
        models = {"teacher (one evaluation)": lambda x: teacher.x0(x, torch.full((len(x),), 0.5, dtype=x.dtype))}
        for v in variants_for(cfg, teacher_name):
            directory = out / teacher_name / v.name / "student"
            if directory.is_dir():
                student = load_student(directory)
                models[v.name] = student.sample
        x = torch.randn(256, *teacher.shape)
        flops, seconds = {}, {k: [] for k in models}
        for name, f in models.items():
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                f(x[:1].to(torch.float64 if "teacher" in name else torch.float32).to(_dtype(teacher, name)))
            flops[name] = counter.get_total_flops()
        for _ in range(7):
            for name, f in models.items():
                xin = x.to(_dtype(teacher, name))
                t0 = time.perf_counter()
                with torch.no_grad():
                    f(xin)
                seconds[name].append((time.perf_counter() - t0) / len(x))
        base = sorted(seconds["teacher (one evaluation)"])[3]
        for name in models:
            med = sorted(seconds[name])[3]
            rows.append(dict(teacher=teacher_name, model=name, mflops=flops[name] / 1e6, us_per_sample=med * 1e6,
                             time_vs_teacher_eval=med / base))
            print(rows[-1], flush=True)
    return rows


def _dtype(teacher, name):
    import torch

    from learnsteps.core.denoiser import dtype_of

    return dtype_of(teacher) if name.startswith("teacher") else torch.float32


def summary(cfg: Config, out: Path, cost_rows: list[dict]) -> str:
    lines = []
    for teacher in cfg.teachers:
        with open(out / teacher / "eval" / "results.csv") as f:
            rows = [dict(r, nfe=int(r["nfe"]), **{k: float(r[k]) for k in ("fid_data", "fid_teacher", "rmse_teacher")})
                    for r in csv.DictReader(f)]
        ref = next(r for r in rows if r["grid"] == "teacher")
        floor = next(r for r in rows if r["grid"].startswith("floor"))
        students = [r for r in rows if r["solver"].startswith(("dsno", "one-step"))]
        samplers = [r for r in rows if r not in students and r is not ref and r is not floor]
        lines += [f"**{teacher}** ({cfg.samples} samples; teacher = {ref['solver']}, {ref['nfe']} steps: FID against "
                  f"the data {ref['fid_data']:.2f}; floor, teacher against teacher on other noise: FID against the "
                  f"data {floor['fid_data']:.2f}, against the teacher {floor['fid_teacher']:.2f})", "",
                  "| sampler | NFE | FID (data) | FID (teacher) | RMSE to teacher | FID / teacher's |",
                  "|---|---|---|---|---|---|"]
        for nfe in sorted({r["nfe"] for r in samplers}):
            here = [r for r in samplers if r["nfe"] == nfe]
            for label, best in (("best by FID", min(here, key=lambda r: r["fid_data"])),
                                ("best by RMSE", min(here, key=lambda r: r["rmse_teacher"]))):
                lines.append(f"| {label}: {best['solver']} {best['grid']} | {nfe} | {best['fid_data']:.2f} | "
                             f"{best['fid_teacher']:.2f} | {best['rmse_teacher']:.4f} | "
                             f"{best['fid_data'] / ref['fid_data']:.2f} |")
        for r in students:
            lines.append(f"| **{r['solver']}** (one pass) | 1 | {r['fid_data']:.2f} | {r['fid_teacher']:.2f} | "
                         f"{r['rmse_teacher']:.4f} | {r['fid_data'] / ref['fid_data']:.2f} |")
        plain = next((r for r in students if r["solver"] == "one-step-M1"), None)
        best4 = min((r for r in samplers if r["nfe"] == 4), key=lambda r: r["fid_data"], default=None)
        for r in students:
            if r is plain or plain is None:
                continue
            lines.append(f"\n{r['solver']}: RMSE / one-step-M1 = {r['rmse_teacher'] / plain['rmse_teacher']:.2f}; "
                         f"FID / teacher = {r['fid_data'] / ref['fid_data']:.2f}"
                         + (f"; FID / best 4-NFE sampler = {r['fid_data'] / best4['fid_data']:.2f}" if best4 else ""))
        lines.append("")
        for v in variants_for(cfg, teacher):
            info = json.loads((out / teacher / v.name / "student" / "student.json").read_text())["training"]
            lines.append(f"- {v.name}: {info['steps']} steps in {info['seconds']:.0f} s")
        lines.append("")
    if cost_rows:
        lines += ["| teacher | model | MFLOPs per sample | CPU us per sample | time / one teacher evaluation |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['teacher']} | {r['model']} | {r['mflops']:.2f} | {r['us_per_sample']:.0f} | "
                  f"{r['time_vs_teacher_eval']:.2f} |" for r in cost_rows]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv):
    cfg = load_config(Config, [], argv)
    out = ROOT / cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dict(argv=argv), indent=2))
    if cfg.part in ("all", "train"):
        train(cfg, out)
    if cfg.part in ("all", "eval"):
        evaluate(cfg, out)
    cost_rows = cost(cfg, out) if cfg.part in ("all", "cost") else []
    if cfg.part in ("all", "eval"):
        print(summary(cfg, out, cost_rows))


if __name__ == "__main__":
    main(sys.argv[1:])

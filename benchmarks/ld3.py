"""LD3 benchmark: learned grids against every baseline grid, training time, and backward-pass memory.

    python benchmarks/ld3.py                                  # all of it (about 40 CPU minutes)
    python benchmarks/ld3.py part=memory                      # peak memory only
    python benchmarks/ld3.py teachers=[gmm_digits] nfe=[4,6]  # a subset
    python benchmarks/ld3.py part=paired "ld3_args=[loss=features]" out_dir=runs/bench_ld3_features

paired: `train.py mode=ld3` for every teacher x solver x NFE (pairs shared per teacher), each reporting RMSE to
the teacher on 200 held-out pairs for the learned grid and every baseline grid; results.md / results.csv.
memory: peak resident memory of one forward + backward pass through the sampler (DPM-Solver++(3M), batch 4)
with a 3x32x32 UNet of 64 channels, with and without per-step rematerialisation, each in a fresh process.
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
class Config:
    part: str = "all"  # all | paired | memory
    teachers: list[str] = field(default_factory=lambda: ["gmm_digits", "digits_unet"])
    solvers: list[SolverChoice] = field(default_factory=lambda: [
        SolverChoice("dpm_solver++", 3), SolverChoice("unipc", 3, {"variant": "bh1"}), SolverChoice("ipndm", 4)])
    nfe: list[int] = field(default_factory=lambda: [4, 6, 8, 10])
    memory_nfe: list[int] = field(default_factory=lambda: [4, 6, 8, 10])
    out_dir: str = "runs/bench_ld3"
    ld3_args: list[str] = field(default_factory=list)  # passed to every `train.py mode=ld3`, e.g. [loss=features]


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
    (out / "memory.md").write_text(text)
    return text


def paired(cfg: Config, out: Path) -> str:
    rows = []
    for teacher in cfg.teachers:
        for case in cfg.solvers:
            for nfe in cfg.nfe:
                run_dir = out / teacher / f"{case.solver}{case.order}" / f"nfe{nfe}"
                opts = [f"options.{k}={v}" for k, v in case.options.items()]
                t0 = time.perf_counter()
                res = subprocess.run([sys.executable, str(ROOT / "train.py"), "mode=ld3", f"teacher={teacher}",
                                      f"solver={case.solver}", f"order={case.order}", f"nfe={nfe}", *opts,
                                      f"run_dir={run_dir}", f"pairs.directory={out / teacher / 'pairs'}",
                                      "trainer.progress_bar=false", "wandb.mode=disabled", *cfg.ld3_args],
                                     capture_output=True, text=True, cwd=ROOT)
                seconds = time.perf_counter() - t0
                if res.returncode != 0:
                    print(res.stderr[-3000:])
                    raise SystemExit(f"ld3 run failed: {run_dir}")
                with open(run_dir / "results.csv") as f:
                    result = {r["grid"]: float(r["rmse"]) for r in csv.DictReader(f)}
                learned = result.pop("ld3 (learned)")
                best = min(result, key=result.get)
                rows.append(dict(teacher=teacher, solver=f"{case.solver}-{case.order}", nfe=nfe, learned=learned,
                                 best_baseline=best, best_rmse=result[best], ratio=learned / result[best],
                                 seconds=round(seconds, 1)))
                print(rows[-1], flush=True)
    with open(out / "paired.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["| teacher | solver | NFE | LD3 RMSE | best baseline | its RMSE | LD3 / best | run time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['teacher']} | {r['solver']} | {r['nfe']} | {r['learned']:.4f} | {r['best_baseline']} | "
              f"{r['best_rmse']:.4f} | {r['ratio']:.3f} | {r['seconds']} |" for r in rows]
    text = "\n".join(lines) + "\n"
    (out / "paired.md").write_text(text)
    return text


def main(argv):
    cfg = load_config(Config, [], argv)
    out = ROOT / cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    if cfg.part in ("all", "memory"):
        print(memory(cfg, out))
    if cfg.part in ("all", "paired"):
        print(paired(cfg, out))
    (out / "config.json").write_text(json.dumps(dict(argv=argv), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Trajectory generation throughput against the raw teacher forward throughput on the same batches.

    python benchmarks/trajectories.py [teacher=digits_unet n=1024 batch_size=256 repeats=3]

Generation = seeded noise, a solver of the core over the fine grid, x0 at the output times, fp32 shards with
checksums and a manifest. Raw = the same number of teacher forward calls on batches of the same size. Both are
timed interleaved in one run; the ratio raw / generation is the fraction of time spent in the teacher.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learnsteps.config import load_config  # noqa: E402
from learnsteps.teachers import load_teacher  # noqa: E402
from learnsteps.trajectories import TrajectorySpec, generate, output_times  # noqa: E402


@dataclass
class Config:
    teacher: str = "digits_unet"
    n: int = 1024
    batch_size: int = 256
    num_times: int = 5
    steps_per_interval: int = 5
    store_x0: bool = True
    repeats: int = 3
    threads: int = 0  # 0: torch's default


def main(argv):
    cfg = load_config(Config, [], argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    teacher = load_teacher(cfg.teacher)
    spec = TrajectorySpec(n=cfg.n, shard_size=cfg.batch_size, batch_size=cfg.batch_size, num_times=cfg.num_times,
                          solver="unipc", order=3, steps_per_interval=cfg.steps_per_interval, store_x0=cfg.store_x0)
    times = output_times(spec, teacher.noise_schedule)
    finite = int((times != teacher.noise_schedule.t_zero).sum())
    calls_per_batch = (finite - 1) * cfg.steps_per_interval + (finite - 1 if cfg.store_x0 else 0)
    shape = teacher.shape
    batches = [torch.randn(cfg.batch_size, *shape) for _ in range(cfg.n // cfg.batch_size)]
    t = torch.full((cfg.batch_size,), 0.5)

    def raw():
        with torch.no_grad():
            for x in batches:
                for _ in range(calls_per_batch):
                    teacher(x, t)

    def gen():
        with tempfile.TemporaryDirectory() as d:
            generate(teacher, d, spec, progress=False)

    gen(), raw()  # warm up
    t_gen, t_raw = [], []
    for _ in range(cfg.repeats):
        t0 = time.perf_counter(); gen(); t_gen.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); raw(); t_raw.append(time.perf_counter() - t0)
    g, r = statistics.median(t_gen), statistics.median(t_raw)
    print(f"teacher {cfg.teacher}, {cfg.n} trajectories in batches of {cfg.batch_size}, {calls_per_batch} teacher "
          f"calls per batch (UniPC-3, {cfg.steps_per_interval} steps per interval, {cfg.num_times} output times"
          f"{', x0 stored' if cfg.store_x0 else ''}), {torch.get_num_threads()} threads, median of {cfg.repeats}:")
    print(f"| generation | {cfg.n / g:.1f} traj/s | {g:.2f} s |")
    print(f"| raw teacher forwards | {cfg.n / r:.1f} traj/s | {r:.2f} s |")
    print(f"| generation / raw throughput | {r / g:.3f} | |")


if __name__ == "__main__":
    main(sys.argv[1:])

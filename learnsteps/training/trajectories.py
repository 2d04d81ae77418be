"""`python train.py mode=trajectories teacher=digits_unet out_dir=...`: generate a teacher trajectory dataset,
split across the DDP ranks that Lightning Fabric launches (trainer.devices, trainer.strategy=ddp, torchrun)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import lightning as L

from ..config import TeacherOptions, not_a_file
from ..teachers import load_teacher
from ..trajectories import TrajectorySpec, check_directory, generate
from .common import RunConfig


@dataclass
class TrajectoryJobConfig(RunConfig, TeacherOptions):
    teacher: str = "digits_unet"  # with TeacherOptions: conditions, guidance, height, width, teacher_dtype, ...
    out_dir: str = "runs/trajectories"
    spec: TrajectorySpec = field(default_factory=TrajectorySpec)
    RULES: ClassVar = dict(RunConfig.RULES, **TeacherOptions.RULES, out_dir=not_a_file)


def generate_job(cfg: TrajectoryJobConfig):
    teacher = load_teacher(cfg.teacher, **cfg.teacher_options())
    check_directory(Path(cfg.out_dir), cfg.spec, teacher, cfg.teacher)  # before any rank writes anything
    t = cfg.trainer
    fabric = L.Fabric(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy)
    fabric.launch()
    teacher = teacher.to(fabric.device)
    manifest = generate(teacher, cfg.out_dir, cfg.spec, rank=fabric.global_rank, world_size=fabric.world_size,
                        teacher_name=cfg.teacher, progress=t.progress_bar and fabric.global_rank == 0,
                        barrier=fabric.barrier)
    if fabric.global_rank == 0:
        print(f"{cfg.spec.n} trajectories of {cfg.teacher} in {cfg.out_dir} (manifest {manifest})")

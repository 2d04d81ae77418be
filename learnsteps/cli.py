"""The command lines behind train.py and eval.py: pick the mode, load its config, run it, report bad input."""
from __future__ import annotations

import sys
from typing import Callable

from .config import CONFIG_DIR, ConfigError, load_config


def _modes() -> dict[str, tuple[type, Callable]]:
    from .dsno.module import DSNOConfig, train_dsno
    from .ld3 import LD3Config, train_ld3
    from .training.features import FeatureTrainConfig, train_features
    from .training.latent_teacher import LatentTeacherConfig, train_latent_teacher
    from .training.teacher import TeacherTrainConfig, train_teacher
    from .training.trajectories import TrajectoryJobConfig, generate_job

    return {"ld3": (LD3Config, train_ld3), "dsno": (DSNOConfig, train_dsno),
            "teacher": (TeacherTrainConfig, train_teacher), "features": (FeatureTrainConfig, train_features),
            "latent_teacher": (LatentTeacherConfig, train_latent_teacher),
            "trajectories": (TrajectoryJobConfig, generate_job)}


def _run(program: str, schema: type, config_file: str, argv: list[str], runner: Callable) -> int:
    """configs/<config_file>, then the key=value overrides, then the runner; bad input: a message and exit 2."""
    try:
        cfg = load_config(schema, [CONFIG_DIR / config_file], argv)
        cfg.command = f"python {program} " + " ".join(argv)  # recorded in the run's outputs
        runner(cfg)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def train_main(argv: list[str]) -> int:
    """python train.py mode=<mode> [key=value ...]"""
    modes = _modes()
    mode = next((a.split("=", 1)[1] for a in argv if a.startswith("mode=")), None)
    if mode not in modes:
        problem = "say which mode to train" if mode is None else f"unknown mode {mode!r}"
        print(f"error: {problem}: mode={'|'.join(modes)}", file=sys.stderr)
        return 2
    schema, runner = modes[mode]
    return _run("train.py", schema, f"{mode}.yaml", argv, runner)


def eval_main(argv: list[str]) -> int:
    """python eval.py [key=value ...]"""
    from .eval.evaluate import EvalConfig, evaluate

    return _run("eval.py", EvalConfig, "eval.yaml", argv, evaluate)

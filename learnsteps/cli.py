"""The command lines behind train.py and eval.py: pick the mode, load its config, run it, report bad input."""
from __future__ import annotations

import sys
from typing import Callable

from .config import CONFIG_DIR, ConfigError, load_config


def _modes() -> dict[str, tuple[type, Callable]]:
    from .dsno.module import DSNOConfig, train_dsno
    from .ld3.module import LD3Config, train_ld3
    from .training.features import FeatureTrainConfig, train_features
    from .training.teacher import TeacherTrainConfig, train_teacher
    from .training.trajectories import TrajectoryJobConfig, generate_job

    return {"ld3": (LD3Config, train_ld3), "dsno": (DSNOConfig, train_dsno), "teacher": (TeacherTrainConfig, train_teacher),
            "features": (FeatureTrainConfig, train_features),
            "trajectories": (TrajectoryJobConfig, generate_job)}


def train_main(argv: list[str]) -> int:
    """python train.py mode=<mode> [key=value ...]: configs/<mode>.yaml, then the overrides."""
    try:
        modes = _modes()
        mode = next((a.split("=", 1)[1] for a in argv if a.startswith("mode=")), None)
        if mode is None:
            raise ConfigError(f"say which mode to train: mode={'|'.join(modes)}")
        if mode not in modes:
            raise ConfigError(f"unknown mode {mode!r}: expected one of {sorted(modes)}")
        schema, run = modes[mode]
        cfg = load_config(schema, [CONFIG_DIR / f"{mode}.yaml"], argv)
        cfg.command = "python train.py " + " ".join(argv)
        run(cfg)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

"""The command lines behind train.py and eval.py: pick the mode, load its config, run it, report bad input."""
from __future__ import annotations

import shlex
import signal
import sys
import threading
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
    """configs/<config_file>, then the key=value overrides, then the runner. Bad input: one line and exit code 2; a
    file that cannot be written (a full disk): one line naming it and its errno, exit code 2; SIGTERM or SIGINT:
    one line saying so and how to resume, exit code 128 + the signal's number (a training step in progress is
    finished and checkpointed first: training.common.StopOnSignal)."""
    from .training.common import Interrupted, raise_interrupted

    rerun = f"rerun the same command to {'resume' if program == 'train.py' else 'start again'}: " + \
        shlex.join(["python", program, *argv])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    if threading.current_thread() is threading.main_thread():
        for s in handlers:
            signal.signal(s, raise_interrupted)
    try:
        cfg = load_config(schema, [CONFIG_DIR / config_file], argv)
        cfg.command = f"python {program} " + " ".join(argv)  # recorded in the run's outputs
        runner(cfg)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # files.WriteError names the file and the errno; others name theirs
        print(f"error: {err}; {rerun}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"error: {err}; {rerun}", file=sys.stderr)
        return err.code
    finally:
        if threading.current_thread() is threading.main_thread():
            for s, handler in handlers.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
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

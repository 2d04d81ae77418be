"""Configuration: dataclass schemas, YAML files under configs/, and key=value overrides from the command line.

Plain omegaconf (Hydra would pin an older omegaconf). The schema is the single source of truth for names,
types and defaults; a YAML file or an override that names an unknown key, or gives a value of the wrong type,
is a ConfigError that names the key (with omegaconf's "did you mean").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class SolverChoice:
    """A solver of the core as configs name it: its name, order, own options, and a label for tables."""

    solver: str
    order: int = 1
    options: dict = field(default_factory=dict)
    label: str = ""


class ConfigError(ValueError):
    """A configuration that does not fit its schema."""


def _message(err: OmegaConfBaseException) -> str:
    first = str(err).splitlines()[0]
    key = getattr(err, "full_key", None)
    return f"{first} (key: {key})" if key and key not in first else first


def load_config(schema: type[T], files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> T:
    """The schema's defaults, merged with each YAML file in order, then with `key=value` overrides."""
    for token in overrides:
        if "=" not in token or token.startswith("="):
            raise ConfigError(f"argument {token!r} is not of the form key=value")
    try:
        cfg = OmegaConf.structured(schema)
        for f in files:
            path = Path(f)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        for token in overrides:
            try:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([token]))
            except yaml.YAMLError as err:
                raise ConfigError(f"the value in {token!r} is not valid YAML: {' '.join(str(err).split())}") from None
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_message(err)) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"a config file is not valid YAML: {err}") from None


def to_yaml(cfg) -> str:
    """The resolved configuration as YAML (saved beside every run's outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))

"""Configuration: dataclass schemas, YAML files under configs/, and key=value overrides from the command line.

Plain omegaconf (Hydra would pin an older omegaconf). The schema is the single source of truth for names,
types, defaults and bounds; a YAML file or an override that names an unknown key, gives a value of the wrong
type (with omegaconf's "did you mean"), or one outside the bounds a schema states in its RULES, is a ConfigError
that names the key. Loading checks everything it can without doing any work, so a bad value is refused before a
run creates anything; what needs the mode's own knowledge (a solver's orders, a teacher's shape) each mode
checks next, still before it writes.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """A configuration that does not fit its schema."""


# ---- bounds: a rule maps a value to None (fine) or to what is wrong with it ------------------------------------
Rule = Callable[[Any], "str | None"]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def at_least(lo: float) -> Rule:
    return lambda v: None if _number(v) and v >= lo else f"must be a number >= {lo}"


def between(lo: float, hi: float) -> Rule:
    return lambda v: None if _number(v) and lo <= v <= hi else f"must be a number in [{lo}, {hi}]"


def positive(v) -> str | None:
    return None if _number(v) and v > 0 else "must be a finite number > 0"


def fraction(v) -> str | None:
    return None if _number(v) and 0 <= v < 1 else "must be a number in [0, 1)"


def one_of(*choices) -> Rule:
    return lambda v: None if v in choices else f"must be one of {', '.join(map(repr, choices))}"


def each(rule: Rule, non_empty: bool = False) -> Rule:
    def check(values):
        if non_empty and not values:
            return "must not be empty"
        for i, v in enumerate(values):
            if (problem := rule(v)) is not None:
                return f"[{i}]={v!r} {problem}"
        return None
    return check


def not_a_file(v) -> str | None:
    """An output directory: empty (the default) or a path that is not an existing file."""
    return "is an existing file, not a directory" if v and Path(v).is_file() else None


def conditions_value(v) -> str | None:
    """A teacher's conditions: a list of class labels / prompts, a prompt file (one per line), or a file of
    precomputed prompt embeddings (.safetensors)."""
    if isinstance(v, str):
        return None if Path(v).is_file() else "is not a prompt or embeddings file (give a file path, or a list [label, ...])"
    if isinstance(v, list) and all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in v):
        return None
    return "must be a list of class labels or prompts, or a prompt or embeddings file"


def guidance_scale(v) -> str | None:
    """A classifier-free guidance scale: a number in [0, MAX_GUIDANCE] (core/denoiser.py says why)."""
    from .core.denoiser import MAX_GUIDANCE

    return between(0, MAX_GUIDANCE)(v)


@dataclass
class TeacherOptions:
    """What a teacher takes besides its name, in every mode that loads one (all of it but teacher_dtype for
    diffusers pipelines only; docs/pipelines.md): configs mirror `load_teacher`'s keywords."""

    conditions: Any = field(default_factory=list)  # class labels or prompts, a prompt file, or an embeddings file
    guidance: float = 1.0  # the pipeline's guidance_scale: the CFG scale, or the input of a guidance-distilled model
    true_cfg: float = 1.0  # FluxPipeline's / QwenImagePipeline's true_cfg_scale (a negative branch)
    negative_prompt: Optional[str] = None  # None: the pipeline's own default
    guidance_rescale: float = 0.0  # Stable Diffusion / SDXL's guidance_rescale
    max_sequence_length: int = 0  # the text length the pipeline is called with (0: its default; T5 / UMT5 / Qwen)
    height: int = 0  # the sampled size in pixels (0: the pipeline's default); it sets the latent shape
    width: int = 0
    frames: int = 0  # video pipelines (Wan): frames (0: the pipeline's default)
    teacher_dtype: str = "float32"  # the network's dtype: float32 | bfloat16 | float16 | auto (bfloat16 for a pipeline
    # of 200 M denoiser parameters or more); the sampler stays float32
    RULES: ClassVar = dict(conditions=conditions_value, guidance=guidance_scale, true_cfg=guidance_scale,
                           guidance_rescale=between(0, 1), max_sequence_length=at_least(0), height=at_least(0),
                           width=at_least(0), frames=at_least(0), teacher_dtype=one_of("float32", "bfloat16", "float16", "auto"))

    def teacher_options(self) -> dict:
        """load_teacher's keywords."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(TeacherOptions)}


def existing_dir(v) -> str | None:
    """An input directory: empty (the default) or an existing directory."""
    if not v:
        return None
    return None if Path(v).is_dir() else ("is a file, not a directory" if Path(v).exists() else "does not exist")


def existing_file(v) -> str | None:
    """An input file: empty (the default) or an existing file."""
    if not v:
        return None
    return None if Path(v).is_file() else ("is a directory, not a file" if Path(v).exists() else "does not exist")


def all_of(*rules: Rule) -> Rule:
    def check(v):
        return next((p for rule in rules if (p := rule(v)) is not None), None)
    return check


def check_config(cfg, prefix: str = "") -> None:
    """ConfigError for the first value that breaks its schema's RULES, in this dataclass or any nested one."""
    rules = getattr(cfg, "RULES", {})
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if f.name in rules and (problem := rules[f.name](value)) is not None:
            raise ConfigError(f"{key}={value!r}: {problem}")
        if dataclasses.is_dataclass(value):
            check_config(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    check_config(item, f"{key}[{i}].")


@dataclass
class SolverChoice:
    """A solver of the core as configs name it: its name, order, own options, and a label for tables."""

    solver: str
    order: int = 1
    options: dict = field(default_factory=dict)
    label: str = ""
    RULES: ClassVar = dict(order=at_least(1))


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
        cfg = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_message(err)) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"a config file is not valid YAML: {err}") from None
    check_config(cfg)
    return cfg


def to_yaml(cfg) -> str:
    """The resolved configuration as YAML (saved beside every run's outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))

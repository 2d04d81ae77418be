"""Precomputed prompt embeddings: encode the prompts once (where the text encoders fit), train without them.

    python -m learnsteps.teachers.pipelines encode path/to/FLUX.1-dev --conditions prompts.txt --out flux.safetensors
    python train.py mode=ld3 teacher=path/to/FLUX.1-dev conditions=flux.safetensors guidance=3.5 ...

The file (safetensors, checksummed like every file learnsteps writes) holds the condition tables exactly as the
teacher keeps them: one tensor per table of the pipeline family's adapter (`embeds`: the text encoders' sequence
embeddings, `pooled`: pooled embeddings (SDXL, SD3, FLUX.1), `mask`: which tokens are the prompt's (Qwen-Image)),
each with K + 1 rows: the K prompts in order, then the negative (unconditional) input; and `info`, the UTF-8
JSON of {format: "learnsteps-conditions", version: 1, pipeline: the diffusers class, model, conditions: the K
prompts, negative_prompt: the negative prompt or null (the pipeline's own default), max_sequence_length: the text
length the prompts were padded to (null where the pipeline has none), negative_row: whether row K
is a real unconditional input (false where the family only has a negative branch with a negative prompt:
FLUX.1 and Qwen-Image encoded without one)}. A teacher loaded with `conditions=` such a file does not load the
pipeline's text encoders at all.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ...files import read_safetensors, write_safetensors
from ..network import TeacherLoadError

FORMAT, VERSION = "learnsteps-conditions", 1


@dataclass
class ConditionsFile:
    path: Path
    pipeline: str
    conditions: list[str]
    negative_prompt: str | None
    negative_row: bool
    max_sequence_length: int | None
    tables: dict[str, Tensor]

    def tables_for(self, pipeline: str, negative_prompt: str | None, max_sequence_length: int,
                   needs_negative: bool) -> dict[str, Tensor]:
        """The tables, for a `pipeline` teacher with this negative prompt and CFG; TeacherLoadError naming what
        does not fit."""
        if pipeline != self.pipeline:
            raise TeacherLoadError(f"{self.path}: embeddings of a {self.pipeline}'s text encoders, not a {pipeline}'s")
        if negative_prompt is not None and negative_prompt != self.negative_prompt:
            raise TeacherLoadError(f"{self.path}: encoded with the negative prompt {self.negative_prompt!r}, not "
                                   f"{negative_prompt!r}: encode them again with --negative-prompt")
        if max_sequence_length and max_sequence_length != self.max_sequence_length:
            raise TeacherLoadError(f"{self.path}: encoded with max_sequence_length={self.max_sequence_length}, not "
                                   f"{max_sequence_length}: encode them again with --max-sequence-length")
        if needs_negative and not self.negative_row:
            raise TeacherLoadError(f"{self.path}: encoded without a negative prompt, which this teacher's CFG needs: "
                                   f"encode them again with --negative-prompt (\"\" for an empty one)")
        return dict(self.tables)


def save_conditions(path: str | Path, pipeline: str, model: str, conditions: list[str], negative_prompt: str | None,
                    negative_row: bool, max_sequence_length: int | None, tables: dict[str, Tensor]) -> Path:
    info = dict(format=FORMAT, version=VERSION, pipeline=pipeline, model=str(model), conditions=list(conditions),
                negative_prompt=negative_prompt, negative_row=bool(negative_row), max_sequence_length=max_sequence_length)
    blob = torch.frombuffer(bytearray(json.dumps(info).encode()), dtype=torch.uint8)
    return write_safetensors(path, {**{k: v.detach().cpu().contiguous() for k, v in tables.items()}, "info": blob})


def load_conditions(path: str | Path) -> ConditionsFile:
    path = Path(path)
    tensors = read_safetensors(path, TeacherLoadError)
    try:
        info = json.loads(bytes(tensors.pop("info").tolist()).decode())
        if info.get("format") != FORMAT or info.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} v{VERSION} file")
        conditions, negative = info["conditions"], info["negative_prompt"]
        if not (isinstance(conditions, list) and conditions and all(isinstance(c, str) for c in conditions)):
            raise ValueError("'conditions' must be a non-empty list of prompts")
        if not all(v.shape[0] == len(conditions) + 1 for v in tensors.values()):
            raise ValueError(f"every table needs {len(conditions) + 1} rows (the prompts, then the negative input)")
        return ConditionsFile(path, str(info["pipeline"]), conditions, negative, bool(info["negative_row"]),
                              info["max_sequence_length"], tensors)
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as err:
        raise TeacherLoadError(f"{path}: not a file of prompt embeddings ({type(err).__name__}: {err})") from None


def encode_conditions(model: str, conditions, out: str | Path, negative_prompt: str | None = None,
                      max_sequence_length: int = 0, dtype: str = "float32",
                      local_files_only: bool | None = None) -> Path:
    """Encode prompts (a list or a prompt file) with the pipeline's own text encoders into a conditions file
    (its denoiser and VAE are not loaded); max_sequence_length 0: the pipeline's default."""
    from .base import DTYPES, FAMILIES, _load, encode_tables, read_conditions, text_length

    prompts = read_conditions(conditions)
    if isinstance(prompts, ConditionsFile) or not prompts:
        raise TeacherLoadError("encode takes prompts: a prompt file (one per line) or a list")
    if dtype not in DTYPES:
        raise TeacherLoadError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    pipe, cls = _load(model, local_files_only, DTYPES[dtype], skip=("unet", "transformer", "vae"))
    family = FAMILIES[cls]
    if family.class_conditional:
        raise TeacherLoadError(f"a {cls} is class-conditional: there is nothing to encode")
    length = text_length(pipe, cls, max_sequence_length)
    tables = encode_tables(pipe, family, prompts, negative_prompt, length)
    real = negative_prompt is not None or not (family.true_cfg or family.guidance_input)
    return save_conditions(out, cls, model, prompts, negative_prompt, real, length, tables)

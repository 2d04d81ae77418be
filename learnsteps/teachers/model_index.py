"""A diffusers pipeline directory's model_index.json, checked before diffusers acts on it, and the pipeline it
loaded, checked before anything uses it: whatever the file holds, the only error is a TeacherLoadError naming it.

diffusers trusts the file: a `_class_name` that is no string fails deep inside with a TypeError, a component
declared as a class its weights do not fit loads with its parameters left on the meta device (and fails when the
teacher's fingerprint first reads them).
"""
from __future__ import annotations

from pathlib import Path

from ..files import MAX_JSON_BYTES, parse_json
from .network import TeacherLoadError


def read_model_index(path: Path) -> dict:
    """The checked JSON object in `path` (a pipeline directory's model_index.json)."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes, more than a model_index.json holds")
        data = parse_json(path.read_bytes())
    except (OSError, ValueError) as err:
        raise TeacherLoadError(f"{path}: {err} (a diffusers pipeline's model_index.json)") from None
    return check_model_index(data, path)


def check_model_index(index, where) -> dict:
    """`index` (a parsed model_index.json) if it names a pipeline class and declares its components as
    [library, class] pairs of names; TeacherLoadError naming `where` otherwise."""
    if not isinstance(index, dict):
        raise TeacherLoadError(f"{where}: a pipeline's model_index.json holds a JSON object, not "
                               f"{type(index).__name__}")
    name = index.get("_class_name")
    if not isinstance(name, str) or not name.isidentifier():
        raise TeacherLoadError(f"{where}: '_class_name' is {name!r}, not the name of a diffusers pipeline class")
    for key, value in index.items():  # a component is [library, class] (both null: left out)
        declares = isinstance(value, list) and (not value or value[0] is None or isinstance(value[0], str))
        if declares and not (len(value) == 2 and all(v is None or (isinstance(v, str) and v) for v in value)):
            raise TeacherLoadError(f"{where}: component {key!r} is declared as {value!r}, not [library, class]")
    return index


# Components a pipeline may be loaded without ([null, null] in model_index.json, or left out as users do to save
# memory), besides those its class calls optional: SD3's T5 encoder. Any other one is what the teacher runs.
MAY_BE_LEFT_OUT = {"text_encoder_3", "tokenizer_3"}


def check_components(pipe, index: dict, where, skipped=()) -> None:
    """TeacherLoadError if the loaded pipeline lacks a component it needs (MAY_BE_LEFT_OUT; `skipped`: those the
    caller chose not to load), or a component has tensors its weights did not fill (diffusers leaves them on the
    meta device when the declared class does not fit the files)."""
    import torch

    optional = MAY_BE_LEFT_OUT | set(getattr(pipe, "_optional_components", [])) | set(skipped)
    for name, component in pipe.components.items():
        if component is None and name not in optional:
            raise TeacherLoadError(f"{where}: leaves out the {name} ({index.get(name)!r}), which the pipeline needs")
        if not isinstance(component, torch.nn.Module):
            continue
        tensors = [*component.parameters(), *component.buffers()]
        empty = sum(t.is_meta for t in tensors)
        if empty:
            declared = index.get(name)
            raise TeacherLoadError(f"{where}: {name} is declared as {declared!r}, but the weights in {name}/ do not "
                                   f"fit it ({empty} of {len(tensors)} tensors not loaded): a wrong class in "
                                   f"model_index.json, or damaged weights")


# A teacher whose denoiser has at least LARGE_TEACHER parameters is large (SD1.5's UNet has 860 M, DiT-XL/2 675 M,
# SDXL 2.6 B; the shipped digits models 1-2 M): `teacher_dtype=auto` loads it in bfloat16 and LD3's `auto` settings are
# the large-teacher ones; from HUGE_TEACHER (FLUX.1 11.9 B, Wan 2.1 14 B, Qwen-Image 20 B) the huge-teacher ones
# (ld3/config.py, docs/scaling.md).
LARGE_TEACHER = 200_000_000
HUGE_TEACHER = 5_000_000_000
DENOISERS = ("transformer", "unet", "prior")


def denoiser_parameters(directory: Path) -> int | None:
    """The parameter count of a pipeline directory's denoiser, read from its safetensors headers (no weights
    loaded), or None where it cannot be told (no such directory, no safetensors)."""
    import math

    from safetensors import safe_open

    index = directory / "model_index.json"
    if not index.is_file():
        return None
    try:
        name = next((k for k in DENOISERS if k in read_model_index(index)), None)
        total = 0
        for f in sorted((directory / name).glob("*.safetensors")) if name else []:
            with safe_open(str(f), framework="pt") as st:
                total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
        return total or None
    except Exception:  # noqa: BLE001 (safetensors raises its own types for a damaged header; so does a bad index)
        return None  # what load_teacher then reads says what is wrong with the directory

"""Atomic, checksummed files: everything learnsteps writes goes to a temporary file in the same directory and is
renamed over the target (an interrupted write leaves the previous file intact, a reader never sees half a file),
and carries a sha256 that every reader verifies before trusting a byte of it:

- JSON documents (`write_json` / `read_json`): a "sha256" field over the canonical JSON of the rest;
- safetensors (`write_safetensors` / `read_safetensors`): a "sha256" entry in the header's metadata over every
  tensor's name, dtype, shape and bytes;
- anything else (Lightning checkpoints, `write_checksummed` / `verify_checksum`): a `<name>.sha256` file beside it.

A reader raises the error type its caller asks for (a loader's own), naming the file and what is wrong with it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

MAX_JSON_BYTES = 16 << 20  # no metadata document learnsteps writes comes near this


class WriteError(OSError):
    """A file that could not be written (a full disk, no permission, ...): one line naming the file and the errno.
    The previous version of the file, if any, is intact (the write went to a temporary file)."""

    def __init__(self, path: Path, err: OSError):
        super().__init__(err.errno, err.strerror, str(path))
        self.path, self.reason = path, err

    def __str__(self) -> str:
        code = errno.errorcode.get(self.errno, "") if self.errno is not None else ""
        what = self.reason.strerror or str(self.reason) or type(self.reason).__name__
        return (f"cannot write {self.path}: {what} (errno {self.errno}{' ' + code if code else ''}); its previous "
                f"version, if any, is intact")


def write_atomically(path: Path, write) -> Path:
    """Call write(tmp) on a temporary path next to `path`, then rename it over `path`; an OSError on the way (a
    full disk, ...) is a WriteError naming `path`."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)  # atomic on POSIX and Windows when both are on one file system
    except WriteError:
        raise
    except OSError as err:
        raise WriteError(path, err) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_atomically(Path(path), lambda tmp: tmp.write_text(text))


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """A table of dicts (one header: the first row's keys), written atomically."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return write_text(path, buf.getvalue())


def save_figure(fig, path: str | Path, **kw) -> Path:
    """A matplotlib figure, written atomically (the format from the path's suffix)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return write_atomically(Path(path), lambda tmp: fig.savefig(tmp, format=fmt, **kw))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- JSON -------------------------------------------------------------------------------------------------------
def _json_digest(obj: dict) -> str:
    body = {k: v for k, v in obj.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_json(path: str | Path, obj: dict) -> Path:
    """`obj` as indented JSON with a "sha256" field over the rest (read_json verifies it)."""
    return write_text(path, json.dumps({**obj, "sha256": _json_digest(obj)}, indent=2) + "\n")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 30:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: str | bytes):
    """json.loads that refuses what no learnsteps file holds (NaN, Infinity, integers of more than 30 digits) and
    turns every parser failure, deep nesting included, into ValueError."""
    try:
        return json.loads(text, parse_int=_bounded_int, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("not valid JSON (nested too deeply)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"not valid JSON ({str(err).splitlines()[0]})") from None


def read_json(path: str | Path, error: type[Exception] = ValueError, checksum: str = "required") -> dict:
    """The JSON object in `path`, checked: it exists, is at most MAX_JSON_BYTES, parses, is an object, and its
    "sha256" matches (checksum="required"; "optional": verified when present, for files people also write by hand).
    Anything else is `error` naming the file."""
    path = Path(path)
    try:
        if not path.is_file():
            raise ValueError("no such file")
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes, more than any learnsteps file holds")
        data = parse_json(path.read_bytes())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if "sha256" in data or checksum == "required":
            if data.get("sha256") != _json_digest(data):
                raise ValueError("checksum mismatch: the file changed after learnsteps wrote it" if "sha256" in data
                                 else "no checksum: not a file this version of learnsteps wrote")
    except (OSError, ValueError) as err:
        raise error(f"{path}: {err}") from None
    return {k: v for k, v in data.items() if k != "sha256"}


# ---- safetensors ------------------------------------------------------------------------------------------------
def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    metadata = {**(metadata or {}), "sha256": _tensor_digest(tensors)}
    return write_atomically(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_safetensors(path: str | Path, error: type[Exception] = ValueError) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, after checking its "sha256" metadata against them."""
    path = Path(path)
    try:
        if not path.is_file():
            raise ValueError("no such file")
        with safe_open(str(path), framework="pt") as f:
            expected = (f.metadata() or {}).get("sha256")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own types for a damaged header or a truncated body
        raise error(f"{path} is not a readable safetensors file ({type(err).__name__}: {err})") from None
    if expected is None:
        raise error(f"{path}: no checksum in its metadata: not a file this version of learnsteps wrote")
    if expected != _tensor_digest(tensors):
        raise error(f"{path}: checksum mismatch: the tensors changed after learnsteps wrote them")
    return tensors


def load_weights(module: torch.nn.Module, path: str | Path, error: type[Exception], described_by: str,
                 convert=lambda t: t) -> torch.nn.Module:
    """Load a checksummed safetensors state dict into `module`; weights that do not fit it are `error` too."""
    try:
        module.load_state_dict({k: convert(v) for k, v in read_safetensors(path, error).items()})
    except RuntimeError as err:
        raise error(f"{path}: the weights do not fit {described_by} ({str(err).splitlines()[0]})") from None
    return module


# ---- any other file: a sidecar ----------------------------------------------------------------------------------
def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_checksummed(path: str | Path, write: Callable[[Path], None]) -> Path:
    """write(tmp), renamed over `path`, with its sha256 in `<name>.sha256` beside it.

    The two renames cannot be one, so the checksum file is renamed first and keeps the previous version's sha256
    on its second line: a kill between the renames leaves the previous file, which still verifies."""
    path, side = Path(path), checksum_path(Path(path))
    previous = side.read_text().split("\n")[0] if side.is_file() else ""

    def write_then_record(tmp: Path) -> None:
        write(tmp)
        write_text(side, f"{sha256_file(tmp)}\n{previous}\n")

    return write_atomically(path, write_then_record)


def verify_checksum(path: str | Path, error: type[Exception] = ValueError) -> Path:
    """`path` if it matches the sha256 beside it, else `error` naming the file and the problem."""
    path, side = Path(path), checksum_path(Path(path))
    if not path.is_file():
        raise error(f"{path}: no such file")
    if not side.is_file():
        raise error(f"{path}: its checksum file {side.name} is missing")
    if sha256_file(path) not in [line for line in side.read_text().split("\n") if line]:
        raise error(f"{path}: checksum mismatch (damaged or changed after it was written)")
    return path

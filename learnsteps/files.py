"""Atomic file writes: everything learnsteps writes (schedule JSON, safetensors, manifests, caches) goes to a
temporary file in the same directory and is renamed over the target, so an interrupted write leaves the previous
file intact and a reader never sees half a file."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_atomically(path: Path, write) -> Path:
    """Call write(tmp) on a temporary path next to `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)  # atomic on POSIX and Windows when both are on one file system
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_atomically(Path(path), lambda tmp: tmp.write_text(text))


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    return write_atomically(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

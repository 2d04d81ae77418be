"""`load_teacher`: a teacher by name or path, whatever its kind (exact mixtures, learnsteps' UNet, the shipped
models, diffusers UNet2DModel checkpoints and pipelines)."""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..hf import hub_reachable
from . import gmm
from .model_index import read_model_index
from .network import TeacherLoadError, diffusers_teacher, learnsteps_teacher
from .pipelines import SUPPORTED, pipeline_teacher

UNET2D_PIPELINES = ("DDPMPipeline", "DDIMPipeline", "PNDMPipeline")  # an unconditional UNet2DModel: diffusers_teacher
BUILT_IN = ("gmm_digits", "toy_mixture", "gaussian", "digits_unet", "digits_latent_flow")
ASSETS = Path(__file__).resolve().parents[1] / "assets"
# A Hugging Face hub id: "org/name" (one slash, no leading dot or slash). Anything else that is not a local path
# is a typo, and is said so at once instead of being sent to the hub (which retries for half a minute).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def load_teacher(spec: str | Path, *, check: bool = True, conditions=None, guidance: float = 1.0, **kwargs):
    """A teacher by name or path:

    - "gmm_digits", "toy_mixture", "gaussian": the exact mixtures;
    - "digits_unet": the shipped UNet trained on the digits (learnsteps/assets/digits_unet);
    - "digits_latent_flow": the shipped class-conditional latent flow-matching DiT (a DiTPipeline directory);
    - a directory with teacher.json (learnsteps' own UNet, as `train.py mode=teacher` exports it);
    - a diffusers pipeline (Stable Diffusion, DiT, SD3 layouts; learnsteps.teachers.pipelines), with its
      `conditions` (prompts or class labels) and CFG scale `guidance`: a local directory or a hub id;
    - a diffusers UNet2DModel: a local directory or a Hugging Face hub id (see `diffusers_teacher`)."""
    name = str(spec)
    if name == "digits_latent_flow":
        name = str(ASSETS / name)
    kind = _pipeline_class(name)
    conditional_hub_id = kind is None and (conditions or guidance != 1.0) and HUB_ID.match(name) \
        and not Path(name).exists()  # not in the cache: the pipeline loader says so in one line
    if (kind is not None and kind not in UNET2D_PIPELINES) or conditional_hub_id:  # SUPPORTED, or what is
        return pipeline_teacher(name, conditions, guidance, **kwargs)
    if conditions or guidance != 1.0:
        raise TeacherLoadError(f"conditions= and guidance= apply to conditional diffusers pipelines "
                               f"({', '.join(SUPPORTED)}); teacher {name!r} is unconditional")
    exact = {"gmm_digits": gmm.gmm_digits, "toy_mixture": gmm.toy_mixture, "gaussian": gmm.gaussian}
    if name in exact:
        return exact[name](**kwargs)
    if name == "digits_unet":
        return load_teacher(ASSETS / "digits_unet")
    path = Path(name)
    if path.is_dir():
        if (path / "teacher.json").is_file():
            return learnsteps_teacher(path, check)
        if (path / "model_index.json").is_file() or (path / "config.json").is_file():
            return diffusers_teacher(name, **kwargs)
        raise TeacherLoadError(f"{path} is a directory but not a teacher: it has no teacher.json (a learnsteps "
                               f"teacher, `train.py mode=teacher`) and no model_index.json or config.json (diffusers)")
    if path.exists():
        raise TeacherLoadError(f"{path} is a file; a teacher is a directory (teacher.json or a diffusers model)")
    if HUB_ID.match(name):
        return diffusers_teacher(name, **kwargs)
    raise TeacherLoadError(f"unknown teacher {name!r}: not one of {', '.join(BUILT_IN)}, no such directory, and "
                           f"not a Hugging Face hub id (org/name)")


def _pipeline_class(name: str) -> str | None:
    """The `_class_name` in a pipeline directory's model_index.json (a hub id's, if it is in the local cache); a
    model_index.json that is there but unreadable or malformed is a TeacherLoadError naming it."""
    path = Path(name) / "model_index.json"
    if path.is_file():
        return read_model_index(path)["_class_name"]
    if not HUB_ID.match(name) or Path(name).exists():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "model_index.json")
        if not isinstance(cached, str) and os.environ.get("HF_HUB_OFFLINE") != "1" and hub_reachable():
            from huggingface_hub import hf_hub_download

            cached = hf_hub_download(name, "model_index.json")
    except Exception:  # not a pipeline, or the hub says no: the UNet2DModel path gives the user-facing message
        return None
    return read_model_index(Path(cached))["_class_name"] if isinstance(cached, str) else None



"""`load_teacher`: a teacher by name or path, whatever its kind (exact mixtures, learnsteps' UNet, the shipped
models, diffusers UNet2DModel checkpoints and pipelines)."""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..files import parse_json
from ..hf import hub_reachable
from . import gmm
from .model_index import LARGE_TEACHER, denoiser_parameters, read_model_index
from .network import TeacherLoadError, diffusers_teacher, learnsteps_teacher
from .pipelines import SUPPORTED, pipeline_teacher
from .pipelines.base import DTYPES

UNET2D_PIPELINES = ("DDPMPipeline", "DDIMPipeline", "PNDMPipeline")  # an unconditional UNet2DModel: diffusers_teacher
BUILT_IN = ("gmm_digits", "toy_mixture", "gaussian", "digits_unet", "digits_latent_flow")
ASSETS = Path(__file__).resolve().parents[1] / "assets"
# A Hugging Face hub id: "org/name" (one slash, no leading dot or slash). Anything else that is not a local path
# is a typo, and is said so at once instead of being sent to the hub (which retries for half a minute).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


# what only a diffusers pipeline teacher takes (pipeline_teacher's keywords), with the values that mean "not given"
PIPELINE_OPTIONS = dict(true_cfg=1.0, negative_prompt=None, guidance_rescale=0.0, height=0, width=0, frames=0,
                        max_sequence_length=0)


def load_teacher(spec: str | Path, *, check: bool = True, conditions=None, guidance: float = 1.0,
                 teacher_dtype: str = "float32", **kwargs):
    """A teacher by name or path:

    - "gmm_digits", "toy_mixture", "gaussian": the exact mixtures;
    - "digits_unet": the shipped UNet trained on the digits (learnsteps/assets/digits_unet);
    - "digits_latent_flow": the shipped class-conditional latent flow-matching DiT (a DiTPipeline directory);
    - a directory with teacher.json (learnsteps' own UNet, as `train.py mode=teacher` exports it);
    - a diffusers pipeline of a supported family (learnsteps.teachers.pipelines; docs/pipelines.md), with its
      `conditions` (prompts, a prompt or embeddings file, or class labels), `guidance`, and the pipeline options
      true_cfg, negative_prompt, guidance_rescale, max_sequence_length, height, width, frames: a local directory
      or a hub id;
    - a diffusers UNet2DModel: a local directory or a Hugging Face hub id (see `diffusers_teacher`).
    `teacher_dtype`: the network's dtype for diffusers teachers (float32, bfloat16, float16; auto: bfloat16 for a
    pipeline whose denoiser has LARGE_TEACHER parameters or more, float32 otherwise); the sampler's own arithmetic
    stays in float32 / float64."""
    name = str(spec)
    if name == "digits_latent_flow":
        name = str(ASSETS / name)
    kind = _pipeline_class(name)
    if teacher_dtype == "auto":
        teacher_dtype = auto_dtype(name)
    options = {k: v for k, v in kwargs.items() if k in PIPELINE_OPTIONS}
    given = sorted(k for k, v in options.items() if v != PIPELINE_OPTIONS[k])
    conditional_hub_id = kind is None and (conditions or guidance != 1.0 or given) and HUB_ID.match(name) \
        and not Path(name).exists()  # not in the cache: the pipeline loader says so in one line
    if (kind is not None and kind not in UNET2D_PIPELINES) or conditional_hub_id:  # SUPPORTED, or what is
        return pipeline_teacher(name, conditions, guidance, dtype=teacher_dtype, **kwargs)
    _refuse_a_component(name)
    if conditions or guidance != 1.0 or given:
        what = ", ".join(f"{k}=" for k in ["conditions"] * bool(conditions) + ["guidance"] * (guidance != 1.0) + given)
        raise TeacherLoadError(f"{what} apply to conditional diffusers pipelines ({', '.join(SUPPORTED)}); teacher "
                               f"{name!r} is unconditional")
    kwargs = {k: v for k, v in kwargs.items() if k not in PIPELINE_OPTIONS}
    if teacher_dtype not in DTYPES:
        raise TeacherLoadError(f"teacher_dtype={teacher_dtype!r}: expected one of {', '.join(DTYPES)}")
    diffusers_kwargs = dict(kwargs, dtype=DTYPES[teacher_dtype])
    path = Path(name)
    exact = {"gmm_digits": gmm.gmm_digits, "toy_mixture": gmm.toy_mixture, "gaussian": gmm.gaussian}
    if teacher_dtype != "float32" and (name in exact or name == "digits_unet" or (path / "teacher.json").is_file()):
        raise TeacherLoadError(f"teacher_dtype= applies to diffusers teachers; {name!r} computes in its own dtype")
    if name in exact:
        return exact[name](**kwargs)
    if name == "digits_unet":
        return load_teacher(ASSETS / "digits_unet")
    if path.is_dir():
        if (path / "teacher.json").is_file():
            return learnsteps_teacher(path, check)
        if (path / "model_index.json").is_file() or (path / "config.json").is_file():
            return diffusers_teacher(name, **diffusers_kwargs)
        raise TeacherLoadError(f"{path} is a directory but not a teacher: it has no teacher.json (a learnsteps "
                               f"teacher, `train.py mode=teacher`) and no model_index.json or config.json (diffusers)")
    if path.exists():
        raise TeacherLoadError(f"{path} is a file; a teacher is a directory (teacher.json or a diffusers model)")
    if HUB_ID.match(name):
        return diffusers_teacher(name, **diffusers_kwargs)
    raise TeacherLoadError(f"unknown teacher {name!r}: not one of {', '.join(BUILT_IN)}, no such directory, and "
                           f"not a Hugging Face hub id (org/name)")


def auto_dtype(name: str) -> str:
    """teacher_dtype=auto: bfloat16 for a large pipeline teacher (its denoiser's parameters counted from its
    safetensors headers), float32 for every other teacher."""
    n = denoiser_parameters(Path(name))
    return "bfloat16" if n is not None and n >= LARGE_TEACHER else "float32"


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




def _refuse_a_component(name: str) -> None:
    """A component directory of a pipeline (its unet/ or transformer/, a conditional network) is not a teacher by
    itself: the pipeline directory is, with its scheduler, text encoders and VAE."""
    config, index = Path(name) / "config.json", Path(name).parent / "model_index.json"
    try:
        cls = parse_json(config.read_bytes()).get("_class_name") if config.is_file() else None
    except ValueError:
        return
    if cls in (None, "UNet2DModel"):
        return
    if index.is_file():
        raise TeacherLoadError(f"{name} is the {cls} of a pipeline: load the pipeline directory itself "
                               f"(teacher={Path(name).parent}), which says how to condition and sample it")
    raise TeacherLoadError(f"{name} holds a {cls}, which learnsteps loads through its diffusers pipeline (a directory "
                           f"with model_index.json): pass the pipeline directory")

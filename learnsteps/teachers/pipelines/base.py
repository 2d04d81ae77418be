"""Teachers from diffusers pipelines: latent, text- or class-conditional, epsilon / v / flow-matching models,
images and video.

`pipeline_teacher(path_or_hub_id, conditions, guidance, ...)` loads the pipeline with diffusers itself (so a
user's model goes through exactly the code its own pipeline runs) and keeps what sampling needs:

- the denoiser behind our Denoiser interface, called through its family's adapter (adapter.py: one short
  `PipelineNet` per family, sd.py, flux.py, qwenimage.py, wan.py), its noise schedule and prediction type from
  the scheduler config (DDPM betas with epsilon / v-prediction, or flow matching with the scheduler's shift and
  velocity prediction; the resolution-dependent shift of FLUX-like schedulers computed for the teacher's size);
- the conditions: prompts, encoded once by the pipeline's own `encode_prompt` (the last row is its negative or
  unconditional input) and cached as tables, after which the text encoders are dropped; or read from a file of
  precomputed embeddings (conditions.py), when the text encoders are not even loaded; or class labels (DiT's
  null class 1000). Everywhere else a condition is an index into those tables, so pairs, trajectories and
  batches carry one integer per sample;
- classifier-free guidance with the pipeline's formula, both branches in one batch; guidance-distilled models
  (FLUX.1 [dev], FLUX.2) take `guidance` as an input in one pass; true CFG (FLUX.1, Qwen-Image) by `true_cfg`;
- the resolution: `height`, `width` (and `frames` for video) set the latent shape (default: the pipeline's);
- the VAE, for `decode` (latents to images or video in [-1, 1]) where pixels are needed; sampling stays in
  latent space.
"""
from __future__ import annotations

import importlib.util
import math
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ...core.denoiser import MAX_GUIDANCE, guided
from ...core.schedules import DiscreteDDPM, FlowMatching
from ...hf import hub_reachable, quiet_diffusers
from ..model_index import check_components, check_model_index
from ..network import PREDICTION_TYPES, NetworkTeacher, TeacherLoadError
from . import sd, flux, qwenimage, wan  # noqa: F401, I001  (each registers its families, in this order)
from .adapter import FAMILIES, FamilyError, PipelineNet, call_default
from .conditions import ConditionsFile, load_conditions

# diffusers 0.3x-0.4x warns on every Transformer2DModel call that its output class moved: nothing a user can act on
warnings.filterwarnings("ignore", message=".*Transformer2DModelOutput.*", category=FutureWarning)

SUPPORTED = {name: family.summary for name, family in FAMILIES.items()}
SHIFT_KEYS = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class PipelineTeacher(NetworkTeacher):
    """A diffusers pipeline's denoiser, frozen, in latent space, over a fixed list of conditions at one size.

    `forward(x, t, cond)` takes cond as condition indices (B,) in [0, K); without one, sample i of the batch takes
    condition i mod K. With a CFG scale != 1 both branches run as one batch (NFE counts the guided call once)."""

    conditional = True

    def __init__(self, net: PipelineNet, noise_schedule, prediction: str, config: dict, conditions: list,
                 guidance: float, cfg: float, vae, size: dict, scheduler_config: dict):
        super().__init__(net, noise_schedule, prediction, config)
        self.conditions, self.guidance, self.cfg, self.shape = list(conditions), float(guidance), float(cfg), net.shape
        self.size, self.scheduler_config = dict(size), dict(scheduler_config)
        self.__dict__["vae"] = vae.eval().requires_grad_(False)  # kept out of the state dict: not the denoiser
        self.null = len(self.conditions)
        # a half-precision network: the sampler's states and arithmetic stay in float32 (inputs are cast per call)
        self.state_dtype = torch.float32 if net.dtype in (torch.bfloat16, torch.float16) else None

    def record(self, steps: int | None = None) -> dict:
        """What a schedule file records of the teacher it was learned for, so that the right pipeline, at the right
        size, gets it back: the classes, conditions, guidance, size and (for schedulers that shift with the size)
        the mu the pipeline hands its scheduler for `steps` steps."""
        c = self.config
        out = dict(super().record(), pipeline=c["pipeline"], scheduler=c["scheduler"], conditions=self.conditions,
                   guidance=self.guidance,
                   **{k: c[k] for k in ("true_cfg", "negative_prompt", "guidance_rescale", "max_sequence_length")
                      if k in c}, **self.size)
        mu = self.net.mu(self.scheduler_config, steps or c["default_steps"])
        if mu is None:
            return out
        # the scheduler settings the pipeline computes mu from: a scheduler put in its place (TabulatedScheduler)
        # carries them, so that the pipeline computes the same mu at the same size
        shift = {k: self.scheduler_config[k] for k in SHIFT_KEYS if k in self.scheduler_config}
        return dict(out, mu=mu, shift_config=shift)

    def class_ids(self, cond: Tensor) -> Tensor | None:
        """The class label ids of condition indices, for a class-conditional pipeline (DiT); None for text."""
        labels = getattr(self.net, "labels", None)
        return None if labels is None else labels.cpu()[torch.as_tensor(cond).long()]

    def condition_of(self, index: Tensor) -> Tensor:
        """The condition index of sample `index` of a data set: the conditions in turn."""
        return torch.as_tensor(index).long() % len(self.conditions)

    def forward(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(len(x))
        cond = self.condition_of(torch.arange(len(x))) if cond is None else torch.as_tensor(cond).long()
        cond = cond.to(x.device)
        if self.cfg == 1:
            return self.net(x, t, cond)
        return guided(self.net, x, t, cond, torch.full_like(cond, self.null), self.cfg, combine=self.net.combine)

    def decode(self, z: Tensor) -> Tensor:
        """Latents to images (video: (B, 3, F, H, W)) in [-1, 1] with the pipeline's VAE as the pipeline decodes
        them; differentiable in z (a pixel loss backpropagates through it), frozen weights."""
        vae = self.vae
        p = next(vae.parameters())
        if p.device != z.device:  # the VAE is not a submodule (not in the state dict): it follows the latents
            p = next(vae.to(z.device).parameters())
        if p.dtype == torch.float16 and vae.config.get("force_upcast"):  # SDXL's VAE overflows in float16: the
            p = next(vae.to(torch.float32).parameters())  # pipelines upcast it, so do we
        return self.net.decode(vae, z.to(p.dtype)).clamp(-1, 1).to(z.dtype)


def read_conditions(conditions) -> list | ConditionsFile:
    """A list of labels / prompts, a prompt file (one per line, blank lines skipped), or a file of precomputed
    prompt embeddings (.safetensors, written by `python -m learnsteps.teachers.pipelines encode`)."""
    if isinstance(conditions, (str, Path)):
        path = Path(conditions)
        if not path.is_file():
            raise TeacherLoadError(f"conditions={conditions!r}: no such prompt file")
        if path.suffix == ".safetensors":
            return load_conditions(path)
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as err:
            raise TeacherLoadError(f"prompt file {path} cannot be read as UTF-8 text ({err})") from None
        conditions = [line for line in lines if line]
        if not conditions:
            raise TeacherLoadError(f"prompt file {path} holds no prompt")
    return list(conditions or [])


def _load(model: str, local_files_only: bool | None, dtype: torch.dtype, skip: tuple[str, ...] = ()):
    """The pipeline, loaded by diffusers; `skip`: prefixes of components not to load (passed as None)."""
    import diffusers

    path = Path(model)
    offline = local_files_only if local_files_only is not None else os.environ.get("HF_HUB_OFFLINE") == "1"
    if not offline and not path.exists() and not hub_reachable():
        offline = True
    try:
        index = diffusers.DiffusionPipeline.load_config(model, local_files_only=offline)
    except (OSError, ValueError) as err:
        raise TeacherLoadError(
            f"could not load the diffusers pipeline {model!r}: it is not a local directory and not in the Hugging "
            f"Face cache{' and the hub is not reachable (offline)' if offline else ''}. Download it where there is "
            f"internet (`huggingface-cli download {model}`) and pass the directory. ({type(err).__name__}: "
            f"{str(err).splitlines()[0]})") from None
    where = path / "model_index.json" if path.exists() else model
    cls = check_model_index(index, where)["_class_name"]
    verify_checksums(path)
    if cls not in SUPPORTED:
        raise TeacherLoadError(f"{model!r} is a {cls}; learnsteps loads " + "; ".join(
            f"{k} ({v})" for k, v in SUPPORTED.items()) + ", and DDPMPipeline / UNet2DModel directories "
            "(docs/pipelines.md: how to add a family)")
    # components the layout leaves out (e.g. SD3 without its T5 encoder) are passed as None, as users load them
    absent = {k: None for k, v in index.items() if isinstance(v, list) and (v[0] is None or k.startswith(skip or "\0"))}
    try:
        with quiet_diffusers():
            pipe = getattr(diffusers, cls).from_pretrained(model, local_files_only=offline, torch_dtype=dtype,
                                                           **absent)
    except Exception as err:  # what a malformed component or config makes diffusers or the pipeline raise
        raise TeacherLoadError(f"could not load the {cls} at {model!r} ({type(err).__name__}: "
                               f"{(str(err).splitlines() or [''])[0]})") from None
    check_components(pipe, index, where, skipped=[k for k in absent if skip and k.startswith(skip)])
    pipe.set_progress_bar_config(disable=True)
    return pipe, cls


def verify_checksums(directory: Path) -> None:
    """A pipeline learnsteps wrote (learnsteps.json beside model_index.json) is checked file by file."""
    from ...files import read_json, sha256_file

    manifest = directory / "learnsteps.json"
    if not manifest.is_file():
        return  # a user's or the hub's pipeline: diffusers' own loading is all there is
    files = read_json(manifest, TeacherLoadError).get("files", {})
    for name, sha in files.items():
        f = directory / name
        if not f.is_file() or sha256_file(f) != sha:
            raise TeacherLoadError(f"{f}: {'missing' if not f.is_file() else 'fails its checksum'} (learnsteps.json); "
                                   f"the pipeline is damaged: export it again")


def _schedule(scheduler_class: str, config: dict, mu: float | None):
    """Our noise schedule and prediction type for a pipeline's scheduler (its class name and config); `mu`: the
    pipeline's resolution-dependent shift parameter, for schedulers with use_dynamic_shifting."""
    if scheduler_class.startswith("FlowMatch") or config.get("use_flow_sigmas"):
        shift = config.get("shift", config.get("flow_shift", 1.0))
        if mu is not None and config.get("use_dynamic_shifting"):  # FLUX: sigma' = e^mu / (e^mu + 1/sigma - 1)
            shift = mu if config.get("time_shift_type") == "linear" else math.exp(mu)
        return FlowMatching(shift=float(shift), n=config.get("num_train_timesteps", 1000)), "flow"
    if config.get("trained_betas") is not None:
        raise TeacherLoadError("schedulers with trained_betas are not supported yet")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise TeacherLoadError(f"prediction_type {prediction!r} is not supported: expected one of {list(PREDICTION_TYPES)}")
    schedule = DiscreteDDPM(config.get("beta_schedule", "linear"), config.get("num_train_timesteps", 1000),
                            config.get("beta_start", 0.0001), config.get("beta_end", 0.02))
    return schedule, PREDICTION_TYPES[prediction]


def _class_labels(pipe, conditions: list) -> Tensor:
    names = {name.lower(): int(i) for name, i in (getattr(pipe, "labels", None) or {}).items()}  # name -> id
    # the pipeline's own label table (id2label) where it has one, else every class its network embeds
    classes = sorted(set(names.values())) or range(pipe.transformer.config.get("num_embeds_ada_norm") or 1000)
    out = []
    for c in conditions:
        if isinstance(c, int) and not isinstance(c, bool):
            label = c
        elif isinstance(c, str) and c.strip().isdigit():
            label = int(c)
        elif isinstance(c, str) and c.lower() in names:
            label = names[c.lower()]
        else:
            raise TeacherLoadError(f"class condition {c!r} is neither a label index nor a label name of this "
                                   f"pipeline ({', '.join(sorted(names)) or 'it has no id2label'})")
        if label not in classes:
            raise TeacherLoadError(f"class label {label} is not one of this pipeline's {len(classes)} classes "
                                   f"({min(classes)}..{max(classes)}{' in its id2label' if names else ''})")
        out.append(label)
    return torch.tensor(out + [1000])  # DiTPipeline's null class


def guidance_plan(family: type[PipelineNet], net_config, guidance: float, true_cfg: float) -> tuple[float | None, float]:
    """(the guidance input of a guidance-distilled network or None, the CFG scale of the two-branch combination):
    `guidance` is the pipeline's guidance_scale, the CFG scale except where the network embeds it (FLUX.1 [dev],
    FLUX.2); `true_cfg` is FluxPipeline's / QwenImagePipeline's true_cfg_scale. A value the pipeline would ignore
    is refused."""
    name = family.pipelines[0]
    if not family.guidance_input:
        if true_cfg != 1:
            raise TeacherLoadError(f"true_cfg= is for pipelines with a separate true CFG (FluxPipeline, "
                                   f"QwenImagePipeline); a {name}'s CFG scale is guidance=")
        return None, guidance
    if not net_config.get("guidance_embeds", False):
        if guidance != 1:
            cfg_is = "true_cfg= with a negative prompt" if family.true_cfg else "none (it is distilled without it)"
            raise TeacherLoadError(f"this {name}'s network has no guidance embedding (guidance_embeds is false, e.g. "
                                   f"FLUX.1 [schnell]): guidance={guidance} would do nothing; its CFG is {cfg_is}")
        guidance_input = None
    else:
        guidance_input = guidance
    if true_cfg != 1 and not family.true_cfg:
        raise TeacherLoadError(f"{name} has no negative branch: true_cfg= does not apply (guidance= is its input)")
    return guidance_input, true_cfg


def pipeline_size(family: type[PipelineNet], pipe, height: int = 0, width: int = 0, frames: int = 0) -> dict:
    """The pixel size (height, width[, frames]) the teacher samples at: the given values, the pipeline's default
    for the others (0); a key the family has no such size for (DiT: its transformer's one size) is refused."""
    given = dict(height=height, width=width, frames=frames)
    extra = [k for k, v in given.items() if v and k not in family.size_keys]
    if extra:
        raise TeacherLoadError(f"{', '.join(f'{k}=' for k in extra)} does not apply to a {family.pipelines[0]} "
                               f"(it takes {', '.join(family.size_keys) or 'no size'})")
    default = family.default_size(pipe)
    return {k: int(given[k] or default[k]) for k in family.size_keys}


def pipeline_teacher(model: str, conditions=None, guidance: float = 1.0, *, true_cfg: float = 1.0,
                     negative_prompt: str | None = None, guidance_rescale: float = 0.0, height: int = 0, width: int = 0,
                     frames: int = 0, max_sequence_length: int = 0, dtype: torch.dtype | str = torch.float32,
                     local_files_only: bool | None = None) -> PipelineTeacher:
    """A diffusers pipeline (directory or hub id) as a frozen teacher over `conditions` (prompts, a prompt file, a
    file of precomputed embeddings, or class labels) with the pipeline's `guidance` (guidance_scale), `true_cfg`
    (true_cfg_scale), `negative_prompt` and `max_sequence_length` (0: its default), at `height` x `width` (x
    `frames`; 0: the pipeline's default), its network in `dtype` (float32, bfloat16, float16)."""
    if importlib.util.find_spec("diffusers") is None or importlib.util.find_spec("transformers") is None:
        raise TeacherLoadError("loading a diffusers pipeline needs diffusers and transformers: "
                               "pip install 'learnsteps[diffusers]'")
    for name, value in (("guidance", guidance), ("true_cfg", true_cfg)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= MAX_GUIDANCE):
            raise TeacherLoadError(f"{name}={value!r} must be a number in [0, {MAX_GUIDANCE:g}]")
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in DTYPES.values():
        raise TeacherLoadError(f"teacher_dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    conditions = read_conditions(conditions)
    embedded = conditions if isinstance(conditions, ConditionsFile) else None
    pipe, cls = _load(model, local_files_only, dtype, skip=("text_encoder", "tokenizer") if embedded else ())
    family = FAMILIES[cls]
    try:
        net_config = getattr(pipe, family.denoiser).config
        guidance_input, cfg = guidance_plan(family, net_config, float(guidance), float(true_cfg))
        if guidance_rescale and (family.true_cfg or family.guidance_input or cfg == 1):
            raise TeacherLoadError("guidance_rescale= applies to CFG with guidance= > 1 (Stable Diffusion, SDXL)")
        size = pipeline_size(family, pipe, height, width, frames)
        shape = family.latent_shape(pipe, size)
        # the negative row: the user's negative prompt, or the pipeline's own default (None); true CFG needs one
        negative = negative_prompt if negative_prompt is not None or not (family.true_cfg and cfg != 1) else ""
        length = text_length(pipe, cls, max_sequence_length)
        if family.class_conditional:
            if embedded or negative_prompt is not None:
                raise TeacherLoadError(f"a {cls} is class-conditional: conditions= are class labels, and it takes no "
                                       f"negative prompt")
            if not conditions:
                if not pipe.labels:
                    raise TeacherLoadError(f"{model!r} is class-conditional: give conditions=[label, ...]")
                conditions = sorted(set(pipe.labels.values()))
            tables = dict(labels=_class_labels(pipe, conditions))
        elif embedded:
            tables = embedded.tables_for(cls, negative_prompt, max_sequence_length, needs_negative=cfg != 1)
            conditions, negative, length = embedded.conditions, embedded.negative_prompt, embedded.max_sequence_length
        else:
            if not conditions:
                raise TeacherLoadError(f"{model!r} is text-conditional: give conditions= a prompt file (one per line), "
                                       f"a list of prompts, or a file of their embeddings")
            tables = encode_tables(pipe, family, conditions, negative, length)
        for name in [k for k in pipe.components if k.startswith(("text_encoder", "tokenizer"))]:
            setattr(pipe, name, None)  # encoded: the text encoders are dropped here, never moved to an accelerator
        net = family.build(pipe, tables, shape, size, guidance=guidance_input, guidance_rescale=guidance_rescale)
    except FamilyError as err:
        raise TeacherLoadError(f"{model!r}: {err}") from None
    scheduler_config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    default_steps = call_default(pipe, "num_inference_steps", 50)
    schedule, prediction = _schedule(type(pipe.scheduler).__name__, scheduler_config,
                                     net.mu(scheduler_config, default_steps))
    net.timestep_scale = schedule.n if schedule.kind == "flow" and not family.sigma_timestep else 1.0
    extra = dict(true_cfg=float(true_cfg)) if family.true_cfg else {}
    extra.update(negative_prompt=negative) if negative is not None else None
    extra.update(guidance_rescale=float(guidance_rescale)) if guidance_rescale else None
    extra.update(max_sequence_length=length) if length is not None else None
    config = dict(kind="pipeline", pipeline=cls, model=str(model), denoiser=type(net.net).__name__,
                  conditions=list(conditions), guidance=float(guidance), scheduler=type(pipe.scheduler).__name__,
                  dtype=str(dtype).replace("torch.", ""), default_steps=default_steps, **size, **extra)
    return PipelineTeacher(net, schedule, prediction, config, conditions, guidance, cfg, pipe.vae, size,
                           scheduler_config)


def text_length(pipe, cls: str, max_sequence_length: int = 0) -> int | None:
    """The max_sequence_length prompts are encoded with: the given one, or the pipeline's own __call__ default
    (None for pipelines without one, e.g. CLIP's fixed 77 tokens of Stable Diffusion)."""
    default = call_default(pipe, "max_sequence_length")
    if max_sequence_length and default is None:
        raise TeacherLoadError(f"max_sequence_length= does not apply to a {cls} (its text encoders' length is fixed)")
    return int(max_sequence_length or default) if default is not None else None


@torch.no_grad()
def encode_tables(pipe, family: type[PipelineNet], prompts: list, negative: str | None,
                  length: int | None) -> dict[str, Tensor]:
    """The pipeline's own encode_prompt of the prompts and the negative prompt (its last row), on the CPU."""
    if not all(isinstance(p, str) for p in prompts):
        raise TeacherLoadError(f"a text-conditional pipeline takes prompts, got {prompts!r}")
    with quiet_diffusers():
        return family.encode(pipe, list(prompts), negative, length)


def pipeline_latents(pipe, x: Tensor) -> Tensor:
    """Our state x (a teacher's latents, e.g. `initial_sample(...)`) as the `latents=` argument of the same
    pipeline: FLUX.1 and Qwen-Image take 2x2-packed tokens (their own _pack_latents), the others x as it is."""
    return _family_of(pipe).to_pipeline(x)


def latents_state(pipe, latents: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A pipeline's `output_type="latent"` result as our state of `shape` (the teacher's): FLUX.1, FLUX.2 and
    Qwen-Image return tokens, the others the latents themselves."""
    return _family_of(pipe).from_pipeline(latents, tuple(shape))


def _family_of(pipe) -> type[PipelineNet]:
    cls = type(pipe).__name__
    if cls not in FAMILIES:
        raise TeacherLoadError(f"a {cls} is not a pipeline family learnsteps knows ({', '.join(FAMILIES)})")
    return FAMILIES[cls]

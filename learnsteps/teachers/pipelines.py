"""Teachers from diffusers pipelines: latent, text- or class-conditional, epsilon / v / flow-matching models.

`pipeline_teacher(path_or_hub_id, conditions, guidance)` loads the pipeline with diffusers itself (so a user's
model goes through exactly the code its own pipeline runs) and keeps what sampling needs:

- the denoiser (UNet2DConditionModel, Transformer2DModel, SD3Transformer2DModel) behind our Denoiser interface,
  its noise schedule and prediction type from the scheduler config (DDPM betas with epsilon / v-prediction, or
  flow matching with the scheduler's shift and velocity prediction);
- the conditions: prompts, encoded once by the pipeline's own `encode_prompt` (its negative, empty prompt is the
  unconditional input) and cached as a table, or class labels (DiT's null class 1000). Everywhere else a
  condition is an index into that table, so pairs, trajectories and batches carry one integer per sample;
- classifier-free guidance with the pipeline's formula, both branches in one batch;
- the VAE, for `decode` (latents to images in [-1, 1]) where pixels are needed; sampling stays in latent space.

Supported layouts: StableDiffusionPipeline, DiTPipeline, StableDiffusion3Pipeline (text_encoder_3 optional).
"""
from __future__ import annotations

import importlib.util
import math
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.denoiser import MAX_GUIDANCE, guided
from ..core.schedules import DiscreteDDPM, FlowMatching, dynamic_shift_mu
from ..hf import hub_reachable, quiet_diffusers
from .model_index import check_components, check_model_index
from .network import PREDICTION_TYPES, NetworkTeacher, TeacherLoadError

# diffusers 0.3x-0.4x warns on every Transformer2DModel call that its output class moved: nothing a user can act on
warnings.filterwarnings("ignore", message=".*Transformer2DModelOutput.*", category=FutureWarning)

SUPPORTED = {"StableDiffusionPipeline": "UNet2DConditionModel, text prompts, epsilon or v-prediction",
             "DiTPipeline": "Transformer2DModel, class labels",
             "StableDiffusion3Pipeline": "SD3Transformer2DModel, text prompts, flow matching"}


class _Conditional(nn.Module):
    """A pipeline's denoiser called as net(x, t, c) with c an index into its condition table (the last row is the
    unconditional input); input cast to the network's dtype, output back to x's. The network's timestep is our
    time times `timestep_scale`: 1 for DDPM indices, num_train_timesteps for a flow model's t."""

    def __init__(self, net: nn.Module, tables: dict[str, Tensor], timestep_scale: float = 1.0):
        super().__init__()
        self.net, self.timestep_scale = net, timestep_scale
        for name, table in tables.items():
            self.register_buffer(name, table)

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        dtype = next(self.net.parameters()).dtype
        out = self.call(x.to(dtype), (t * self.timestep_scale).to(dtype).expand(len(x)), c)
        return out[:, : x.shape[1]].to(x.dtype)  # DiT's learned variance, if any, is not the ODE's business


class _UNetText(_Conditional):
    def call(self, x, t, c):
        return self.net(x, t, encoder_hidden_states=self.embeds[c]).sample


class _DiT(_Conditional):
    def call(self, x, t, c):
        return self.net(x, timestep=t, class_labels=self.labels[c]).sample


class _SD3(_Conditional):
    def call(self, x, t, c):
        return self.net(hidden_states=x, timestep=t, encoder_hidden_states=self.embeds[c],
                        pooled_projections=self.pooled[c]).sample


class PipelineTeacher(NetworkTeacher):
    """A diffusers pipeline's denoiser, frozen, in latent space, over a fixed list of conditions.

    `forward(x, t, cond)` takes cond as condition indices (B,) in [0, K); without one, sample i of the batch takes
    condition i mod K. With guidance != 1 both branches run as one batch (NFE counts the guided call once)."""

    conditional = True

    def __init__(self, net: _Conditional, noise_schedule, prediction: str, config: dict, conditions: list,
                 guidance: float, vae, shape: tuple[int, ...]):
        super().__init__(net, noise_schedule, prediction, config)
        self.conditions, self.guidance, self.shape = list(conditions), float(guidance), tuple(shape)
        self.__dict__["vae"] = vae.eval().requires_grad_(False)  # kept out of the state dict: not the denoiser
        self.null = len(self.conditions)

    def record(self) -> dict:
        """What a schedule file records of the teacher it was learned for, so the right pipeline gets it back."""
        c = self.config
        return dict(super().record(), pipeline=c["pipeline"], scheduler=c["scheduler"], conditions=self.conditions,
                    guidance=self.guidance)

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
        if self.guidance == 1:
            return self.net(x, t, cond)
        return guided(self.net, x, t, cond, torch.full_like(cond, self.null), self.guidance)

    def decode(self, z: Tensor) -> Tensor:
        """Latents to images in [-1, 1] with the pipeline's VAE (z / scaling_factor + shift_factor); differentiable
        in z (a pixel loss backpropagates through it), frozen weights."""
        vae = self.vae
        c = vae.config
        p = next(vae.parameters())
        if p.device != z.device:  # the VAE is not a submodule (not in the state dict): it follows the latents
            p = next(vae.to(z.device).parameters())
        x = vae.decode((z.to(p.dtype) / c.scaling_factor) + (c.get("shift_factor") or 0.0)).sample
        return x.clamp(-1, 1).to(z.dtype)


def read_conditions(conditions) -> list:
    """A list of labels / prompts, or a prompt file (one per line, blank lines skipped)."""
    if isinstance(conditions, (str, Path)):
        path = Path(conditions)
        if not path.is_file():
            raise TeacherLoadError(f"conditions={conditions!r}: no such prompt file")
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as err:
            raise TeacherLoadError(f"prompt file {path} cannot be read as UTF-8 text ({err})") from None
        conditions = [line for line in lines if line]
        if not conditions:
            raise TeacherLoadError(f"prompt file {path} holds no prompt")
    return list(conditions or [])


def _load(model: str, local_files_only: bool | None, dtype: torch.dtype):
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
            f"{k} ({v})" for k, v in SUPPORTED.items()) + ", and DDPMPipeline / UNet2DModel directories")
    # components the layout leaves out (e.g. SD3 without its T5 encoder) are passed as None, as users load them
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
    try:
        with quiet_diffusers():
            pipe = getattr(diffusers, cls).from_pretrained(model, local_files_only=offline, torch_dtype=dtype,
                                                           **absent)
    except Exception as err:  # what a malformed component or config makes diffusers or the pipeline raise
        raise TeacherLoadError(f"could not load the {cls} at {model!r} ({type(err).__name__}: "
                               f"{(str(err).splitlines() or [''])[0]})") from None
    check_components(pipe, index, where)
    pipe.set_progress_bar_config(disable=True)
    return pipe, cls


def verify_checksums(directory: Path) -> None:
    """A pipeline learnsteps wrote (learnsteps.json beside model_index.json) is checked file by file."""
    from ..files import read_json, sha256_file

    manifest = directory / "learnsteps.json"
    if not manifest.is_file():
        return  # a user's or the hub's pipeline: diffusers' own loading is all there is
    files = read_json(manifest, TeacherLoadError).get("files", {})
    for name, sha in files.items():
        f = directory / name
        if not f.is_file() or sha256_file(f) != sha:
            raise TeacherLoadError(f"{f}: {'missing' if not f.is_file() else 'fails its checksum'} (learnsteps.json); "
                                   f"the pipeline is damaged: export it again")


def _schedule(scheduler_class: str, config: dict, latent_tokens: int):
    """Our noise schedule and prediction type for a pipeline's scheduler (its class name and config)."""
    if scheduler_class.startswith("FlowMatch") or config.get("use_flow_sigmas"):
        shift = config.get("shift", config.get("flow_shift", 1.0))
        if config.get("use_dynamic_shifting"):  # FLUX: shift = e^mu for this latent size
            shift = math.exp(dynamic_shift_mu(latent_tokens, config.get("base_image_seq_len", 256),
                                              config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                              config.get("max_shift", 1.15)))
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


@torch.no_grad()
def _text_tables(pipe, cls: str, prompts: list) -> dict[str, Tensor]:
    """The pipeline's own encode_prompt, once per prompt; the last row is its negative (empty) prompt."""
    if not all(isinstance(p, str) for p in prompts):
        raise TeacherLoadError(f"a text-conditional pipeline takes prompts, got {prompts!r}")
    if cls == "StableDiffusion3Pipeline":
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, None, None, device="cpu",
                                                          do_classifier_free_guidance=True, negative_prompt="")
        return dict(embeds=torch.cat([emb, neg[:1]]), pooled=torch.cat([pooled, neg_pooled[:1]]))
    emb, neg = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=[""] * len(prompts))
    return dict(embeds=torch.cat([emb, neg[:1]]))


def pipeline_teacher(model: str, conditions=None, guidance: float = 1.0, local_files_only: bool | None = None,
                     dtype: torch.dtype = torch.float32) -> PipelineTeacher:
    """A diffusers pipeline (directory or hub id) as a frozen teacher over `conditions` with CFG scale `guidance`."""
    if importlib.util.find_spec("diffusers") is None or importlib.util.find_spec("transformers") is None:
        raise TeacherLoadError("loading a diffusers pipeline needs diffusers and transformers: "
                               "pip install 'learnsteps[diffusers]'")
    if not (isinstance(guidance, (int, float)) and math.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
        raise TeacherLoadError(f"guidance={guidance!r} must be a number in [0, {MAX_GUIDANCE:g}]")
    conditions = read_conditions(conditions)
    pipe, cls = _load(model, local_files_only, dtype)
    if cls == "DiTPipeline":
        if not conditions:
            if not pipe.labels:
                raise TeacherLoadError(f"{model!r} is class-conditional: give conditions=[label, ...]")
            conditions = sorted(set(pipe.labels.values()))
        net, tables = pipe.transformer, dict(labels=_class_labels(pipe, conditions))
    else:
        if not conditions:
            raise TeacherLoadError(f"{model!r} is text-conditional: give conditions= a prompt file (one per line) "
                                   f"or a list of prompts")
        net, tables = (pipe.unet if cls == "StableDiffusionPipeline" else pipe.transformer), _text_tables(pipe, cls, conditions)
    size = net.config.sample_size
    shape = (net.config.in_channels, *((size, size) if isinstance(size, int) else size))
    patch = net.config.get("patch_size") or 1
    schedule, prediction = _schedule(type(pipe.scheduler).__name__, dict(pipe.scheduler.config),
                                     (shape[1] // patch) * (shape[2] // patch))
    wrapper = {"StableDiffusionPipeline": _UNetText, "DiTPipeline": _DiT, "StableDiffusion3Pipeline": _SD3}[cls]
    wrapped = wrapper(net, tables, schedule.n if schedule.kind == "flow" else 1.0)
    config = dict(kind="pipeline", pipeline=cls, model=str(model), denoiser=type(net).__name__,
                  conditions=list(conditions), guidance=float(guidance), scheduler=type(pipe.scheduler).__name__)
    return PipelineTeacher(wrapped, schedule, prediction, config, conditions, guidance, pipe.vae, shape)

"""The DSNO student: the teacher's own network, weights copied, its M output times folded into the batch, with
Fourier temporal convolutions after its blocks (learnsteps/dsno/backbones.py), started as M exact copies of the
teacher network.

Parametrisation (one for every backbone). Given x_T at the input time T (the trajectories' first time, t_max), copy m
of the network is called exactly as the teacher calls it, unguided, at its own time input s_m (t_m; t_min for the
clean end):

    F_m = net(x_T, s_m, c)                                   (the teacher's network call: NetworkDenoiser.forward)
    D_m = convert(F_m, prediction, "x0", x_T, alpha(r), sigma(r))            (core/denoiser.py's conversion)

i.e. F_m is read as the backbone's prediction type (epsilon, v, flow velocity, x0, EDM's D; a fresh UNet's is x0)
at the input x_T and the reading time r. r is the input time T unless the conversion amplifies there: the largest
time <= T at which its coefficients on x_T and F are at most READ_GAIN in size (for flow, v, x0 and EDM models
r = T, e.g. D = x_T - T F for a flow; for an epsilon model with alpha(T) -> 0 it is where alpha = 1 / READ_GAIN).
D_m is the prediction of the teacher's x0-prediction at t_m (targets=x0, DSNO's), or the state at t_m is the
DDIM / flow-path point from x_T through it (targets=states):

    x_m = alpha(t_m) D_m + sigma(t_m) (x_T - alpha(T) D_m) / sigma(T)

Sampling keeps the last time (t_zero, where x_m = D_m): one network pass over the M folded copies, no guidance
branch (a student of a guided teacher learns the guided trajectory).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from ..core.denoiser import NetworkDenoiser, convert, dtype_of, per_sample
from ..core.schedules import make_schedule
from ..files import load_weights, read_json, write_json, write_safetensors
from ..teachers.network import made_for
from ..teachers.unet import UNet, UNetConfig
from .backbones import PLACEMENTS, add_temporal, place, probe_channels, sites

FORMAT, VERSION = "learnsteps-dsno", 2
READ_GAIN = 2.0  # the largest coefficient the reading of F_m as x0 may put on x_T or F_m


class StudentError(ValueError):
    """A DSNO student directory that cannot be loaded, or one made for another teacher; the message names the file
    and the problem."""


@dataclass
class StudentConfig:
    output_times: list[float] = field(default_factory=list)  # the M times, decreasing, in the teacher's time
    time_input: list[float] = field(default_factory=list)  # the time each copy's network call gets
    input_time: float = 1.0  # T, the time of x_T
    read_time: float = 1.0  # r, where F_m is read as the backbone's prediction (see the module docstring)
    prediction: str = "x0"  # what the backbone predicts (the teacher's type; x0 for a fresh UNet)
    noise_schedule: dict = field(default_factory=dict)  # the teacher's (schedule.config())
    targets: str = "x0"  # x0 (the teacher's x0-predictions at the M times) or states
    backbone: str = "teacher"  # teacher (its network, weights copied) | unet (a fresh learnsteps UNet)
    unet: dict = field(default_factory=dict)  # a fresh UNet's config
    shape: list[int] = field(default_factory=list)  # one sample's shape (C, H, W) (latents for a latent teacher)
    num_conditions: int = 0  # a conditional teacher's condition table size (condition indices 0..K-1)
    modes: int = 2
    temporal: bool = True  # False: M independent copies (with M = 1, plain one-step distillation)
    placement: str = "every"
    kind: str = ""  # the backbone kind found (backbones.ADAPTERS)
    sites: dict[str, int] = field(default_factory=dict)  # module name -> channels of each temporal layer


def read_time(schedule, prediction: str, input_time: float) -> float:
    """The reading time r: the input time unless the x0 conversion's coefficients there exceed READ_GAIN, then the
    largest earlier time where they do not (bisection; the gain of each type is monotone in t)."""
    def gain(t: float) -> float:
        t = torch.tensor(t, dtype=torch.float64)
        a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
        one = torch.ones((), dtype=torch.float64)
        skip = float(convert(0 * one, prediction, "x0", one, a * one, s * one))  # coefficient on x
        out = float(convert(one, prediction, "x0", 0 * one, a * one, s * one))  # coefficient on F
        return max(abs(skip), abs(out)) if math.isfinite(skip) and math.isfinite(out) else math.inf

    if gain(input_time) <= READ_GAIN:
        return float(input_time)
    lo, hi = float(schedule.t_zero), float(input_time)  # gain(t_zero) = 1 for every prediction type
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if gain(mid) <= READ_GAIN else (lo, mid)
    return lo


class DSNOStudent(nn.Module):
    """`forward(x_T, cond)`: (B, ...) noise -> (B, M, ...) predictions of the targets at the M output times;
    `sample(x_T, cond)`: the last one (the data), one network pass."""

    def __init__(self, cfg: StudentConfig, net: nn.Module):
        super().__init__()
        m = len(cfg.output_times)
        if m < 1 or len(cfg.time_input) != m:
            raise ValueError("a DSNO student needs its output times and their time inputs")
        if cfg.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {cfg.placement!r}: expected one of {PLACEMENTS}")
        self.cfg = cfg
        schedule = make_schedule(**cfg.noise_schedule)
        dtype = torch.promote_types(dtype_of(net), torch.float32)  # trained in float32 (float64 stays float64)
        self.denoiser = NetworkDenoiser(net.to(dtype).requires_grad_(True), schedule, cfg.prediction)
        if cfg.temporal and m > 1:
            add_temporal(net, cfg.sites, m, cfg.modes)
        f64 = dict(dtype=torch.float64)
        at = lambda t: (schedule.alpha(torch.tensor(t, **f64)), schedule.sigma(torch.tensor(t, **f64)))  # noqa: E731
        times = torch.tensor(cfg.output_times, **f64)
        self.register_buffer("time_input", torch.tensor(cfg.time_input, dtype=dtype))
        self.register_buffer("alpha_m", schedule.alpha(times).to(dtype))
        self.register_buffer("sigma_m", schedule.sigma(times).to(dtype))
        self.register_buffer("read_at", torch.stack(at(cfg.read_time)).to(dtype))
        self.register_buffer("input_at", torch.stack(at(cfg.input_time)).to(dtype))

    def train(self, mode: bool = True):
        """The backbone always runs as at inference (no dropout, no class-label dropout as DiT's label embedding
        does in training mode): the student is a deterministic map, trained or not."""
        super().train(mode)
        self.denoiser.eval()
        return self

    @property
    def num_times(self) -> int:
        return len(self.cfg.output_times)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.cfg.shape)

    def network(self, x_T: Tensor, cond: Tensor | None = None) -> Tensor:
        """(B, ...) -> (B, M, ...): the backbone's raw outputs F_m, one call on the B x M folded copies."""
        b, m = x_T.shape[0], self.num_times
        x = repeat(x_T.to(self.time_input.dtype), "b ... -> (b m) ...", m=m)
        t = repeat(self.time_input, "m -> (b m)", b=b)
        if self.cfg.num_conditions:
            cond = torch.arange(b, device=x.device) % self.cfg.num_conditions if cond is None else cond
            cond = repeat(torch.as_tensor(cond, device=x.device).long(), "b -> (b m)", m=m)
        return rearrange(self.denoiser(x, t, cond), "(b m) ... -> b m ...", m=m)

    def forward(self, x_T: Tensor, cond: Tensor | None = None) -> Tensor:
        out = self.network(x_T, cond)
        x = x_T.to(out.dtype)[:, None]
        x0 = convert(out, self.cfg.prediction, "x0", x, *self.read_at)
        if self.cfg.targets == "x0":
            return x0
        (a_T, s_T), a, s = self.input_at, per_sample(self.alpha_m, x0[0]), per_sample(self.sigma_m, x0[0])
        return a * x0 + s * (x - a_T * x0) / s_T

    @torch.no_grad()
    def sample(self, x_T: Tensor, cond: Tensor | None = None) -> Tensor:
        """One pass: the prediction at the last output time (the data), in x_T's dtype. For a pipeline teacher, x_T
        is the pipeline's initial latents and the result the latents its VAE decodes."""
        return self(x_T, cond)[:, -1].to(x_T.dtype)


def build_student(cfg: StudentConfig, net: nn.Module, probe_cond: bool = False) -> DSNOStudent:
    """A student on `net` (the student's own module: a copy of the teacher's network, or a fresh UNet); with no
    sites given, they are found (backbones.sites), placed (cfg.placement) and their channels probed by one call."""
    if cfg.temporal and len(cfg.output_times) > 1 and not cfg.sites:
        cfg.kind, levels = sites(net)
        names = place(levels, cfg.placement)
        probe = NetworkDenoiser(net, make_schedule(**cfg.noise_schedule), cfg.prediction)
        x = torch.zeros(1, *cfg.shape, dtype=torch.promote_types(dtype_of(net), torch.float32))
        cond = torch.zeros(1, dtype=torch.long) if probe_cond else None
        cfg.sites = probe_channels(net, names, lambda: probe(x, torch.tensor(cfg.time_input[:1]), cond))
    return DSNOStudent(cfg, net)


def fresh_unet(cfg: StudentConfig) -> nn.Module:
    return UNet(UNetConfig(**cfg.unet))


def save_student(directory: str | Path, student: DSNOStudent, meta: dict) -> Path:
    d = Path(directory)
    weights = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    write_safetensors(d / "model.safetensors", weights)
    write_json(d / "student.json", dict(format=FORMAT, version=VERSION, student=asdict(student.cfg), **meta))
    return d


def read_student_info(directory: str | Path) -> dict:
    """student.json of a student directory (checksum verified); StudentError if absent, damaged or another format."""
    d = Path(directory)
    if not (d / "student.json").is_file():
        raise StudentError(f"{d} holds no DSNO student (student.json)")
    info = read_json(d / "student.json", StudentError)
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise StudentError(f"{d / 'student.json'}: not a {FORMAT} v{VERSION} checkpoint (format "
                           f"{info.get('format')!r} v{info.get('version')!r}); train it again with this version")
    return info


def load_student(directory: str | Path, teacher=None) -> DSNOStudent:
    """A one-step checkpoint written by `train.py mode=dsno`, ready to sample (eval mode).

    A student on the teacher's own network is rebuilt on that network's code: from `teacher` if given (a loaded
    teacher, e.g. the one a pipeline user already has), else by loading the teacher the checkpoint records (its
    name or path and the options it recorded: conditions, guidance, size, ...). Either way the teacher's
    fingerprint must be the recorded one.
    StudentError if the directory holds no student, a damaged or malformed one, or one made for another teacher."""
    d = Path(directory)
    info = read_student_info(d)
    try:
        cfg = StudentConfig(**info["student"])
        record = info["teacher"]
    except (KeyError, TypeError) as err:
        raise StudentError(f"{d / 'student.json'}: malformed ({type(err).__name__}: {err})") from None
    if teacher is not None or cfg.backbone == "teacher":
        if teacher is None:
            from ..teachers import load_teacher

            try:
                from ..config import TeacherOptions

                options = {k: record[k] for k in TeacherOptions().teacher_options() if record.get(k) is not None}
                options["conditions"] = record.get("conditions") or None
                teacher = load_teacher(record.get("name", ""), **options)  # as recorded: conditions, size, ...
            except ValueError as err:
                raise StudentError(f"{d}: its teacher {record.get('name')!r} cannot be loaded ({err})") from None
        check_teacher(info, teacher, d)
    try:
        net = copy.deepcopy(teacher.net) if cfg.backbone == "teacher" else fresh_unet(cfg)
        student = DSNOStudent(cfg, net)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise StudentError(f"{d / 'student.json'}: {type(err).__name__}: {err}") from None
    load_weights(student, d / "model.safetensors", StudentError, "student.json")
    student.info = info
    return student.eval().requires_grad_(False)


def check_teacher(info: dict, teacher, where: Path | str) -> None:
    """StudentError (one line) unless `teacher` is the one the student was made for (its fingerprint)."""
    want = info.get("teacher", {}).get("fingerprint")
    have = teacher.fingerprint() if hasattr(teacher, "fingerprint") else None
    if want and not made_for(teacher, want):
        raise StudentError(f"{where} is a student of teacher {info['teacher'].get('name')!r} (fingerprint "
                           f"{want[:12]}), not of this one ({(have or 'none')[:12]})")

"""Teacher trajectory datasets: what LD3 and DSNO learn from.

From seeded noise, a high-accuracy solver of the core integrates the frozen teacher and the states at chosen
output times are stored (with the x0-predictions there, when asked), in shards:

    out_dir/spec.json                   what is being generated (teacher fingerprint, solver, times, seed, ...)
    out_dir/shard-00000.safetensors     x_T (S, ...), trajectory (S, M, ...), [x0 (S, M, ...)], index (S,),
                                        [cond (S,): a conditional teacher's condition index of each sample], with
                                        the sha256 of its tensors in its metadata (written atomically: a shard
                                        that is there and verifies is finished)
    out_dir/manifest.json               written once every shard is done: shapes, dtypes, counts, each file's sha256

Every JSON file carries its own sha256 (learnsteps.files). Sample j always starts from the noise of seed (seed,
j), whatever the shard size or the number of ranks. A rerun generates only the missing shards (and regenerates,
with a warning, any whose checksum fails); a reader refuses a missing or damaged shard. Under DDP rank r takes
shards r, r + world, ... so that ranks share no shard and leave none out.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import lightning as L
import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .config import at_least, between, each, one_of, positive
from .core.grids import make as make_grid
from .core.denoiser import device_of, dtype_of
from .core.reference import reference_solve
from .core.sample import check_options, check_order, get_solver, solve, starts_at_noise
from .files import read_json, read_safetensors, sha256_file, write_json, write_safetensors
from .loaders import train_loader
from .teachers.network import made_for

FORMAT, VERSION = "learnsteps-trajectories", 1
TIME_KINDS = ("time_uniform", "time_quadratic", "logsnr", "edm")


class TrajectoryError(ValueError):
    """A trajectory directory that cannot be used: missing, damaged, or made for something else."""


@dataclass
class TrajectorySpec:
    n: int = 1024  # trajectories
    shard_size: int = 256
    seed: int = 0
    output_times: list[float] = field(default_factory=list)  # explicit, decreasing; empty: `times` + `num_times`
    times: str = "logsnr"  # spacing of the output times when not explicit (time_uniform, time_quadratic, ...)
    num_times: int = 5  # output times including both ends
    to_zero: bool = True  # the last output time is the clean data (sigma = 0)
    solver: str = "reference"  # "reference" (adaptive dopri5) or a solver of the core
    order: int = 3
    options: dict = field(default_factory=dict)
    steps_per_interval: int = 20  # fine steps between output times, for a solver of the core
    rtol: float = 1e-5  # reference tolerance (1e-5 suits float32 networks; 1e-8 float64 exact teachers)
    store_x0: bool = False  # also store the teacher's x0-prediction at each output time (DSNO's targets)
    dtype: str = "float32"  # storage dtype: float32 or float16
    batch_size: int = 256
    RULES: ClassVar = dict(n=between(1, 10**8), shard_size=at_least(1), num_times=at_least(2),
                           times=one_of(*TIME_KINDS), order=at_least(1), steps_per_interval=at_least(1),
                           rtol=positive, dtype=one_of("float32", "float16"), batch_size=at_least(1),
                           output_times=each(lambda v: None if isinstance(v, float) and math.isfinite(v)
                                             else "must be a finite number"))


def output_times(spec: TrajectorySpec, schedule) -> Tensor:
    if spec.output_times:
        t = torch.tensor(spec.output_times, dtype=torch.float64)
    else:
        if spec.times not in TIME_KINDS:
            raise ValueError(f"unknown output time spacing {spec.times!r}: expected one of {TIME_KINDS}")
        t = make_grid(spec.times, spec.num_times - 1, schedule, to_zero=spec.to_zero)
    if len(t) < 2 or not (t[1:] < t[:-1]).all() or not torch.isfinite(t).all():
        raise ValueError(f"output times must be finite and decrease strictly, got {t.tolist()}")
    return t


def sample_noise(indices, shape: tuple[int, ...], seed: int, scale: float = 1.0) -> Tensor:
    """x_T for the given sample indices: sample j is drawn from its own generator seeded by (seed, j)."""
    out = []
    for j in indices:
        state = np.random.SeedSequence([seed, int(j)]).generate_state(2, dtype=np.uint32)
        g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        out.append(torch.randn(shape, generator=g, dtype=torch.float64))
    return torch.stack(out) * scale


def conditions_of(teacher, index: Tensor) -> Tensor | None:
    """The condition of each sample index for a conditional teacher (a pipeline's conditions in turn), else None."""
    return teacher.condition_of(index) if getattr(teacher, "conditional", False) else None


def integrate(teacher, x_T: Tensor, times: Tensor, spec: TrajectorySpec, cond: Tensor | None = None) -> Tensor:
    """States at `times` (M, B, ...) from x_T at times[0], by the reference solver or a fine solver grid."""
    if spec.solver == "reference":
        return reference_solve(teacher, x_T, times, rtol=spec.rtol, atol=spec.rtol, cond=cond).trajectory
    sched = teacher.noise_schedule
    pieces, marks = [times[:1]], [0]
    for a, b in zip(times[:-1], times[1:]):  # a fine grid through every output time
        if b == sched.t_zero:
            piece = b[None]
        else:
            piece = make_grid("logsnr", spec.steps_per_interval, sched, t_max=float(a), t_min=float(b))[1:]
        pieces.append(piece)
        marks.append(marks[-1] + len(piece))
    grid = torch.cat(pieces)
    traj = solve(teacher, x_T, grid, spec.solver, spec.order, cond=cond, return_trajectory=True,
                 **spec.options).trajectory
    return traj[marks]


def shard_path(out_dir: Path, k: int) -> Path:
    return out_dir / f"shard-{k:05d}.safetensors"


def shard_ok(out_dir: Path, k: int) -> bool:
    """Whether shard k is there and its tensors match their checksum."""
    try:
        read_safetensors(shard_path(out_dir, k))
        return True
    except ValueError:
        return False


def check_spec(spec: TrajectorySpec, schedule) -> Tensor:
    """The output times of `spec` for `schedule`, after checking the solver, its order and options: ValueError
    before anything is generated or written."""
    times = output_times(spec, schedule)
    if float(times[0]) > schedule.t_max or float(times[-1]) < schedule.t_zero:
        raise ValueError(f"output times {times.tolist()} leave the schedule's range [{schedule.t_zero}, {schedule.t_max}]")
    if spec.solver != "reference":
        get_solver(spec.solver)
        to_zero = int(times[-1] == schedule.t_zero)  # that interval is one step: x0
        check_order(spec.solver, spec.order, (len(times) - 1 - to_zero) * spec.steps_per_interval + to_zero)
        check_options(spec.solver, spec.options)
        if schedule.lambda_(times[:1]) == -math.inf and not starts_at_noise(spec.solver, spec.options):
            raise ValueError(f"the output times start at t = {float(times[0])} (alpha = 0), where {spec.solver} "
                             f"cannot start: use the reference solver or a data-form one (dpm_solver++, unipc)")
    elif spec.options:
        raise ValueError(f"the reference solver takes no options, got {spec.options}")
    return times


def check_directory(out: Path, spec: TrajectorySpec, teacher, teacher_name: str = "") -> dict:
    """What `generate` would record in out/spec.json, after checking the spec against the teacher and, if `out`
    already holds trajectories, that they are of this teacher and spec: ValueError before anything is written."""
    times = check_spec(spec, teacher.noise_schedule)
    if not tuple(getattr(teacher, "shape", None) or ()):
        raise ValueError("the teacher does not say its sample shape (teacher.shape)")
    if Path(out).is_file():
        raise TrajectoryError(f"{out} is a file, not a trajectory directory")
    fingerprint = teacher.fingerprint() if hasattr(teacher, "fingerprint") else ""
    identity = dict(format=FORMAT, version=VERSION, spec=asdict(spec), output_times=times.tolist(),
                    teacher=dict(fingerprint=fingerprint, name=teacher_name), noise_schedule=teacher.noise_schedule.config())
    spec_file = Path(out) / "spec.json"
    if spec_file.is_file():
        old = read_json(spec_file, TrajectoryError)
        if isinstance(old.get("teacher"), dict) and made_for(teacher, old["teacher"].get("fingerprint")):
            old["teacher"] = dict(old["teacher"], fingerprint=fingerprint)  # an earlier version's, of this teacher
        if {k: old.get(k) for k in identity} != json.loads(json.dumps(identity)):
            raise TrajectoryError(f"{out} holds trajectories of another teacher or spec; use a new directory")
    return identity


def generate(teacher, out_dir: str | Path, spec: TrajectorySpec, rank: int = 0, world_size: int = 1,
             teacher_name: str = "", progress: bool = True, barrier=None) -> Path:
    """Generate this rank's missing shards; rank 0 writes the manifest once all shards are done.

    `barrier`: a callable that waits for every rank (e.g. Fabric.barrier) under DDP."""
    out = Path(out_dir)
    sched = teacher.noise_schedule
    identity = check_directory(out, spec, teacher, teacher_name)
    times = torch.tensor(identity["output_times"], dtype=torch.float64)
    shape = tuple(teacher.shape)
    if rank == 0 and not (out / "spec.json").is_file():
        write_json(out / "spec.json", identity)
    dtype = getattr(torch, spec.dtype)
    n_shards = -(-spec.n // spec.shard_size)
    mine = [k for k in range(rank, n_shards, world_size)]
    todo = []
    for k in mine:
        if not shard_ok(out, k):
            if shard_path(out, k).exists():
                warnings.warn(f"shard {k} of {out} fails its checksum: generating it again")
            todo.append(k)
    bar = tqdm(total=sum(min(spec.shard_size, spec.n - k * spec.shard_size) for k in todo), unit="traj",
               desc=f"trajectories (rank {rank})", disable=not progress)
    for k in todo:
        idx = torch.arange(k * spec.shard_size, min((k + 1) * spec.shard_size, spec.n))
        x_T = sample_noise(idx.tolist(), shape, spec.seed, sched.init_noise_std())
        cond = conditions_of(teacher, idx)  # stored with each sample: consumers draw matched (noise, condition)
        parts = {"x_T": [], "trajectory": [], "x0": []}
        for b in range(0, len(idx), spec.batch_size):
            x = x_T[b: b + spec.batch_size].to(device_of(teacher), dtype_of(teacher))
            c = None if cond is None else cond[b: b + spec.batch_size].to(x.device)
            with torch.no_grad():
                traj = integrate(teacher, x, times, spec, c)  # (M, B, ...)
                check_not_diverged(traj, x, times, out)
                parts["trajectory"].append(traj.transpose(0, 1).cpu())
                if spec.store_x0:
                    x0 = [traj[m] if times[m] == sched.t_zero else teacher.x0(traj[m], times[m].to(x).expand(len(x)), c)
                          for m in range(len(times))]
                    parts["x0"].append(torch.stack(x0, 1).cpu())
            bar.update(len(x))
        tensors = {key: torch.cat(v).to(dtype) for key, v in parts.items() if v}
        tensors["x_T"] = x_T.to(dtype)
        tensors["index"] = idx
        if cond is not None:
            tensors["cond"] = cond
        write_safetensors(shard_path(out, k), tensors)
    bar.close()
    if barrier is not None:
        barrier()
    if rank == 0:
        missing = [k for k in range(n_shards) if not shard_ok(out, k)]
        if missing:
            raise RuntimeError(f"shards {missing} of {out} are not finished; run the generation again")
        first = read_safetensors(shard_path(out, 0), TrajectoryError)
        manifest = dict(identity, n=spec.n, shard_size=spec.shard_size, count=n_shards,
                        shapes={k: [spec.n] + list(v.shape[1:]) for k, v in first.items()},
                        dtypes={k: str(v.dtype).replace("torch.", "") for k, v in first.items()},
                        shards=[dict(file=shard_path(out, k).name, sha256=sha256_file(shard_path(out, k)),
                                     first_index=k * spec.shard_size,
                                     count=min(spec.shard_size, spec.n - k * spec.shard_size)) for k in range(n_shards)],
                        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        write_json(out / "manifest.json", manifest)
    return out / "manifest.json"


# A teacher state this many times the starting noise's RMS: its ODE blew up. A trained model's samples are of the
# order of its noise (the shipped latent model: 1.0x at its guidance, 8x at guidance 100, 1e8x at 1e9:
# tests/test_reliability.py), the tests' tiny pipelines with random weights reach a few hundred.
DIVERGED = 1e4


def check_not_diverged(traj: Tensor, x_T: Tensor, times: Tensor, where: Path) -> None:
    """TrajectoryError, before the shard is written, if the teacher's states (M, B, ...) are not finite or their RMS
    at some output time exceeds DIVERGED x the starting noise's: the samples of a teacher that blows up (a guidance
    scale far beyond use, broken weights, a float16 overflow) are no target to learn, and would only be exported as
    a result."""
    start = float(x_T.double().pow(2).mean().sqrt())
    for m, state in enumerate(traj):
        rms = float(state.double().pow(2).mean().sqrt())
        if not math.isfinite(rms) or rms > DIVERGED * start:
            raise TrajectoryError(f"{where}: the teacher's samples diverge (RMS {rms:.4g} at output time "
                                  f"{float(times[m]):.4g}: {rms / start:.3g}x the starting noise's, the limit is "
                                  f"{DIVERGED:g}x): its guidance, weights or dtype make its ODE blow up; no shard of "
                                  f"them was written")


class TrajectoryDataset(torch.utils.data.Dataset):
    """A generated trajectory set, read back into memory after checking the manifest and every shard (a missing or
    damaged shard is a TrajectoryError: training on fewer samples than the manifest promises would be silent)."""

    def __init__(self, directory: str | Path, dtype: torch.dtype = torch.float32):
        d = Path(directory)
        if not (d / "manifest.json").is_file():
            raise TrajectoryError(f"{d} has no manifest.json: generate the trajectories first (or finish the run)")
        self.manifest = m = read_json(d / "manifest.json", TrajectoryError)
        try:
            if m.get("format") != FORMAT or m.get("version") != VERSION:
                raise ValueError(f"not a {FORMAT} v{VERSION} manifest")
            shards, times, fingerprint = m["shards"], m["output_times"], m["teacher"]["fingerprint"]
            files = [(d / s["file"], s["sha256"], int(s["count"])) for s in shards]
            self.times = torch.tensor(times, dtype=torch.float64)
        except (KeyError, TypeError, ValueError) as err:
            raise TrajectoryError(f"{d / 'manifest.json'}: malformed manifest ({type(err).__name__}: {err})") from None
        parts = []
        for path, sha, count in files:
            if not path.is_file() or sha256_file(path) != sha:
                raise TrajectoryError(f"{path}: {'missing' if not path.is_file() else 'fails its checksum'}; rerun "
                                      f"the generation into {d} (`python train.py mode=trajectories out_dir={d} ...` "
                                      f"regenerates damaged shards) or use a new directory")
            parts.append(read_safetensors(path, TrajectoryError))
            if len(parts[-1]["x_T"]) != count:
                raise TrajectoryError(f"{path}: {len(parts[-1]['x_T'])} trajectories, the manifest says {count}")
        if not parts:
            raise TrajectoryError(f"{d}: the manifest lists no shard")
        self.tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        for k, v in self.tensors.items():
            if v.is_floating_point():
                self.tensors[k] = v.to(dtype)
        self.teacher_fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self.tensors["x_T"])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


class TrajectoryDataModule(L.LightningDataModule):
    """A trajectory directory as train and validation sets (a seeded permutation). Given a teacher and a spec
    and no manifest yet, prepare_data (rank 0) generates the trajectories first. With `seen`, validation also runs
    on as many training trajectories as held-out ones (its second loader): the gap between the two losses says
    whether a student memorises its trajectories."""

    def __init__(self, directory, batch_size: int = 64, val_fraction: float = 0.1, seed: int = 0, teacher=None,
                 spec: TrajectorySpec | None = None, teacher_name: str = "", seen: bool = False):
        super().__init__()
        self.directory, self.batch_size, self.val_fraction, self.seed = Path(directory), batch_size, val_fraction, seed
        self.seen = seen
        self.teacher, self.spec, self.teacher_name = teacher, spec, teacher_name

    def prepare_data(self):
        if self.teacher is not None and not (self.directory / "manifest.json").is_file():
            generate(self.teacher, self.directory, self.spec or TrajectorySpec(), teacher_name=self.teacher_name)

    def setup(self, stage=None):
        self.dataset = TrajectoryDataset(self.directory)
        n = len(self.dataset)
        n_val = max(1, round(self.val_fraction * n)) if self.val_fraction > 0 else 0
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.val_set = torch.utils.data.Subset(self.dataset, perm[:n_val])
        self.train_set = torch.utils.data.Subset(self.dataset, perm[n_val:])
        self.seen_set = torch.utils.data.Subset(self.dataset, perm[n_val:2 * n_val])

    def train_dataloader(self):
        return train_loader(self.train_set, self.batch_size, self.seed)

    def val_dataloader(self):
        loader = lambda data: torch.utils.data.DataLoader(data, batch_size=self.batch_size)  # noqa: E731
        return [loader(self.val_set), loader(self.seen_set)] if self.seen else loader(self.val_set)

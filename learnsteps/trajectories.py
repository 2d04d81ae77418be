"""Teacher trajectory datasets: what LD3 and DSNO learn from.

From seeded noise, a high-accuracy solver of the core integrates the frozen teacher and the states at chosen
output times are stored (with the x0-predictions there, when asked), in shards:

    out_dir/spec.json                   what is being generated (teacher fingerprint, solver, times, seed, ...)
    out_dir/shard-00000.safetensors     x_T (S, ...), trajectory (S, M, ...), [x0 (S, M, ...)], index (S,)
    out_dir/shard-00000.sha256          its checksum, written after the shard: a shard without one is unfinished
    out_dir/manifest.json               written once every shard is done: shapes, dtypes, counts, checksums

Sample j always starts from the noise of seed (seed, j), whatever the shard size or the number of ranks.
A rerun generates only the missing shards (and regenerates, with a warning, any whose checksum fails); under
DDP rank r takes shards r, r + world, ... so that ranks share no shard and leave none out.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor
from tqdm import tqdm

from .core.grids import make as make_grid
from .core.denoiser import dtype_of
from .core.reference import reference_solve
from .core.sample import solve
from .files import write_safetensors, write_text
from .loaders import train_loader

FORMAT, VERSION = "learnsteps-trajectories", 1
TIME_KINDS = ("time_uniform", "time_quadratic", "logsnr", "edm")


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


def integrate(teacher, x_T: Tensor, times: Tensor, spec: TrajectorySpec) -> Tensor:
    """States at `times` (M, B, ...) from x_T at times[0], by the reference solver or a fine solver grid."""
    if spec.solver == "reference":
        return reference_solve(teacher, x_T, times, rtol=spec.rtol, atol=spec.rtol).trajectory
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
    traj = solve(teacher, x_T, grid, spec.solver, spec.order, return_trajectory=True, **spec.options).trajectory
    return traj[marks]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_ok(out_dir: Path, k: int) -> bool:
    f, s = out_dir / f"shard-{k:05d}.safetensors", out_dir / f"shard-{k:05d}.sha256"
    return f.is_file() and s.is_file() and s.read_text().strip() == _sha256(f)


def generate(teacher, out_dir: str | Path, spec: TrajectorySpec, rank: int = 0, world_size: int = 1,
             teacher_name: str = "", progress: bool = True, barrier=None) -> Path:
    """Generate this rank's missing shards; rank 0 writes the manifest once all shards are done.

    `barrier`: a callable that waits for every rank (e.g. Fabric.barrier) under DDP."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sched = teacher.noise_schedule
    times = output_times(spec, sched)
    fingerprint = teacher.fingerprint() if hasattr(teacher, "fingerprint") else ""
    identity = dict(format=FORMAT, version=VERSION, spec=asdict(spec), output_times=times.tolist(),
                    teacher=dict(fingerprint=fingerprint, name=teacher_name), noise_schedule=sched.config())
    spec_file = out / "spec.json"
    if spec_file.is_file():
        old = json.loads(spec_file.read_text())
        if {k: old.get(k) for k in identity} != json.loads(json.dumps(identity)):
            raise ValueError(f"{out} holds trajectories of another teacher or spec; use a new directory")
    elif rank == 0:
        write_text(spec_file, json.dumps(identity, indent=2))
    if spec.dtype not in ("float32", "float16"):
        raise ValueError(f"storage dtype must be float32 or float16, not {spec.dtype!r}")
    dtype = getattr(torch, spec.dtype)
    shape = tuple(getattr(teacher, "shape", None) or ())
    n_shards = -(-spec.n // spec.shard_size)
    mine = [k for k in range(rank, n_shards, world_size)]
    todo = []
    for k in mine:
        if (out / f"shard-{k:05d}.sha256").exists() and not shard_ok(out, k):
            warnings.warn(f"shard {k} of {out} fails its checksum: generating it again")
        if not shard_ok(out, k):
            todo.append(k)
    bar = tqdm(total=sum(min(spec.shard_size, spec.n - k * spec.shard_size) for k in todo), unit="traj",
               desc=f"trajectories (rank {rank})", disable=not progress)
    if todo and not shape:
        raise ValueError("the teacher does not say its sample shape (teacher.shape)")
    for k in todo:
        idx = torch.arange(k * spec.shard_size, min((k + 1) * spec.shard_size, spec.n))
        x_T = sample_noise(idx.tolist(), shape, spec.seed, sched.init_noise_std())
        parts = {"x_T": [], "trajectory": [], "x0": []}
        for b in range(0, len(idx), spec.batch_size):
            x = x_T[b: b + spec.batch_size].to(dtype_of(teacher))
            with torch.no_grad():
                traj = integrate(teacher, x, times, spec)  # (M, B, ...)
                parts["trajectory"].append(traj.transpose(0, 1))
                if spec.store_x0:
                    x0 = [traj[m] if times[m] == sched.t_zero else teacher.x0(traj[m], times[m].to(x).expand(len(x)))
                          for m in range(len(times))]
                    parts["x0"].append(torch.stack(x0, 1))
            bar.update(len(x))
        tensors = {key: torch.cat(v).to(dtype) for key, v in parts.items() if v}
        tensors["x_T"] = x_T.to(dtype)
        tensors["index"] = idx
        path = write_safetensors(out / f"shard-{k:05d}.safetensors", tensors)
        write_text(out / f"shard-{k:05d}.sha256", _sha256(path) + "\n")
    bar.close()
    if barrier is not None:
        barrier()
    if rank == 0:
        missing = [k for k in range(n_shards) if not shard_ok(out, k)]
        if missing:
            raise RuntimeError(f"shards {missing} of {out} are not finished; run the generation again")
        first = load_file(str(out / "shard-00000.safetensors"))
        manifest = dict(identity, n=spec.n, shard_size=spec.shard_size, count=n_shards,
                        shapes={k: [spec.n] + list(v.shape[1:]) for k, v in first.items()},
                        dtypes={k: str(v.dtype).replace("torch.", "") for k, v in first.items()},
                        shards=[dict(file=f"shard-{k:05d}.safetensors", sha256=_sha256(out / f"shard-{k:05d}.safetensors"),
                                     first_index=k * spec.shard_size,
                                     count=min(spec.shard_size, spec.n - k * spec.shard_size)) for k in range(n_shards)],
                        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    return out / "manifest.json"


class TrajectoryDataset(torch.utils.data.Dataset):
    """A generated trajectory set, read back into memory. Shards whose checksum fails are reported and skipped."""

    def __init__(self, directory: str | Path, dtype: torch.dtype = torch.float32):
        d = Path(directory)
        if not (d / "manifest.json").is_file():
            raise ValueError(f"{d} has no manifest.json: generate the trajectories first (or finish the run)")
        self.manifest = json.loads((d / "manifest.json").read_text())
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise ValueError(f"{d / 'manifest.json'}: not a {FORMAT} v{VERSION} manifest")
        parts = []
        for shard in self.manifest["shards"]:
            path = d / shard["file"]
            if not path.is_file() or _sha256(path) != shard["sha256"]:
                warnings.warn(f"{path}: missing or fails its checksum; left out")
                continue
            parts.append(load_file(str(path)))
        if not parts:
            raise ValueError(f"{d}: no usable shard")
        self.tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        for k, v in self.tensors.items():
            if v.is_floating_point():
                self.tensors[k] = v.to(dtype)
        self.times = torch.tensor(self.manifest["output_times"], dtype=torch.float64)
        self.teacher_fingerprint = self.manifest["teacher"]["fingerprint"]

    def __len__(self) -> int:
        return len(self.tensors["x_T"])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


class TrajectoryDataModule(L.LightningDataModule):
    """A trajectory directory as train and validation sets (a seeded permutation). Given a teacher and a spec
    and no manifest yet, prepare_data (rank 0) generates the trajectories first."""

    def __init__(self, directory, batch_size: int = 64, val_fraction: float = 0.1, seed: int = 0, teacher=None,
                 spec: TrajectorySpec | None = None, teacher_name: str = ""):
        super().__init__()
        self.directory, self.batch_size, self.val_fraction, self.seed = Path(directory), batch_size, val_fraction, seed
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

    def train_dataloader(self):
        return train_loader(self.train_set, self.batch_size, self.seed)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val_set, batch_size=self.batch_size)

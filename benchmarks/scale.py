"""Real size (issue #31): LD3, the learned solver, teacher pairs and DSNO on networks of SD1.5, SDXL, DiT-XL/2 and
FLUX.1 size, on the device it runs on.

    python benchmarks/scale.py                       # this CPU: SD1.5 in full, the others in part (~75 min)
    python benchmarks/scale.py device=cuda           # one GPU: every model, every setting (sized for 10 min;
                                                     # written for a GPU, not yet run on one)
    python benchmarks/scale.py toy=true              # a toy-size pass of every measurement (CI's test runs it)
    python benchmarks/scale.py part=bf16             # LD3 with a bfloat16 teacher against float32 (digits size)
    python benchmarks/scale.py part=profile          # where an LD3 step's time goes besides the network (SD1.5)

Each network is built from its published config with seeded random weights (nothing is downloaded) and saved as a
diffusers pipeline directory with its real scheduler, then loaded as users' checkpoints are:
`load_teacher(dir, conditions=<prompt embeddings file>, teacher_dtype=bfloat16)`, the text encoders never loaded
(their embeddings, random at the real shapes, come from a learnsteps conditions file). The VAE is the real one's
layout (4 levels, so the real latent size) at a tiny width: it is not called here. FLUX.1 is built at its published
width and heads with fewer blocks (`flux_blocks`), each block's cost fitted from the measured depths and projected
to 19 double + 38 single blocks (said in the table).

Every measurement runs in a fresh process (a clean memory peak): the peak is the process's resident set above its
level just before the measured work (CPU, sampled every 5 ms) or torch.cuda.max_memory_allocated above the memory
allocated before it (CUDA).
- call: one teacher call (guided: both CFG branches in one batch, as sampling calls it), median of a few;
- ld3: one LD3 training step through Lightning (LD3's own training_step: solve, loss, backward, optimiser, soft
  teacher forcing), remat on/off, learn=grid/solver, and its ratio to NFE x one call;
- overhead: the same step with the network swapped for a free stand-in (what is not the teacher's compute);
- pairs: `trajectories.generate` of teacher pairs against the same number of raw teacher calls;
- dsno: one DSNO training step on the teacher's own network (M output times, temporal layers), Adam.
part=bf16: LD3 on the shipped latent flow model (a diffusers DiTPipeline) with its network in bfloat16 and in
float32 (and float32 on another CPU kernel path, the yardstick), same seeds; each learned schedule is then run on
the float32 teacher against the float32 run's held-out pairs: the paired RMSE of bfloat16-learned over
float32-learned.
Results: <out_dir>/results.jsonl (one line a measurement, appended; a rerun skips what is there) and scale.md.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from families import FLUX_DEV, SDXL_UNET  # noqa: E402  (the published configs, as families.py's memory part reads them)
from learnsteps.config import load_config  # noqa: E402

# ---------------------------------------------------------------------------------------------- the networks
# published configs: runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0, facebook/DiT-XL-2-256,
# black-forest-labs/FLUX.1-dev (unet|transformer/config.json, scheduler/scheduler_config.json)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
DIT_XL = dict(sample_size=32, num_layers=28, patch_size=2, attention_head_dim=72, num_attention_heads=16, in_channels=4,
              out_channels=8, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
              norm_elementwise_affine=False)
DDPM_SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)


@dataclass
class Model:
    pipeline: str
    denoiser: str  # unet | transformer
    net: str  # diffusers class
    config: dict
    scheduler: tuple  # (class, config)
    tables: dict  # condition table name -> shape of one row (random prompt embeddings at the real shape)
    guidance: float  # as its users sample it
    latent_channels: int = 4
    vae: dict = field(default_factory=dict)  # scaling_factor, shift_factor, ...
    max_sequence_length: int | None = None
    negative_row: bool = True


MODELS = {
    "sd15": Model("StableDiffusionPipeline", "unet", "UNet2DConditionModel", SD15_UNET,
                  ("PNDMScheduler", dict(DDPM_SD, skip_prk_steps=True, steps_offset=1)), dict(embeds=(77, 768)), 7.5,
                  vae=dict(scaling_factor=0.18215)),
    "sdxl": Model("StableDiffusionXLPipeline", "unet", "UNet2DConditionModel", SDXL_UNET,
                  ("EulerDiscreteScheduler", dict(DDPM_SD, steps_offset=1, timestep_spacing="leading")),
                  dict(embeds=(77, 2048), pooled=(1280,)), 5.0, vae=dict(scaling_factor=0.13025)),
    "dit_xl": Model("DiTPipeline", "transformer", "Transformer2DModel", DIT_XL,
                    ("DDIMScheduler", dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)), {}, 4.0,
                    vae=dict(scaling_factor=0.18215)),
    "flux": Model("FluxPipeline", "transformer", "FluxTransformer2DModel", FLUX_DEV,
                  ("FlowMatchEulerDiscreteScheduler", FLUX_SCHEDULER), dict(embeds=(512, 4096), pooled=(768,)), 3.5,
                  latent_channels=16, vae=dict(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                                               use_post_quant_conv=False), max_sequence_length=512, negative_row=False),
}
TOY = {  # the same families at toy width (CI)
    "sd15": dict(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, norm_num_groups=4, attention_head_dim=2,
                 cross_attention_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "flux": dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                 pooled_projection_dim=16, axes_dims_rope=[4, 4, 8]),
}
TOY_TABLES = {"sd15": dict(embeds=(6, 8)), "flux": dict(embeds=(6, 16), pooled=(16,))}
FULL_FLUX_BLOCKS = (19, 38)
PROMPTS = ["a photograph of an astronaut riding a horse", "a bowl of fruit on a table"]


def build_pipeline(name: str, directory: Path, toy: bool = False, blocks: tuple[int, int] | None = None,
                   dtype=torch.bfloat16) -> tuple[Path, Path | None]:
    """The pipeline directory of model `name` (seeded random weights in `dtype`) and its conditions file."""
    import diffusers

    from learnsteps.teachers.pipelines.conditions import save_conditions

    m = MODELS[name]
    config = dict(m.config, **(TOY.get(name, {}) if toy else {}))
    if blocks:
        config.update(num_layers=blocks[0], num_single_layers=blocks[1])
    if not (directory / "model_index.json").is_file():
        with torch.device("meta"):
            net = getattr(diffusers, m.net)(**config)
        net = net.to(dtype).to_empty(device="cpu")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # N(0, 0.02) weights, norms' scales at one: a network whose activations stay finite
            for pname, p in list(net.named_parameters()) + list(net.named_buffers()):
                if p.is_floating_point():
                    ones = p.dim() == 1 and "norm" in pname and pname.endswith("weight")
                    p.copy_(torch.ones_like(p) if ones else torch.randn(p.shape, generator=g).mul_(0.02))
        vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=m.latent_channels,
                                      block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=2, layers_per_block=1,
                                      sample_size=8 * int(config.get("sample_size", 128)), **m.vae)
        scheduler = getattr(diffusers, m.scheduler[0])(**m.scheduler[1])
        parts = {m.denoiser: net, "vae": vae, "scheduler": scheduler}
        if m.pipeline == "StableDiffusionPipeline":
            parts.update(text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None,
                         requires_safety_checker=False)
        elif m.pipeline in ("StableDiffusionXLPipeline", "FluxPipeline"):
            parts.update(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
        pipe = getattr(diffusers, m.pipeline)(**parts)
        pipe.save_pretrained(directory)
        if m.pipeline == "DiTPipeline":
            index = json.loads((directory / "model_index.json").read_text())
            (directory / "model_index.json").write_text(json.dumps(dict(index, id2label={"0": "tench", "1": "goldfish"})))
    if not m.tables:
        return directory, None
    tables_shapes = TOY_TABLES[name] if toy else m.tables
    g = torch.Generator().manual_seed(1)
    tables = {k: torch.randn((len(PROMPTS) + 1, *shape), generator=g).to(dtype) for k, shape in tables_shapes.items()}
    length = m.max_sequence_length and tables_shapes["embeds"][0]
    cond = save_conditions(directory / "conditions.safetensors", m.pipeline, str(directory), PROMPTS, None,
                           m.negative_row, length, tables)
    return directory, cond


# ---------------------------------------------------------------------------------------------- measuring
class Peak:
    """Peak memory of a block above its start: CPU resident set (sampled every 5 ms), or CUDA allocated bytes."""

    def __init__(self, device: torch.device):
        self.device, self.bytes, self.total = device, 0, 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base, self.high, self.running = self.rss(), self.rss(), True

            def watch():
                while self.running:
                    self.high = max(self.high, self.rss())
                    time.sleep(0.005)
            self.thread = threading.Thread(target=watch, daemon=True)
            self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.t0
            self.total = torch.cuda.max_memory_allocated()
        else:
            self.seconds = time.perf_counter() - self.t0
            self.running = False
            self.thread.join()
            self.total = max(self.high, self.rss())
        self.bytes = self.total - self.base


def teacher_of(job: dict, device: torch.device, guided: bool = True):
    from learnsteps.teachers import load_teacher

    m = MODELS[job["model"]]
    options = dict(teacher_dtype=job.get("dtype", "bfloat16"), guidance=m.guidance if guided else 1.0)
    if job.get("conditions"):
        options["conditions"] = job["conditions"]
    else:
        options["conditions"] = [0, 1]
    if m.max_sequence_length:
        options["max_sequence_length"] = TOY_TABLES["flux"]["embeds"][0] if job.get("toy") else m.max_sequence_length
    teacher = load_teacher(job["pipeline"], **options).to(device)
    return teacher.requires_grad_(False)


def noise(teacher, batch: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((batch, *teacher.shape), generator=g) * teacher.noise_schedule.init_noise_std()).to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def one_call(teacher, x, device) -> float:
    t = torch.full((len(x),), 0.5 * (teacher.noise_schedule.t_max + teacher.noise_schedule.t_min), device=device)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        teacher(x, t, torch.arange(len(x), device=device) % len(teacher.conditions))
    sync(device)
    return time.perf_counter() - t0


def measure_call(job: dict, device) -> dict:
    teacher = teacher_of(job, device, guided=job["guided"])
    x = noise(teacher, job["batch"], device)
    if job.get("channels_last"):
        teacher.net.net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if job.get("compile"):
        teacher.net.net = torch.compile(teacher.net.net)
    first = one_call(teacher, x, device)  # warm: kernels chosen, allocator filled, (compiled)
    with Peak(device) as peak:
        times = [one_call(teacher, x, device) for _ in range(job["repeats"])]
    return dict(seconds=statistics.median(times), first=first, peak=peak.bytes, total=peak.total,
                params=sum(p.numel() for p in teacher.net.parameters()))


class Timed(L.Callback):
    """Time and peak memory of each training batch (the step, its backward and optimiser, as Lightning runs it)."""

    def __init__(self, device):
        self.device, self.steps = device, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.peak = Peak(self.device).__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.peak.__exit__(None, None, None)
        self.steps.append((self.peak.seconds, self.peak.bytes, self.peak.total))


def fit_steps(module, data, device, steps: int):
    timer = Timed(device)
    trainer = L.Trainer(max_steps=steps, accelerator=device.type, devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(module, data)
    return timer.steps


class FreeNet(torch.nn.Module):
    """A network that costs nothing: what is left of an LD3 step is what is not the teacher's compute."""

    def __init__(self, net):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones((), dtype=net.dtype), requires_grad=False)
        self.dtype, self.shape, self.combine = net.dtype, net.shape, net.combine

    def forward(self, x, t, cond):
        return x * self.scale


def ld3_module(job: dict, teacher, device):
    from learnsteps.ld3 import LD3Config
    from learnsteps.ld3.module import LD3

    cfg = LD3Config(teacher=job["pipeline"], solver="dpm_solver++", order=2, nfe=job["nfe"], batch_size=job["batch"],
                    remat=str(job["remat"]).lower(), learn=job.get("learn", "grid"),
                    soft_forcing=job.get("soft_forcing", True), loss="l2")
    x_T = noise(teacher, job["batch"], "cpu")
    return LD3(cfg, teacher, x_T), x_T


def measure_ld3(job: dict, device) -> dict:
    from torch.utils.data import DataLoader, TensorDataset

    teacher = teacher_of(job, device)
    call = warm_call(teacher, job["batch"], device)
    if job.get("free"):  # the stand-in network, at the same latent shape
        teacher.net = FreeNet(teacher.net)
    module, x_T = ld3_module(job, teacher, device)
    cond = torch.arange(job["batch"]) % len(teacher.conditions)
    data = DataLoader(TensorDataset(torch.arange(job["batch"]), x_T, torch.randn_like(x_T), cond),
                      batch_size=job["batch"])
    out = dict(stepped(fit_steps(module, data, device, job["steps"])), call=call)
    return dict(out, ratio=out["seconds"] / (job["nfe"] * call))


def warm_call(teacher, batch: int, device) -> float:
    """One call's seconds, after a first (warming) call: the faster of two."""
    x = noise(teacher, batch, device)
    one_call(teacher, x, device)
    return min(one_call(teacher, x, device) for _ in range(2))


def stepped(steps: list[tuple]) -> dict:
    """A training run's figures: time and peak of the steps after the first (which warms the kernels and the
    allocator; the only one where a single step was run, `cold`), and the first step's peak."""
    warm = steps[1:] or steps
    return dict(seconds=statistics.median(s[0] for s in warm), peak=max(s[1] for s in warm),
                total=max(s[2] for s in warm), peak_first=steps[0][1], cold=len(steps) == 1)


def measure_pairs(job: dict, device) -> dict:
    from learnsteps.trajectories import TrajectorySpec, generate

    teacher = teacher_of(job, device)
    s = teacher.noise_schedule
    spec = TrajectorySpec(n=job["n"], shard_size=job["n"], seed=0, output_times=[s.t_max, s.t_min, s.t_zero],
                          solver="unipc", order=3, steps_per_interval=job["steps_per_pair"], batch_size=job["n"])
    calls = []
    hook = teacher.net.register_forward_hook(lambda *a: calls.append(1))
    one_call(teacher, noise(teacher, job["n"], device), device)  # warm
    calls.clear()
    with tempfile.TemporaryDirectory() as tmp, Peak(device) as gen:
        generate(teacher, Path(tmp) / "pairs", spec, progress=False)
    hook.remove()
    x = noise(teacher, job["n"], device)
    with Peak(device) as raw:
        for _ in calls:
            one_call(teacher, x, device)
    return dict(seconds=gen.seconds, raw=raw.seconds, calls=len(calls), ratio=raw.seconds / gen.seconds,
                peak=gen.bytes, total=gen.total)


def measure_dsno(job: dict, device) -> dict:
    from learnsteps.dsno.module import DSNOConfig, DSNOModule, make_student, student_times, time_weights

    teacher = teacher_of(job, device)
    call = warm_call(teacher, job["batch"], device)
    M = job["num_times"]
    cfg = DSNOConfig(teacher=job["pipeline"], num_times=M, temporal=M > 1, placement=job.get("placement", "every"),
                     batch_size=job["batch"])
    times = student_times(cfg, teacher.noise_schedule)
    student = make_student(cfg, teacher, times)
    module = DSNOModule(cfg, student, time_weights(cfg, teacher.noise_schedule, times), torch.arange(M))
    x_T = noise(teacher, job["batch"], "cpu")
    cond = torch.arange(job["batch"]) % len(teacher.conditions)
    batch = dict(x_T=x_T, x0=x_T.unsqueeze(1).expand(-1, M, *x_T.shape[1:]).clone(), cond=cond)
    data = [batch] * job["steps"]
    steps = fit_steps(module, torch.utils.data.DataLoader(data, batch_size=None), device, job["steps"])
    out = dict(stepped(steps), call=call, params=sum(p.numel() for p in student.parameters()))
    return dict(out, ratio=out["seconds"] / call)


MEASURE = dict(call=measure_call, ld3=measure_ld3, pairs=measure_pairs, dsno=measure_dsno)


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class Config:
    part: str = "size"  # size (the measurements above) | bf16
    device: str = "cpu"  # cpu | cuda
    toy: bool = False  # toy widths: a check that every measurement runs (CI)
    models: list[str] = field(default_factory=list)  # default: by device (cpu: sd15 in full; cuda: all)
    nfe: list[int] = field(default_factory=lambda: [4, 6, 8, 10])
    flux_blocks: list[list[int]] = field(default_factory=lambda: [[1, 1], [2, 1], [1, 2]])  # (double, single)
    fresh: str = "auto"  # each measurement in a fresh process: auto (on the CPU, for clean resident-set peaks; on a
    # GPU torch's peak counters are reset per measurement, and all run in one process) | true | false
    out_dir: str = "runs/scale"
    models_dir: str = ""  # where the pipelines are written (default <out_dir>/models)
    gpu_tflops: float = 250.0  # the planning table's assumed sustained bfloat16 throughput of one GPU (TFLOP/s)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # part=bf16
    ld3_args: list[str] = field(default_factory=list)  # part=bf16: more train.py arguments


def plan(cfg: Config) -> list[dict]:
    """The measurements, each a job for a fresh process. On a GPU: every model at full size, every setting. On the
    CPU: SD1.5 gets the whole set, DiT-XL/2 the LD3 memory rows, SDXL and the FLUX depths their calls (a step of
    theirs would take a quarter of an hour here). toy: one of each measurement, at toy width."""
    cuda = cfg.device == "cuda"
    if cfg.toy:
        base = dict(model=(cfg.models or ["sd15"])[0], blocks=None, toy=True, device=cfg.device)
        return [dict(base, kind="call", guided=True, batch=1, repeats=1),
                dict(base, kind="ld3", batch=1, steps=1, nfe=cfg.nfe[0], remat=True),
                dict(base, kind="pairs", n=2, steps_per_pair=2),
                dict(base, kind="dsno", num_times=2, batch=1, steps=1)]
    models = cfg.models or list(MODELS)
    steps, repeats = (4, 5) if cuda else (1, 1)
    jobs = []
    for name in models:
        variants = [tuple(b) for b in cfg.flux_blocks] if name == "flux" else [None]
        for i, blocks in enumerate(variants):
            base = dict(model=name, blocks=blocks, toy=False, device=cfg.device)
            call = dict(base, kind="call", guided=True, batch=1, repeats=repeats)
            jobs.append(call)
            if i:  # the other depths: one call each, to fit the cost of a block
                continue
            jobs.append(dict(call, guided=False))
            if cuda or name == "sd15":
                jobs.append(dict(call, batch=2))
                jobs += [dict(call, channels_last=True)] if MODELS[name].denoiser == "unet" else []
                # torch.compile: on the GPU, for the two smaller networks (a minute or more to compile each of the
                # larger ones); not on the CPU (minutes)
                jobs += [dict(call, compile=True)] if cuda and name in ("sd15", "dit_xl") else []
            ld3 = dict(base, kind="ld3", batch=1, steps=steps)
            if name == "dit_xl" and not cuda:
                jobs += [dict(ld3, nfe=n, remat=r) for n, r in ((cfg.nfe[0], True), (cfg.nfe[-1], True),
                                                                (cfg.nfe[-1], False))]
                jobs += [dict(ld3, nfe=n, remat=True, malloc="unpooled") for n in (cfg.nfe[0], cfg.nfe[-1])]
            if not (cuda or name == "sd15"):
                continue
            ends = sorted({cfg.nfe[0], cfg.nfe[-1]})
            # the memory rows (NFE at both ends, remat on): a second step on the CPU, whose peak is not the first's
            # allocator warm-up
            jobs += [dict(ld3, nfe=n, remat=True, steps=steps + (not cuda and n in ends)) for n in cfg.nfe]
            jobs += [dict(ld3, nfe=n, remat=False) for n in ends]
            # the CPU's memory rows proper: the resident set of a step with the allocator not pooling (its pool
            # otherwise grows with every call a step makes and a first step's peak counts it)
            jobs += [] if cuda else [dict(ld3, nfe=n, remat=True, malloc="unpooled") for n in ends]
            jobs += [dict(ld3, nfe=n, remat=True, learn="solver") for n in ends]
            jobs += [dict(ld3, nfe=cfg.nfe[0], remat=True, batch=2),
                     dict(ld3, nfe=cfg.nfe[0], remat=True, soft_forcing=False)]
            jobs += [dict(ld3, nfe=n, remat=True, free=True) for n in ends]
            jobs.append(dict(base, kind="pairs", n=2, steps_per_pair=20 if cuda else 4))
            # DSNO fine-tunes the whole network: 6 copies of it (teacher, student, EMA, gradients, Adam's two moments)
            # and the temporal layers'; at SD1.5 size on the CPU M = 1 takes 21.6 GB and M = 2 is killed for memory
            # on a 24 GB machine, so the CPU measures M = 1 only
            jobs += [dict(base, kind="dsno", num_times=m, batch=1, steps=steps + 1) for m in ((1, 2, 4) if cuda else (1,))]
    return jobs


def key(job: dict) -> str:
    return json.dumps({k: v for k, v in job.items() if k not in ("pipeline", "conditions")}, sort_keys=True)


JOB = "LEARNSTEPS_SCALE_JOB"  # the environment variable that hands a measurement to its process


def run_job(job: dict) -> dict:
    device = torch.device(job["device"])
    result = MEASURE[job["kind"]](job, device)
    return dict(job, **result)


def run_fresh(job: dict) -> dict:
    """The measurement in a process of its own; its error's last line where it fails."""
    env = dict(os.environ, WANDB_MODE="disabled", **{JOB: json.dumps(job)})
    if job.get("malloc") == "unpooled":  # glibc hands every allocation of 64 KiB or more back to the system when it is
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed: the resident set follows the live tensors (slower: page faults)
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode == -9:
        return dict(job, error="killed (SIGKILL: on Linux, the out-of-memory killer; dmesg says)")
    if proc.returncode or line is None:
        return dict(job, error=(proc.stderr.strip().splitlines() or ["(no output)"])[-1])
    return json.loads(line[len("RESULT "):])


def run_here(job: dict) -> dict:
    """The measurement in this process (CUDA: its peak counters reset for it); an out-of-memory is a result."""
    import gc

    try:
        return run_job(job)
    except Exception as err:  # noqa: BLE001 (recorded and reported; the other measurements go on)
        return dict(job, error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv: list[str]) -> None:
    if JOB in os.environ:  # a measurement's own process
        print("RESULT " + json.dumps(run_job(json.loads(os.environ[JOB]))), flush=True)
        return
    cfg = load_config(Config, [], argv)
    if cfg.part == "bf16":
        return bf16(cfg)
    if cfg.part == "profile":
        return profile(cfg)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: device=cuda but torch sees no CUDA device")
    out = Path(cfg.out_dir)
    models_dir = Path(cfg.models_dir) if cfg.models_dir else out / "models"
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    done = {key(r["job"]) for r in map(json.loads, results_file.read_text().splitlines()) if "error" not in r["result"]} \
        if results_file.is_file() else set()
    fresh = cfg.device == "cpu" if cfg.fresh == "auto" else cfg.fresh == "true"
    jobs = plan(cfg)
    machine = describe(cfg.device)
    print(f"{len(jobs)} measurements on {machine}", flush=True)
    for i, job in enumerate(jobs):
        if key(job) in done:
            continue
        blocks = "-".join(map(str, job["blocks"])) if job["blocks"] else "full"
        name = f"{job['model']}-{blocks}{'-toy' if cfg.toy else ''}"
        pipeline, cond = build_pipeline(job["model"], models_dir / name, toy=cfg.toy, blocks=job["blocks"])
        job = dict(job, pipeline=str(pipeline), conditions=str(cond) if cond else None)
        t0 = time.perf_counter()
        result = run_fresh(job) if fresh else run_here(job)
        record = dict(job=job, result=result, machine=machine, wall=time.perf_counter() - t0)
        with open(results_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"[{i + 1}/{len(jobs)}] {summary(result)}", flush=True)
    records = [json.loads(line) for line in results_file.read_text().splitlines()]
    flops_file = out / "flops.json"
    if not cfg.toy and not flops_file.is_file():
        flops_file.write_text(json.dumps({name: call_flops(name) for name in MODELS}))  # name: [flops, parameters]
    text = tables(records, machine, json.loads(flops_file.read_text()) if flops_file.is_file() else {})
    if flops_file.is_file():
        text += "\n" + planning(records, json.loads(flops_file.read_text()), cfg.gpu_tflops)
    (out / "scale.md").write_text(text)
    print(text)


def describe(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), "CPU")
    return f"{name}, {torch.get_num_threads()} threads"


def summary(r: dict) -> str:
    what = {k: r[k] for k in ("model", "kind", "blocks", "guided", "batch", "nfe", "remat", "learn", "free",
                              "soft_forcing", "num_times", "channels_last", "compile", "malloc")
            if r.get(k) not in (None, False)}
    if "error" in r:
        return f"{what}: ERROR {r['error']}"
    return f"{what}: {r['seconds']:.3f} s, peak {r.get('peak', 0) / 2**20:.0f} MiB" + (
        f", ratio {r['ratio']:.2f}" if "ratio" in r else "")


def call_flops(name: str) -> tuple[float, int]:
    """FLOPs of one guided teacher call at batch 1 (both CFG rows; FLUX.1-dev: one row, guidance embedded) of the
    full-size network, counted by torch.utils.flop_counter on the meta device (nothing allocated: FLUX at full
    depth too), with the inputs the family's adapter gives it; and the network's parameter count."""
    import diffusers
    from torch.utils.flop_counter import FlopCounterMode

    m, bf = MODELS[name], torch.bfloat16
    rows = 1 if name == "flux" else 2
    with torch.device("meta"):
        net = getattr(diffusers, m.net)(**m.config).to(bf)
        t = torch.full((rows,), 500.0)
        if name == "flux":
            call = lambda: net(hidden_states=torch.randn(1, 4096, 64, dtype=bf), timestep=t / 1000,  # noqa: E731
                               guidance=torch.full((1,), 3.5), pooled_projections=torch.randn(1, 768, dtype=bf),
                               encoder_hidden_states=torch.randn(1, 512, 4096, dtype=bf),
                               txt_ids=torch.zeros(512, 3, dtype=bf), img_ids=torch.zeros(4096, 3, dtype=bf))
        elif name == "dit_xl":
            call = lambda: net(torch.randn(rows, 4, 32, 32, dtype=bf), timestep=t,  # noqa: E731
                               class_labels=torch.zeros(rows, dtype=torch.long))
        else:
            side = m.config["sample_size"]
            added = dict(added_cond_kwargs=dict(text_embeds=torch.randn(rows, 1280, dtype=bf),
                                                time_ids=torch.ones(rows, 6, dtype=bf))) if name == "sdxl" else {}
            call = lambda: net(torch.randn(rows, 4, side, side, dtype=bf), t,  # noqa: E731
                               encoder_hidden_states=torch.randn(rows, 77, m.tables["embeds"][1], dtype=bf), **added)
        with FlopCounterMode(display=False) as counter:
            call()
    return float(counter.get_total_flops()), sum(p.numel() for p in net.parameters())


def profile(cfg: Config) -> None:
    """torch.profiler over LD3 steps at SD1.5's latent shape with the network swapped for the free stand-in: what
    is left is everything an LD3 step costs besides the teacher (solver, grid, soft forcing, optimiser, Lightning),
    by operator."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    device = torch.device(cfg.device)
    pipeline, cond = build_pipeline("sd15", Path(cfg.models_dir or Path(cfg.out_dir) / "models") / "sd15-full")
    for nfe in (cfg.nfe[0], cfg.nfe[-1]):
        job = dict(model="sd15", pipeline=str(pipeline), conditions=str(cond), nfe=nfe, batch=1, remat=True, steps=1)
        teacher = teacher_of(job, device)
        teacher.net = FreeNet(teacher.net)
        module, x_T = ld3_module(job, teacher, device)
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
            torch.arange(1), x_T, torch.randn_like(x_T), torch.zeros(1, dtype=torch.long)), batch_size=1)
        fit_steps(module, data, device, 3)  # warm
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            steps = fit_steps(module, data, device, 5)
        print(f"NFE {nfe}: a step without the network {statistics.median(s[0] for s in steps) * 1000:.1f} ms")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


# ---------------------------------------------------------------------------------------------- bfloat16
def bf16(cfg: Config) -> None:
    """LD3 with the teacher's network in bfloat16 against float32, per seed; and, as the yardstick of what any change
    of arithmetic does to an LD3 run, float32 again on another CPU kernel path (ATEN_CPU_CAPABILITY=default)."""
    from learnsteps.core.sample import solve_in_batches
    from learnsteps.ld3.run import pairs_dataset
    from learnsteps.schedule import load_schedule
    from learnsteps.teachers import load_teacher
    from learnsteps.trajectories import TrajectoryDataset

    out = Path(cfg.out_dir) / "bf16"
    teacher = load_teacher("digits_latent_flow")
    variants = {"float32": ("float32", {}), "bfloat16": ("bfloat16", {}),
                "float32-default-kernels": ("float32", {"ATEN_CPU_CAPABILITY": "default"})}
    rows = []
    for seed in cfg.seeds:
        rmse = {}
        for name, (dtype, env) in variants.items():
            run = out / f"{name}-seed{seed}"
            if not (run / "schedule.json").is_file():
                subprocess.run([sys.executable, str(ROOT / "train.py"), "mode=ld3", "teacher=digits_latent_flow",
                                f"teacher_dtype={dtype}", f"seed={seed}", f"pairs.seed={seed}", f"run_dir={run}",
                                "trainer.progress_bar=false", *cfg.ld3_args], check=True,
                               env=dict(os.environ, WANDB_MODE="disabled", **env))
            # the float32 run's held-out pairs (made first, by the float32 teacher) judge every run
            test = pairs_dataset(TrajectoryDataset(out / f"float32-seed{seed}" / "pairs" / "test").tensors)
            _, x_T, target, cond = test.tensors
            x = solve_in_batches(teacher, x_T, 256, cond, **load_schedule(run / "schedule.json").solve_kwargs)
            rmse[name] = float((x - target).pow(2).mean().sqrt())
        rows.append((seed, *rmse.values()))
        print(f"seed {seed}: held-out RMSE " + ", ".join(f"{k} {v:.5f}" for k, v in rmse.items()), flush=True)
    lines = ["| seed | " + " | ".join(f"{k}-learned" for k in variants) + " | bfloat16 / float32 | other kernels / "
             "float32 |", "|---|" + "---|" * (len(variants) + 2)]
    lines += [f"| {seed} | {a:.5f} | {b:.5f} | {c:.5f} | {b / a:.4f} | {c / a:.4f} |" for seed, a, b, c in rows]
    means = [statistics.mean(r[i] for r in rows) for i in (1, 2, 3)]
    lines.append(f"| mean | {means[0]:.5f} | {means[1]:.5f} | {means[2]:.5f} | {means[1] / means[0]:.4f} | "
                 f"{means[2] / means[0]:.4f} |")
    (out / "bf16.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# ---------------------------------------------------------------------------------------------- tables
def latest(records: list[dict]) -> list[dict]:
    """The successful results, one per setting: the one of the most training steps (a rerun with more replaces a
    single cold step), in order; LD3 and DSNO ratios taken against the setting's own call measurement (the median
    of its warm calls) where there is one."""
    best = {}
    for rec in records:
        r = rec["result"]
        if "error" in r:
            continue
        k = json.dumps({a: b for a, b in r.items() if a in PLAN_KEYS and a != "steps"}, sort_keys=True)
        if k not in best or r.get("steps", 0) >= best[k].get("steps", 0):
            best[k] = r
    rs = list(best.values())
    for r in rs:
        ref = [c["seconds"] for c in rs if c["kind"] == "call" and c["model"] == r["model"] and c["guided"]
               and c["batch"] == r.get("batch") and c.get("blocks") == r.get("blocks")
               and not c.get("channels_last") and not c.get("compile")]
        if ref and r["kind"] in ("ld3", "dsno"):
            r["call"] = statistics.median(ref)
            r["ratio"] = r["seconds"] / (r["call"] * (r["nfe"] if r["kind"] == "ld3" else 1))
    return rs


PLAN_KEYS = ("model", "kind", "blocks", "toy", "device", "guided", "batch", "repeats", "channels_last", "compile", "malloc",
             "nfe", "remat", "learn", "soft_forcing", "free", "n", "steps_per_pair", "num_times", "placement", "steps")


def tables(records: list[dict], machine: str, flops: dict) -> str:
    rs = latest(records)
    gib = 2**30
    lines = [f"Machine: {machine}. Times in seconds, memory in GiB above the process before the measured work "
             f"(weights loaded).", ""]
    if flops:
        lines += ["| model | TFLOPs a guided call (batch 1, full size) | measured guided call here | sustained |",
                  "|---|---|---|---|"]
        for name, (f, _) in flops.items():
            r = next((r for r in rs if r["model"] == name and r["kind"] == "call" and r["guided"] and r["batch"] == 1
                      and not r.get("blocks") and not r.get("channels_last") and not r.get("compile")), None)
            fit = flux_fit(rs) if name == "flux" else None
            sec = r["seconds"] if r else fit[3] if fit else None
            how = "–" if sec is None else f"{sec:.2f} s" + (" (fitted, projected depth)" if r is None else "")
            rate = "–" if sec is None else f"{f / sec / 1e12:.3f} TFLOP/s"
            lines.append(f"| {name} | {f / 1e12:.3f} | {how} | {rate} |")
        lines.append("")
    lines += ["| model | blocks | call | batch | seconds | peak GiB |", "|---|---|---|---|---|---|"]
    for r in rs:
        if r["kind"] == "call":
            how = "guided" if r["guided"] else "unguided"
            how += ", channels_last" if r.get("channels_last") else ", torch.compile" if r.get("compile") else ""
            lines.append(f"| {r['model']} | {blocks_label(r)} | {how} | {r['batch']} | {r['seconds']:.3f} | "
                         f"{r['peak'] / gib:.2f} |")
    flux = flux_fit(rs)
    if flux:
        lines += ["", "FLUX.1-dev width, one guided-distilled call at batch 1, fitted per block (seconds = a + "
                  f"double x d + single x s) and projected to {FULL_FLUX_BLOCKS[0]} + {FULL_FLUX_BLOCKS[1]} blocks: "
                  f"a {flux[0]:.2f}, d {flux[1]:.2f}, s {flux[2]:.2f}, full depth **{flux[3]:.1f} s** (projected)."]
    lines += ["", "LD3 steps (seconds: the second step where two ran, else the first; peak: the first step's resident "
              "set above the loaded teacher, the allocator's pool included):", "",
              "| model | LD3 step | NFE | batch | remat | seconds | x NFE calls | peak GiB |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rs if r["kind"] == "ld3" and not r.get("malloc")), key=lambda r: (r["model"], bool(r.get("free")),
                                                                           r.get("learn", ""), not r.get("soft_forcing", True),
                                                                           r["batch"], not r["remat"], r["nfe"])):
        how = "free network" if r.get("free") else "learned solver" if r.get("learn") == "solver" else "grid"
        how += ", no soft forcing" if r.get("soft_forcing") is False else ""
        lines.append(f"| {r['model']} | {how} | {r['nfe']} | {r['batch']} | {'on' if r['remat'] else 'off'} | "
                     f"{r['seconds']:.2f} | {r['ratio']:.2f} | {r.get('peak_first', r['peak']) / gib:.2f} |")
    unpooled = {(r["model"], r["nfe"]): r["peak"] for r in rs if r["kind"] == "ld3" and r.get("malloc")}
    if unpooled:
        lines += ["", "LD3 step memory with remat, batch 1 (the resident set above the loaded teacher with glibc's "
                  "pool off, MALLOC_MMAP_THRESHOLD_=65536: what the step holds live, not what the allocator keeps):",
                  "", "| model | NFE | peak GiB |", "|---|---|---|"]
        lines += [f"| {m} | {n} | {b / gib:.2f} |" for (m, n), b in sorted(unpooled.items())]
        for m in sorted({m for m, _ in unpooled}):
            nfes = sorted(n for mm, n in unpooled if mm == m)
            if len(nfes) > 1:
                lines.append(f"| {m} | NFE {nfes[-1]} / NFE {nfes[0]} | **{unpooled[m, nfes[-1]] / unpooled[m, nfes[0]]:.2f}** |")
    for r in (r for r in rs if r["kind"] == "pairs"):
        lines += ["", f"Pairs ({r['model']}): {r['calls']} teacher calls in generate(): {r['seconds']:.2f} s, the same "
                  f"raw calls {r['raw']:.2f} s: **{r['ratio']:.3f}** of raw throughput."]
    lines += ["", "| model | DSNO step | batch | seconds | x one call | peak GiB | student parameters |",
              "|---|---|---|---|---|---|---|"]
    for r in (r for r in rs if r["kind"] == "dsno"):
        how = f"M = {r['num_times']}" + ("" if r["num_times"] > 1 else " (plain one-step)")
        lines.append(f"| {r['model']} | {how} | {r['batch']} | {r['seconds']:.2f} | {r['ratio']:.2f} | "
                     f"{r['peak'] / gib:.2f} | {r['params'] / 1e6:.0f} M |")
    errors = [r["result"] for r in records if "error" in r["result"]]
    if errors:
        lines += ["", "Failed: " + "; ".join(summary(e) for e in errors)]
    return "\n".join(lines) + "\n"


def run_calls(settings: dict, nfe: int, ratio: float) -> dict:
    """Teacher calls (guided, batch 1 each) of one LD3 run with `settings` (AUTO_SETTINGS' keys), by stage: the
    pairs (UniPC-3 with `steps` steps and the final x0 call), the starting grids (5 hand grids on the validation
    pairs), training (epochs x train / batch steps of `ratio` x NFE calls a sample), the validations (and the
    sanity pass) and the report (the learned grid and 5 hand grids on the test pairs)."""
    from learnsteps.config import CONFIG_DIR
    from learnsteps.ld3.config import LD3Config

    ld3 = load_config(LD3Config, [CONFIG_DIR / "ld3.yaml"])
    p, epochs = settings["pairs"], ld3.rounds_theta + ld3.rounds_joint
    steps = epochs * p["train"] // settings["batch_size"]
    return dict(pairs=(p["train"] + p["val"] + p["test"]) * (p["steps"] + 1), starts=5 * p["val"] * nfe,
                training=steps * ratio * nfe * settings["batch_size"],
                validation=(steps // settings["val_every_n_steps"] + 1) * p["val"] * nfe, report=6 * p["test"] * nfe)


def planning(records: list[dict], flops: dict, tflops: float) -> str:
    """Projected LD3 runs on one GPU with the auto settings of each network's size: calls (run_calls, at the step
    ratio measured here for SD1.5) x one call's FLOPs (counted) / an assumed sustained throughput."""
    from learnsteps.ld3.config import AUTO_SETTINGS, size_of

    rs = latest(records)
    ratios = {r["nfe"]: r["ratio"] for r in rs if r["kind"] == "ld3" and r["model"] == "sd15" and r["remat"]
              and r["batch"] == 1 and not r.get("free") and r.get("learn", "grid") == "grid"
              and r.get("soft_forcing", True)}
    if not ratios:
        return ""
    nfe = 6
    ratio = ratios.get(nfe) or max(ratios.values())
    lines = [f"Projected LD3 runs on one GPU (configs/ld3.yaml, NFE {nfe}, the auto settings of the network's size; a "
             f"step = {ratio:.2f} x NFE calls as measured for SD1.5 here; one call = its counted FLOPs at an assumed "
             f"{tflops:.0f} TFLOP/s sustained; minutes):", "",
             "| model | size (auto settings) | one call | pairs | starts | training | validation | report | total |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, (f, params) in flops.items():
        call, size = f / (tflops * 1e12), size_of(params)
        calls = run_calls(AUTO_SETTINGS[size], nfe, ratio)
        cells = [f"{c * call / 60:.1f}" for c in calls.values()]
        lines.append(f"| {name} | {size} ({params / 1e9:.2f} B) | {call * 1000:.0f} ms | " + " | ".join(cells)
                     + f" | **{sum(calls.values()) * call / 60:.0f}** |")
    return "\n".join(lines) + "\n"


def blocks_label(r: dict) -> str:
    return f"{r['blocks'][0]} + {r['blocks'][1]}" if r.get("blocks") else "all"


def flux_fit(rs: list[dict]):
    """Least squares of one guided FLUX call's seconds in (1, double blocks, single blocks); None without 3 depths."""
    pts = [(r["blocks"], r["seconds"]) for r in rs if r["model"] == "flux" and r["kind"] == "call" and r["guided"]
           and r["batch"] == 1 and r.get("blocks") and not r.get("channels_last") and not r.get("compile")]
    if len({tuple(b) for b, _ in pts}) < 3:
        return None
    A = torch.tensor([[1.0, b[0], b[1]] for b, _ in pts], dtype=torch.float64)
    y = torch.tensor([s for _, s in pts], dtype=torch.float64)
    a, d, s = torch.linalg.lstsq(A, y[:, None]).solution[:, 0].tolist()
    return a, d, s, a + d * FULL_FLUX_BLOCKS[0] + s * FULL_FLUX_BLOCKS[1]


if __name__ == "__main__":
    main(sys.argv[1:])

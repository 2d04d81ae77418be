"""DSNO benchmark: one-pass students against the teacher's samplers, the M / temporal-layer / backbone / placement
ablations, the training curve, and cost.

    python benchmarks/dsno.py                                   # all of it (about an hour on 2 CPU cores)
    python benchmarks/dsno.py part=cost                         # cost per sample only
    python benchmarks/dsno.py part=cost_large                   # FLOPs of a DSNO pass on SDXL, SD3, FLUX (1024^2)
    python benchmarks/dsno.py part=summary                      # the tables (and cost) of a finished run
    python benchmarks/dsno.py teachers=[gmm_digits] steps=300   # a smaller run

train: `train.py mode=dsno` for every teacher x variant at the same budget (optimizer steps, batch, data, seed),
each exporting its EMA student every `curve_every` steps. Every variant of a teacher reads one trajectory set,
generated once at the largest M's output times (DSNO's quadratic times nest: M's times are among 2M's).
eval: `eval.py` on held-out noise (a seed the trajectories never used): every student, the baseline samplers at
1, 2, 4 and 8 NFE on several grids, LD3 schedules when given, the teacher (UniPC-3, 40 steps) and the FID floor.
curve: `eval.py` on every exported student (FID against the data and the teacher, paired RMSE, by step): a plot.
cost: forward FLOPs (torch.utils.flop_counter) and CPU time per sample of each student against one network
evaluation, one teacher call (a guided teacher's: 2 evaluations in one batch) and the best 4-NFE sampler, timed
interleaved in one process.
"""
from __future__ import annotations

import csv
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learnsteps.config import SolverChoice, load_config  # noqa: E402
from learnsteps.dsno.student import read_student_info  # noqa: E402
from learnsteps.files import write_json, write_text  # noqa: E402


@dataclass
class Variant:
    num_times: int = 4
    temporal: bool = True
    backbone: str = "auto"  # auto (the teacher's own network) | unet (a fresh UNet)
    placement: str = "every"
    loss: str = "l2"  # train.py mode=dsno's loss, e.g. l2+3*feature_contraction
    weighting: str = "snr"  # snr | uniform
    lr_schedule: str = "constant"  # constant | cosine
    lr: float = 2e-4

    @property
    def name(self) -> str:
        dsno = self.temporal and self.num_times > 1
        return ((f"dsno-M{self.num_times}" if dsno else f"one-step-M{self.num_times}")
                + ("-fresh-unet" if self.backbone == "unet" else "")
                + (f"-{self.placement}" if dsno and self.placement != "every" else "")
                + (f"-{self.loss.replace('+', '_').replace('*', 'x')}" if self.loss != "l2" else "")
                + (f"-{self.weighting}" if self.weighting != "snr" else "")
                + (f"-{self.lr_schedule}" if self.lr_schedule != "constant" else "")
                + (f"-lr{self.lr:g}" if self.lr != 2e-4 else ""))

    def args(self) -> list[str]:
        return [f"num_times={self.num_times}", f"temporal={str(self.temporal).lower()}", f"backbone={self.backbone}",
                f"placement={self.placement}", f"loss={self.loss}", f"weighting={self.weighting}",
                f"lr_schedule={self.lr_schedule}", f"lr={self.lr}"]


@dataclass
class Config:
    part: str = "all"  # all | train | eval | curve | cost | summary (cost + the tables of a finished run) | cost_large
    teachers: list[str] = field(default_factory=lambda: ["digits_unet", "gmm_digits"])
    variants: list[Variant] = field(default_factory=lambda: [Variant(8), Variant(4), Variant(2), Variant(1, False)])
    ablation_teachers: list[str] = field(default_factory=lambda: ["digits_unet"])  # the others: M = 4 and M = 1 only
    steps: int = 1500
    curve_every: int = 0  # > 0: each student exported every that many steps and scored (the training curve)
    curve_samples: int = 2000
    curve_name: str = "curve"  # the training curve's eval directory, <out_dir>/<teacher>/<curve_name>
    batch_size: int = 32
    trajectories: int = 4096
    solvers: list[SolverChoice] = field(default_factory=lambda: [
        SolverChoice("euler", 1), SolverChoice("dpm_solver++", 2), SolverChoice("unipc", 3, {"variant": "bh1"}),
        SolverChoice("ipndm", 4)])
    grids: list[str] = field(default_factory=lambda: ["time_uniform", "logsnr", "edm"])
    nfe: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    schedules: list[str] = field(default_factory=list)  # LD3 schedule files to compare with
    samples: int = 2000
    eval_seed: int = 7  # held-out noise: the trajectories use seed 0
    out_dir: str = "runs/bench_dsno"
    teacher_args: list[str] = field(default_factory=list)  # e.g. [guidance=2.0] for a conditional pipeline teacher


def variants_for(cfg: Config, teacher: str) -> list[Variant]:
    chosen = cfg.variants if teacher in cfg.ablation_teachers else [
        v for v in cfg.variants if (v.num_times, v.temporal) in ((4, True), (1, False))]
    return sorted(chosen, key=lambda v: -v.num_times)  # the largest M generates the shared trajectories


def run_logged(cmd: list[str], log: Path, what: str) -> None:
    """A subprocess whose output is kept in `log` (a benchmark's record of each run)."""
    print(" ".join(cmd[1:]), flush=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd[1:])}\n")
        f.flush()
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if res.returncode != 0:
        print(log.read_text()[-4000:])
        raise SystemExit(f"{what} failed (log: {log})")


def train(cfg: Config, out: Path) -> None:
    for teacher in cfg.teachers:
        for v in variants_for(cfg, teacher):
            run_dir = out / teacher / v.name
            done = run_dir / "student" / "student.json"
            if done.is_file() and read_student_info(done.parent)["training"]["steps"] >= cfg.steps:
                continue  # a shorter run is continued from its last checkpoint to `steps`
            cmd = [sys.executable, str(ROOT / "train.py"), "mode=dsno", f"teacher={teacher}", *v.args(),
                   f"run_dir={run_dir}", f"data_dir={out / teacher / 'trajectories'}",
                   f"trajectories.n={cfg.trajectories}", f"batch_size={cfg.batch_size}",
                   f"trainer.max_steps={cfg.steps}",
                   f"trainer.val_check_interval={min(250, cfg.steps)}", f"export_every={cfg.curve_every}",
                   "trainer.progress_bar=false", "wandb.mode=disabled", *cfg.teacher_args]
            run_dir.mkdir(parents=True, exist_ok=True)
            run_logged(cmd, out / teacher / f"{v.name}.log", f"dsno run {run_dir}")


def evaluate(cfg: Config, out: Path) -> None:
    from learnsteps.schedule import load_schedule

    for teacher in cfg.teachers:
        students = [str(out / teacher / v.name / "student") for v in variants_for(cfg, teacher)]
        cmd = [sys.executable, str(ROOT / "eval.py"), f"teachers=[{teacher}]", f"samples={cfg.samples}",
               f"seed={cfg.eval_seed}", f"nfe=[{','.join(map(str, cfg.nfe))}]", f"grids=[{','.join(cfg.grids)}]",
               f"students=[{','.join(students)}]", f"out_dir={out / teacher / 'eval'}", "wandb.mode=disabled",
               *cfg.teacher_args]
        cmd += [f"solvers=[{','.join(_solver_arg(s) for s in cfg.solvers)}]"]
        mine = [s for s in cfg.schedules if load_schedule(s).teacher.get("name") == teacher]
        if mine:
            cmd.append(f"schedules=[{','.join(mine)}]")
        run_logged(cmd, out / teacher / "eval.log", f"evaluation of {teacher}")


def curve(cfg: Config, out: Path) -> None:
    """eval.py on every exported student of every variant (no samplers), then FID and paired RMSE by step."""
    for teacher in cfg.teachers:
        points = sorted(p for v in variants_for(cfg, teacher) for p in (out / teacher / v.name / "curve").glob("step-*")
                        if int(p.name[5:]) <= cfg.steps)
        if not points:
            continue
        cmd = [sys.executable, str(ROOT / "eval.py"), f"teachers=[{teacher}]", f"samples={cfg.curve_samples}",
               f"seed={cfg.eval_seed}", "solvers=[]", "grids=[]", "nfe=[]", f"students=[{','.join(map(str, points))}]",
               f"out_dir={out / teacher / cfg.curve_name}", "wandb.mode=disabled", *cfg.teacher_args]
        run_logged(cmd, out / teacher / f"{cfg.curve_name}.log", f"training-curve evaluation of {teacher}")
        plot_curve(out / teacher / cfg.curve_name)


def plot_curve(directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from learnsteps.files import save_figure

    with open(directory / "results.csv") as f:
        rows = list(csv.DictReader(f))
    ref = next(r for r in rows if r["grid"] == "teacher")
    lines: dict[str, list] = {}
    for r in rows:
        hit = re.match(r"(?:(.*)/)?curve/step-(\d+)$", r["grid"])
        if hit:
            lines.setdefault((hit.group(1) or "student").rsplit("/", 1)[-1], []).append(
                (int(hit.group(2)), float(r["fid_data"]), float(r["fid_teacher"]), float(r["rmse_teacher"])))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, pts in sorted(lines.items()):
        pts.sort()
        for ax, k in zip(axes, (1, 2, 3)):
            ax.plot([p[0] for p in pts], [p[k] for p in pts], marker="o", label=name)
    axes[0].axhline(float(ref["fid_data"]), color="k", ls="--", lw=1, label="teacher")
    samplers = directory.parent / "eval" / "results.csv"  # the best 4-NFE sampler, once the evaluation has run
    if samplers.is_file():
        with open(samplers) as f:
            four = [r for r in csv.DictReader(f)
                    if r["nfe"] == "4" and not r["solver"].startswith(("dsno", "one-step"))]
        if four:
            best = min(four, key=lambda r: float(r["fid_data"]))
            axes[0].axhline(float(best["fid_data"]), color="grey", ls=":", lw=1,
                            label=f"best 4-NFE sampler ({best['solver']}, {best['grid']})")
    for ax, label in zip(axes, ("FID against the data", "FID against the teacher", "paired RMSE to the teacher")):
        ax.set(xlabel="training step", ylabel=label, yscale="log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, directory / "curve.png", dpi=110)
    plt.close(fig)


def _solver_arg(s: SolverChoice) -> str:
    opts = ", ".join(f"{k}: {v}" for k, v in s.options.items())
    return f"{{solver: {s.solver}, order: {s.order}" + (f", options: {{{opts}}}" if opts else "") + "}"


def flops_of(f, *args) -> float:
    """Forward FLOPs of f(*args) by torch.utils.flop_counter, with the temporal layers' complex matrix products
    counted as the 4 real multiply-adds each complex one is (the counter counts them as 1)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        f(*args)
    temporal = sum(sum(v.values()) for k, v in counter.get_flop_counts().items() if k.endswith("dsno_temporal"))
    return counter.get_total_flops() + 3 * temporal


def cost(cfg: Config, out: Path) -> list[dict]:
    """FLOPs and CPU time per sample: each student's one pass against one network evaluation, one teacher call (a
    guided teacher's is 2 evaluations in one batch) and the 4-NFE sampler (DPM-Solver++(2M), 4 teacher calls),
    timed interleaved in one process (median of 7)."""
    import torch
    import yaml

    import learnsteps as ls
    from learnsteps.core.denoiser import NetworkDenoiser, dtype_of
    from learnsteps.core.sample import steps_for_nfe
    from learnsteps.dsno.student import load_student
    from learnsteps.teachers import load_teacher
    from learnsteps.trajectories import conditions_of

    rows = []
    for teacher_name in cfg.teachers:
        args = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in cfg.teacher_args)}
        teacher = load_teacher(teacher_name, **args)
        n = 256
        cond_all = conditions_of(teacher, torch.arange(n))
        s = teacher.noise_schedule
        t = torch.tensor(0.5 * (s.t_max + s.t_min), dtype=dtype_of(teacher))
        grid = ls.grids.make("shifted" if s.kind == "flow" else "logsnr", steps_for_nfe("dpm_solver++", 4, True), s,
                             to_zero=True)
        guided = getattr(teacher, "guidance", 1.0) != 1.0

        def net(x, c):  # one network evaluation: the teacher's unguided call
            return NetworkDenoiser.forward(teacher, x, t, c) if hasattr(teacher, "net") else teacher(x, t, c)
        models = {"network evaluation": net,
                  f"teacher call{' (guided: 2 evaluations)' if guided else ''}": lambda x, c: teacher(x, t, c),
                  "4-NFE sampler (DPM-Solver++(2M))": lambda x, c: ls.sample(teacher, x, grid, "dpm_solver++", 2,
                                                                              cond=c)}
        for v in variants_for(cfg, teacher_name):
            directory = out / teacher_name / v.name / "student"
            if directory.is_dir():
                models[v.name] = load_student(directory, teacher).sample
        x = torch.randn(n, *teacher.shape)
        dtype = lambda name: torch.float32 if name.startswith(("dsno", "one-step")) else dtype_of(teacher)  # noqa
        flops, seconds = {}, {k: [] for k in models}
        for name, f in models.items():
            flops[name] = flops_of(f, x[:1].to(dtype(name)), None if cond_all is None else cond_all[:1])
        for _ in range(7):
            for name, f in models.items():
                xin = x.to(dtype(name))
                t0 = time.perf_counter()
                with torch.no_grad():
                    f(xin, cond_all)
                seconds[name].append((time.perf_counter() - t0) / n)
        base = sorted(seconds["network evaluation"])[3]
        for name in models:
            med = sorted(seconds[name])[3]
            rows.append(dict(teacher=teacher_name, model=name, mflops=flops[name] / 1e6,
                             flops_vs_evaluation=flops[name] / flops["network evaluation"], us_per_sample=med * 1e6,
                             time_vs_evaluation=med / base))
            print(rows[-1], flush=True)
    return rows


LARGE = {  # published configurations (the hub's config.json of each), called at 1024 x 1024 with batch 1
    "SDXL UNet (CFG)": ("UNet2DConditionModel", dict(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280], layers_per_block=2,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        transformer_layers_per_block=[1, 2, 10],
        attention_head_dim=[5, 10, 20], cross_attention_dim=2048, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, use_linear_projection=True), 2),
    "SD3-medium transformer (CFG)": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192), 2),
    "FLUX.1-dev transformer (guidance-distilled)": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=[16, 56, 56]), 1)}


def _large_inputs(cls: str) -> dict:
    import torch

    z = lambda *shape: torch.zeros(*shape, device="meta")  # noqa: E731
    if cls == "UNet2DConditionModel":
        return dict(sample=z(1, 4, 128, 128), timestep=z(1), encoder_hidden_states=z(1, 77, 2048),
                    added_cond_kwargs=dict(text_embeds=z(1, 1280), time_ids=z(1, 6)))
    if cls == "SD3Transformer2DModel":
        return dict(hidden_states=z(1, 16, 128, 128), timestep=z(1), encoder_hidden_states=z(1, 333, 4096),
                    pooled_projections=z(1, 2048))
    return dict(hidden_states=z(1, 4096, 64), timestep=z(1), guidance=z(1), encoder_hidden_states=z(1, 512, 4096),
                pooled_projections=z(1, 768), img_ids=torch.zeros(4096, 3), txt_ids=torch.zeros(512, 3))


def cost_large(out: Path) -> str:
    """What a DSNO pass costs on large backbones, counted on the real architectures on the meta device (no weights):
    one network evaluation's FLOPs (torch.utils.flop_counter), and for M = 2, 3, 4 and each placement the student's
    pass, M evaluations plus its temporal layers' channel mixing (8 J C^2 real FLOPs per position per sample per
    layer; the FFTs over M are O(M log M) per channel and left out), against the 4-NFE sampler's 4 calls (2
    evaluations each under CFG)."""
    import diffusers
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from learnsteps.dsno.backbones import hidden_of, place, sites

    lines = ["| backbone (1024 x 1024) | one evaluation (TFLOPs) | M | placement | temporal layers | parameters added "
             "(M) | student pass / one evaluation | student pass / 4-NFE sampler |",
             "|---|---|---|---|---|---|---|---|"]
    for label, (cls, config, per_call) in LARGE.items():
        with torch.device("meta"):
            net = getattr(diffusers, cls)(**config)
        kind, levels = sites(net)
        shapes, handles = {}, []
        for name in place(levels, "every"):
            def record(module, args, output, name=name):
                h = hidden_of(output)[0]
                c = h.shape[-1] if h.dim() == 3 else h.shape[1]
                shapes[name] = (int(c), h.numel() // (h.shape[0] * c))
            handles.append(net.get_submodule(name).register_forward_hook(record))
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(**_large_inputs(cls))
        for h in handles:
            h.remove()
        evaluation, params = counter.get_total_flops(), sum(p.numel() for p in net.parameters())
        for m in (2, 3, 4):
            j = min(2, m // 2 + 1)
            for placement in ("every", "every_other", "one_per_level"):
                chosen = place(levels, placement)
                temporal = sum(8 * j * shapes[n][0] ** 2 * shapes[n][1] for n in chosen)
                added = sum(2 * j * shapes[n][0] ** 2 for n in chosen)
                student = m * evaluation + temporal
                lines.append(f"| {label} | {evaluation / 1e12:.1f} | {m} | {placement} | {len(chosen)} | "
                             f"{added / 1e6:.0f} ({100 * added / params:.1f} %) | {student / evaluation:.2f} | "
                             f"{student / (4 * per_call * evaluation):.2f} |")
        print("\n".join(lines[-9:]), flush=True)
    text = "\n".join(lines) + "\n"
    write_text(out / "cost_large.md", text)
    return text


def summary(cfg: Config, out: Path, cost_rows: list[dict]) -> str:
    lines = []
    for teacher in cfg.teachers:
        with open(out / teacher / "eval" / "results.csv") as f:
            rows = [dict(r, nfe=int(r["nfe"]), **{k: float(r[k]) for k in ("fid_data", "fid_teacher", "rmse_teacher")})
                    for r in csv.DictReader(f)]
        ref = next(r for r in rows if r["grid"] == "teacher")
        floor = next(r for r in rows if r["grid"].startswith("floor"))
        students = [dict(r, name=r["grid"].split("/")[0]) for r in rows if r["solver"].startswith(("dsno", "one-step"))]
        named = {x["grid"] for x in students}
        samplers = [r for r in rows if r["grid"] not in named and r is not ref and r is not floor]
        acc = lambda r: f"{float(r['class_acc']):.3f}" if r.get("class_acc", "nan") != "nan" else "–"  # noqa: E731
        lines += [f"**{teacher}** ({cfg.samples} samples; teacher = {ref['solver']}, {ref['nfe']} steps: FID against "
                  f"the data {ref['fid_data']:.2f}, class accuracy {acc(ref)}; floor, teacher against teacher on other "
                  f"noise: FID against the data {floor['fid_data']:.2f}, against the teacher "
                  f"{floor['fid_teacher']:.2f})", "",
                  "| sampler | NFE | FID (data) | FID (teacher) | RMSE to teacher | class accuracy | FID / teacher's |",
                  "|---|---|---|---|---|---|---|"]
        for nfe in sorted({r["nfe"] for r in samplers}):
            here = [r for r in samplers if r["nfe"] == nfe]
            for label, best in (("best by FID", min(here, key=lambda r: r["fid_data"])),
                                ("best by RMSE", min(here, key=lambda r: r["rmse_teacher"]))):
                lines.append(f"| {label}: {best['solver']} {best['grid']} | {nfe} | {best['fid_data']:.2f} | "
                             f"{best['fid_teacher']:.2f} | {best['rmse_teacher']:.4f} | {acc(best)} | "
                             f"{best['fid_data'] / ref['fid_data']:.2f} |")
        for r in students:
            lines.append(f"| **{r['name']}** (one pass) | 1 | {r['fid_data']:.2f} | {r['fid_teacher']:.2f} | "
                         f"{r['rmse_teacher']:.4f} | {acc(r)} | {r['fid_data'] / ref['fid_data']:.2f} |")
        plain = next((r for r in students if r["name"] == "one-step-M1"), None)
        best4 = min((r for r in samplers if r["nfe"] == 4), key=lambda r: r["fid_data"], default=None)
        for r in students:
            if r is plain or plain is None:
                continue
            lines.append(f"\n{r['name']}: RMSE / one-step-M1 = {r['rmse_teacher'] / plain['rmse_teacher']:.2f}; "
                         f"FID / teacher = {r['fid_data'] / ref['fid_data']:.2f}"
                         + (f"; FID / best 4-NFE sampler = {r['fid_data'] / best4['fid_data']:.2f}" if best4 else ""))
        lines.append("")
        for v in variants_for(cfg, teacher):
            info = read_student_info(out / teacher / v.name / "student")["training"]
            took = f" in {info['seconds']:.0f} s" if "seconds" in info else ""  # a curve export has no time
            val = info.get("validation", {})
            gap = (f"; validation loss on held-out / on seen trajectories {val['val/loss'] / val['val/loss_seen']:.2f}x"
                   if val.get("val/loss_seen") and "val/loss" in val else "")  # students before the seen loss: none
            lines.append(f"- {v.name}: {info['steps']} steps{took}{gap}")
        lines.append("")
    if cost_rows:
        lines += ["| teacher | model | MFLOPs per sample | FLOPs / one network evaluation | CPU us per sample | "
                  "time / one network evaluation |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['teacher']} | {r['model']} | {r['mflops']:.2f} | {r['flops_vs_evaluation']:.2f} | "
                  f"{r['us_per_sample']:.0f} | {r['time_vs_evaluation']:.2f} |" for r in cost_rows]
    text = "\n".join(lines) + "\n"
    write_text(out / "summary.md", text)
    return text


PARTS = ("all", "train", "eval", "curve", "cost", "summary", "cost_large")


def main(argv):
    cfg = load_config(Config, [], argv)
    if cfg.part not in PARTS:  # before anything is created
        raise SystemExit(f"part={cfg.part}: one of {', '.join(PARTS)}")
    out = ROOT / cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", dict(argv=argv))
    if cfg.part in ("all", "train"):
        train(cfg, out)
    if cfg.part in ("all", "eval"):
        evaluate(cfg, out)
    if cfg.part in ("all", "curve"):
        curve(cfg, out)
    if cfg.part == "cost_large":
        print(cost_large(out))
    cost_rows = cost(cfg, out) if cfg.part in ("all", "cost", "summary") else []
    if cfg.part in ("all", "eval", "summary"):
        print(summary(cfg, out, cost_rows))


if __name__ == "__main__":
    main(sys.argv[1:])

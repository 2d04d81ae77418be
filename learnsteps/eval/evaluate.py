"""`python eval.py`: FID and KID for teacher x solver x grid (baselines and learned schedule files) x NFE.

Every entry samples from the same seed bank, so differences between rows are the samplers', not the noise's.
Each row is scored against the data and against the teacher's own high-accuracy samples; the teacher row and
the floor row (the teacher against itself on independent noise: the estimator's noise level at this sample
count) let every number be read in context.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from tqdm import tqdm

from ..config import SolverChoice, TeacherOptions, at_least, between, each, not_a_file, one_of
from ..core.denoiser import device_of, dtype_of
from ..core.grids import applicable, make as make_grid
from ..core.sample import check_options, check_order, solve_in_batches, start_time, steps_for_nfe
from ..dsno.student import load_student, read_student_info
from ..files import save_figure, write_csv, write_text
from ..core.schedules import make_schedule
from ..schedule import check_fits, load_schedule
from ..teachers import load_teacher
from ..teachers.network import made_for
from ..trajectories import conditions_of, sample_noise
from ..training.common import WandbConfig
from ..quality.metrics import EXTRACTORS, Features, fid_kid, pixels, reference_features

GRID_KINDS = ("time_uniform", "time_quadratic", "logsnr", "edm", "shifted")  # the hand grids eval.py compares


@dataclass
class EvalConfig(TeacherOptions):
    # with TeacherOptions (conditions, guidance, height, width, teacher_dtype, ...), the same for every teacher; a
    # conditional teacher's sample j takes condition j mod K, so every row is scored over the same condition set
    teachers: list[str] = field(default_factory=lambda: ["digits_unet"])
    solvers: list[SolverChoice] = field(default_factory=lambda: [
        SolverChoice("dpm_solver++", 3), SolverChoice("unipc", 3, {"variant": "bh1"}), SolverChoice("ipndm", 4)])
    grids: list[str] = field(default_factory=lambda: ["time_uniform", "time_quadratic", "logsnr", "edm"])
    schedules: list[str] = field(default_factory=list)  # schedule files, each run with its own solver and NFE
    students: list[str] = field(default_factory=list)  # DSNO one-step checkpoints (directories)
    nfe: list[int] = field(default_factory=lambda: [4, 6, 8, 10])
    to_zero: bool = True
    samples: int = 2000
    seed: int = 0
    batch_size: int = 500
    reference: str = "digits"  # the data FID is against: digits | none | a folder of your images
    feature_extractor: str = "digits"  # digits | inception
    feature_weights: str = ""
    teacher_solver: SolverChoice = field(default_factory=lambda: SolverChoice("unipc", 3))
    teacher_steps: int = 40
    out_dir: str = "runs/eval"
    device: str = "auto"  # where the teachers sample: auto (a GPU if there is one) | cpu | cuda | cuda:1 | mps
    wandb: WandbConfig = field(default_factory=lambda: WandbConfig(mode="disabled"))
    command: str = ""
    RULES: ClassVar = dict(
        teachers=each(lambda v: None if v else "must name a teacher", non_empty=True),
        grids=each(one_of(*GRID_KINDS)), nfe=each(between(1, 200)),
        samples=between(2, 10**6), batch_size=at_least(1),
        reference=lambda v: None if v in ("digits", "none") or Path(str(v)).is_dir()
        else "must be digits, none or a folder of your images",
        **TeacherOptions.RULES,
        feature_extractor=one_of(*EXTRACTORS), teacher_steps=between(1, 10_000), out_dir=not_a_file,
        device=lambda v: None if v == "auto" or v == "cpu" or v == "mps" or str(v).split(":")[0] == "cuda"
        else "must be auto, cpu, cuda, cuda:<index> or mps")


def sample_in_batches(teacher, x_T, grid, solver, order, batch_size, eval_grid=None, cond=None, **options):
    """Samples in batches, as images: a latent teacher's are decoded by its VAE."""
    return solve_in_batches(teacher, x_T, batch_size, cond, grid=grid, solver=solver, order=order,
                            eval_grid=eval_grid, then=lambda x: pixels(teacher, x).float().cpu(), **options)



def entries(cfg: EvalConfig, teacher):
    """(label, solver, order, options, nfe, grid, eval_grid) for every requested combination."""
    s = teacher.noise_schedule
    for case in cfg.solvers:
        for kind in applicable(cfg.grids, s):
            for nfe in cfg.nfe:
                steps = steps_for_nfe(case.solver, nfe, cfg.to_zero)
                if steps < case.order and case.solver not in ("euler", "heun"):
                    print(f"note: {case.solver} order {case.order} needs {case.order} steps, NFE {nfe} gives {steps}: "
                          f"that cell is left out")
                    continue
                # a solver that cannot start where alpha = 0 (a flow teacher's t_max = 1) starts at t_cap
                start = start_time(s, case.solver, case.options)
                yield kind, case, nfe, make_grid(kind, steps, s, to_zero=cfg.to_zero, t_max=start), None
    labels = short_labels(cfg.schedules)
    for path in cfg.schedules:
        sched = load_schedule(path)
        if made_for(teacher, sched.teacher.get("fingerprint")):
            yield labels[path], SolverChoice(sched.solver, sched.order, sched.solver_options), sched.nfe, sched.grid, \
                sched.eval_grid


def short_labels(paths: list[str]) -> dict[str, str]:
    """Each path's shortest tail of at least two parts that tells it apart from the others (ld3/nfe4/schedule.json
    and ld3-bare/nfe4/schedule.json get those, not two nfe4/schedule.json)."""
    parts = {p: Path(p).parts for p in paths}
    for k in range(2, max((len(v) for v in parts.values()), default=2) + 1):
        labels = {p: "/".join(v[-k:]) for p, v in parts.items()}
        if len(set(labels.values())) == len(labels):
            return labels
    return {p: str(p) for p in paths}


def evaluate(cfg: EvalConfig) -> list[dict]:
    # Everything that can be wrong with the input is found here, before any sampling and before out_dir exists.
    for case in [*cfg.solvers, cfg.teacher_solver]:
        check_order(case.solver, case.order)
        check_options(case.solver, case.options)
        if case.solver == "tabulated":  # its table belongs to one grid of one NFE
            raise ValueError("solvers: tabulated runs a schedule file's own table; give the file as schedules=[...]")
    features = Features(cfg.feature_extractor, cfg.feature_weights or None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else \
        torch.device(cfg.device)
    teachers = {name: load_teacher(name, **cfg.teacher_options()).to(device) for name in cfg.teachers}
    students = {name: {} for name in teachers}  # each teacher's students, loaded (and checked) now
    for kind, paths in (("schedule", cfg.schedules), ("student", cfg.students)):
        for path in paths:
            made = load_schedule(path) if kind == "schedule" else read_student_info(path)
            info = made.teacher if kind == "schedule" else made["teacher"]
            fits = [t for t in teachers.values() if made_for(t, info.get("fingerprint"))]
            if not fits:
                raise ValueError(f"{path} was made for another teacher ({info.get('name') or info.get('fingerprint')}) "
                                 f"than {', '.join(cfg.teachers)}")
            for t in fits:  # the right teacher, but are the times in its units?
                if kind == "schedule":
                    check_fits(made, t.noise_schedule, path)
                elif "noise_schedule" in made and make_schedule(**made["noise_schedule"]).config() != \
                        t.noise_schedule.config():
                    raise ValueError(f"{path}: made for the noise schedule {made.get('noise_schedule')}, not the "
                                     f"teacher's {t.noise_schedule.config()}")
                if kind == "student":
                    students[next(n for n, u in teachers.items() if u is t)][path] = load_student(path, t)
    for name, teacher in teachers.items():
        zero = torch.zeros(1, *teacher.shape, dtype=dtype_of(teacher), device=device_of(teacher))
        images = tuple(pixels(teacher, zero).shape[1:])
        if cfg.feature_extractor == "digits" and images != (1, 8, 8):
            raise ValueError(f"feature_extractor=digits reads 1x8x8 images; {name}'s are {'x'.join(map(str, images))}: "
                             f"use feature_extractor=inception")
    plans = {name: list(entries(cfg, teacher)) for name, teacher in teachers.items()}
    ref = reference_features(cfg.reference, features, images) if cfg.reference != "none" else None
    rows, samples_for_png, teacher_png = [], {}, None
    for name, teacher in teachers.items():
        tag = f"{name}: " if len(teachers) > 1 else ""
        new_rows, new_samples, first = evaluate_teacher(cfg, name, teacher, plans[name], features, ref,
                                                        students[name])
        rows += new_rows
        samples_for_png.update({(s, tag + g, n): v for (s, g, n), v in new_samples.items()})
        teacher_png = first if teacher_png is None else teacher_png
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(cfg, rows, samples_for_png, teacher_png, out)
    return rows


def evaluate_teacher(cfg: EvalConfig, name: str, teacher, plan: list, features: Features, ref, students: dict):
    shape, std = teacher.shape, teacher.noise_schedule.init_noise_std()
    x_T = sample_noise(range(cfg.samples), shape, cfg.seed, std).to(dtype_of(teacher))
    x_T2 = sample_noise(range(cfg.samples), shape, cfg.seed + 1, std).to(dtype_of(teacher))  # for the floor
    cond = conditions_of(teacher, torch.arange(cfg.samples))  # the same condition set for every row
    tgrid = make_grid("logsnr", cfg.teacher_steps, teacher.noise_schedule, to_zero=cfg.to_zero,
                      t_max=start_time(teacher.noise_schedule, cfg.teacher_solver.solver, cfg.teacher_solver.options))
    ts = cfg.teacher_solver
    teacher_samples = sample_in_batches(teacher, x_T, tgrid, ts.solver, ts.order, cfg.batch_size, cond=cond,
                                        **ts.options)
    teacher_f = features(teacher_samples)
    floor = sample_in_batches(teacher, x_T2, tgrid, ts.solver, ts.order, cfg.batch_size, cond=cond, **ts.options)
    rows, samples_for_png = [], {}
    nan = dict(fid=float("nan"), kid=float("nan"), precision=float("nan"), recall=float("nan"))
    accuracy = class_accuracy(teacher, cond)

    def row(label, solver, nfe, images, paired=float("nan")):
        f = features(images)
        vs_data, vs_teacher = fid_kid(f, ref) if ref is not None else nan, fid_kid(f, teacher_f)
        rows.append(dict(teacher=name, solver=solver, grid=label, nfe=nfe, fid_data=vs_data["fid"],
                         kid_data=vs_data["kid"], precision=vs_data["precision"], recall=vs_data["recall"],
                         fid_teacher=vs_teacher["fid"], kid_teacher=vs_teacher["kid"], rmse_teacher=paired,
                         class_acc=accuracy(images)))

    row("teacher", f"{ts.solver}-{ts.order}", cfg.teacher_steps, teacher_samples, 0.0)
    row("floor (teacher, other noise)", f"{ts.solver}-{ts.order}", cfg.teacher_steps, floor)
    for label, case, nfe, grid, eval_grid in tqdm(plan, desc=f"eval {name}", unit="entry"):
        x = sample_in_batches(teacher, x_T, grid, case.solver, case.order, cfg.batch_size, eval_grid, cond,
                              **case.options)
        row(label, f"{case.solver}-{case.order}", nfe, x, float((x - teacher_samples).pow(2).mean().sqrt()))
        samples_for_png[(f"{case.solver}-{case.order}", label, nfe)] = x[:16]
    student_labels = short_labels(cfg.students)
    for directory, student in students.items():
        x = student_images(student, teacher, x_T, cond, cfg.batch_size)
        temporal = student.cfg.temporal and student.num_times > 1
        solver = f"dsno-M{student.num_times}" if temporal else f"one-step-M{student.num_times}"
        row(student_labels[directory], solver, 1, x, float((x - teacher_samples).pow(2).mean().sqrt()))
        samples_for_png[(solver, student_labels[directory], 1)] = x[:16]
    return rows, samples_for_png, teacher_samples[:16]


def student_images(student, teacher, x_T, cond, batch_size: int):
    """A DSNO student's samples (one pass each) from x_T, as images (a latent teacher's VAE decodes them)."""
    with torch.no_grad():
        device = device_of(teacher)
        student.to(device)
        return torch.cat([pixels(teacher, student.sample(
            x_T[b: b + batch_size].float().to(device), None if cond is None else cond[b: b + batch_size].to(device)))
            .float().cpu() for b in range(0, len(x_T), batch_size)])


def class_accuracy(teacher, cond):
    """For a class-conditional teacher of digits (1x8x8 images whose conditions are digit labels 0-9): a function
    images -> the fraction the shipped digits classifier assigns to their condition's class; else NaN."""
    labels = teacher.class_ids(cond) if cond is not None and hasattr(teacher, "class_ids") else None
    if labels is None or not bool(((labels >= 0) & (labels <= 9)).all()):
        return lambda images: float("nan")
    from ..quality.features import load_feature_net

    classifier = load_feature_net()

    def accuracy(images):
        if tuple(images.shape[1:]) != (1, 8, 8):
            return float("nan")
        with torch.no_grad():
            return float((classifier(images.float())[1].argmax(1) == labels).float().mean())
    return accuracy


def write_outputs(cfg: EvalConfig, rows, samples, teacher_samples, out: Path) -> None:
    write_csv(out / "results.csv", rows)
    acc = any(r["class_acc"] == r["class_acc"] for r in rows)  # a class-conditional digits teacher: one column more
    lines = [f"{cfg.samples} samples per row, features: {cfg.feature_extractor}; FID/KID against the data "
             f"({cfg.reference}) and against the teacher's {cfg.teacher_solver.solver}-{cfg.teacher_steps} samples; "
             "rmse_teacher: paired RMSE to the teacher's sample from the same noise.", "",
             "| teacher | solver | grid | NFE | FID (data) | KID (data) | precision | recall | FID (teacher) "
             "| KID (teacher) | RMSE (teacher) |" + (" class accuracy |" if acc else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if acc else "")]
    lines += [f"| {r['teacher']} | {r['solver']} | {r['grid']} | {r['nfe']} | {r['fid_data']:.3f} | {r['kid_data']:.4f} | "
              f"{r['precision']:.3f} | {r['recall']:.3f} | {r['fid_teacher']:.3f} | {r['kid_teacher']:.4f} | "
              f"{r['rmse_teacher']:.4f} |" + (f" {r['class_acc']:.3f} |" if acc else "") for r in rows]
    write_text(out / "results.md", "\n".join(lines) + "\n")
    plot_fid(rows, out / "fid_vs_nfe.png")
    if teacher_samples.dim() in (4, 5):  # images, or videos (a row of frames each)
        from ..quality.images import save_image_grid

        for nfe in sorted({k[2] for k in samples}):
            keys = [k for k in samples if k[2] == nfe]
            save_image_grid(torch.cat([teacher_samples] + [samples[k] for k in keys]), out / f"samples_nfe{nfe}.png",
                            nrow=16)
    print("\n".join(lines))
    _log_wandb(cfg, rows, out)


def plot_fid(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher = next(r for r in rows if r["grid"] == "teacher")
    floor = next(r for r in rows if r["grid"].startswith("floor"))
    several = len({r["teacher"] for r in rows}) > 1
    body = [dict(r, grid=f"{r['teacher']}: {r['grid']}" if several else r["grid"]) for r in rows
            if r["grid"] != "teacher" and not r["grid"].startswith("floor")]
    solvers = sorted({r["solver"] for r in body})
    key = "fid_data" if teacher["fid_data"] == teacher["fid_data"] else "fid_teacher"  # reference=none: no data
    fig, axes = plt.subplots(1, max(1, len(solvers)), figsize=(4.8 * max(1, len(solvers)), 4), squeeze=False)
    for ax, solver in zip(axes[0], solvers):
        for grid in sorted({r["grid"] for r in body if r["solver"] == solver}):
            pts = sorted((r["nfe"], r[key]) for r in body if r["solver"] == solver and r["grid"] == grid)
            ax.plot(*zip(*pts), marker="o", label=grid, lw=2.5 if grid.endswith(".json") else 1.2)
        if key == "fid_data":
            ax.axhline(teacher[key], color="k", ls="--", lw=1, label=f"teacher ({teacher['teacher']})")
        ax.axhline(floor[key], color="grey", ls=":", lw=1, label="floor")
        ax.set(title=solver, xlabel="NFE", ylabel="FID against the " + ("data" if key == "fid_data" else "teacher"),
               yscale="log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def _log_wandb(cfg: EvalConfig, rows, out: Path) -> None:
    import os

    mode = os.environ.get("WANDB_MODE", cfg.wandb.mode)
    if mode == "disabled":
        return
    import wandb

    os.environ.setdefault("WANDB_DIR", str(out.resolve()))
    run = wandb.init(project=cfg.wandb.project, name=cfg.wandb.name or "eval", mode=mode, dir=str(out),
                     config=dict(teachers=cfg.teachers, samples=cfg.samples, nfe=cfg.nfe))
    run.log({"results": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows]),
             "fid_vs_nfe": wandb.Image(str(out / "fid_vs_nfe.png"))})
    for png in sorted(out.glob("samples_nfe*.png")):
        run.log({png.stem: wandb.Image(str(png))})
    run.finish()


"""What an LD3 run reports: the learned schedule against every hand grid on held-out pairs (RMSE to the teacher;
FID against the teacher's samples and the data for digits teachers), the grid plot, the sample pictures, W&B."""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from ..core.denoiser import device_of
from ..core.grids import applicable
from ..core.sample import solve_in_batches, steps_for_nfe
from ..files import save_figure
from .config import LD3Config, baseline_grid
from .module import LD3, condition


def evaluate_grids(cfg: LD3Config, teacher, learned: dict, test: TensorDataset) -> list[dict]:
    """On the held-out pairs, for the learned run (`solve` keywords: grid, eval_grid, solver, order, options) and
    every baseline grid with the configured solver (same NFE): RMSE to the teacher and, for digits teachers (1x8x8
    images, a latent teacher's decoded), FID against the teacher's samples and against the data, with precision and
    recall against the data (diversity: a sampler that pulls its samples together loses recall). The last row is
    the teacher itself (its reference samples of the pairs): the FID against the data a sampler matching the
    teacher exactly would have. `<metric>_vs_best` is each row's metric over the best hand grid's."""
    from ..quality.metrics import Features, fid_features, pixels, precision_recall, reference_features

    _, x_T, target, cond = (v.to(device_of(teacher)) for v in test.tensors)
    steps = steps_for_nfe(cfg.solver, cfg.nfe, cfg.to_zero)
    runs = {"ld3 (learned)" if learned["solver"] != "tabulated" else "ld3 (learned solver)": learned}
    for kind in applicable(cfg.baselines, teacher.noise_schedule):
        runs[kind] = dict(grid=baseline_grid(cfg, teacher, kind, steps), solver=cfg.solver, order=cfg.order,
                          **cfg.options)
    with torch.no_grad():  # a latent teacher's decoded by its VAE (one first: only digits images are scored)
        digits = tuple(pixels(teacher, target[:1]).shape[1:]) == (1, 8, 8) and len(target) >= 2
        images = pixels(teacher, target) if digits else None
    if digits:
        features = Features("digits")
        f_teacher, f_data = features(images.float()), reference_features("digits", features)

    def judged(out, f):
        row = dict(rmse=float((out - target).pow(2).mean().sqrt()))
        if digits:
            row.update(fid_teacher=fid_features(f, f_teacher), fid_data=fid_features(f, f_data),
                       **precision_recall(f, f_data))
        return row

    rows = []
    for name, run in runs.items():
        out = solve_in_batches(teacher, x_T, cfg.pairs.batch_size, condition(cond), **run)
        with torch.no_grad():
            rows.append(dict(grid=name, **judged(out, features(pixels(teacher, out).float()) if digits else None)))
    if digits:
        rows.append(dict(grid="teacher", **judged(target, f_teacher)))
    hand = [r for r in rows[1:] if r["grid"] != "teacher"]
    for key in ("rmse", "fid_teacher", "fid_data"):
        if key in rows[0]:
            best = min(r[key] for r in hand) if hand else math.nan
            for r in rows:
                r[f"{key}_vs_best"] = r[key] / best
    return rows


def plot_grids(cfg: LD3Config, teacher, learned: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = teacher.noise_schedule
    steps = steps_for_nfe(cfg.solver, cfg.nfe, cfg.to_zero)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    n_finite = steps if cfg.to_zero else steps + 1
    for kind in applicable(cfg.baselines, teacher.noise_schedule):
        g = baseline_grid(cfg, teacher, kind, steps)[:n_finite]
        ax.plot(range(n_finite), s.lambda_(g), marker=".", alpha=0.6, label=kind)
    t, t_eval = learned["grid"], learned["eval_grid"]
    ax.plot(range(n_finite), s.lambda_(t[:n_finite]), marker="o", color="k", lw=2, label="LD3 (integration)")
    if cfg.decoupled:
        ax.plot(range(n_finite), s.lambda_(t_eval[:n_finite]), marker="x", ls="--", color="crimson",
                label="LD3 (model evaluation)")
    ax.set(xlabel="step", ylabel="log-SNR lambda", title=f"{cfg.solver} order {cfg.order}, NFE {cfg.nfe}"
           + (" (+ final step to sigma = 0)" if cfg.to_zero else "") + (", learned solver" if cfg.learn == "solver" else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def results_table(cfg: LD3Config, rows: list[dict], n: int) -> list[str]:
    """The held-out comparison as markdown lines: each metric and its ratio to the best baseline grid."""
    fid = "fid_teacher" in rows[0]
    lines = [f"{cfg.solver} order {cfg.order}, NFE {cfg.nfe}, on {n} held-out teacher pairs: RMSE to the teacher"
             + ("; FID (digits features) against the teacher's samples and against the data, precision and recall "
                "against the data; the last row is the teacher's own samples" if fid else ""),
             "| grid | RMSE | / best baseline |" + (" FID (teacher) | / best | FID (data) | / best | precision | "
                                                    "recall |" if fid else ""),
             "|---|---|---|" + ("---|---|---|---|---|---|" if fid else "")]
    for r in rows:
        cells = [r["grid"], f"{r['rmse']:.4g}", f"{r['rmse_vs_best']:.3f}"]
        if fid:
            # (the teacher's FID against its own samples is 0 up to the matrix square root's rounding: no "-0.00")
            cells += [f"{max(r['fid_teacher'], 0.0):.2f}", f"{max(r['fid_teacher_vs_best'], 0.0):.3f}",
                      f"{r['fid_data']:.2f}", f"{r['fid_data_vs_best']:.3f}", f"{r['precision']:.3f}",
                      f"{r['recall']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def log_outputs(logger, run_dir: Path, module: LD3, teacher, test, learned, rows) -> None:
    from ..quality.images import save_image_grid

    _, x_T, target, cond = (v.to(device_of(teacher)) for v in test.tensors)
    n = min(32 if x_T.dim() == 4 else 8, len(x_T))  # videos: 8 clips, a row of frames each
    decode = getattr(teacher, "decode", None)  # a latent teacher: the VAE's images, decoded only here
    bs = module.cfg.pairs.batch_size
    student = solve_in_batches(teacher, x_T[:n], bs, condition(cond[:n]), then=decode, **learned)
    if decode is not None:
        with torch.no_grad():
            target = torch.cat([decode(target[b: min(b + bs, n)]) for b in range(0, n, bs)])
    if x_T.dim() in (4, 5) and (x_T.shape[1] == 1 or decode is not None):  # each student sample beside its teacher's
        both = torch.stack([student.clamp(-1, 1), target[:n].clamp(-1, 1)], 1).flatten(0, 1).float()
        save_image_grid(both, run_dir / "samples.png", nrow=16)
    if logger is None:
        return
    import wandb

    logger.log_table("results", columns=list(rows[0]), data=[list(r.values()) for r in rows])
    logger.log_image("ld3/grid", [str(run_dir / "grid.png")])
    if (run_dir / "samples.png").exists():
        logger.log_image("ld3/student_vs_teacher", [str(run_dir / "samples.png")])
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"schedule-{module.cfg.solver}-{module.cfg.order}-nfe{module.cfg.nfe}")
    artifact = wandb.Artifact(name, type="schedule")
    artifact.add_file(str(run_dir / "schedule.json"))
    logger.experiment.log_artifact(artifact)

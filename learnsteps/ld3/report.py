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


def learned_label(run: dict) -> str:
    """A learned schedule's row name: its solve keywords' solver is `tabulated` for a learned solver."""
    return "ld3 (learned solver)" if run["solver"] == "tabulated" else "ld3 (learned)"


def hand_grids(cfg: LD3Config, teacher) -> dict[str, torch.Tensor]:
    """The baseline grids a run is judged against (the schedule's own end; GITS' found once, here), by name; a grid
    identical to an earlier one is that one's row under both names ("time_uniform = shifted": a flow model's
    shifted grid at shift 1)."""
    steps = steps_for_nfe(cfg.solver, cfg.nfe, cfg.to_zero)
    grids = {}
    for kind in applicable(cfg.baselines, teacher.noise_schedule):
        grid = baseline_grid(cfg, teacher, kind, steps)
        same = next((k for k, g in grids.items() if torch.equal(g, grid)), None)
        grids = {(f"{k} = {kind}" if k == same else k): g for k, g in grids.items()} if same else {**grids, kind: grid}
    return grids


def evaluate_grids(cfg: LD3Config, teacher, learned: dict, test: TensorDataset, others: dict | None = None,
                   hand: dict | None = None, keep: int = 32) -> tuple[list[dict], dict]:
    """On the held-out pairs, for the learned run (`solve` keywords: grid, eval_grid, solver, order, options), the
    `others` (label -> solve keywords: the schedule a learned solver started from) and every baseline grid with the
    configured solver (`hand`: `hand_grids`, found here if None): RMSE
    to the teacher and, for digits teachers (1x8x8 images, a latent teacher's decoded), FID against the teacher's
    samples and against the data, with precision and recall against the data (diversity: a sampler that pulls its
    samples together loses recall). The last row is the teacher itself (its reference samples of the pairs): the FID
    against the data a sampler matching the teacher exactly would have. `<metric>_vs_best` is each row's metric over
    the best hand grid's (a grid identical to an earlier one is one row); `role` says which of learned / start / hand / teacher a row is. Returns (rows, samples):
    samples are each row's first `keep` outputs, as sampled."""
    from ..quality.metrics import Features, fid_features, pixels, precision_recall, reference_features

    _, x_T, target, cond = (v.to(device_of(teacher)) for v in test.tensors)
    hand = hand_grids(cfg, teacher) if hand is None else hand
    runs = {learned_label(learned): learned, **(others or {}),
            **{k: dict(grid=g, solver=cfg.solver, order=cfg.order, **cfg.options) for k, g in hand.items()}}
    roles = {name: "learned" if i == 0 else "hand" if name in hand else "start" for i, name in enumerate(runs)}
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

    rows, samples = [], {}
    for name, run in runs.items():
        out = solve_in_batches(teacher, x_T, cfg.pairs.batch_size, condition(cond), **run)
        samples[name] = out[:keep]
        with torch.no_grad():
            rows.append(dict(grid=name, role=roles[name],
                             **judged(out, features(pixels(teacher, out).float()) if digits else None)))
    samples["teacher"] = target[:keep]
    if digits:
        rows.append(dict(grid="teacher", role="teacher", **judged(target, f_teacher)))
    for key in ("rmse", "fid_teacher", "fid_data"):
        if key in rows[0]:
            best = min((r[key] for r in rows if r["grid"] in hand), default=math.nan)
            for r in rows:
                r[f"{key}_vs_best"] = r[key] / best
    return rows, samples


def images_of(teacher, x: torch.Tensor) -> bool:
    """Whether the teacher's samples are pictures (grey or RGB images or videos, a latent teacher's decoded)."""
    from ..quality.metrics import pixels

    with torch.no_grad():
        p = pixels(teacher, x)
    return p.dim() in (4, 5) and p.shape[1] in (1, 3)


def best_hand_grid(rows: list[dict], key: str = "fid_data") -> dict:
    """The hand grid's row that is best on `key` (RMSE where the rows have no FID)."""
    key = key if key in rows[0] else "rmse"
    return min((r for r in rows if r["role"] == "hand"), key=lambda r: r[key])


def draw_grids(ax, cfg: LD3Config, teacher, learned: dict, hand: dict, starts: dict | None = None) -> None:
    """Each hand grid (`hand_grids`), the schedules the run started from (`starts`: label -> solve keywords) and
    the learned one (and LD3's evaluation times) as log-SNR against the step."""
    s = teacher.noise_schedule
    steps = steps_for_nfe(cfg.solver, cfg.nfe, cfg.to_zero)
    n_finite = steps if cfg.to_zero else steps + 1
    for kind, g in hand.items():
        ax.plot(range(n_finite), s.lambda_(g[:n_finite]), marker=".", alpha=0.6, label=kind)
    for label, run in (starts or {}).items():
        ax.plot(range(n_finite), s.lambda_(run["grid"][:n_finite]), marker="s", color="grey", ls=":", lw=1.5,
                label=f"start: {label}")
    t, t_eval = learned["grid"], learned["eval_grid"]
    name = "learned solver" if cfg.learn == "solver" else "LD3"
    ax.plot(range(n_finite), s.lambda_(t[:n_finite]), marker="o", color="k", lw=2, label=f"{name} (integration)")
    if cfg.decoupled and t_eval is not None:
        ax.plot(range(n_finite), s.lambda_(t_eval[:n_finite]), marker="x", ls="--", color="crimson",
                label=f"{name} (model evaluation)")
    ax.set(xlabel="step", ylabel="log-SNR lambda", title=f"{cfg.solver} order {cfg.order}, NFE {cfg.nfe}"
           + (" (+ final step to sigma = 0)" if cfg.to_zero else "") + (", learned solver" if cfg.learn == "solver" else ""))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_grids(cfg: LD3Config, teacher, learned: dict, hand: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    draw_grids(ax, cfg, teacher, learned, hand)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def plot_comparison(cfg: LD3Config, teacher, learned: dict, hand: dict, rows: list[dict], samples: dict,
                    path: Path, starts: dict | None = None) -> None:
    """The picture a run ends with: the same noises sampled by the best hand grid (on FID against the data; on RMSE
    without FIDs), by what the run started from (learn=solver from a schedule file), by the learned schedule and by
    the teacher, side by side with their figures, and the grids."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..quality.images import tile
    from ..quality.metrics import pixels

    by_name = {r["grid"]: r for r in rows}
    x = samples["teacher"]
    n = 32 if x.dim() == 4 and max(x.shape[-2:]) <= 16 else 2 if x.dim() == 5 else 4  # large images: a few
    role = {r["grid"]: r["role"] for r in rows}
    shown = [best_hand_grid(rows)["grid"], *[k for k in samples if role.get(k) == "start"], rows[0]["grid"], "teacher"]
    fig, axes = plt.subplots(1, len(shown) + 1, figsize=(2.6 * len(shown) + 6.5, 5.2),
                             gridspec_kw=dict(width_ratios=[1] * len(shown) + [2.4]))
    for ax, name in zip(axes, shown):
        with torch.no_grad():
            images = pixels(teacher, samples[name][:n]).float()
        canvas = tile(images, nrow=4 if images.dim() == 4 else 1)
        ax.imshow(canvas.permute(1, 2, 0).numpy().squeeze(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_axis_off()
        r = by_name.get(name, {})
        label = {"teacher": f"teacher ({cfg.pairs.solver}-{cfg.pairs.order}, {cfg.pairs.steps} steps)"}.get(
            name, f"best hand grid: {name}" if role.get(name) == "hand" else name)
        figures = []
        if "fid_data" in r:
            figures.append(f"FID data {r['fid_data']:.2f}" + ("" if name == "teacher" else
                                                              f" · teacher {max(r['fid_teacher'], 0.0):.2f}"))
        if name != "teacher" and "rmse" in r:
            figures.append(f"RMSE {r['rmse']:.4f}")
        ax.set_title("\n".join([label, *figures]), fontsize=9)
    draw_grids(axes[-1], cfg, teacher, learned, hand, starts)
    fig.suptitle(f"{cfg.teacher}: the same {min(n, len(x))} noises (figures: all {cfg.pairs.test} held-out pairs)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
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


def log_outputs(logger, run_dir: Path, module: LD3, teacher, samples: dict | None, rows: list | None) -> None:
    """samples.png (each learned sample beside the teacher's, from the report's samples) and W&B (without a report,
    pairs.test=0: the grid plot and the schedule only)."""
    from ..quality.images import save_image_grid
    from ..quality.metrics import pixels

    learned = samples[rows[0]["grid"]] if rows else None
    if learned is not None and learned.dim() in (4, 5):
        n = min(32 if learned.dim() == 4 else 8, len(learned))  # videos: 8 clips, a row of frames each
        with torch.no_grad():
            both = [pixels(teacher, x[:n]).clamp(-1, 1).float() for x in (learned, samples["teacher"])]
        if both[0].shape[1] in (1, 3):
            save_image_grid(torch.stack(both, 1).flatten(0, 1), run_dir / "samples.png", nrow=16)
    if logger is None:
        return
    import wandb

    if rows:
        logger.log_table("results", columns=list(rows[0]), data=[list(r.values()) for r in rows])
    logger.log_image("ld3/grid", [str(run_dir / "grid.png")])
    for name in ("comparison", "samples"):
        if (run_dir / f"{name}.png").exists():
            logger.log_image(f"ld3/{name}", [str(run_dir / f"{name}.png")])
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"schedule-{module.cfg.solver}-{module.cfg.order}-nfe{module.cfg.nfe}")
    artifact = wandb.Artifact(name, type="schedule")
    artifact.add_file(str(run_dir / "schedule.json"))
    logger.experiment.log_artifact(artifact)

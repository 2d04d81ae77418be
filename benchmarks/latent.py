"""The shipped latent flow-matching digits model (issue #15): its quality, and the methods on it.

    python benchmarks/latent.py                      # everything (about 40 min on 2 CPU cores)
    python benchmarks/latent.py part=teacher         # the model's FID / class accuracy against the pixel UNet's

teacher: FID against the data (digits feature network, 2000 samples, UniPC-3 with 40 steps, 10 classes in turn)
and class accuracy (shipped digits classifier) of digits_latent_flow at several guidance scales, beside the
shipped pixel UNet (digits_unet) and the estimator's floor (each model against itself on other noise), one run.
solvers: benchmarks/solvers.py on it (guided): every solver x grid x NFE, RMSE in latent space to an adaptive
reference, the model's own shifted grid among the grids.
ld3: benchmarks/ld3.py part=paired on it (guided), NFE 4 and 6, baselines time_uniform / shifted / logsnr / edm /
gits: learned / best hand grid in paired RMSE and in FID against the teacher's reference samples and the data
(2000 held-out pairs), with the FID floor at that sample count.
placement: benchmarks/dsno.py on it (guided), DSNO M = 4 on the teacher's own DiT with a temporal layer after every
block, every other block, or one per level (the last block), `placement_steps` each, scored by the training curve.
dsno: benchmarks/dsno.py on it (guided), same trajectories, steps and seed for every student: DSNO M = 4 on the
teacher's own DiT (at `placement`), plain one-step distillation on it (M = 1, no temporal layers), DSNO M = 4 on a
fresh UNet (issue #15's student); eval.py on 2000 held-out noises against the teacher's samplers at 1-8 NFE, the
training curve (FID every `curve_every` steps) and the cost per sample.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learnsteps.config import load_config  # noqa: E402

TEACHER = "digits_latent_flow"


@dataclass
class Config:
    part: str = "all"  # all | teacher | solvers | ld3 | placement | dsno
    guidance: float = 1.15  # the chosen guidance (FID 1.25x the pixel UNet, accuracy 0.999)
    guidances: list[float] = field(default_factory=lambda: [1.0, 1.1, 1.15, 1.25, 1.5, 2.0])
    samples: int = 2000
    nfe: list[int] = field(default_factory=lambda: [4, 6])
    out_dir: str = "runs/bench_latent"
    dsno_steps: int = 4000
    placement_steps: int = 1000
    placement: str = "every"  # the measured choice (docs/dsno.md)
    curve_every: int = 250


def images_of(teacher, n: int, seed: int):
    """n samples (conditions in turn), UniPC-3 with 40 log-SNR steps to sigma = 0, as images."""
    import learnsteps as ls
    from learnsteps.quality.metrics import pixels
    from learnsteps.trajectories import conditions_of, sample_noise

    s = teacher.noise_schedule
    x_T = sample_noise(range(n), teacher.shape, seed, s.init_noise_std()).float()
    cond = conditions_of(teacher, torch.arange(n))
    grid = ls.grids.make("logsnr", 40, s, to_zero=True)
    out = []
    with torch.no_grad():
        for b in range(0, n, 500):
            c = None if cond is None else cond[b: b + 500]
            out.append(pixels(teacher, ls.sample(teacher, x_T[b: b + 500], grid, "unipc", 3, cond=c)))
    return torch.cat(out).float(), cond


def teacher_quality(cfg: Config, out: Path) -> str:
    from learnsteps.quality.features import load_feature_net
    from learnsteps.quality.metrics import Features, fid_features, reference_features
    from learnsteps.teachers import load_teacher

    features, classifier = Features("digits"), load_feature_net()
    data = reference_features("digits", features)
    lines = ["| model | guidance | FID (data) | floor (itself, other noise) | class accuracy |", "|---|---|---|---|---|"]
    unet = load_teacher("digits_unet")
    a, b = (features(images_of(unet, cfg.samples, seed)[0]) for seed in (0, 1))
    unet_fid = fid_features(a, data)
    lines.append(f"| digits_unet (pixel, unconditional) | – | {unet_fid:.2f} | {fid_features(a, b):.2f} | – |")
    for g in cfg.guidances:
        teacher = load_teacher(TEACHER, guidance=g)
        (x, cond), (y, _) = (images_of(teacher, cfg.samples, seed) for seed in (0, 1))
        with torch.no_grad():
            acc = float((classifier(x)[1].argmax(1) == teacher.class_ids(cond)).float().mean())
        fx = features(x)
        fid = fid_features(fx, data)
        lines.append(f"| {TEACHER} | {g} | {fid:.2f} ({fid / unet_fid:.2f}x the UNet's) | "
                     f"{fid_features(fx, features(y)):.2f} | {acc:.3f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    (out / "teacher.md").write_text(text)
    return text


def run(args: list[str]) -> None:
    print(" ".join(args), flush=True)
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    print(res.stdout[-6000:], flush=True)
    if res.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{res.stderr[-4000:]}")


def main(argv: list[str]) -> None:
    cfg = load_config(Config, [], argv)
    out = ROOT / cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    g = f"guidance={cfg.guidance}"
    nfe = f"nfe=[{','.join(map(str, cfg.nfe))}]"
    if cfg.part in ("all", "teacher"):
        print(teacher_quality(cfg, out))
    if cfg.part in ("all", "solvers"):
        run(["benchmarks/solvers.py", f"teacher={TEACHER}", g, "grids=[time_uniform,shifted,logsnr,edm,gits]",
             "nfe=[3,4,5,6,8,10]", "table_nfe=[3,4,5,6,8,10]", "samples=256", "reference_rtol=1e-6",
             "overhead=false", f"out_dir={out / 'solvers'}"])
    if cfg.part in ("all", "ld3"):
        run(["benchmarks/ld3.py", "part=paired", f"teachers=[{TEACHER}]", nfe, f"bench_test={cfg.samples}",
             "solvers=[{solver: euler, order: 1},{solver: dpm_solver++, order: 2},{solver: unipc, order: 2}]",
             f"ld3_args=[{g},'baselines=[time_uniform,shifted,logsnr,edm,gits]']", f"out_dir={out / 'ld3'}"])
    dsno = ["benchmarks/dsno.py", f"teachers=[{TEACHER}]", f"teacher_args=[{g}]", f"ablation_teachers=[{TEACHER}]",
            f"samples={cfg.samples}", f"curve_every={cfg.curve_every}", f"out_dir={out / 'dsno'}"]
    if cfg.part in ("all", "placement"):
        variants = ",".join(f"{{num_times: 4, placement: {p}}}" for p in ("every", "every_other", "one_per_level"))
        for part in ("train", "curve"):
            run([*dsno, f"part={part}", f"variants=[{variants}]", f"steps={cfg.placement_steps}",
                 "curve_name=curve-placement"])
    if cfg.part in ("all", "dsno"):
        variants = (f"{{num_times: 4, placement: {cfg.placement}}},{{num_times: 1, temporal: false}},"
                    f"{{num_times: 4, backbone: unet}}")
        run([*dsno, "part=all", f"variants=[{variants}]", f"steps={cfg.dsno_steps}", "nfe=[1,2,4,8]",
             "grids=[shifted,logsnr,edm]"])


if __name__ == "__main__":
    main(sys.argv[1:])

"""Diffusers pipelines against our core (issue #29): the pipeline's own grid and solver, a schedule applied to it,
and TabulatedScheduler, each from the same latents, on tiny pipelines with random weights (tests/tiny_pipelines.py).

    python benchmarks/pipelines.py   # ~2 min on 2 CPU cores

For each pipeline (float32, 2 prompts or labels, guidance 4, 6 steps; DiTPipeline draws its own noise from the same
generator and decodes, so its row compares images): the worst relative difference between the pipeline's latents
and our core's,
- "own": the pipeline's own configured scheduler (or the one named, configured on top of its config), read by
  pipeline_grid(pipe, 6): pipe(latents=noise) against learnsteps.sample(teacher, noise * latents_scale, ...);
- "apply_schedule": a DPM-Solver++(2M) schedule with decoupled model times (LD3's), apply_schedule(pipe, s),
  pipe(latents=noise);
- "TabulatedScheduler": a learned table (UniPC-3's, perturbed) with decoupled times, pipe(latents=noise).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import diffusers  # noqa: E402
import tiny_pipelines  # noqa: E402

import learnsteps as ls  # noqa: E402
from learnsteps.core.steps import Grid  # noqa: E402
from learnsteps.core.tables import solver_table  # noqa: E402
from learnsteps.interop.diffusers import apply_schedule, pipeline_grid  # noqa: E402
from learnsteps.interop.scheduler import TabulatedScheduler  # noqa: E402
from learnsteps.schedule import Schedule, save_schedule  # noqa: E402
from learnsteps.teachers import load_teacher  # noqa: E402

PROMPTS = ["a red dot", "two cats"]
FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
CASES = {  # pipeline: its own scheduler (None) and others configured on top of its config
    "sd (epsilon)": (tiny_pipelines.stable_diffusion, {}, [None, ("EulerDiscreteScheduler", {}),
                                                         ("DPMSolverMultistepScheduler", dict(solver_order=3)),
                                                         ("UniPCMultistepScheduler", {})]),
    "sd (v)": (tiny_pipelines.stable_diffusion, dict(prediction_type="v_prediction"),
               [None, ("DPMSolverMultistepScheduler", dict(solver_order=3))]),
    "dit": (tiny_pipelines.dit, {}, [None]),
    "dit (flow)": (tiny_pipelines.dit, dict(flow=True), [None]),
    "sd3": (tiny_pipelines.sd3, {}, [None, ("DPMSolverMultistepScheduler", dict(FLOW, solver_order=2)),
                                     ("UniPCMultistepScheduler", dict(FLOW, solver_order=3))]),
}


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def with_scale_model_input(scheduler):
    """DiTPipeline calls scale_model_input, which flow schedulers lack: the identity, as learnsteps' pinned class has."""
    cls = type(scheduler)
    return type(cls.__name__, (cls,), dict(scale_model_input=lambda self, x, *a, **k: x)).from_config(scheduler.config)


def compare(name, pipe, teacher, ours_x, steps, seed, **kwargs):
    """(our core's result, the pipeline's), as latents, or as images for DiT."""
    noise = torch.randn(2, *teacher.shape, generator=torch.Generator().manual_seed(seed))
    ours = ours_x(noise)
    if name.startswith("dit"):
        labels = teacher.net.labels[:-1].tolist()
        theirs = torch.from_numpy(pipe(labels, guidance_scale=4.0, num_inference_steps=steps, output_type="np",
                                       generator=torch.Generator().manual_seed(seed), **kwargs).images)
        return (teacher.decode(ours) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), theirs
    return ours, pipe(PROMPTS, latents=noise, guidance_scale=4.0, num_inference_steps=steps, output_type="latent",
                      height=8, width=8, **kwargs).images


def main():
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    cond = torch.tensor([0, 1])
    print("| pipeline | scheduler | route | relative difference to our core |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (build, kw, schedulers) in CASES.items():
            path = build(Path(tmp) / name.replace(" ", "_").strip("()"), **kw)
            teacher = load_teacher(str(path), conditions=[0, "two"] if name.startswith("dit") else PROMPTS,
                                   guidance=4.0)
            extra = {"text_encoder_3": None, "tokenizer_3": None} if name == "sd3" else {}

            def fresh(scheduler=None):
                pipe = diffusers.DiffusionPipeline.from_pretrained(path, **extra)
                pipe.set_progress_bar_config(disable=True)
                if scheduler:
                    pipe.scheduler = getattr(diffusers, scheduler[0]).from_config({**pipe.scheduler.config,
                                                                                  **scheduler[1]})
                if name == "dit (flow)":
                    pipe.scheduler = with_scale_model_input(pipe.scheduler)
                return pipe

            for scheduler in schedulers:
                pipe = fresh(scheduler)
                pg = pipeline_grid(pipe, 6)
                err = relative(*compare(name, pipe, teacher, lambda z: ls.sample(teacher, z * pg.latents_scale,
                                                                                   cond=cond, **pg.solve_kwargs)
                                        / pg.output_scale, 6, 5))
                shown = [f"{k}={v}" for k, v in (scheduler or (None, {}))[1].items() if k not in FLOW or
                         k == "use_flow_sigmas"]
                label = type(pipe.scheduler).__name__ + (f" ({', '.join(shown)})" if shown else "")
                print(f"| {name} | {label} | own: pipeline_grid, from {float(pg.grid[0]):.7g} | {err:.1e} |")
            s = teacher.noise_schedule
            grid = ls.grids.make("shifted" if s.kind == "flow" else "logsnr", 5, s, to_zero=True)
            eval_grid = grid.clone()
            eval_grid[1:-1] += 0.2 * (grid[2:] - grid[1:-1])
            sched = Schedule.from_grid(grid, s, "dpm_solver++", 2, eval_grid=eval_grid, teacher=teacher.record())
            pipe = fresh()
            kwargs = apply_schedule(pipe, sched)
            err = relative(*compare(name, pipe, teacher, lambda z: ls.sample(teacher, z * s.init_noise_std(),
                                                                               cond=cond, **sched.solve_kwargs), 5, 6,
                                    **{k: v for k, v in kwargs.items() if k != "num_inference_steps"}))
            print(f"| {name} | {type(pipe.scheduler).__name__} | apply_schedule, dpm_solver++ 2M, decoupled | {err:.1e} |")
            if name.startswith("dit"):
                continue  # (TabulatedScheduler in DiTPipeline: the same, shown by the SD rows)
            table = solver_table("unipc", 3, Grid(s, grid, eval_grid), "data")
            table = table * (1 + 0.05 * torch.randn(table.shape, generator=torch.Generator().manual_seed(2),
                                                    dtype=torch.float64)).tril()
            learned = Schedule.from_grid(grid, s, "tabulated", table.shape[1], eval_grid=eval_grid,
                                         options=dict(form="data"), coefficients=table, teacher=teacher.record())
            file = save_schedule(Path(tmp) / f"{name}.json", learned)
            pipe = fresh()
            pipe.scheduler = TabulatedScheduler.from_schedule(file)
            err = relative(*compare(name, pipe, teacher, lambda z: ls.sample(teacher, z * s.init_noise_std(),
                                                                               cond=cond, **learned.solve_kwargs), 5, 7))
            print(f"| {name} | TabulatedScheduler | learned table, decoupled, latents=noise | {err:.1e} |")


if __name__ == "__main__":
    main()

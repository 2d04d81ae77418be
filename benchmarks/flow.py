"""Flow matching in the core (issues #14, #29): parity with diffusers' flow schedulers and convergence orders,
from t = 1 (alpha = 0), where the flow pipelines start.

    python benchmarks/flow.py        # ~1 min on 2 CPU cores

The exact mixture teacher (tiny 6-d toy mixture) on the rectified-flow path x_t = (1 - t) x0 + t eps with SD3's
shift 3, wrapped as a velocity network v = eps - x0 (what SD3 / FLUX transformers predict), float64, 8 samples.
Parity: diffusers' FlowMatchEulerDiscreteScheduler, DPMSolverMultistepScheduler(use_flow_sigmas,
prediction_type="flow_prediction") and UniPCMultistepScheduler(use_flow_sigmas) at 6, 10 and 20 steps on the
shifted grid from t = 1 (UniPC-3 and UniPC bh1 from t_cap: diffusers' UniPC-3 returns NaN from sigma = 1, and
bh1's first corrector has no finite limit there), ending at sigma = 0 and at t_min, in the denoising loop with our
float64 grid as their sigmas (what learnsteps.interop does); each also on its own set_timesteps(N) grid, read by
learnsteps.interop.diffusers.pipeline_grid: float32 sigmas (FlowMatchEuler's from t = 1 exactly, DPM-Solver's from
shift(1 - 1/n), UniPC's from 1 - 1e-6), and the model called at its timesteps (integers int(t n) for DPM-Solver and
UniPC), which our core reproduces as decoupled evaluation times.
Orders: RMSE to an adaptive reference (rtol 1e-12) on log-SNR grids of 32-256 steps from t = 1 (the solvers that
cannot start there from t_cap), least-squares slope.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import learnsteps as ls  # noqa: E402
from learnsteps.core.denoiser import NetworkDenoiser, VelocityNetwork  # noqa: E402
from learnsteps.core.sample import start_time  # noqa: E402
from learnsteps.core.schedules import FlowMatching  # noqa: E402
from learnsteps.interop.diffusers import pipeline_grid  # noqa: E402
from learnsteps.teachers.gmm import toy_mixture  # noqa: E402

F64 = torch.float64


def run(scheduler, velocity, x_T, grid=None, steps=None):
    """diffusers' loop; with `grid` its sigmas are our float64 times, else its own set_timesteps(steps) tables."""
    n = scheduler.config.num_train_timesteps
    scheduler.set_timesteps(steps if grid is None else len(grid) - 1)
    if grid is not None:
        scheduler.sigmas, scheduler.timesteps = grid.clone(), grid[:-1] * n
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
    x = x_T.clone()
    for ts in scheduler.timesteps:
        x = scheduler.step(velocity(x, (ts / n).to(F64).expand(len(x))), ts, x).prev_sample
    return x.to(F64)


def parity(velocity):
    import diffusers

    s = velocity.noise_schedule
    x_T = torch.randn(8, 6, dtype=F64, generator=torch.Generator().manual_seed(0)) * s.init_noise_std()
    flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=s.shift)
    cases = [("FlowMatchEulerDiscrete", lambda fin: diffusers.FlowMatchEulerDiscreteScheduler(shift=s.shift), "euler", 1, {})]
    cases += [(f"DPMSolverMultistep {o}M {st}", lambda fin, o=o, st=st: diffusers.DPMSolverMultistepScheduler(
        **flow, solver_order=o, solver_type=st, final_sigmas_type=fin), "dpm_solver++", o,
        dict(variant="taylor" if st == "heun" else "midpoint")) for o in (2, 3) for st in ("midpoint", "heun")]
    cases += [(f"UniPCMultistep {o} {v}", lambda fin, o=o, v=v: diffusers.UniPCMultistepScheduler(
        **flow, solver_order=o, solver_type=v, final_sigmas_type=fin), "unipc", o, dict(variant=v))
        for o in (1, 2, 3) for v in ("bh1", "bh2")]
    rows = {}
    for label, make, solver, order, opts in cases:
        for steps in (6, 10, 20):
            for to_zero in (True, False):
                if opts.get("variant") == "bh1" and to_zero:
                    continue  # diffusers' bh1 step to sigma = 0 is NaN (refused by learnsteps.interop)
                fin = "zero" if to_zero else "sigma_min"
                start = s.t_cap if (solver, order) == ("unipc", 3) else start_time(s, solver, opts)
                grid = ls.grids.make("shifted", steps, s, to_zero=to_zero, t_max=start)
                theirs = run(make(fin), velocity, x_T, grid=grid)
                ours = ls.sample(velocity, x_T, grid, solver, order, **opts)
                key = (label, f"our float64 grid from {'t = 1' if start == 1 else 't_cap'}")
                rows.setdefault(key, []).append(float((ours - theirs).norm() / theirs.norm()))
                if to_zero:  # their own grid and tables, as pipeline_grid reads them
                    pg = pipeline_grid(make(fin), steps)
                    assert (pg.solver, pg.order) == (solver, order)
                    theirs = run(make(fin), velocity, x_T, steps=steps)
                    ours = ls.sample(velocity, x_T, **pg.solve_kwargs)
                    key = (label, f"their float32 grid from {float(pg.grid[0]):.7g}")
                    rows.setdefault(key, []).append(float((ours - theirs).norm() / theirs.norm()))
    return {k: max(v) for k, v in rows.items()}


ORDERS = [("euler", 1, {}), ("heun", 2, {}), ("dpm_solver++", 2, {}), ("dpm_solver++", 3, {}),
          ("dpm_solver++", 3, dict(method="singlestep", variant="taylor")),
          ("dpm_solver", 2, {}), ("unipc", 2, dict(lower_order_final=False)), ("unipc", 3, dict(lower_order_final=False)),
          ("unipc", 3, dict(variant="bh1", corrector=False, lower_order_final=False)),
          ("deis", 3, dict(basis="tab")), ("ipndm", 4, {})]


def orders(mixture):
    s = mixture.noise_schedule
    x_T = torch.randn(8, 6, dtype=F64, generator=torch.Generator().manual_seed(1)) * s.init_noise_std()
    out = {}
    for solver, order, opts in ORDERS:
        start = start_time(s, solver, opts)
        ref = ls.reference_solve(mixture, x_T, torch.tensor([start, s.t_min], dtype=F64), rtol=1e-12, atol=1e-12).x
        steps = [32, 64, 128, 256]
        err = [float((ls.sample(mixture, x_T, ls.grids.make("logsnr", n, s, t_max=start), solver, order, **opts) - ref)
                     .pow(2).mean().sqrt()) for n in steps]
        name = f"{solver} {order}{' ' + str(opts) if opts else ''} from {'t = 1' if start == 1 else 't_cap'}"
        out[name] = (-np.polyfit(np.log(steps), np.log(err), 1)[0], err[-1])
    return out


def main():
    mixture = toy_mixture(noise_schedule=FlowMatching(shift=3.0))
    velocity = NetworkDenoiser(VelocityNetwork(mixture), mixture.noise_schedule, "flow")
    print("| diffusers scheduler (flow sigmas) | grid | worst relative error |\n|---|---|---|")
    for (label, grid), err in parity(velocity).items():
        print(f"| {label} | {grid} | {err:.1e} |")
    print("\n| solver | measured order | RMSE at 256 steps |\n|---|---|---|")
    for name, (slope, err) in orders(mixture).items():
        print(f"| {name} | {slope:.2f} | {err:.1e} |")


if __name__ == "__main__":
    main()

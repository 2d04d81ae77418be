"""How closely the peers reproduce our core, on the same exact DDPM teacher, grids and noise (float64 model).

    python benchmarks/parity.py

diffusers: each multistep class on its own set_timesteps(N) grid, once with the float64 sigmas of that grid
handed to it (what learnsteps.interop does) and once with its own float32 tables (what a pipeline does);
k-diffusion: each sampler of learnsteps.interop.k_diffusion.recipe on irregular fractional-time grids, through
its own DiscreteEpsDDPMDenoiser. Prints the worst relative (norm) and absolute error per class.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import learnsteps as ls  # noqa: E402
from learnsteps.core.denoiser import EpsilonNetwork, NetworkDenoiser  # noqa: E402
from learnsteps.core.schedules import DiscreteDDPM  # noqa: E402
from learnsteps.schedule import Schedule  # noqa: E402
from learnsteps.teachers.gmm import toy_mixture  # noqa: E402

F64 = torch.float64
BETAS = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def errors(ours, theirs):
    return float((ours - theirs).norm() / theirs.norm()), float((ours - theirs).abs().max())


def diffusers_cases():
    return [(f"DPMSolverMultistep {alg} {o}M {st} {final}", "DPMSolverMultistepScheduler",
             dict(algorithm_type=alg, solver_order=o, solver_type=st, final_sigmas_type=final),
             "dpm_solver++" if alg == "dpmsolver++" else "dpm_solver", o, dict(variant="taylor" if st == "heun" else "midpoint"))
            for alg, final in (("dpmsolver++", "zero"), ("dpmsolver++", "sigma_min"), ("dpmsolver", "sigma_min"))
            for o in (2, 3) for st in ("midpoint", "heun")] + \
        [(f"UniPCMultistep {v} {o} {final}", "UniPCMultistepScheduler",
          dict(solver_order=o, solver_type=v, final_sigmas_type=final), "unipc", o, dict(variant=v))
         for o in (1, 2, 3) for v, final in (("bh1", "sigma_min"), ("bh2", "sigma_min"), ("bh2", "zero"))] + \
        [(f"DEISMultistep {o}", "DEISMultistepScheduler", dict(solver_order=o), "deis", o, dict(basis="logrho"))
         for o in (1, 2, 3)]


def diffusers_parity(teacher):
    import diffusers

    worst = {}
    for label, cls, config, solver, order, options in diffusers_cases():
        for steps in (6, 9, 10, 20):
            for own_tables in (False, True):
                sched = getattr(diffusers, cls)(**BETAS, **config)
                sched.set_timesteps(steps)
                final = config.get("final_sigmas_type", "sigma_min")
                grid = torch.cat([sched.timesteps.to(F64), torch.tensor([0.0 if final == "sigma_min" else -1.0], dtype=F64)])
                if not own_tables:
                    sched.sigmas = teacher.noise_schedule.sigma_tilde(grid)
                x = x_T = torch.randn(8, 6, dtype=F64, generator=torch.Generator().manual_seed(steps))
                for t in sched.timesteps:
                    x = sched.step(teacher(x, torch.as_tensor(t, dtype=F64).expand(len(x))), t, x).prev_sample
                ours = ls.sample(teacher, x_T, grid, solver, order, **options)
                key = (cls.removesuffix("Scheduler"), "float32 tables" if own_tables else "float64 sigmas")
                worst[key] = [max(a, b) for a, b in zip(worst.get(key, (0, 0)), errors(ours, x.to(F64)))]
    return worst


def k_diffusion_parity(teacher):
    import k_diffusion as K

    from learnsteps.interop.k_diffusion import recipe

    s = teacher.noise_schedule
    model = K.external.DiscreteEpsDDPMDenoiser(teacher.net, s.alphas_cumprod, quantize=False)
    cases = [("euler", 1, {}), ("heun", 2, {}), ("dpm_solver++", 2, {}), ("dpm_solver++", 2, dict(variant="taylor")),
             ("dpm_solver++", 3, dict(variant="taylor", lower_order_final=False))]
    worst = {}
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        grid = ls.grids.make("logsnr", 8, s, to_zero=True)
        lam = s.lambda_(grid[:-1])
        lam[1:-1] += 0.3 * (torch.rand(len(lam) - 2, generator=gen, dtype=F64) - 0.5) * (lam[2:] - lam[:-2]) / 2
        grid[:-1] = s.t_of_lambda(lam)
        for solver, order, options in cases:
            schedule = Schedule.from_grid(grid, s, solver, order, options=options)
            r = recipe(schedule)
            x_T = torch.randn(8, 6, dtype=F64, generator=gen)
            theirs = getattr(K.sampling, r["sampler"])(model, schedule.x_tilde(x_T),
                                                       torch.tensor(schedule.sigmas, dtype=F64), disable=True, **r["kwargs"])
            ours = ls.sample(teacher, x_T, schedule.grid, solver, order, **schedule.options)
            key = (r["sampler"], "float64 sigmas")
            worst[key] = [max(a, b) for a, b in zip(worst.get(key, (0, 0)), errors(ours, schedule.from_x_tilde(theirs)))]
    return worst


def main():
    exact = toy_mixture(noise_schedule=DiscreteDDPM("linear"))
    teacher = NetworkDenoiser(EpsilonNetwork(exact), exact.noise_schedule, "epsilon")
    print("| peer | class / sampler | sigmas | worst relative error | worst absolute error |\n|---|---|---|---|---|")
    for peer, table in (("diffusers", diffusers_parity(teacher)), ("k-diffusion", k_diffusion_parity(teacher))):
        for (name, how), (rel, ab) in table.items():
            print(f"| {peer} | {name} | {how} | {rel:.1e} | {ab:.1e} |")


if __name__ == "__main__":
    main()

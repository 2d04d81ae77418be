"""learnsteps' ComfyUI nodes and exported lists, run through ComfyUI's own sampling (a development check, not CI).

    python benchmarks/comfyui.py --comfyui-dir /path/to/ComfyUI [--ld3-file runs/ld3/schedule.json]
                                 [--record tests/fixtures/comfyui_conventions.json] [--commit SHA]

No registry package carries ComfyUI's sampling code in a form a test can depend on (docs/benchmarks.md says what
was checked), so this check runs a ComfyUI checkout: the Comfy-Org/ComfyUI repository with its requirements
installed. Its `--cpu` option is put in effect before `comfy` is imported. Two real ComfyUI models are built, a
`comfy.model_base.BaseModel` with SD1.5's model config (ModelSamplingDiscrete, EPS: scaled-linear betas
0.00085..0.012) and one with SD3's (ModelSamplingDiscreteFlow with shift 3, CONST), with a neutral latent format
(scale 1) and, as their diffusion model, learnsteps' exact mixture teacher (16 dimensions as 4x2x2 latents), whose
outputs are known. learnsteps' nodes are installed into the checkout (`python -m learnsteps.interop.comfyui
install`, the custom_nodes/learnsteps folder) and loaded by ComfyUI's own custom-node loader. Every route is
sampled by the SamplerCustom node itself (its seeded noise, comfy.sample.sample_custom, the model's noise scaling),
and compared with learnsteps' core on the same file, network and noise (float64):

    node       'Load learnsteps schedule' -> sigmas, 'learnsteps sampler' -> sampler
    pasted     `export --to comfyui`'s list read as ManualSigmas reads it (its pattern: ManualSigmas is newer than
               v0.3.64), with the sampler and settings the export names, with and without 'learnsteps exact
               timesteps' on the model
    other      what the export led users to before: the sigma/alpha list on flow models, dpmpp_2m on the t list

--ld3-file adds a flow schedule learned by `train.py mode=ld3` (its grid, evaluation times and table, on a flow
model set to its shift with ComfyUI's ModelSamplingSD3 node; the network is still the mixture).

--record writes what CI's tests/test_comfyui.py checks the nodes and its stand-in of ComfyUI against: ComfyUI's
sigma tables, its timestep rounding, noise scaling, and each route's inputs and ComfyUI's outputs (checksummed).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import learnsteps as ls  # noqa: E402
from learnsteps.core.denoiser import EpsilonNetwork, NetworkDenoiser, VelocityNetwork  # noqa: E402
from learnsteps.core.schedules import DiscreteDDPM, FlowMatching  # noqa: E402
from learnsteps.core.steps import Grid  # noqa: E402
from learnsteps.core.tables import solver_table  # noqa: E402
from learnsteps.files import write_json  # noqa: E402
from learnsteps.interop.comfyui import install  # noqa: E402
from learnsteps.interop.export import export  # noqa: E402
from learnsteps.schedule import Schedule, ScheduleError, load_schedule, save_schedule  # noqa: E402
from learnsteps.teachers.gmm import toy_mixture  # noqa: E402

F64 = torch.float64
MANUAL_SIGMAS = r"[-+]?(?:\d*\.*\d+)"  # ComfyUI's ManualSigmas: re.findall of this, then a FloatTensor
SHAPE, SEED = (4, 4, 2, 2), 7


def import_comfyui(comfyui_dir: Path):
    """ComfyUI's modules, with its own --cpu option in effect (comfy.cli_args reads sys.argv when told to)."""
    sys.path.insert(0, str(comfyui_dir))
    import comfy.options

    comfy.options.enable_args_parsing()
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    try:
        import comfy.cli_args  # noqa: F401
        import comfy.latent_formats
        import comfy.model_base
        import comfy.model_patcher
        import comfy.sample
        import comfy.supported_models
        import folder_paths
        from comfy_extras import nodes_custom_sampler
    finally:
        sys.argv = argv
    return comfy, folder_paths, nodes_custom_sampler


def teacher_for(ns):
    """learnsteps' exact mixture (16 dimensions) on `ns` as the network ComfyUI's model type has: an epsilon network
    (discrete models) or a velocity network (flow); its outputs are exact, so results are known."""
    flow = ns.kind == "flow"
    exact = toy_mixture(dim=16, noise_schedule=ns)
    return NetworkDenoiser((VelocityNetwork if flow else EpsilonNetwork)(exact), ns, "flow" if flow else "epsilon")


def load_nodes(comfyui_dir: Path):
    """learnsteps' nodes as ComfyUI loads them: the install command's custom_nodes/learnsteps folder, through
    ComfyUI's own custom-node loader (nodes.load_custom_node)."""
    import asyncio

    import nodes

    folder = install(comfyui_dir)
    if not asyncio.run(nodes.load_custom_node(str(folder))):
        raise SystemExit(f"error: ComfyUI did not load {folder}")
    found = [nodes.NODE_CLASS_MAPPINGS[k] for k in ("LearnstepsLoadSchedule", "LearnstepsSampler",
                                                      "LearnstepsExactTimesteps")]
    print(f"ComfyUI loaded {folder}: " + ", ".join(nodes.NODE_DISPLAY_NAME_MAPPINGS[n.GET_SCHEMA().node_id]
                                                   for n in found))
    return found


class TeacherNet(torch.nn.Module):
    """learnsteps' teacher as the diffusion model ComfyUI calls, net(x_in, timestep, context, ...) on latents: an
    epsilon network at DDPM timesteps or a velocity network at t * 1000; it records the timesteps it is given."""

    def __init__(self, teacher, flow: bool):
        super().__init__()
        self.teacher, self.flow, self.calls = teacher, flow, []
        self.weight = torch.nn.Parameter(torch.zeros(1))  # float32: what ComfyUI reads as the model's dtype

    @property
    def dtype(self):
        return self.weight.dtype

    def forward(self, x, timesteps, context=None, control=None, transformer_options={}, **kwargs):
        self.calls.append(timesteps.double().tolist())
        t = timesteps.double() / (1000 if self.flow else 1)
        return self.teacher(x.double().reshape(len(x), -1), t).reshape(x.shape).float()


def comfy_model(comfy, ns):
    """(ModelPatcher of a real ComfyUI model with the teacher on `ns` as its network, that teacher). Flow models have
    SD3's config (shift 3), set to another shift with ComfyUI's own ModelSamplingSD3 node."""
    flow = ns.kind == "flow"
    config_cls = comfy.supported_models.SD3 if flow else comfy.supported_models.SD15
    config = config_cls({"disable_unet_model_creation": True})
    config.latent_format = comfy.latent_formats.LatentFormat()  # scale 1: the latents are the teacher's states
    mtype = comfy.model_base.ModelType.FLOW if flow else comfy.model_base.ModelType.EPS
    model = comfy.model_base.BaseModel(config, model_type=mtype, device=torch.device("cpu"))
    teacher = teacher_for(ns)
    model.diffusion_model = TeacherNet(teacher, flow)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    if flow and ns.shift != float(model.model_sampling.shift):
        from comfy_extras.nodes_model_advanced import ModelSamplingSD3

        patcher = ModelSamplingSD3().patch(patcher, ns.shift)[0]
    return patcher, teacher


def learned_looking(ns, steps: int, seed: int, integer: bool = False, decoupled: bool = False):
    """An irregular grid ending at the clean data (log-SNR spacing, interior points moved by up to 15 % of their
    interval; whole DDPM timesteps if `integer`) and, if `decoupled`, evaluation times moved off it as LD3's."""
    gen = torch.Generator().manual_seed(seed)
    grid = ls.grids.make("logsnr", steps, ns, to_zero=True)
    lam = ns.lambda_(grid[:-1])
    lam[1:-1] += 0.3 * (torch.rand(len(lam) - 2, generator=gen, dtype=F64) - 0.5) * (lam[2:] - lam[:-2]) / 2
    grid[:-1] = ns.t_of_lambda(lam)
    grid[0], grid[-2] = ns.t_max, ns.t_min
    if integer:
        grid[1:-2] = grid[1:-2].round()
    eval_grid = None
    if decoupled:
        eval_grid = grid.clone()
        gaps = torch.minimum(grid[:-2] - grid[1:-1], grid[1:-1] - grid[2:])
        eval_grid[1:-1] += 0.4 * (torch.rand(steps - 1, generator=gen, dtype=F64) - 0.5) * gaps
        eval_grid[-2] = grid[-2]  # the model is never called at the clean end
    return grid, eval_grid


def learned_table(ns, grid, eval_grid, seed: int):
    """A 'learned' coefficient table: DPM-Solver++(3M)'s on the grid, each weight moved by up to 3 %."""
    table = solver_table("dpm_solver++", 3, Grid(ns, grid, eval_grid), form="data")
    gen = torch.Generator().manual_seed(seed)
    return table * (1 + 0.06 * (torch.rand(table.shape, generator=gen, dtype=F64) - 0.5))


def schedules(ld3_file: Path | None):
    """(name, noise schedule, Schedule) of every case."""
    vp, flow = DiscreteDDPM("scaled_linear"), FlowMatching(shift=3.0)
    out = []
    for kind, ns in (("vp", vp), ("flow", flow)):
        frac, _ = learned_looking(ns, 8, seed=1)
        out += [(f"{kind} dpm_solver++ 2M", ns, Schedule.from_grid(frac, ns, "dpm_solver++", 2)),
                (f"{kind} dpm_solver++ 2M taylor", ns, Schedule.from_grid(
                    frac, ns, "dpm_solver++", 2, options=dict(variant="taylor"))),
                (f"{kind} euler", ns, Schedule.from_grid(frac, ns, "euler", 1)),
                (f"{kind} dpm_solver++ 3M taylor", ns, Schedule.from_grid(
                    frac, ns, "dpm_solver++", 3, options=dict(variant="taylor", lower_order_final=False)))]
        grid, eval_grid = learned_looking(ns, 6, seed=2, decoupled=True)
        out.append((f"{kind} LD3-like (decoupled times, learned table)", ns, Schedule.from_grid(
            grid, ns, "tabulated", 3, eval_grid=eval_grid, options=dict(form="data"),
            coefficients=learned_table(ns, grid, eval_grid, seed=3))))
        if kind == "vp":
            whole, _ = learned_looking(ns, 8, seed=1, integer=True)
            out.append(("vp dpm_solver++ 2M, whole timesteps", ns, Schedule.from_grid(whole, ns, "dpm_solver++", 2)))
            out.append(("vp heun", ns, Schedule.from_grid(frac, ns, "heun", 2)))
    if ld3_file:
        learned = load_schedule(ld3_file)
        out.append((f"flow LD3 file ({learned.provenance.get('method')}, {learned.teacher.get('name')}, "
                    f"{learned.solver} {learned.order}, NFE {learned.nfe})", learned.make_noise_schedule(), learned))
    return out


def relative(ours, theirs) -> float:
    return float((theirs.double() - ours).norm() / ours.norm())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui-dir", type=Path, required=True)
    ap.add_argument("--record", type=Path, default=None, help="write the fixture CI checks the nodes against")
    ap.add_argument("--ld3-file", type=Path, default=None, help="a flow schedule learned by train.py mode=ld3")
    ap.add_argument("--commit", default=None, help="the ComfyUI commit checked out, if --comfyui-dir is no git tree")
    args = ap.parse_args(argv)
    comfy, folder_paths, ncs = import_comfyui(args.comfyui_dir.resolve())
    LoadLearnstepsSchedule, LearnstepsSampler, LearnstepsExactTimesteps = load_nodes(args.comfyui_dir.resolve())

    tmp = Path(tempfile.mkdtemp())
    folder_paths.folder_names_and_paths["learnsteps"] = ([str(tmp)], {".json"})
    comfy.utils.PROGRESS_BAR_ENABLED = False
    cases_in = schedules(args.ld3_file)
    models = {}
    for _, ns, _ in cases_in:
        key = repr(ns)
        if key not in models:
            models[key] = comfy_model(comfy, ns)
    vp_key, flow_key = repr(DiscreteDDPM("scaled_linear")), repr(FlowMatching(shift=3.0))
    latent = {"samples": torch.zeros(SHAPE)}
    noise = comfy.sample.prepare_noise(latent["samples"], SEED)  # what SamplerCustom's Noise_RandomNoise draws
    cond = [[torch.zeros(1, 1, 8), {}]]

    def run(model, sampler, sigmas):
        net = model.model.diffusion_model
        net.calls.clear()
        out = ncs.SamplerCustom().sample(model, True, SEED, 1.0, cond, cond, sampler, sigmas, latent)[0]["samples"]
        return out, [c[0] for c in net.calls]

    def pasted_sampler(recipe):
        kw = recipe.get("kwargs", {})
        if recipe["node"] == "SamplerDPMPP_2M_SDE":
            return ncs.SamplerDPMPP_2M_SDE().get_sampler(kw["solver_type"], kw["eta"], 1.0, "cpu")[0]
        if recipe["node"] == "SamplerDPMPP_3M_SDE":
            return ncs.SamplerDPMPP_3M_SDE().get_sampler(kw["eta"], 1.0, "cpu")[0]
        return ncs.KSamplerSelect().get_sampler(recipe["sampler"])[0]

    def read(text):  # what ManualSigmas makes of a pasted string
        return torch.FloatTensor([float(v) for v in re.findall(MANUAL_SIGMAS, text)])

    cases, refusals, files = [], [], []
    for name, ns, schedule in cases_in:
        files.append(schedule.to_dict())
        flow = ns.kind == "flow"
        model, teacher = models[repr(ns)]
        file = save_schedule(tmp / f"case{len(cases)}.json", schedule)
        ours = ls.sample(teacher, noise.double() * ns.init_noise_std(), **schedule.solve_kwargs)
        node_sigmas = LoadLearnstepsSchedule.execute(model, file.name, 0).result[0]
        routes = []  # (label, model, sampler, sigmas, what the test checks it as)
        for exact in (True,) if flow else (True, False):
            routes.append(("node" + ("" if exact else ", exact_timesteps off"), model,
                           LearnstepsSampler.execute(file.name, exact).result[0], node_sigmas,
                           dict(route="node", exact_timesteps=exact)))
        payload, _ = export(schedule, "comfyui")
        recipe = schedule.consumers()["comfyui"]
        if "sampler" in recipe:
            settings = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in recipe["kwargs"].items())
            label = f"pasted, {recipe['sampler']}" + (f" ({settings})" if settings else "")
            routes.append((label, model, pasted_sampler(recipe), read(payload), dict(route="pasted", recipe=recipe)))
            if not flow:
                routes.append((f"{label}, through 'learnsteps exact timesteps'",
                               LearnstepsExactTimesteps.execute(model).result[0], pasted_sampler(recipe),
                               read(payload), dict(route="pasted", recipe=recipe, exact_timesteps=True)))
        if flow and schedule.solver == "dpm_solver++" and schedule.order == 2:  # the sampler of the old export's note
            routes.append(("pasted, dpmpp_2m", model, pasted_sampler(dict(node="KSamplerSelect", sampler="dpmpp_2m")),
                           read(payload), dict(route="other")))
        if flow and (schedule.solver in ("euler", "tabulated") or schedule.solver == "dpm_solver++" and schedule.order == 2):
            old_sampler = "euler" if schedule.solver == "euler" else "dpmpp_2m"
            old = ", ".join(f"{v:.10g}" for v in schedule.sigmas)  # the export before #34: sigma/alpha whatever the model
            routes.append((f"the old export's sigma/alpha list, {old_sampler}", model,
                           pasted_sampler(dict(node="KSamplerSelect", sampler=old_sampler)), read(old),
                           dict(route="other")))
        if flow and repr(ns) != flow_key:  # on a model of another shift, the loader refuses the file
            try:
                LoadLearnstepsSchedule.execute(models[flow_key][0], file.name, 0)
                refusals.append(dict(file=len(files) - 1, error=None))
            except ScheduleError as err:
                refusals.append(dict(file=len(files) - 1, error=str(err).replace(str(file), "FILE")))
                print(f"{name}, on the shift-3 model: {err}")
        for label, m, sampler, sigmas, meta in routes:
            out, calls = run(m, sampler, sigmas)
            rel = relative(ours, out)
            print(f"{name:58s} {label:70s} {rel:.2g}", flush=True)
            cases.append(dict(name=name, label=label, **meta, file=len(files) - 1, sigmas=sigmas.tolist(),
                              output=out.flatten().tolist(), timesteps=calls, relative=rel))
    if args.record:
        write_json(args.record, conventions(comfy, models[vp_key][0], models[flow_key][0], noise, args.comfyui_dir,
                                            args.commit) | dict(files=files, cases=cases, refusals=refusals))
        print(f"wrote {args.record}")
    return 0


def conventions(comfy, vp_model, flow_model, noise, comfyui_dir: Path, commit: str | None) -> dict:
    """What ComfyUI does with sigmas, recorded for the stand-in of tests/test_comfyui.py to be checked against."""
    from learnsteps.interop.comfyui.sampler import exact_timesteps

    commit = commit or subprocess.run(["git", "rev-parse", "HEAD"], cwd=comfyui_dir, capture_output=True,
                                      text=True).stdout.strip()
    version = (comfyui_dir / "comfyui_version.py").read_text().split('"')[1]
    vp = vp_model.get_model_object("model_sampling")
    fl = flow_model.get_model_object("model_sampling")
    s = vp.sigmas
    probes = torch.cat([s[[0, 1, 100, 500, 998, 999]], torch.exp(torch.linspace(s[0].log(), s[-1].log(), 17)),
                        torch.tensor([0.5 * (s[10] + s[11]), s[-1] * (1 - 2e-6), s[-1] * (1 - 2e-5)])])
    tprobes = torch.tensor([0.0029940119, 0.05, 0.3, 0.5, 0.77, 0.99966645, 1.0])
    ones, zeros = torch.ones(2), torch.zeros(2)
    return dict(
        comfyui=dict(repository="Comfy-Org/ComfyUI", version=version, commit=commit or "unknown"),
        noise=noise.flatten().tolist(), shape=list(SHAPE), seed=SEED,
        discrete=dict(classes=[c.__name__ for c in type(vp).__mro__], sigmas=s.tolist(), sigma_max=float(vp.sigma_max),
                      probes=probes.tolist(), timestep=vp.timestep(probes).tolist(),
                      exact_timestep=exact_timesteps(vp).timestep(probes).tolist(),
                      max_denoise=[bool(comfy.samplers.KSAMPLER(None).max_denoise(_wrap(vp_model), p[None]))
                                   for p in probes[-3:]],
                      noise_scaling=[vp.noise_scaling(s[-1], ones, zeros, True).tolist(),
                                     vp.noise_scaling(s[500], ones, zeros, False).tolist()]),
        flow=dict(classes=[c.__name__ for c in type(fl).__mro__], shift=float(fl.shift),
                  multiplier=float(fl.multiplier), sigma_max=float(fl.sigma_max), probes=tprobes.tolist(),
                  timestep=fl.timestep(tprobes).tolist(),
                  noise_scaling=fl.noise_scaling(torch.tensor(0.77), ones, zeros, True).tolist(),
                  inverse_noise_scaling=fl.inverse_noise_scaling(torch.tensor(0.25), ones).tolist()))


def _wrap(model_patcher):
    """The object `Sampler.max_denoise` reads model_sampling from (model_wrap.inner_model.model_sampling)."""
    class Wrap:
        inner_model = model_patcher.model
    return Wrap()


if __name__ == "__main__":
    raise SystemExit(main())

"""Parity of learnsteps' pipeline teachers with the pipelines themselves, family by family (issue #29).

    python benchmarks/families.py                 # the parity table of docs/benchmarks.md
    python benchmarks/families.py part=memory     # per-call memory of the real architectures (docs/scaling.md)

parity: tiny pipelines of each family with seeded random weights (tests/tiny_pipelines.py), float32, over seeds and
step counts; the worst relative error ||ours - theirs|| / ||theirs|| of the final latents for
- own: the pipeline with its own scheduler and grid against our core on that grid with that solver, from the
  pipeline's own start (flow pipelines: sigma = 1, alpha = 0; Wan's UniPC read by learnsteps' pipeline_grid, which
  also takes its model timesteps); "own, Euler by hand" is FlowMatchEuler's step x + (sigma' - sigma) v written out
  over the teacher from t = 1 (Wan: with FlowMatchEulerDiscreteScheduler put into the pipeline for that row),
  which checks the family's network call and guidance alone;
- apply_schedule: a DPM-Solver++(2M) schedule with LD3-style decoupled model times, put into the same pipeline;
- TabulatedScheduler: the same schedule as the generalized multistep solver's table.

memory: the parameters of FLUX.1-dev's and SDXL's networks and text encoders, counted on the meta device from their
published configs, and the bytes one network call saves for the backward pass to its input (what an LD3 step
holds per call with remat=false, and once with remat=true), measured at small sizes on the CPU with
torch.autograd.graph.saved_tensors_hooks, per block, then projected to 1024 x 1024 (see docs/scaling.md).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import learnsteps as ls  # noqa: E402
from learnsteps.schedule import Schedule  # noqa: E402

CASES = {  # family: (tiny builder, teacher options, what the pipeline call is)
    "SDXL (Euler discrete, CFG 4)": ("sdxl", dict(guidance=4.0, height=8, width=8)),
    "FLUX.1 [dev] (guidance 3.5 embedded)": ("flux", dict(guidance=3.5, height=16, width=16, max_sequence_length=16)),
    "FLUX.1 [dev] + true CFG 2": ("flux", dict(guidance=3.5, true_cfg=2.0, negative_prompt="ugly", height=16, width=16,
                                               max_sequence_length=16)),
    "FLUX.1 [schnell]": ("schnell", dict(height=16, width=16, max_sequence_length=16)),
    "FLUX.2 [dev] (guidance 4 embedded)": ("flux2", dict(guidance=4.0, height=16, width=16, max_sequence_length=192)),
    "Qwen-Image (true CFG 4)": ("qwen", dict(true_cfg=4.0, negative_prompt=" ", height=16, width=16)),
    "Wan 2.1 (UniPC, CFG 5, 5 frames)": ("wan", dict(guidance=5.0, height=16, width=16, frames=5,
                                                     max_sequence_length=16)),
}
PROMPTS = ["a red dot", "two cats"]


def parity(seeds=(0, 1, 2), steps=(4, 8)) -> list[dict]:
    import diffusers
    from tiny_pipelines import BUILD, load_pipeline, own_grid, run_pipeline  # what the tests build and call

    from learnsteps.interop.diffusers import apply_schedule, initial_sample, pipeline_grid
    from learnsteps.interop.scheduler import TabulatedScheduler
    from learnsteps.teachers import load_teacher

    root = Path(tempfile.mkdtemp(prefix="learnsteps-pipelines-"))
    rows = []
    for label, (name, options) in CASES.items():
        directory = root / name
        if not directory.exists():
            BUILD[name](directory)
        teacher = load_teacher(str(directory), conditions=PROMPTS, **options)
        s, cond = teacher.noise_schedule, torch.tensor([0, 1])
        worst = dict(own=0.0, by_hand=0.0, apply=0.0, tabulated=0.0)
        for n in steps:
            for seed in seeds:
                noise = torch.randn(2, *teacher.shape, generator=torch.Generator().manual_seed(seed))
                pipe = load_pipeline(directory)
                theirs = run_pipeline(pipe, teacher, noise, num_inference_steps=n)
                grid, solver = own_grid(pipe, teacher)
                if solver["solver"] == "unipc":  # called at its own timesteps: pipeline_grid reads them
                    pg = pipeline_grid(pipe, n)
                    ours = ls.sample(teacher, noise * pg.latents_scale, cond=cond, **pg.solve_kwargs) * pg.output_scale
                else:
                    ours = ls.sample(teacher, noise, grid, cond=cond, **solver)
                worst["own"] = max(worst["own"], rel(ours, theirs))
                if s.kind == "flow":
                    if solver["solver"] != "euler":
                        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=s.shift)
                        theirs = run_pipeline(pipe, teacher, noise, num_inference_steps=n)
                        grid, _ = own_grid(pipe, teacher)
                    x = noise
                    with torch.no_grad():
                        for t, t_next in zip(grid[:-1], grid[1:]):
                            x = x + (t_next - t) * teacher(x, t.expand(2), cond)
                    worst["by_hand"] = max(worst["by_hand"], rel(x, theirs))
                g = ls.grids.make("shifted" if s.kind == "flow" else "logsnr", n, s, to_zero=True)
                e = g.clone()
                e[1:-1] += 0.2 * (g[2:] - g[1:-1])  # decoupled model times, as LD3 learns them
                schedule = Schedule.from_grid(g, s, "dpm_solver++", 2, eval_grid=e, teacher=teacher.record(steps=n))
                ours = ls.sample(teacher, noise * s.init_noise_std(), cond=cond, **schedule.solve_kwargs)
                pipe = load_pipeline(directory)
                kwargs = apply_schedule(pipe, schedule)
                worst["apply"] = max(worst["apply"], rel(run_pipeline(
                    pipe, teacher, initial_sample(pipe.scheduler, schedule, noise), **kwargs), ours))
                pipe.scheduler = TabulatedScheduler.from_schedule(schedule)
                worst["tabulated"] = max(worst["tabulated"], rel(run_pipeline(
                    pipe, teacher, noise * pipe.scheduler.init_noise_sigma, num_inference_steps=n), ours))
        rows.append(dict(family=label, shape=teacher.shape, **worst, flow=s.kind == "flow"))
        print(f"{label}: {worst}", flush=True)
    return rows


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def parity_table(rows: list[dict], seeds, steps) -> str:
    lines = [f"worst over seeds {list(seeds)} x steps {list(steps)}, 2 prompts, float32; relative error of the final "
             "latents", "",
             "| family (tiny pipeline) | latents | own grid and solver | own, Euler by hand from t = 1 | "
             "apply_schedule (DPM-Solver++(2M), decoupled) | TabulatedScheduler |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        own = f"{r['own']:.2g}"
        hand = f"{r['by_hand']:.2g}" if r["flow"] else "(not a flow model)"
        lines.append(f"| {r['family']} | {'x'.join(map(str, r['shape']))} | {own} | {hand} | {r['apply']:.2g} | "
                     f"{r['tabulated']:.2g} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ memory
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=[16, 56, 56])  # black-forest-labs/FLUX.1-dev transformer/config.json
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, down_block_types=(
    "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=(
    "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(320, 640, 1280), layers_per_block=2,
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128,
              feed_forward_proj="gated-gelu")  # google/t5-v1_1-xxl (FLUX's text_encoder_2)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, vocab_size=49408)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, vocab_size=49408,
              projection_dim=1280)


def count(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def built(build, dtype):
    """The network of `build` directly in `dtype` (made on the meta device, then filled with seeded N(0, 0.02):
    no float32 copy of a billion parameters on the way), frozen."""
    with torch.device("meta"):
        net = build()
    net = net.to(dtype).to_empty(device="cpu").requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in list(net.parameters()) + list(net.buffers()):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32).mul_(0.02))
    return net


def saved_bytes(module, call, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors one call of `module` saves for the backward pass to its input x (its own
    weights, which backward reads but which are there anyway, left out)."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    x = x.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call(x)
    return sum(seen.values())


def flux_saved(double: int, single: int, side: int, text: int = 512, dtype=torch.bfloat16) -> int:
    """Saved bytes of a FLUX.1-dev-width transformer with `double` and `single` blocks at side x side pixels."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    net = built(lambda: FluxTransformer2DModel(**dict(FLUX_DEV, num_layers=double, num_single_layers=single)), dtype)
    h = side // 16
    kw = dict(timestep=torch.full((1,), 0.5, dtype=dtype), guidance=torch.full((1,), 3.5),
              pooled_projections=torch.randn(1, 768, dtype=dtype), encoder_hidden_states=torch.randn(1, text, 4096,
                                                                                                   dtype=dtype),
              txt_ids=torch.zeros(text, 3, dtype=dtype), img_ids=FluxPipeline._prepare_latent_image_ids(1, h, h, "cpu",
                                                                                                       dtype))
    out = saved_bytes(net, lambda x: net(hidden_states=x, return_dict=False, **kw)[0], torch.randn(1, h * h, 64,
                                                                                                   dtype=dtype))
    return out


def sdxl_saved(side: int, dtype=torch.bfloat16) -> int:
    from diffusers import UNet2DConditionModel

    net = built(lambda: UNet2DConditionModel(**SDXL_UNET), dtype)
    added = dict(text_embeds=torch.randn(1, 1280, dtype=dtype), time_ids=torch.tensor([[side, side, 0, 0, side, side]],
                                                                                       dtype=dtype))
    ctx = torch.randn(1, 77, 2048, dtype=dtype)
    out = saved_bytes(net, lambda x: net(x, torch.tensor([500.0]), encoder_hidden_states=ctx, added_cond_kwargs=added)
                      .sample, torch.randn(1, 4, side // 8, side // 8, dtype=dtype))
    return out


def memory(dtype=torch.bfloat16) -> str:
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    params = {"FLUX.1-dev transformer": count(lambda: FluxTransformer2DModel(**FLUX_DEV)),
              "T5-XXL encoder": count(lambda: T5EncoderModel(T5Config(**T5_XXL))),
              "CLIP-L text encoder": count(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L))),
              "SDXL UNet": count(lambda: UNet2DConditionModel(**SDXL_UNET)),
              "CLIP-G text encoder (projection)": count(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)))}
    lines = ["| network | parameters | bfloat16 weights |", "|---|---|---|"]
    lines += [f"| {k} | {v / 1e9:.3f} B | {2 * v / 2**30:.2f} GiB |" for k, v in params.items()]
    lines += ["", "saved for the backward pass to the input, one call, batch 1, bfloat16 (measured, MiB):", "",
              "| network | pixels | tokens (image + text) | 1 double + 1 single | 2 double + 1 single | "
              "1 double + 2 single |", "|---|---|---|---|---|---|"]
    flux = {}
    for side in (128, 256):
        flux[side] = [flux_saved(d, s, side) for d, s in ((1, 1), (2, 1), (1, 2))]
        lines.append(f"| FLUX.1-dev width | {side}x{side} | {(side // 16) ** 2} + 512 | "
                     + " | ".join(f"{b / 2**20:.0f}" for b in flux[side]) + " |")
    sdxl = {side: sdxl_saved(side) for side in (256, 512)}
    lines += ["", "| network | pixels | saved (MiB) |", "|---|---|---|"]
    lines += [f"| SDXL UNet (whole) | {side}x{side} | {b / 2**20:.0f} |" for side, b in sdxl.items()]
    lines += ["", *projection(params, flux, sdxl)]
    print("\n".join(lines))
    return "\n".join(lines), params, flux, sdxl


def projection(params: dict, flux: dict, sdxl: dict) -> list[str]:
    """Saved bytes per call at other sizes, linear in the tokens (image + text; FLUX) or latent pixels (SDXL)
    through the two measured sizes (the measured growth is linear: attention saves O(tokens), as flash attention
    does), and FLUX's 19 double + 38 single blocks from the per-block differences; then an LD3 step with
    remat=true: the weights, plus one call's saved tensors (the call being recomputed), times the batch (x 2
    for CFG, SDXL)."""
    tokens = {side: (side // 16) ** 2 + 512 for side in flux}
    (s0, s1) = sorted(flux)

    def fit(v0, v1, n0, n1):
        b = (v1 - v0) / (n1 - n0)
        return lambda n: v0 + b * (n - n0)

    double = fit(flux[s0][1] - flux[s0][0], flux[s1][1] - flux[s1][0], tokens[s0], tokens[s1])
    single = fit(flux[s0][2] - flux[s0][0], flux[s1][2] - flux[s1][0], tokens[s0], tokens[s1])
    base = fit(flux[s0][0], flux[s1][0], tokens[s0], tokens[s1])
    unet = fit(sdxl[256], sdxl[512], 32 * 32, 64 * 64)
    gib = 2**30
    out = ["projected, bfloat16: one call's saved tensors and an LD3 step (remat=true) = weights + batch x one call",
           "", "| model | size | one call, batch 1 | LD3 step, batch 1 | LD3 step, batch 2 | weights |",
           "|---|---|---|---|---|---|"]
    for side in (512, 768, 1024):
        n = (side // 16) ** 2 + 512
        call = base(n) + 18 * double(n) + 37 * single(n)
        w = 2 * params["FLUX.1-dev transformer"]
        out.append(f"| FLUX.1-dev (one pass, guidance embedded) | {side}x{side} | {call / gib:.1f} GiB | "
                   f"{(w + call) / gib:.1f} GiB | {(w + 2 * call) / gib:.1f} GiB | {w / gib:.1f} GiB |")
    for side in (512, 768, 1024):
        call = 2 * unet((side // 8) ** 2)  # the CFG batch: conditional and unconditional rows
        w = 2 * params["SDXL UNet"]
        out.append(f"| SDXL (CFG: 2 rows a sample) | {side}x{side} | {call / gib:.1f} GiB | {(w + call) / gib:.1f} GiB "
                   f"| {(w + 2 * call) / gib:.1f} GiB | {w / gib:.1f} GiB |")
    return out


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv)
    if opts.get("part", "parity") == "parity":
        seeds, steps = (0, 1, 2), (4, 8)
        print(parity_table(parity(seeds, steps), seeds, steps))
    else:
        memory()


if __name__ == "__main__":
    main(sys.argv[1:])

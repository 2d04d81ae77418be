import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from learnsteps.config import load_config
from learnsteps.core.denoiser import NetworkDenoiser, convert
from learnsteps.core.schedules import DiscreteDDPM, FlowMatching, VPLinear
from learnsteps.dsno.backbones import TemporalConv, place, sites
from learnsteps.dsno.module import DSNOConfig, loss_of, make_student, student_times, time_weights, train_dsno
from learnsteps.dsno.student import READ_GAIN, StudentError, load_student, read_time, save_student
from learnsteps.teachers.network import DiffusersUNet, NetworkTeacher
from learnsteps.teachers.unet import UNet, UNetConfig

from helpers import benchmark_module

ROOT = Path(__file__).resolve().parents[1]
SMALL = UNetConfig(channels=8, channel_mult=[1, 2], blocks_per_level=1)


def test_temporal_conv_mixes_times_only_through_its_modes():
    torch.manual_seed(0)
    conv = TemporalConv(channels=3, num_times=6, modes=2)
    assert conv.weight.abs().max() == 0  # the untrained layer is the identity
    h = torch.randn(2, 6, 3, 16)
    torch.testing.assert_close(conv(h), h, rtol=0, atol=0)
    with torch.no_grad():
        conv.weight.copy_(torch.randn_like(conv.weight))
    out = conv(h)
    assert out.shape == h.shape and (out - h).abs().max() > 0
    # a signal with only frequencies >= 2 along the time axis is outside the kept modes: the layer passes it
    m = torch.arange(6, dtype=torch.float32)
    high = torch.cos(2 * torch.pi * 2 * m / 6)[None, :, None, None].expand(2, 6, 3, 16)
    torch.testing.assert_close(conv(high), high, rtol=0, atol=1e-5)
    # positions do not mix: changing one position changes only that position's output
    h2 = h.clone()
    h2[..., 0] += 1
    diff = (conv(h2) - conv(h)).abs().sum(dim=(0, 1, 2))
    assert diff[0] > 0 and diff[1:].max() == 0
    # on a block's folded output: (b m, C, H, W) feature maps and (b m, L, C) tokens give the same mixing
    maps = torch.randn(2 * 6, 3, 4, 4)
    tokens = maps.flatten(2).transpose(1, 2)
    torch.testing.assert_close(conv.on_features(maps).flatten(2).transpose(1, 2), conv.on_features(tokens))


def test_fft_runs_in_float32_under_autocast():
    conv = TemporalConv(channels=4, num_times=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(torch.randn(1, 4, 4, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_placements_pick_every_every_other_or_one_per_level():
    kind, levels = sites(UNet(UNetConfig(channels=8, channel_mult=[1, 2], blocks_per_level=2)))
    assert kind == "learnsteps_unet" and [len(level) for level in levels] == [2, 2, 2, 3, 3]
    assert len(place(levels, "every")) == 12
    assert place(levels, "every_other") == ["down.1", "down.3", "mid.1", "up.0", "up.2", "up.3", "up.5"]
    assert place(levels, "one_per_level") == ["down.1", "down.3", "mid.1", "up.2", "up.5"]
    with pytest.raises(ValueError, match="unknown placement"):
        place(levels, "sometimes")
    with pytest.raises(ValueError, match="no known backbone"):
        sites(nn.Sequential(nn.Linear(2, 2)))


def test_reading_time_is_the_input_time_unless_the_conversion_amplifies():
    flow = FlowMatching(shift=3.0)
    assert read_time(flow, "flow", flow.t_max) == flow.t_max  # x0 = x_T - sigma F: coefficients <= 1
    vp = VPLinear()
    assert read_time(vp, "v", vp.t_max) == vp.t_max and read_time(vp, "x0", vp.t_max) == vp.t_max
    r = read_time(vp, "epsilon", vp.t_max)  # x0 = (x - sigma eps) / alpha, alpha(t_max) = 0.0066
    assert abs(float(vp.alpha(torch.tensor(r, dtype=torch.float64))) - 1 / READ_GAIN) < 1e-9


# ---- exact initialisation on every backbone kind ---------------------------------------------------------------
class SDXLNet(nn.Module):
    """A tiny SDXL UNet (text_time added conditions) called as net(x, t, c), c an index into its prompt tables,
    as a pipeline adapter calls it."""

    def __init__(self):
        from diffusers import UNet2DConditionModel

        super().__init__()
        torch.manual_seed(0)
        self.unet = UNet2DConditionModel(
            block_out_channels=(8, 16), layers_per_block=1, sample_size=4, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
            cross_attention_dim=16, norm_num_groups=2)
        self.register_buffer("embeds", torch.randn(4, 5, 16))
        self.register_buffer("pooled", torch.randn(4, 32))
        self.register_buffer("time_ids", torch.tensor([8.0, 8.0, 0.0, 0.0, 8.0, 8.0]))

    def forward(self, x, t, c):
        added = dict(text_embeds=self.pooled[c], time_ids=self.time_ids.to(x.dtype).expand(len(x), 6))
        return self.unet(x, t, encoder_hidden_states=self.embeds[c], added_cond_kwargs=added).sample


class FluxNet(nn.Module):
    """A tiny FLUX transformer (double and single blocks, guidance embedding, img / txt ids) on (B, 4, 4, 4)
    latents as tokens, called as net(x, t, c)."""

    def __init__(self):
        from diffusers import FluxTransformer2DModel

        super().__init__()
        torch.manual_seed(0)
        self.transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
            guidance_embeds=True)
        self.register_buffer("embeds", torch.randn(4, 5, 32))
        self.register_buffer("pooled", torch.randn(4, 32))

    def forward(self, x, t, c):
        b, ch, h, w = x.shape
        axes = torch.zeros(1), torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
        img_ids = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
        out = self.transformer(hidden_states=x.flatten(2).transpose(1, 2), timestep=t, guidance=torch.full_like(t, 3.5),
                               pooled_projections=self.pooled[c], encoder_hidden_states=self.embeds[c],
                               txt_ids=torch.zeros(5, 3), img_ids=img_ids.reshape(-1, 3)).sample
        return out.transpose(1, 2).reshape(b, ch, h, w)


def network_teacher(net, schedule, prediction, shape, conditions=()):
    teacher = NetworkTeacher(net, schedule, prediction, dict(kind="test", net=type(net).__name__))
    teacher.shape, teacher.conditional, teacher.conditions = shape, bool(conditions), list(conditions)
    return teacher


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    pytest.importorskip("diffusers")
    import tiny_pipelines

    root = tmp_path_factory.mktemp("dsno_pipelines")
    return dict(dit_flow=tiny_pipelines.dit(root / "dit_flow", flow=True), dit=tiny_pipelines.dit(root / "dit"),
                sd=tiny_pipelines.stable_diffusion(root / "sd"), sd3=tiny_pipelines.sd3(root / "sd3"))


def teacher_of(kind, pipelines):
    from diffusers import UNet2DModel

    from learnsteps.teachers import load_teacher

    torch.manual_seed(0)
    if kind == "learnsteps_unet":
        net = UNet(SMALL)
        with torch.no_grad():  # a trained network's weights, not the zero-initialised output layers of a fresh one
            for p in net.parameters():
                p.normal_(0, 0.3)
        return network_teacher(net, VPLinear(), "epsilon", (1, 8, 8))
    if kind == "unet2d_v":
        unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                           layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4)
        return network_teacher(DiffusersUNet(unet), DiscreteDDPM(), "v", (1, 8, 8))
    if kind == "sdxl":
        return network_teacher(SDXLNet(), DiscreteDDPM("scaled_linear", 1000, 0.00085, 0.012), "epsilon", (4, 4, 4),
                               ["a", "b", "c"])
    if kind == "flux":
        return network_teacher(FluxNet(), FlowMatching(shift=3.0), "flow", (4, 4, 4), ["a", "b", "c"])
    conditions = [0, 1, 2] if kind.startswith("dit") else ["a red dot", "two cats", "a cat"]
    return load_teacher(str(pipelines[kind]), conditions=conditions, guidance=2.0)


KINDS = {  # backbone kind: (its adapter, temporal layers at placement=every)
    "learnsteps_unet": ("learnsteps_unet", 8), "unet2d_v": ("diffusers_unet", 8), "sd": ("diffusers_unet", 8),
    "sdxl": ("diffusers_unet", 8), "dit_flow": ("transformer", 1), "sd3": ("transformer", 1),
    "flux": ("transformer", 3)}


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_untrained_student_is_the_teacher_network_at_each_output_time(kind, pipelines):
    """In float64: copy m of the student's one folded call is the teacher's own (unguided) network call at time
    input m to 1e-12, and the student's prediction is that output read as the teacher's prediction type."""
    teacher = teacher_of(kind, pipelines)
    teacher.net.double()
    cfg = DSNOConfig(num_times=4, placement="every")
    student = make_student(cfg, teacher, student_times(cfg, teacher.noise_schedule))
    assert (student.cfg.kind, len(student.cfg.sites)) == KINDS[kind]
    assert student.cfg.prediction == teacher.prediction
    x = torch.randn(3, *teacher.shape, dtype=torch.float64)
    cond = torch.tensor([2, 0, 1]) if getattr(teacher, "conditional", False) else None
    with torch.no_grad():
        raw, pred = student.network(x, cond), student(x, cond)
        for m, s in enumerate(student.time_input):
            ref = NetworkDenoiser.forward(teacher, x, s.expand(3), cond)  # the teacher's call, without guidance
            assert float((raw[:, m] - ref).abs().max()) <= 1e-12 * max(1.0, float(ref.abs().max()))
            torch.testing.assert_close(pred[:, m], convert(ref, teacher.prediction, "x0", x, *student.read_at),
                                       rtol=1e-12, atol=1e-12)
        for layer in (mod for name, mod in student.named_modules() if name.endswith("dsno_temporal")):
            layer.weight.copy_(0.1 * torch.randn_like(layer.weight))
        assert (student.network(x, cond) - raw).abs().max() > 1e-6  # the layers are in the path


def test_training_moves_the_zero_initialised_temporal_layers():
    teacher = teacher_of("learnsteps_unet", None)
    cfg = DSNOConfig(num_times=4, placement="one_per_level")
    student = make_student(cfg, teacher, student_times(cfg, teacher.noise_schedule))
    layers = [mod for name, mod in student.named_modules() if name.endswith("dsno_temporal")]
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    x, target = torch.randn(8, 1, 8, 8), torch.randn(8, 4, 1, 8, 8)
    before = student(x).detach()
    for _ in range(3):
        opt.zero_grad()
        (student(x) - target).pow(2).mean().backward()
        assert all(layer.weight.grad.abs().max() > 0 for layer in layers)  # LeakyReLU'(0) = 0.01 lets it through
        opt.step()
    assert all(layer.weight.abs().min() > 0 for layer in layers)
    # the copies now see each other: changing copy 0's input changes copy 3's output
    with torch.no_grad():
        a = student.network(x)
        student.time_input[0] += 0.1
        assert (student.network(x)[:, 3] - a[:, 3]).abs().max() > 0
    assert (student(x).detach() - before).abs().max() > 0


def test_the_last_time_rmse_is_an_rmse_whatever_the_loss():
    """val/rmse_last is the root mean squared error at the clean end for every loss (an l1 run logged its l1)."""
    from learnsteps.dsno.module import DSNOModule

    teacher = teacher_of("learnsteps_unet", None)
    cfg = DSNOConfig(num_times=4, placement="one_per_level", loss="l1")
    times = student_times(cfg, teacher.noise_schedule)
    student = make_student(cfg, teacher, times)
    module = DSNOModule(cfg, student, torch.ones(4), torch.arange(4))
    batch = {"x_T": torch.randn(8, 1, 8, 8), "x0": torch.randn(8, 4, 1, 8, 8)}
    loss, per_time, rmse_last = module._loss(student, batch)
    pred = student(batch["x_T"]).detach()
    torch.testing.assert_close(per_time[-1], (pred[:, -1] - batch["x0"][:, -1]).abs().mean())  # the l1 loss
    torch.testing.assert_close(rmse_last, (pred[:, -1] - batch["x0"][:, -1]).pow(2).mean().sqrt())


def test_states_are_the_flow_path_from_x_T_through_the_prediction():
    teacher = teacher_of("flux", None)
    cfg = DSNOConfig(num_times=4, targets="states")
    student = make_student(cfg, teacher, student_times(cfg, teacher.noise_schedule))
    x = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        states = student(x, torch.tensor([0, 1]))
        student.cfg.targets = "x0"
        x0 = student(x, torch.tensor([0, 1]))
    s = teacher.noise_schedule
    for m, t in enumerate(student.cfg.output_times):
        t, T = torch.tensor(t, dtype=torch.float64), torch.tensor(student.cfg.input_time, dtype=torch.float64)
        eps = (x - s.alpha(T).float() * x0[:, m]) / s.sigma(T).float()
        torch.testing.assert_close(states[:, m], s.alpha(t).float() * x0[:, m] + s.sigma(t).float() * eps)
    torch.testing.assert_close(states[:, -1], x0[:, -1])  # the clean end: the data prediction itself


# ---- a conditional, guided pipeline teacher ----------------------------------------------------------------------
def small_run(pipelines, tmp_path, *extra):
    return load_config(DSNOConfig, [ROOT / "configs" / "dsno.yaml"], [
        f"teacher={pipelines['dit_flow']}", "conditions=[0,1,2]", "guidance=3.0", "trainer.max_steps=3",
        "trainer.val_check_interval=3", "trajectories.n=12", "trajectories.steps_per_interval=2", "batch_size=4",
        f"run_dir={tmp_path}", "trainer.progress_bar=false", "wandb.mode=disabled", *extra])


@pytest.fixture(scope="module")
def guided_run(pipelines, tmp_path_factory):
    return train_dsno(small_run(pipelines, tmp_path_factory.mktemp("guided")))


def calls_of(module: nn.Module):
    calls = []
    module.register_forward_hook(lambda mod, args, kwargs, out: calls.append(len(kwargs.get("hidden_states", args[0]
                                                                                           if args else None))),
                                 with_kwargs=True)
    return calls


def test_a_guided_teacher_s_student_samples_in_one_unguided_pass(pipelines, guided_run):
    from learnsteps.teachers import load_teacher

    info = json.loads((guided_run / "student" / "student.json").read_text())
    assert info["guidance_distilled"] == 3.0 and info["network_calls_per_sample"] == 1
    assert info["student"]["backbone"] == "teacher" and info["student"]["kind"] == "transformer"
    assert info["training"]["steps"] == 3
    student = load_student(guided_run / "student")  # rebuilt on the recorded teacher's own transformer
    teacher = load_teacher(str(pipelines["dit_flow"]), conditions=[0, 1, 2], guidance=3.0)
    ours, theirs = calls_of(student.denoiser.net.net), calls_of(teacher.net.net)
    x, cond = torch.randn(5, *teacher.shape), torch.tensor([0, 1, 2, 0, 1])
    out = student.sample(x, cond)
    teacher(x, torch.tensor(0.5), cond)
    assert ours == [5 * 4]  # one call, the 4 output times folded into the batch, no guidance branch
    assert theirs == [2 * 5]  # the teacher's guided call doubles its batch
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.equal(out, student.sample(x, torch.tensor([1, 2, 0, 1, 2])))  # it takes the condition
    with torch.no_grad():  # it was trained: the temporal layers moved off zero
        assert max(float(p.abs().max()) for n, p in student.named_parameters() if "dsno_temporal" in n) > 0


def test_save_load_sample_equals_and_another_teacher_is_refused(pipelines, tmp_path):
    from learnsteps.teachers import load_teacher

    teacher = load_teacher(str(pipelines["dit_flow"]), conditions=[0, 1, 2], guidance=3.0)
    cfg = DSNOConfig(num_times=4, placement="every_other")
    student = make_student(cfg, teacher, student_times(cfg, teacher.noise_schedule))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    record = dict(fingerprint=teacher.fingerprint(), name=str(pipelines["dit_flow"]), **teacher.record())
    save_student(tmp_path / "student", student.eval(), dict(teacher=record))
    x, cond = torch.randn(4, *teacher.shape), torch.tensor([0, 1, 2, 0])
    before = student.sample(x, cond)
    for loaded in (load_student(tmp_path / "student"), load_student(tmp_path / "student", teacher)):
        assert torch.equal(loaded.sample(x, cond), before)
    other = load_teacher(str(pipelines["dit"]), conditions=[0, 1, 2], guidance=3.0)
    with pytest.raises(StudentError, match=r"is a student of teacher .*dit_flow.* not of this one") as err:
        load_student(tmp_path / "student", other)
    assert "\n" not in str(err.value)


def test_the_documented_loop_gives_eval_s_samples(pipelines, guided_run):
    """docs/dsno.md's loop (load_student, one call, the pipeline's VAE) against eval.py's sampling of the student."""
    from learnsteps.eval.evaluate import student_images
    from learnsteps.teachers import load_teacher

    doc = (ROOT / "docs" / "dsno.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    code = code.replace("runs/dsno/student", str(guided_run / "student"))
    code = code.replace("learnsteps/assets/digits_latent_flow", str(pipelines["dit_flow"]))
    assert len(code.strip().splitlines()) <= 20
    scope = {}
    exec(compile(code, "docs/dsno.md", "exec"), scope)
    teacher = load_teacher(str(pipelines["dit_flow"]), conditions=[0, 1, 2], guidance=3.0)
    ours = student_images(load_student(guided_run / "student", teacher), teacher, scope["noise"], scope["cond"], 3)
    torch.testing.assert_close(scope["images"], ours, rtol=0, atol=1e-6)


# ---- the data, the loss, the run ---------------------------------------------------------------------------------
def test_a_loss_sum_weighs_its_terms_by_their_factors_on_a_latent_teacher_s_images():
    """loss=l2+3*feature_contraction on the shipped latent teacher: L2 on the latents plus 3 x the contraction of
    the decoded images' digits features, as computed by hand, with gradients reaching the latents through the VAE."""
    from learnsteps.config import ConfigError
    from learnsteps.quality.features import LOSS_ASSET, load_feature_net
    from learnsteps.quality.losses import contraction
    from learnsteps.teachers import load_teacher

    teacher = load_teacher("digits_latent_flow", guidance=1.0)
    d = loss_of(DSNOConfig(teacher="digits_latent_flow", loss="l2+3*feature_contraction"), teacher)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(8, *teacher.shape, generator=g)
    x = (0.8 * y + 0.1 * torch.randn(8, *teacher.shape, generator=g)).requires_grad_(True)  # contracted
    net = load_feature_net(LOSS_ASSET)
    with torch.no_grad():
        term = contraction(net(teacher.decode(x))[0], net(teacher.decode(y))[0])
    assert float(term[0]) > 1e-4  # the batch term is on
    torch.testing.assert_close(d(x, y), (x - y).pow(2).flatten(1).mean(1) + 3 * term, rtol=1e-5, atol=1e-6)
    batch_term = loss_of(DSNOConfig(teacher="digits_latent_flow", loss="feature_contraction"), teacher)
    (grad,) = torch.autograd.grad(batch_term(x, y).mean(), x)
    assert float(grad.abs().max()) > 0  # through the VAE and the feature network to the latents
    with pytest.raises(ConfigError, match="loss"):
        load_config(DSNOConfig, [ROOT / "configs" / "dsno.yaml"], ["loss=l2+nope"])


def test_a_student_trains_on_a_loss_sum_with_a_batch_term(pipelines, tmp_path):
    """A few steps of a guided pipeline teacher's student on l2 + contraction of the decoded images."""
    run = train_dsno(small_run(pipelines, tmp_path, "loss=l2+3*contraction"))
    info = json.loads((run / "student" / "student.json").read_text())
    assert info["training"]["loss"] == "l2+3*contraction" and info["training"]["steps"] == 3
    val = info["training"]["validation"]
    assert math.isfinite(val["val/loss"]) and math.isfinite(val["val/loss_seen"]) and val["val/loss_seen"] > 0


def test_a_student_that_memorises_its_trajectories_is_told_so():
    from learnsteps.dsno.module import memorising

    note = memorising({"val/loss": 0.0068, "val/loss_seen": 0.0014}, 4096)
    assert note is not None and "4.9x" in note and "4096 trajectories" in note and "trajectories.n" in note
    assert memorising({"val/loss": 0.0027, "val/loss_seen": 0.0014}, 4096) is None  # 1.9x: learning the map
    assert memorising({"val/loss": 0.0068}, 4096) is None and memorising({}, 4096) is None


def test_the_ema_warms_up_and_copies_integer_buffers():
    from learnsteps.dsno.module import ema_update

    update = ema_update(0.999)
    ema, new = [torch.zeros(3)], [torch.ones(3)]
    update(ema, new, torch.tensor(1))  # after one update: decay min(0.999, 2 / 11)
    torch.testing.assert_close(ema[0], torch.full((3,), 9 / 11))
    update(ema, new, torch.tensor(10**6))
    labels, table = [torch.tensor([0, 7, 1000])], [torch.tensor([3, 7, 1000])]
    update(labels, table, torch.tensor(5))
    assert labels[0].tolist() == [3, 7, 1000]  # copied, never averaged (and never truncated)


def test_snr_weights_clamp_as_dsno_does():
    w = time_weights(DSNOConfig(), VPLinear(), torch.tensor([1.0, 0.3, 0.05, 0.0], dtype=torch.float64))
    assert w[0] == 1.0 and w[-1] == 1e4 and (w[1:] >= w[:-1]).all()
    assert time_weights(DSNOConfig(weighting="uniform"), VPLinear(), torch.zeros(3)).tolist() == [1, 1, 1]


def test_output_times_are_dsno_s_and_nest_across_m():
    vp = VPLinear(t_min=0.0)
    torch.testing.assert_close(student_times(DSNOConfig(num_times=4), vp),
                               torch.tensor([0.5625, 0.25, 0.0625, 0.0], dtype=torch.float64))  # DSNO, CIFAR-10
    assert student_times(DSNOConfig(num_times=1), vp).tolist() == [0.0]
    for kind in ("quadratic", "uniform", "logsnr"):
        t8 = student_times(DSNOConfig(num_times=8, times=kind), VPLinear())
        for m in (1, 2, 4):
            torch.testing.assert_close(student_times(DSNOConfig(num_times=m, times=kind), VPLinear()), t8[8 // m - 1::8 // m])
    lam = VPLinear().lambda_(student_times(DSNOConfig(num_times=4, times="logsnr"), VPLinear())[:-1])
    torch.testing.assert_close(lam.diff(), torch.full((2,), float(lam[1] - lam[0]), dtype=torch.float64))
    for bad in (dict(num_times=0), dict(times="cosine"), dict(output_times=[0.5, 0.6, 0.0]),
                dict(output_times=[0.5, 0.1])):
        with pytest.raises(ValueError):
            student_times(DSNOConfig(**bad), VPLinear())


def test_dsno_end_to_end_on_the_exact_digits_teacher(tmp_path):
    cfg = load_config(DSNOConfig, [ROOT / "configs" / "dsno.yaml"], [
        "teacher=gmm_digits", f"run_dir={tmp_path}", "trainer.max_steps=20", "trainer.val_check_interval=10",
        "trajectories.n=128", "trajectories.steps_per_interval=4", "unet.channels=8", "batch_size=16",
        "trainer.progress_bar=false", "wandb.mode=disabled", "export_every=10"])
    run_dir = train_dsno(cfg)
    student = load_student(run_dir / "student")
    info = json.loads((run_dir / "student" / "student.json").read_text())
    assert info["teacher"]["name"] == "gmm_digits" and len(info["student"]["output_times"]) == 4
    assert info["student"]["backbone"] == "unet" and info["student"]["prediction"] == "x0"  # a fresh UNet, read as x0
    assert info["training"]["steps"] == 20 and info["student"]["output_times"][-1] == 0.0
    assert info["guidance_distilled"] is None
    x = student.sample(torch.randn(5, 1, 8, 8))
    assert x.shape == (5, 1, 8, 8) and torch.isfinite(x).all()
    # the training curve: the EMA student every export_every steps, the last one the exported student
    curve = sorted(p.name for p in (run_dir / "curve").iterdir())
    assert curve == ["step-000010", "step-000020"]
    assert torch.equal(load_student(run_dir / "curve" / "step-000020").sample(x), student.sample(x))
    (run_dir / "student" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_student(run_dir / "student")
    # the same trajectories serve M = 2 and plain one-step distillation (M = 1, no temporal layers)
    for extra in (["num_times=2"], ["num_times=1", "temporal=false"]):
        more = load_config(DSNOConfig, [ROOT / "configs" / "dsno.yaml"], [
            "teacher=gmm_digits", f"run_dir={tmp_path / extra[0]}", f"data_dir={run_dir / 'trajectories'}",
            "trainer.max_steps=4", "trainer.val_check_interval=2", "unet.channels=8", "batch_size=16",
            "trainer.progress_bar=false", "wandb.mode=disabled", *extra])
        one = load_student(train_dsno(more) / "student")
        assert one.cfg.output_times == info["student"]["output_times"][4 // one.num_times - 1::4 // one.num_times]
    assert not (tmp_path / "num_times=2" / "trajectories").exists()
    # the learning rate after the warm-up: constant (as run above), or a cosine decay that is 0 at max_steps
    for schedule in ("constant", "cosine"):
        more = load_config(DSNOConfig, [ROOT / "configs" / "dsno.yaml"], [
            "teacher=gmm_digits", f"run_dir={tmp_path / schedule}", f"data_dir={run_dir / 'trajectories'}",
            "trainer.max_steps=4", "trainer.val_check_interval=2", "unet.channels=8", "batch_size=16",
            "warmup_steps=2", "trainer.checkpoint_every=1", "trainer.progress_bar=false", "wandb.mode=disabled",
            f"lr_schedule={schedule}"])
        train_dsno(more)
        ckpt = torch.load(tmp_path / schedule / "checkpoints" / "last.ckpt", weights_only=False)
        lr = ckpt["optimizer_states"][0]["param_groups"][0]["lr"]
        assert lr == (2e-4 if schedule == "constant" else pytest.approx(0.0, abs=1e-12)), (schedule, lr)
    with pytest.raises(ValueError, match="lr_schedule=cosine decays to 0 at trainer.max_steps"):
        train_dsno(load_config(DSNOConfig, [ROOT / "configs" / "dsno.yaml"], [
            "teacher=gmm_digits", f"run_dir={tmp_path / 'bad'}", "lr_schedule=cosine", "trainer.max_steps=-1",
            "wandb.mode=disabled"]))
    with pytest.raises(ValueError, match="do not hold output time"):
        train_dsno(load_config(DSNOConfig, [ROOT / "configs" / "dsno.yaml"], [
            "teacher=gmm_digits", f"run_dir={tmp_path / 'bad'}", f"data_dir={run_dir / 'trajectories'}",
            "num_times=3", "wandb.mode=disabled"]))
    assert not (tmp_path / "bad").exists()  # nothing written for a bad request
    with pytest.raises(ValueError, match="has no network to copy"):
        train_dsno(load_config(DSNOConfig, [ROOT / "configs" / "dsno.yaml"], [
            "teacher=gmm_digits", f"run_dir={tmp_path / 'bad'}", "backbone=teacher", "wandb.mode=disabled"]))
    assert not (tmp_path / "bad").exists()


def test_benchmark_variants_name_their_settings_and_pass_them_to_train_py(monkeypatch):
    V = benchmark_module("dsno", monkeypatch).Variant
    variants = [V(), V(1, False), V(4, weighting="uniform"), V(4, lr_schedule="cosine"), V(4, lr=6e-4),
                V(4, backbone="unet"), V(4, loss="l2+3*feature_contraction"), V(4, placement="every_other")]
    names = [v.name for v in variants]
    assert names[:5] == ["dsno-M4", "one-step-M1", "dsno-M4-uniform", "dsno-M4-cosine", "dsno-M4-lr0.0006"]
    assert len(set(names)) == len(names)  # each its own run directory
    for v in variants:
        cfg = load_config(DSNOConfig, [ROOT / "configs" / "dsno.yaml"], v.args())
        assert (cfg.num_times, cfg.temporal, cfg.weighting, cfg.lr_schedule, cfg.lr, cfg.loss) == (
            v.num_times, v.temporal, v.weighting, v.lr_schedule, v.lr, v.loss)


def test_benchmark_refuses_an_unknown_part_before_creating_anything(tmp_path, monkeypatch):
    """benchmarks/dsno.py part=<typo> used to write its config.json, run nothing and exit 0."""
    bench = benchmark_module("dsno", monkeypatch)
    with pytest.raises(SystemExit, match=r"part=sumary: one of all, train, eval, curve, cost, summary, cost_large"):
        bench.main(["part=sumary", f"out_dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()

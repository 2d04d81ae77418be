import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import learnsteps as ls
from learnsteps.config import load_config
from learnsteps.core.schedules import DiscreteDDPM, VPLinear
from learnsteps.ld3.grid import LD3Grid
from learnsteps.ld3 import LD3Config, train_ld3
from learnsteps.ld3.module import NO_CONDITION
from learnsteps.schedule import load_schedule
from learnsteps.teachers.gmm import toy_mixture

from helpers import F64, benchmark_module, noise, refused_by_train_py

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("schedule", [VPLinear(), DiscreteDDPM()], ids=lambda s: s.kind)
@pytest.mark.parametrize("to_zero", [False, True])
def test_initial_grid_is_the_uniform_baseline(schedule, to_zero):
    g = LD3Grid(schedule, 6, "lambda", to_zero)
    t, t_eval = g()
    torch.testing.assert_close(t, ls.grids.make("logsnr", 6, schedule, to_zero=to_zero), rtol=1e-9, atol=1e-9)
    assert torch.equal(t, t_eval)
    t, _ = LD3Grid(schedule, 6, "time", to_zero)()
    torch.testing.assert_close(t, ls.grids.make("time_uniform", 6, schedule, to_zero=to_zero), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["time_quadratic", "edm"])
def test_init_from_a_baseline_grid_reproduces_it(kind):
    s = VPLinear()
    for to_zero in (False, True):
        g = LD3Grid(s, 5, "lambda", to_zero)
        target = ls.grids.make(kind, 5, s, to_zero=to_zero)
        g.init_from(target)
        torch.testing.assert_close(g()[0], target, rtol=1e-9, atol=1e-12)


def test_grid_stays_monotone_with_pinned_ends_and_clipped_offsets():
    s = VPLinear()
    g = LD3Grid(s, 7, "lambda", to_zero=True, window=0.5)
    with torch.no_grad():
        g.theta.copy_(torch.randn(7, dtype=F64) * 2)
        g.xi.copy_(torch.randn(7, dtype=F64) * 100)  # far outside the window
    t, t_eval = g()
    assert t[0] == s.t_max and t[-2] == s.t_min and t[-1] == s.t_zero and (t[1:] < t[:-1]).all()
    assert t_eval[0] == t[0] and t_eval[-2] == t[-2] and t_eval[-1] == t[-1]
    lam, lam_e = s.lambda_(t[:-1]), s.lambda_(t_eval[:-1])
    window = 0.5 * (lam[1:] - lam[:-1]).min()
    assert ((lam_e - lam).abs() <= window + 1e-9).all() and (lam_e - lam).abs().max() > 0.9 * window
    assert not torch.equal(g(decoupled=False)[1], t_eval)


def test_gradients_reach_both_parameter_vectors_and_remat_changes_nothing():
    teacher = toy_mixture()
    g = LD3Grid(teacher.noise_schedule, 5, "lambda", to_zero=True)
    x_T, target = noise((4, 6)), noise((4, 6), seed=3)
    grads = []
    for remat in (False, True):
        g.zero_grad()
        t, t_eval = g()
        out = ls.sample(teacher, x_T, t, "unipc", 3, eval_grid=t_eval, remat=remat)
        (out - target).pow(2).mean().backward()
        grads.append((g.theta.grad.clone(), g.xi.grad.clone()))
    assert grads[0][0].abs().sum() > 0 and grads[0][1].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def saved_bytes(teacher, nfe: int, remat: bool, learned: bool = False) -> int:
    """Bytes the autograd graph holds for the backward pass of one sampler run (distinct storages); learned: the
    learned solver (DPM-Solver++(3M)'s table on the grid, found by the probe, plus corrections)."""
    from learnsteps.core.steps import Grid
    from learnsteps.ld3.solver import LearnedTable

    storages = {}

    def pack(t):  # the storage is held, so that a freed one's address is never reused by another and miscounted
        s = t.untyped_storage()
        storages[s.data_ptr()] = s
        return t

    g = LD3Grid(teacher.noise_schedule, nfe, "lambda", to_zero=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        t, t_eval = g()
        run = dict(solver="dpm_solver++", order=3)
        if learned:
            table = LearnedTable("dpm_solver++", 3, {}, nfe, "data", 3)(Grid(teacher.noise_schedule, t, t_eval))
            run = dict(solver="tabulated", order=3, coefficients=table)
        ls.sample(teacher, torch.randn(2, *teacher.shape), t, eval_grid=t_eval, remat=remat, **run)
    return sum(s.nbytes() for s in storages.values())


def test_rematerialisation_keeps_the_network_activations_out_of_the_graph():
    """With remat the graph holds the solver's states (size of x, a few per step) and nothing of the network:
    the same bytes for a narrow and a wide UNet. Without it, every call's activations stay until backward."""
    from learnsteps.teachers.network import NetworkTeacher
    from learnsteps.teachers.unet import UNet, UNetConfig

    def teacher(channels):
        t = NetworkTeacher(UNet(UNetConfig(channels=channels)), VPLinear(), "epsilon", {})
        t.shape = (1, 8, 8)
        return t

    narrow, wide = teacher(8), teacher(32)
    state = 2 * 64 * 4  # one x of the batch, float32
    for learned in (False, True):  # the learned solver's table adds scalars, not network activations
        for nfe in (4, 10):
            assert saved_bytes(narrow, nfe, True, learned) == saved_bytes(wide, nfe, True, learned)
            assert saved_bytes(wide, nfe, False, learned) > 4 * saved_bytes(wide, nfe, True, learned)
        assert saved_bytes(wide, 10, True, learned) < 40 * 10 * state


def tiny(tmp_path, **kw):
    overrides = [f"run_dir={tmp_path}", "teacher=toy_mixture", "nfe=4", "solver=unipc", "order=2",
                 "pairs.train=8", "pairs.val=8", "pairs.test=32", "pairs.solver=reference", "pairs.rtol=1e-7", "rounds_theta=1",
                 "rounds_joint=2", "batch_size=4", "val_every_n_steps=1", "loss=l2", "restarts=1", "trainer.progress_bar=false",
                 "wandb.mode=disabled"] + [f"{k}={v}" for k, v in kw.items()]
    return load_config(LD3Config, [ROOT / "configs" / "ld3.yaml"], overrides)


def test_ld3_end_to_end_on_an_exact_teacher(tmp_path):
    cfg = tiny(tmp_path)
    run_dir = train_ld3(cfg)
    schedule = load_schedule(run_dir / "schedule.json", solver="unipc", order=2, nfe=4)
    assert schedule.teacher["fingerprint"] == toy_mixture().fingerprint()
    assert schedule.provenance["method"] == "ld3" and schedule.times[-1] == 0.0
    rows = (run_dir / "results.md").read_text()
    for name in ("ld3 (learned)", "time_uniform", "time_quadratic", "logsnr", "edm"):
        assert f"| {name} |" in rows
    assert (run_dir / "grid.png").stat().st_size > 10_000
    # the best-validation grid is never worse than the initial grid (the best baseline) on the validation pairs
    val = schedule.provenance["validation"]["l2"]
    teacher = toy_mixture()
    from learnsteps.trajectories import TrajectoryDataset
    ds = TrajectoryDataset(run_dir / "pairs" / "train", dtype=F64)
    x_T, target = ds.tensors["x_T"][8:], ds.tensors["trajectory"][8:, -1]
    initial = min(float((ls.sample(teacher, x_T, ls.grids.make(k, 4, teacher.noise_schedule, to_zero=True), "unipc", 2)
                         - target).pow(2).flatten(1).mean(1).mean()) for k in ("time_uniform", "time_quadratic",
                                                                              "logsnr", "edm"))
    learned = float((ls.sample(teacher, x_T, schedule.grid, "unipc", 2, eval_grid=schedule.eval_grid) - target)
                    .pow(2).flatten(1).mean(1).mean())
    assert learned == pytest.approx(val, rel=1e-6) and learned <= initial


def test_a_grid_that_stops_at_its_own_t_min_starts_from_hand_grids_that_stop_there(tmp_path):
    """t_min: the learned grid's last time before the step to zero (LD3 keeps both ends, so it stops exactly
    there); it starts from the hand grids re-made to stop there, and never exports worse than the best of them."""
    from learnsteps.ld3.config import baseline_grid, learned_ends

    cfg = tiny(tmp_path, t_min=0.05)
    schedule = load_schedule(train_ld3(cfg) / "schedule.json", solver="unipc", order=2, nfe=4)
    assert schedule.times[-2] == 0.05 and schedule.times[-1] == 0.0 and schedule.times[0] == 1.0
    teacher = toy_mixture()
    assert learned_ends(cfg, teacher.noise_schedule).t_min == 0.05 and teacher.noise_schedule.t_min == 1e-3
    assert float(baseline_grid(cfg, teacher, "edm", 4, learned_end=True)[-2]) == pytest.approx(0.05, rel=1e-12)
    assert float(baseline_grid(cfg, teacher, "edm", 4)[-2]) == pytest.approx(1e-3, rel=1e-12)  # users' grid
    from learnsteps.trajectories import TrajectoryDataset
    ds = TrajectoryDataset(tmp_path / "pairs" / "train", dtype=F64)
    x_T, target = ds.tensors["x_T"][8:], ds.tensors["trajectory"][8:, -1]

    def val(grid, eval_grid=None):
        out = ls.sample(teacher, x_T, grid, "unipc", 2, eval_grid=eval_grid)
        return float((out - target).pow(2).flatten(1).mean(1).mean())

    starts = [val(baseline_grid(cfg, teacher, k, 4, learned_end=True)) for k in ("time_uniform", "logsnr", "edm")]
    assert val(schedule.grid, schedule.eval_grid) <= min(starts) * (1 + 1e-9)


def test_soft_forcing_stays_inside_the_ball(tmp_path):
    from learnsteps.ld3.module import LD3
    from torch.utils.data import DataLoader, TensorDataset
    import lightning as L

    cfg = tiny(tmp_path, gamma=0.05)
    teacher = toy_mixture()
    x_T, target = noise((8, 6)), noise((8, 6), seed=1)
    module = LD3(cfg, teacher, x_T)
    data = DataLoader(TensorDataset(torch.arange(8), x_T, target, torch.full((8,), NO_CONDITION)), batch_size=4)
    L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              num_sanity_val_steps=0, limit_val_batches=0).fit(module, data)
    moved = (module.x_prime - x_T).flatten(1).norm(dim=1)
    assert (moved <= module.radius * (1 + 1e-9)).all() and (moved > 0).any()
    assert module.radius == pytest.approx(0.05 * 6 / 16)


def test_feature_loss_is_the_squared_distance_of_the_digits_features_and_has_gradients():
    from learnsteps.quality.features import ASSET, LOSS_ASSET, load_feature_net
    from learnsteps.quality.losses import distance

    dist, net = distance("features", (1, 8, 8)), load_feature_net(LOSS_ASSET)
    fid_net = load_feature_net(ASSET)  # the loss network is not FID's
    assert any((a - b).abs().max() > 0.1 for a, b in zip(net.state_dict().values(), fid_net.state_dict().values()))
    x = torch.randn(5, 1, 8, 8, dtype=F64, requires_grad=True)
    y = torch.randn(5, 1, 8, 8, dtype=F64)
    d = dist(x, y)
    expected = (net(x.detach().float())[0] - net(y.float())[0]).pow(2).mean(1).double()
    torch.testing.assert_close(d.detach(), expected)
    assert d.shape == (5,) and d.dtype == F64 and (d > 0).all() and (dist(y, y) == 0).all()
    d.sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="reads 1x8x8 images"):
        distance("features", (3, 32, 32))
    on_fid_net = distance("features", (1, 8, 8), str(ASSET))(x.detach(), y)
    torch.testing.assert_close(on_fid_net, (fid_net(x.detach().float())[0] - fid_net(y.float())[0]).pow(2).mean(1).double())


@pytest.mark.parametrize("args, match", [
    (["loss=lpips"], "lpips"),
    (["loss=features", "teacher=toy_mixture"], "reads 1x8x8 images"),
    (["loss=l2+30*data_mmd", "teacher=toy_mixture"], "class_mmd use the digits feature network"),
    (["loss=features", "feature_net=/no/such/dir"], "feature_net='/no/such/dir': does not exist"),
    (["solver=heun", "order=2", "nfe=4"], "cannot spend exactly 4 model calls"),
    (["solver=ipndm", "order=4", "nfe=3"], "needs at least 4 steps"),
    (["solver=er_sde", "order=3"], "deterministic solvers"),
    (["teacher=/no/such/dir"], "unknown teacher '/no/such/dir'"),
    (["learn=solver", "solver=heun", "order=2", "nfe=5"], "learn=solver needs a multistep solver"),
    (["learn=solver", "init_schedule=/no/such.json"], "init_schedule='/no/such.json': does not exist"),
    (["learn=everything"], "learn='everything': must be one of 'grid', 'solver'"),
    (["t_min=2"], "t_min = 2.0 must lie between the schedule's t_zero"),
    (["loss=l2+2*nope"], "each with an optional positive factor"),
    (["teacher=digits_latent_flow", "guidance=1.15", "solver=ipndm", "order=2"],
     "ipndm cannot start at t = 1.0, where this teacher's sampling starts"),
])
def test_bad_ld3_arguments_exit_2(args, match, tmp_path, capsys):
    err = refused_by_train_py(["mode=ld3", f"run_dir={tmp_path / 'r'}", *args], capsys)
    assert match in err, err[-1500:]
    assert not (tmp_path / "r").exists()


def test_restarts_run_from_the_best_baselines_and_export_the_best_on_validation(tmp_path, capsys):
    """restarts=3: training runs three times, from the three best baseline grids on validation (best first); the
    exported grid is the best-validation grid of all three, never worse than any of the grids they started from."""
    cfg = tiny(tmp_path, restarts=3)
    run_dir = train_ld3(cfg)
    starts = capsys.readouterr().out.split("LD3 starts from the ")[1].split(" grids")[0].split(" / ")
    assert len(starts) == 3
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["ld3_started"] == 2 and ckpt["epoch"] == 3 * (cfg.rounds_theta + cfg.rounds_joint)  # epochs done
    schedule = load_schedule(run_dir / "schedule.json")
    teacher = toy_mixture()
    from learnsteps.trajectories import TrajectoryDataset
    ds = TrajectoryDataset(run_dir / "pairs" / "train", dtype=F64)
    x_T, target = ds.tensors["x_T"][8:], ds.tensors["trajectory"][8:, -1]

    def val(grid, eval_grid=None):
        return float((ls.sample(teacher, x_T, grid, "unipc", 2, eval_grid=eval_grid) - target).pow(2).mean())

    learned = val(schedule.grid, schedule.eval_grid)
    assert learned == pytest.approx(schedule.provenance["validation"]["l2"], rel=1e-6)
    scores = {k: val(ls.grids.make(k, 4, teacher.noise_schedule, to_zero=True)) for k in starts}
    assert list(scores.values()) == sorted(scores.values())  # started best first
    assert learned <= min(scores.values())


def test_a_sum_of_losses_weights_each_term_to_its_factor_on_its_calibration_set():
    """Each term's weight is its factor over its mean across the candidates, each candidate scored on its own (a
    batch term must not find another candidate's copy of a sample as its neighbour); a term without units
    (contraction) keeps its factor as it is."""
    from learnsteps.quality.losses import check_loss_name, distance

    x, y = noise((16, 1, 8, 8)).float().clamp(-1, 1), noise((16, 1, 8, 8), seed=1).float().clamp(-1, 1)
    x2 = (0.5 * x).clamp(-1, 1)
    both = distance("l2+3*features+40*contraction", (1, 8, 8))
    both.calibrate([x, x2], y)
    for name, factor in (("l2", 1.0), ("features", 3.0)):
        d = both.parts[name]
        mean = (float(d(x, y).mean()) + float(d(x2, y).mean())) / 2
        assert both.weights[name] * mean == pytest.approx(factor, rel=1e-5)
    assert both.weights["contraction"] == 40.0
    with pytest.raises(ValueError, match="several joined by"):
        distance("l2+l2")
    for bad in ("3*l2", "l2+0*features", "l2+x*features", "l2+-1*features", "l2+nan*features", "l2+2*nope"):
        assert check_loss_name(bad) is not None, bad
    assert check_loss_name("l2+0.5*features+100*feature_contraction") is None


def test_the_contraction_term_is_the_squared_log_scale_of_the_batch():
    """(log s)^2 for the teacher's batch scaled by s about any point and moved anywhere (float64, closed form),
    whatever each sample's pairing; its gradient expands a contracted batch; on a latent teacher it is computed on
    the decoded images and stays unweighted by calibration."""
    from learnsteps.quality.losses import distance

    contraction = distance("contraction")
    y = noise((12, 4, 3, 3))
    for s in (0.5, 0.9, 1.0, 1.3):
        x = 0.2 + s * (y - 0.2) - 1.1
        assert float(contraction(x, y).max()) == pytest.approx(math.log(s) ** 2, abs=1e-12)
        assert float(contraction(x.flip(0), y.flip(0)).max()) == pytest.approx(math.log(s) ** 2, abs=1e-12)
    x = (0.5 * y).requires_grad_()
    contraction(x, y).mean().backward()
    assert float((x.grad * y).sum()) < 0  # descending the gradient expands x
    assert contraction(y[:1], y[:1]).tolist() == [0.0]  # a batch of one has no neighbours
    decode = lambda z: z.repeat_interleave(2, -1)  # noqa: E731  a stand-in VAE: (4, 3, 3) -> (4, 3, 6)
    on_images = distance("contraction", decode=decode, image_shape=(4, 3, 6))
    assert getattr(on_images, "scale_free", False)
    assert float(on_images(0.8 * y, y).max()) == pytest.approx(math.log(0.8) ** 2, abs=1e-12)


def test_the_data_term_is_the_squared_mmd_to_the_digits_it_was_given():
    """Zero for the even-indexed digits themselves (the data it compares with), small for the odd ones it never
    sees, large for a washed-out batch; it ignores the teacher's samples, a gradient step lowers it, and a sum
    weighs it by its factor alone (no units)."""
    from learnsteps.quality.losses import distance, Sum
    from learnsteps.teachers.gmm import digits_data

    term = distance("data_mmd", (1, 8, 8))
    digits = digits_data(torch.float32)
    even, odd = digits[::2][:400], digits[1::2][:400]
    assert abs(float(term(digits[::2], digits[::2])[0])) < 1e-5
    unseen, faded = float(term(odd, odd)[0]), float(term(0.3 * odd - 0.7, odd)[0])
    assert 0 < unseen < 0.1 * faded
    torch.testing.assert_close(term(odd, even), term(odd, odd))  # the teacher's samples play no part
    x = (0.3 * odd - 0.7).requires_grad_()
    (grad,) = torch.autograd.grad(term(x, odd).mean(), x)
    step = (x - 0.5 * grad / grad.norm() * x.norm().sqrt()).detach()
    assert float(term(step, odd)[0]) < faded
    both = distance("l2+30*data_mmd", (1, 8, 8))
    assert isinstance(both, Sum)
    both.calibrate([odd], even)
    assert both.weights["data_mmd"] == 30.0
    decode = lambda z: z.repeat_interleave(2, -1).repeat_interleave(2, -2)  # noqa: E731  (1, 4, 4) -> (1, 8, 8)
    on_latents = distance("data_mmd", decode=decode, image_shape=(1, 8, 8))
    assert getattr(on_latents, "scale_free", False) and on_latents(odd[:, :, ::2, ::2], odd).shape == (400,)


def test_the_class_data_term_sees_the_contraction_within_classes_that_the_data_term_misses():
    """class_mmd compares each sample with the data of the class the digits network sees in its teacher's sample:
    small for unseen digits, and a batch whose samples are pulled halfway to their class's mean (the mix of classes
    unchanged) raises it far more than it raises data_mmd; its gradient pushes such a batch apart; the classes come
    from the teacher's samples, not the student's; a class with one sample in the batch has no batch term."""
    from learnsteps.quality.losses import _feature_net, distance
    from learnsteps.teachers.gmm import digits_data

    by_class, overall = distance("class_mmd", (1, 8, 8)), distance("data_mmd", (1, 8, 8))
    odd = digits_data(torch.float32)[1::2][:400]
    classes = _feature_net((1, 8, 8), "").classes(odd)
    contracted = odd.clone()
    for c in classes.unique():
        contracted[classes == c] = 0.5 * odd[classes == c] + 0.5 * odd[classes == c].mean(0)
    rise = {name: float(term(contracted, odd)[0]) / float(term(odd, odd)[0])
            for name, term in (("class", by_class), ("data", overall))}
    assert rise["class"] > 2 * rise["data"] and float(by_class(odd, odd)[0]) < 0.1
    x = contracted.clone().requires_grad_()
    (grad,) = torch.autograd.grad(by_class(x, odd).mean(), x)
    step = (x - 0.5 * grad / grad.norm() * x.norm().sqrt()).detach()
    assert float(by_class(step, odd)[0]) < float(by_class(contracted, odd)[0])
    spread = lambda z: torch.cdist(z.flatten(1), z.flatten(1)).mean()  # noqa: E731
    assert spread(step) > spread(contracted)
    shuffled = odd[torch.randperm(len(odd), generator=torch.Generator().manual_seed(0))]
    assert float(by_class(odd, shuffled)[0]) > 5 * float(by_class(odd, odd)[0])  # teacher's classes, not the student's
    one_each = torch.stack([odd[classes == c][0] for c in classes.unique()])
    assert float(by_class(one_each, one_each)[0]) == 0.0


def test_the_spread_term_measures_how_much_the_batch_contracts():
    """Zero for the teacher's own batch moved anywhere (translation), c^2 - 2c + 1 = (1 - c)^2 for the batch
    contracted by c towards any point (float64, closed form), and its gradient pushes a contracted batch apart."""
    from learnsteps.quality.losses import distance

    spread = distance("spread")
    y = noise((12, 4, 3, 3))
    assert float(spread(y + 0.7, y).abs().max()) < 1e-12
    for c in (0.5, 0.9, 1.3):
        x = 0.2 + c * (y - 0.2)
        assert float(spread(x, y).mean()) == pytest.approx((1 - c) ** 2, rel=1e-12)
    x = (0.5 * y).requires_grad_()
    spread(x, y).mean().backward()
    assert float((x.grad * y).sum()) < 0  # descending the gradient expands x along y
    assert spread(y.float(), y.float()).dtype == torch.float32


def test_precision_and_recall_see_a_collapse_in_diversity():
    from learnsteps.quality.metrics import precision_recall

    real = noise((400, 8), seed=3).float()
    assert precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}
    collapsed = precision_recall(0.3 * noise((400, 8), seed=4).float(), real)
    assert collapsed["precision"] > 0.9 and collapsed["recall"] < 0.5
    few = precision_recall(real[:3], real)  # a report on a handful of pairs: no 3rd neighbour, NaN (not a crash)
    assert math.isnan(few["precision"]) and math.isnan(few["recall"])


def test_auto_loss_and_remat_resolve_per_teacher():
    from learnsteps.ld3.config import REMAT_ABOVE, resolve_auto
    from learnsteps.teachers import load_teacher

    unet = load_teacher("digits_unet")
    cfg = LD3Config()
    resolve_auto(cfg, unet)  # a 1x8x8 teacher whose feature network ships, small enough to keep its graph
    assert (cfg.loss, cfg.remat) == ("l2+features", "false")
    assert sum(p.numel() for p in unet.parameters()) < REMAT_ABOVE
    cfg = LD3Config()
    resolve_auto(cfg, toy_mixture())  # no image shape: L2
    assert (cfg.loss, cfg.remat) == ("l2", "false")
    cfg = LD3Config(loss="features", remat="True")
    resolve_auto(cfg, unet)  # explicit choices are kept
    assert (cfg.loss, cfg.remat) == ("features", "true")


def test_gits_and_the_flow_models_shifted_grid_as_baselines(tmp_path):
    """baselines=[..., gits]: GITS' grid is found on the teacher's own trajectories and compared like the others;
    "shifted" (a flow model's default) is left out for a VP teacher, where it does not exist."""
    import csv

    run_dir = train_ld3(tiny(tmp_path, baselines="[logsnr,shifted,gits]"))
    with open(run_dir / "results.csv") as f:
        assert [r["grid"] for r in csv.DictReader(f)] == ["ld3 (learned)", "logsnr", "gits"]


# ------------------------------------------------------------------------------------------ learn=solver
def test_a_learned_solver_run_exports_a_version_2_file_never_worse_than_its_start(tmp_path):
    """learn=solver: the grid, offsets and the corrections to DPM-Solver++(3M)'s table are learned together; the
    export is a version-2 file whose table runs in the core exactly as validated, at least as good as the start."""
    cfg = tiny(tmp_path, learn="solver", solver="dpm_solver++", order=3, lr_coefficients=0.01)
    run_dir = train_ld3(cfg)
    schedule = load_schedule(run_dir / "schedule.json", solver="tabulated", nfe=4)
    raw = json.loads((run_dir / "schedule.json").read_text())
    assert raw["version"] == 2 and raw["options"] == {"form": "data"} and schedule.order == 3  # 3M: 3 outputs
    assert schedule.provenance["base"] == dict(solver="dpm_solver++", order=3, options={})
    assert "| ld3 (learned solver) |" in (run_dir / "results.md").read_text()
    teacher = toy_mixture()
    from learnsteps.core.steps import Grid
    from learnsteps.core.tables import solver_table
    from learnsteps.trajectories import TrajectoryDataset

    ds = TrajectoryDataset(run_dir / "pairs" / "train", dtype=F64)
    x_T, target = ds.tensors["x_T"][8:], ds.tensors["trajectory"][8:, -1]

    def val_loss(**run):
        return float((ls.solve(teacher, x_T, **run).x - target).pow(2).flatten(1).mean(1).mean())

    learned = val_loss(**schedule.solve_kwargs)
    assert learned == pytest.approx(schedule.provenance["validation"]["l2"], rel=1e-6)
    initial = min(val_loss(grid=ls.grids.make(k, 4, teacher.noise_schedule, to_zero=True), solver="dpm_solver++", order=3)
                  for k in ("time_uniform", "time_quadratic", "logsnr", "edm"))
    assert learned <= initial
    # the corrections moved the table away from DPM-Solver++(3M)'s own on the learned grid
    base = solver_table("dpm_solver++", 3, Grid(teacher.noise_schedule, schedule.grid, schedule.eval_grid), "data", width=3)
    assert (torch.tensor(schedule.coefficients) - base).abs().max() > 1e-4


def test_a_learned_solver_starts_from_an_ld3_schedule(tmp_path):
    """init_schedule: the run's first validation is the LD3 schedule's own loss (grid, offsets, base table)."""
    first = train_ld3(tiny(tmp_path / "ld3", solver="dpm_solver++", order=3))
    ld3 = load_schedule(first / "schedule.json")
    from learnsteps.ld3.module import LD3

    cfg = tiny(tmp_path / "solver", learn="solver", solver="dpm_solver++", order=3,
               init_schedule=str(first / "schedule.json"), rounds_theta=0)
    module = LD3(cfg, toy_mixture(), noise((8, 6)))
    module.set_starts([(ld3.grid, ld3.eval_grid)])
    run = module.best_run()
    torch.testing.assert_close(run["grid"], ld3.grid)
    torch.testing.assert_close(run["eval_grid"], ld3.eval_grid, rtol=1e-10, atol=1e-10)
    x = noise((3, 6))
    torch.testing.assert_close(ls.sample(toy_mixture(), x, **run).double(),
                               ls.sample(toy_mixture(), x, **ld3.solve_kwargs), rtol=1e-10, atol=1e-10)
    run_dir = train_ld3(cfg)
    assert load_schedule(run_dir / "schedule.json").provenance["validation"]["l2"] <= \
        ld3.provenance["validation"]["l2"] * (1 + 1e-9)
    # its report has the schedule it started from as a row: the LD3 run's own figures on the same held-out pairs
    import csv

    rows = [list(csv.DictReader(open(d / "results.csv"))) for d in (first, run_dir)]
    assert [(r["grid"], r["role"]) for r in rows[1][:2]] == [("ld3 (learned solver)", "learned"), ("ld3 (learned)", "start")]
    assert float(rows[1][1]["rmse"]) == pytest.approx(float(rows[0][0]["rmse"]), rel=1e-9)
    assert {r["role"] for r in rows[1][2:]} == {"hand"}


def test_a_sum_of_losses_weighs_its_terms_alike_whatever_the_run_starts_from(tmp_path, monkeypatch):
    """A sum of losses is calibrated on the hand grids' validation outputs in every run: a learned solver started
    from an LD3 schedule (closer to the teacher than any hand grid) and a run from LD3's uniform grid weigh each
    term as the run from the best hand grid does (on its own start, the paired term would weigh more). The LD3
    file records its weights and a run started from it takes them without solving a hand grid again."""
    import dataclasses

    import learnsteps.ld3.run as run
    from learnsteps.ld3.config import baseline_grid
    from learnsteps.ld3.module import LD3
    from learnsteps.schedule import save_schedule
    from learnsteps.trajectories import TrajectoryDataset

    loss = "l2+10*contraction"
    first = train_ld3(tiny(tmp_path / "ld3", loss=loss, **{"pairs.test": 0}))
    ld3 = load_schedule(first / "schedule.json")
    bare = tmp_path / "bare.json"  # the same schedule without the weights, as a file from elsewhere would be
    save_schedule(bare, dataclasses.replace(ld3, provenance={"method": "ld3", "loss": loss}))
    teacher = toy_mixture()
    pairs = run.pairs_dataset(TrajectoryDataset(first / "pairs" / "train", dtype=F64).tensors)
    val_set = torch.utils.data.Subset(pairs, range(8, 16))  # the LD3 run's validation pairs
    solver = dict(learn="solver", rounds_theta=0)
    starts = {"best": {}, "uniform": dict(init="uniform"), "time_quadratic": dict(init="time_quadratic"),
              "file without weights": dict(init_schedule=str(bare), **solver),
              "file": dict(init_schedule=str(first / "schedule.json"), **solver)}
    weights, grids = {}, []
    monkeypatch.setattr(run, "baseline_grid", lambda *a, **k: grids.append(a[2]) or baseline_grid(*a, **k))
    for name, kw in starts.items():
        grids.clear()
        cfg = tiny(tmp_path / name, loss=loss, **kw)
        module = LD3(cfg, teacher, pairs.tensors[1])
        run.initial_grids(cfg, teacher, module, val_set)
        weights[name] = module.dist.weights
        assert grids == ([] if name == "file" else ["time_uniform", "time_quadratic", "logsnr", "edm"]), name
    assert weights["best"]["contraction"] == 10.0 and ld3.provenance["loss_weights"] == weights["best"]
    for name in starts:
        assert weights[name] == pytest.approx(weights["best"], rel=1e-12), name
    # the paired term's weight is 1 over its mean on the hand grids, which the learned schedule is far below
    _, x_T, target, _ = (torch.stack([val_set[i][k] for i in range(8)]) for k in range(4))
    hand = [ls.sample(teacher, x_T, ls.grids.make(k, 4, teacher.noise_schedule, to_zero=True), "unipc", 2)
            for k in ("time_uniform", "time_quadratic", "logsnr", "edm")]
    mean = sum(float((h - target).pow(2).mean()) for h in hand) / len(hand)
    assert weights["best"]["l2"] * mean == pytest.approx(1.0, rel=1e-6)
    assert float((ls.sample(teacher, x_T, **ld3.solve_kwargs) - target).pow(2).mean()) < mean / 2
    # one loss needs no calibration: a run started from a file solves no hand grid
    grids.clear()
    cfg = tiny(tmp_path / "l2", init_schedule=str(bare), **solver)
    run.initial_grids(cfg, teacher, LD3(cfg, teacher, pairs.tensors[1]), val_set)
    assert grids == [] and "loss_weights" not in load_schedule(train_ld3(tiny(tmp_path / "l2run")) / "schedule.json").provenance


def test_an_init_schedule_for_another_solver_or_nfe_is_refused(tmp_path):
    from learnsteps.schedule import Schedule, save_schedule

    s = toy_mixture().noise_schedule
    path = save_schedule(tmp_path / "s.json", Schedule.from_grid(ls.grids.make("logsnr", 6, s, to_zero=True), s,
                                                                  "dpm_solver++", 3))
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "mode=ld3", f"run_dir={tmp_path / 'r'}",
                          "teacher=toy_mixture", "nfe=4", "learn=solver", f"init_schedule={path}"],
                         capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "WANDB_MODE": "disabled"})
    assert res.returncode == 2 and "made for NFE 6, not 4" in res.stderr, res.stderr[-1500:]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("time_mode", ["lambda", "time"])
def test_a_flow_grid_keeps_its_start_at_t_1_and_gradchecks_through_it(time_mode):
    """A flow teacher's LD3 grid starts at t = 1 (alpha = 0): the first point stays there, the learned ones live in
    (lambda(t_cap), lambda_min] (lambda mode), and the gradients with respect to theta and xi through the solver's
    step from alpha = 0 are finite and exact (gradcheck); a start from a baseline grid round-trips."""
    from learnsteps.core.schedules import FlowMatching

    from helpers import reexpressed

    s = FlowMatching(shift=3.0)
    teacher = reexpressed(toy_mixture(dim=3, components=2, noise_schedule=s), "flow")
    g = LD3Grid(s, 4, time_mode, to_zero=True)
    with torch.no_grad():
        g.theta.copy_(torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=F64))
        g.xi.copy_(torch.tensor([0.0, 0.05, -0.04, 0.0], dtype=F64))
    t, t_eval = g()
    assert t[0] == t_eval[0] == 1 and t[-2] == s.t_min and (t[1:] < t[:-1]).all() and t[1] < s.t_cap
    x_T = noise((2, 3))

    def run(theta, xi):
        t, t_eval = torch.func.functional_call(g, dict(theta=theta, xi=xi), ())
        return ls.sample(teacher, x_T, t, "dpm_solver++", 3, eval_grid=t_eval)

    theta, xi = g.theta.detach().clone().requires_grad_(), g.xi.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(run, (theta, xi), eps=1e-7, atol=1e-6, rtol=1e-4)
    baseline = ls.grids.make("logsnr", 4, s, to_zero=True)
    g.init_from(baseline)
    torch.testing.assert_close(g()[0], baseline, rtol=1e-9, atol=1e-12)


def test_the_report_judges_each_distinct_grid_once_and_draws_the_comparison(tmp_path):
    """evaluate_grids on the shipped latent flow teacher: the learned run first, then the schedule it started from,
    then the hand grids (a flow model's `shifted` at shift 1 is time_uniform: one row, both names), the teacher
    last; ratios are to the best hand grid only; the samples are each row's first outputs, and the comparison
    figure shows the best hand grid, the start, the learned schedule and the teacher."""
    from torch.utils.data import TensorDataset

    from learnsteps.ld3.report import best_hand_grid, evaluate_grids, hand_grids, plot_comparison
    from learnsteps.teachers import load_teacher

    teacher = load_teacher("digits_latent_flow", guidance=1.0)
    s = teacher.noise_schedule
    n = 24
    x_T = torch.randn(n, *teacher.shape, generator=torch.Generator().manual_seed(0))
    cond = torch.arange(n) % 10
    target = ls.sample(teacher, x_T, ls.grids.make("logsnr", 12, s, to_zero=True), "unipc", 3, cond=cond)
    cfg = LD3Config(teacher="digits_latent_flow", solver="unipc", order=2, nfe=4,
                    baselines=["time_uniform", "shifted", "edm"])
    learned = dict(grid=ls.grids.make("time_quadratic", 4, s, to_zero=True), eval_grid=None, solver="unipc", order=2)
    start = dict(grid=ls.grids.make("logsnr", 4, s, to_zero=True), eval_grid=None, solver="unipc", order=2)
    rows, samples = evaluate_grids(cfg, teacher, learned, TensorDataset(torch.arange(n), x_T, target, cond),
                                   {"ld3 (init_schedule)": start}, keep=8)
    assert [(r["grid"], r["role"]) for r in rows] == [
        ("ld3 (learned)", "learned"), ("ld3 (init_schedule)", "start"), ("time_uniform = shifted", "hand"),
        ("edm", "hand"), ("teacher", "teacher")]
    out = ls.sample(teacher, x_T, **learned, cond=cond)
    assert rows[0]["rmse"] == pytest.approx(float((out - target).pow(2).mean().sqrt()), rel=1e-5)
    torch.testing.assert_close(samples["ld3 (learned)"], out[:8], rtol=1e-5, atol=1e-5)
    best = {k: min(r[k] for r in rows[2:4]) for k in ("rmse", "fid_data")}
    assert rows[1]["rmse_vs_best"] == pytest.approx(rows[1]["rmse"] / best["rmse"], rel=1e-12)
    assert best_hand_grid(rows)["fid_data"] == best["fid_data"] and rows[-1]["rmse"] == 0
    plot_comparison(cfg, teacher, learned, hand_grids(cfg, teacher), rows, samples, tmp_path / "comparison.png")
    assert (tmp_path / "comparison.png").stat().st_size > 20_000


def test_a_run_without_held_out_pairs_exports_and_leaves_the_comparison_to_the_next(tmp_path, capsys):
    """pairs.test=0 (make demo's LD3 run, which the learned solver's run reports on): the schedule and its plot,
    no held-out pairs made and no comparison; the test set of a later run in the same pairs directory is its own."""
    run_dir = train_ld3(tiny(tmp_path, **{"pairs.test": 0}))
    assert (run_dir / "schedule.json").is_file() and (run_dir / "grid.png").is_file()
    assert not (run_dir / "results.csv").exists() and not (run_dir / "pairs" / "test").exists()
    assert "pairs.test=0: not compared with the hand grids" in capsys.readouterr().out
    with pytest.raises(Exception, match="pairs.test"):
        tiny(tmp_path / "b", **{"pairs.test": 1})


def test_make_demos_two_runs_are_valid_ld3_configs(tmp_path, monkeypatch):
    """The Makefile's demo lines parse as train.py parses them: LD3 without held-out pairs, then the learned solver
    from its schedule, on the same teacher, solver and pairs, judged on 2000 held-out pairs."""
    import re
    import shlex

    monkeypatch.chdir(tmp_path)  # where the first run has written its schedule, as `make demo` runs the second
    (tmp_path / "runs" / "demo" / "ld3").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "ld3" / "schedule.json").write_text("{}")
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    found = {k: shlex.split(v) for k, v in re.findall(r"^(DEMO\w*) := (.*)$", text, re.M)}
    ld3, solver = (load_config(LD3Config, [ROOT / "configs" / "ld3.yaml"], found["DEMO"] + found[k])
                   for k in ("DEMO_LD3", "DEMO_SOLVER"))
    assert (ld3.teacher, ld3.solver, ld3.nfe, ld3.pairs.test, ld3.learn) == ("digits_latent_flow", "unipc", 3, 0, "grid")
    assert (solver.learn, solver.pairs.test, solver.pairs.directory) == ("solver", 2000, ld3.pairs.directory)
    assert solver.init_schedule == "runs/demo/ld3/schedule.json" and "gits" in solver.baselines
    assert "run_dir=runs/demo/ld3" in text and "run_dir=runs/demo/solver" in text


def test_data_benchmark_adds_each_invocations_cases_to_the_table_and_refuses_other_arguments(tmp_path, monkeypatch):
    """benchmarks/ld3.py part=data: each case keeps its judged rows beside its runs, so data.md covers every case
    of the out_dir (an invocation for one solver used to replace the rows of the others); a case's runs are reused
    by a later invocation, so an out_dir holds one recipe and other ld3_args are refused before anything runs."""
    from learnsteps.files import write_json

    bench = benchmark_module("ld3", monkeypatch)
    args = ["loss=l2", "t_min=0.015"]

    def case(solver, seed, method, fid):
        unseen = dict(fid_unseen=fid + 3, hand_fid_unseen=8.0, teacher_fid_unseen=7.0) if solver == "unipc-2" else {}
        return dict(guidance=1.0, solver=solver, nfe=4, seed=seed, method=method, seconds=1.0, rmse=0.1,
                    fid_teacher=1.0, fid_data=fid, precision=0.9, recall=0.8, teacher_fid_data=4.0,
                    teacher_recall=0.85, hand_rmse=0.2, hand_fid_teacher=5.0, hand_fid_data=5.0,
                    hand_fid_data_grid="gits", hand_recall=0.9, **unseen)  # the DPM rows: judged before unseen

    for solver, fids in (("unipc-2", (4.0, 4.2)), ("dpm_solver++-2", (6.0, 6.4))):  # two invocations' cases
        for seed, fid in enumerate(fids):  # laid out as against_data lays out its cases: <solver><order>/nfe<n>
            cell = tmp_path / "data" / "guidance1.0" / f"seed{seed}" / solver.replace("-", "") / "nfe4"
            write_json(cell / "rows.json",
                       {"ld3_args": args, "rows": [case(solver, seed, "solver", fid), case(solver, seed, "ld3", fid)]})
    rows = bench.data_rows(tmp_path / "data", args)
    assert [(r["solver"], r["method"], r["seed"]) for r in rows] == [
        (s, m, seed) for s in ("dpm_solver++-2", "unipc-2") for m in ("ld3", "solver") for seed in (0, 1)]
    table = bench.data_table(bench.Config(ld3_args=args), rows)
    assert "seeds 0, 1 (median, range)" in table
    body = [line for line in table.splitlines() if line.startswith("| 1.0 |")]
    assert len(body) == 4 and all("4.00 / 5.00 (gits)" in line for line in body)
    assert "/ 4.10 (4.00–4.20) | 0.820 | 1.025 |" in body[2] and "/ 6.20 (6.00–6.40) | 1.240 |" in body[0]
    # (a) holds at 4.10; (b) asks <= 0.8 x 5.00 = 4.00
    assert body[2].endswith("| 0.200 | 0.850 / 0.900 / 0.800 | 0.500 | yes | no | 7.00 / 8.00 / 7.10 |")
    assert body[0].endswith("| no | no | – |")  # FID against the odd digits: not judged for those rows

    with pytest.raises(SystemExit, match=r"made with ld3_args=\['loss=l2', 't_min=0.015'\], not \['loss=l2'\]"):
        bench.against_data(bench.Config(ld3_args=["loss=l2"]), tmp_path)
    assert sorted(p.name for p in (tmp_path / "data" / "guidance1.0").iterdir()) == ["seed0", "seed1"]  # no pairs


def test_robustness_table_states_fid_against_the_data_beside_the_teacher(monkeypatch):
    """benchmarks/ld3.py part=robustness: learned / best hand grid per NFE (median, worst, best), each run's cell, and
    FID against the data itself, the teacher's own beside it, with how many runs are at or below the best hand grid
    and at or below the teacher."""
    bench = benchmark_module("ld3", monkeypatch)

    def run(seed, path, fid, hand, teacher):
        return dict(seed=seed, path=path, nfe=4, seconds=1.0, demo_rmse=0.8 + seed / 100, bench_rmse=0.7,
                    bench_fid_teacher=0.3, bench_fid_data=fid / hand, fid_data=fid, hand_fid_data=hand,
                    teacher_fid_data=teacher)

    rows = [run(0, "avx2", 4.0, 5.0, 4.5), run(0, "default", 4.6, 5.0, 4.5), run(1, "avx2", 5.5, 5.0, 4.4),
            run(1, "default", 4.4, 5.0, 4.4)]
    table = bench.robustness_table(bench.Config(seeds=[0, 1], robust_nfe=[4]), rows, ["avx2", "default"])
    assert "| 4 | paired RMSE, 200 pairs | 0.805 | 0.810 | 0.800 |" in table
    assert "| 4 | FID vs data, 2000 | 0.900 | 1.100 | 0.800 |" in table
    assert "| 4 | 1 | 0.810 / 0.300 | 0.810 / 0.300 |" in table
    # medians (ranges) of the teacher, the best hand grid and the learned grid; 3 runs of 4 at or below the hand
    # grid (5.5 is not), 2 at or below their teacher (4.0 < 4.5, 4.4 = 4.4)
    assert "| 4 | 4.45 (4.40–4.50) | 5.00 (5.00–5.00) | 4.50 (4.00–5.50) | 3 of 4 | 2 of 4 |" in table


def test_ld3_benchmark_refuses_an_unknown_part_before_creating_anything(tmp_path, monkeypatch):
    """benchmarks/ld3.py part=<typo> used to run nothing, write its config.json and exit 0."""
    bench = benchmark_module("ld3", monkeypatch)
    with pytest.raises(SystemExit, match=r"part=robustnes: one of all, memory, paired, demo, robustness"):
        bench.main(["part=robustnes", f"out_dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


def test_data_benchmark_judges_on_another_draw_of_held_out_noises_and_never_mixes_two(tmp_path, monkeypatch):
    """benchmarks/ld3.py part=data heldout_seed=<n>: the same runs judged on a fresh draw of held-out noises (a
    setting chosen on one draw, confirmed on another); a held-out directory of the other draw is refused, not
    silently reused."""
    bench = benchmark_module("ld3", monkeypatch)
    first, second = (bench.Config(bench_test=4, data_teacher="gmm_digits", heldout_seed=s) for s in (10_000, 7))
    _, a = bench.heldout_pairs(first, 1.0, tmp_path / "a")
    _, b = bench.heldout_pairs(second, 1.0, tmp_path / "b")
    _, again = bench.heldout_pairs(first, 1.0, tmp_path / "a")
    assert torch.equal(a.tensors[1], again.tensors[1]) and not torch.allclose(a.tensors[1], b.tensors[1])
    with pytest.raises(SystemExit, match=r"another teacher or spec; use a new directory \(heldout_seed=7, bench_test"):
        bench.heldout_pairs(second, 1.0, tmp_path / "a")


def test_ceiling_benchmark_guides_on_its_interval_only(monkeypatch):
    """benchmarks/ld3.py part=ceiling: the teacher guided on t <= c only (Kynkäänniemi et al. 2024) calls the network
    at the teacher's scale there and at the other scale above, exactly."""
    from learnsteps.teachers import load_teacher

    bench = benchmark_module("ld3", monkeypatch)
    inside, outside = (load_teacher("digits_latent_flow", guidance=g) for g in (1.15, 1.0))
    model = bench.interval_guidance(inside, outside, 0.3)
    x, cond = torch.randn(4, *inside.shape, generator=torch.Generator().manual_seed(0)), torch.arange(4)
    with torch.no_grad():
        assert not torch.equal(inside(x, torch.tensor(0.5), cond), outside(x, torch.tensor(0.5), cond))
        for t, which in ((0.1, inside), (0.29, inside), (0.31, outside), (1.0, outside)):
            assert torch.equal(model(x, torch.tensor(t), cond), which(x, torch.tensor(t), cond))
    # target (a) as a box: 0.6x the best hand grid against the teacher; the best hand grid against the data, capped at
    # 1.1x the teacher's own (the first row)
    rows = [dict(sampler="the teacher", kind="teacher", fid_teacher=0.0, fid_data=4.0),
            dict(sampler="gits, unipc-2 NFE 6", kind="hand", fid_teacher=3.0, fid_data=5.0),
            dict(sampler="edm, unipc-2 NFE 6", kind="hand", fid_teacher=2.0, fid_data=6.0),
            dict(sampler="guidance 1 everywhere", kind="scale", fid_teacher=0.1, fid_data=1.0)]
    assert bench.target_a(rows) == (pytest.approx(1.2), pytest.approx(4.4),
                                    "0.6x edm's 2.00 against the teacher, gits's 5.00 against the data")

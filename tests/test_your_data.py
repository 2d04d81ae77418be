"""Your data for the data term and the feature terms: a folder of images (`data_reference=`) and a transformers
vision model (`feature_net=`, e.g. a local copy of DINOv2), for teachers whose images are not the 8x8 digits."""
import math
from pathlib import Path

import pytest
import torch

from learnsteps.quality.images import ReferenceImagesError, iter_reference
from learnsteps.quality.losses import distance

ROOT = Path(__file__).resolve().parents[1]


def read_reference(directory, size=None, channels=None, **kw) -> torch.Tensor:
    return torch.cat(list(iter_reference(directory, size, channels, **kw)))


def write_images(folder: Path, n: int, size=(20, 24), mode="RGB", seed=0) -> torch.Tensor:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, size[0], size[1], 3 if mode == "RGB" else 1), generator=g, dtype=torch.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p.numpy() if mode == "RGB" else p[..., 0].numpy(), mode=mode).save(folder / f"{i:03d}.png")
    return pixels


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    pytest.importorskip("transformers")
    import tiny_pipelines

    return tiny_pipelines.dinov2(tmp_path_factory.mktemp("dinov2"))


def test_a_folder_of_images_reads_as_they_are_or_at_the_samples_size(tmp_path):
    pixels = write_images(tmp_path / "rgb", 3)
    x = read_reference(tmp_path / "rgb")
    assert x.shape == (3, 3, 20, 24)
    torch.testing.assert_close(x, pixels.permute(0, 3, 1, 2).float() / 127.5 - 1)  # exact: 8-bit PNGs
    assert read_reference(tmp_path / "rgb", size=(16, 16), channels=1).shape == (3, 1, 16, 16)
    write_images(tmp_path / "grey", 4, size=(8, 8), mode="L")
    assert read_reference(tmp_path / "grey", limit=2).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such folder"), ("one", "at least 2"), ("broken", "cannot be read"), ("sizes", "pass a size")])
def test_a_folder_that_cannot_serve_is_one_line_naming_it(tmp_path, case, message):
    folder = tmp_path / "images"
    if case != "missing":
        write_images(folder, 1 if case == "one" else 3)
    if case == "broken":
        (folder / "004.png").write_bytes(b"not a png")
    if case == "sizes":
        write_images(folder, 1, size=(10, 10), seed=1)  # overwrites 000.png at another size
    with pytest.raises(ReferenceImagesError, match=message) as err:
        read_reference(folder)
    assert "\n" not in str(err.value) and str(folder) in str(err.value)


def test_a_vision_model_s_features_are_its_own_on_its_processor_s_input(dino):
    """feature_net=<a DINOv2 folder>: the features are the model's pooled output on exactly what its image
    processor makes of the same images (at the model's size: no resizing to compare)."""
    from transformers import AutoImageProcessor, Dinov2Model

    from learnsteps.quality.features import load_any_feature_net

    net = load_any_feature_net(dino)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 32, 32, 3), generator=g, dtype=torch.uint8)
    processed = AutoImageProcessor.from_pretrained(dino)(list(images.numpy()), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = Dinov2Model.from_pretrained(dino)(pixel_values=processed).pooler_output
    got = net(images.permute(0, 3, 1, 2).float() / 127.5 - 1)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert net(torch.zeros(3, 1, 20, 12))[0].shape == (3, 32)  # grey, any size


def test_data_mmd_on_your_images_is_zero_for_them_and_pulls_samples_toward_them(dino, tmp_path):
    write_images(tmp_path / "mine", 8, size=(16, 16))
    d = distance("data_mmd", (3, 16, 16), str(dino), reference=str(tmp_path / "mine"))
    mine = read_reference(tmp_path / "mine")
    noise = torch.randn(8, 3, 16, 16)
    assert float(d(mine, noise)[0]) == pytest.approx(0, abs=1e-5)  # the teacher's samples play no part
    x = (0.2 * torch.randn(8, 3, 16, 16)).requires_grad_(True)  # grey-ish: far from the images
    far = d(x, noise)
    assert float(far[0].detach()) > 1e-3
    (grad,) = torch.autograd.grad(far.mean(), x)
    with torch.no_grad():  # a small gradient step (at most 0.01 per pixel) moves toward the data
        assert float(d(x - 0.01 * grad / grad.abs().max(), noise)[0]) < float(far[0].detach()) - 1e-6


def test_the_feature_terms_refuse_what_they_cannot_read_in_one_line(dino, tmp_path):
    with pytest.raises(ValueError, match="feature_net=") as err:
        distance("l2+features", (3, 16, 16))  # the digits network on RGB images
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="data_reference="):
        distance("data_mmd", (3, 16, 16), str(dino))  # a vision network, and no images to compare with
    with pytest.raises(ValueError, match="choose data_mmd"):
        distance("class_mmd", (3, 16, 16), str(dino), reference=str(tmp_path))  # a vision network does not classify
    with pytest.raises(ValueError, match="vision model"):
        distance("features", (3, 16, 16), str(tmp_path))  # a folder with neither network


def test_ld3_learns_with_your_images_and_a_vision_model_on_a_pipeline_teacher(dino, tmp_path):
    """A guided text-conditional pipeline (tiny SD) with loss=l2+data_mmd toward a folder of images in tiny
    DINOv2's features; a bad folder is refused before anything is written."""
    pytest.importorskip("diffusers")
    import tiny_pipelines

    from learnsteps.config import ConfigError, load_config
    from learnsteps.ld3 import LD3Config, train_ld3
    from learnsteps.schedule import load_schedule

    pipe = tiny_pipelines.stable_diffusion(tmp_path / "sd")
    write_images(tmp_path / "mine", 6, size=(40, 40))
    args = [f"teacher={pipe}", "conditions=[a cat,a dog]", "guidance=4.0", "nfe=3", "pairs.train=4", "pairs.val=2",
            "pairs.test=2", "pairs.steps=4", "batch_size=2", "rounds_theta=1", "rounds_joint=1",
            "baselines=[time_uniform]",
            "loss=l2+data_mmd", f"feature_net={dino}", "trainer.progress_bar=false", "wandb.mode=disabled"]
    with pytest.raises(ConfigError, match="data_reference"):
        load_config(LD3Config, [ROOT / "configs" / "ld3.yaml"], [*args, f"data_reference={tmp_path / 'nope'}"])
    run = train_ld3(load_config(LD3Config, [ROOT / "configs" / "ld3.yaml"],
                                [*args, f"data_reference={tmp_path / 'mine'}", f"run_dir={tmp_path / 'run'}"]))
    assert load_schedule(run / "schedule.json").nfe == 3


def test_eval_against_a_folder_of_the_digits_is_eval_against_the_digits(tmp_path, monkeypatch):
    """eval.py reference=<a folder of your images>: the digits written as 8-bit PNGs give the embedded digits'
    features exactly (both are scored as 8-bit images), so the same FID against the data."""
    from PIL import Image

    from learnsteps.config import SolverChoice
    from learnsteps.eval.evaluate import EvalConfig, evaluate
    from learnsteps.quality.metrics import Features, reference_features, to_uint8
    from learnsteps.teachers.gmm import digits_data

    monkeypatch.setenv("LEARNSTEPS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "digits"
    folder.mkdir()
    for i, img in enumerate(to_uint8(digits_data(torch.float32))):
        Image.fromarray(img[0].numpy(), mode="L").save(folder / f"{i:04d}.png")
    features = Features("digits")
    torch.testing.assert_close(reference_features(str(folder), features, (1, 8, 8)),
                               reference_features("digits", features), rtol=0, atol=0)
    rows = {}
    for ref in ("digits", str(folder)):
        cfg = EvalConfig(teachers=["gmm_digits"], solvers=[SolverChoice("euler", 1)], grids=["edm"], nfe=[3],
                         samples=64, batch_size=64, teacher_steps=6, reference=ref, out_dir=str(tmp_path / "out"))
        rows[ref] = [r["fid_data"] for r in evaluate(cfg)]
    assert rows["digits"] == rows[str(folder)] and all(math.isfinite(f) for f in rows["digits"])

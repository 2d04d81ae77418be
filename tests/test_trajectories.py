import json
import os

import pytest
import torch

import learnsteps as ls
from learnsteps.trajectories import (TrajectoryDataModule, TrajectoryDataset, TrajectorySpec, generate, TrajectoryError, sample_noise,
                                     shard_ok)
from learnsteps.teachers.gmm import toy_mixture

from helpers import F64


def spec(**kw):
    return TrajectorySpec(**{**dict(n=10, shard_size=4, num_times=4, rtol=1e-8, batch_size=3), **kw})


@pytest.fixture(scope="module")
def teacher():
    return toy_mixture()


def test_generation_writes_shards_and_a_manifest(tmp_path, teacher):
    manifest = json.loads(generate(teacher, tmp_path, spec(store_x0=True), teacher_name="toy", progress=False).read_text())
    assert manifest["count"] == 3 and [s["count"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["shapes"]["trajectory"] == [10, 4, 6] and manifest["shapes"]["x0"] == [10, 4, 6]
    assert manifest["teacher"] == dict(fingerprint=teacher.fingerprint(), name="toy")
    ds = TrajectoryDataset(tmp_path, dtype=F64)
    assert len(ds) == 10 and ds[7]["index"] == 7
    times = ds.times
    assert times[-1] == teacher.noise_schedule.t_zero and len(times) == 4
    # the stored trajectory is the reference solution from the stored noise; the last point is clean data
    ref = ls.reference_solve(teacher, ds.tensors["x_T"].double(), times, rtol=1e-8, atol=1e-8).trajectory
    torch.testing.assert_close(ds.tensors["trajectory"].transpose(0, 1), ref.float().double(), rtol=1e-6, atol=1e-6)
    x0 = teacher.x0(ds.tensors["trajectory"][:, 1].double(), times[1].expand(10))
    torch.testing.assert_close(ds.tensors["x0"][:, 1], x0.float().double(), rtol=1e-6, atol=1e-6)


def test_noise_depends_only_on_seed_and_index():
    a = sample_noise([3, 4, 5], (2, 3), seed=7)
    b = sample_noise([5], (2, 3), seed=7)
    torch.testing.assert_close(a[2], b[0], rtol=0, atol=0)
    assert not torch.equal(sample_noise([5], (2, 3), seed=8), b)


def test_rerun_finishes_only_missing_shards_and_replaces_corrupt_ones(tmp_path, teacher):
    generate(teacher, tmp_path, spec(), progress=False)
    (tmp_path / "shard-00001.safetensors").unlink()
    corrupt = tmp_path / "shard-00002.safetensors"
    corrupt.write_bytes(corrupt.read_bytes()[:-8] + b"garbage!")
    untouched = os.stat(tmp_path / "shard-00000.safetensors").st_mtime_ns
    with pytest.warns(UserWarning, match="shard 2 .* fails its checksum"):
        generate(teacher, tmp_path, spec(), progress=False)
    assert os.stat(tmp_path / "shard-00000.safetensors").st_mtime_ns == untouched
    assert all(shard_ok(tmp_path, k) for k in range(3))


def test_a_corrupt_or_missing_shard_stops_reading(tmp_path, teacher):
    """Training on fewer trajectories than the manifest promises would be silent: the reader refuses instead, and a
    rerun of the generation repairs the directory."""
    generate(teacher, tmp_path, spec(), progress=False)
    corrupt = tmp_path / "shard-00001.safetensors"
    good = corrupt.read_bytes()
    corrupt.write_bytes(good[:-8] + b"garbage!")
    with pytest.raises(TrajectoryError, match="shard-00001.safetensors: fails its checksum; rerun the generation"):
        TrajectoryDataset(tmp_path)
    corrupt.unlink()
    with pytest.raises(TrajectoryError, match="shard-00001.safetensors: missing"):
        TrajectoryDataset(tmp_path)
    generate(teacher, tmp_path, spec(), progress=False)
    assert len(TrajectoryDataset(tmp_path)) == 10


def test_another_spec_in_the_same_directory_is_refused(tmp_path, teacher):
    generate(teacher, tmp_path, spec(), progress=False)
    with pytest.raises(ValueError, match="another teacher or spec"):
        generate(teacher, tmp_path, spec(seed=1), progress=False)


def test_ranks_split_the_shards_without_gaps_or_duplicates(tmp_path, teacher):
    s = spec(n=21, shard_size=4)  # 6 shards over 4 ranks
    done = {}
    for rank in (3, 1, 2, 0):  # rank 0 last: it writes the manifest once every shard exists
        before = {p.name for p in tmp_path.glob("shard-*.safetensors")}
        generate(teacher, tmp_path, s, rank=rank, world_size=4, progress=False)
        done[rank] = {p.name for p in tmp_path.glob("shard-*.safetensors")} - before
    assert done == {r: {f"shard-{k:05d}.safetensors" for k in range(r, 6, 4)} for r in range(4)}
    ds = TrajectoryDataset(tmp_path)
    assert sorted(ds.tensors["index"].tolist()) == list(range(21))


def test_solver_trajectories_and_fp16_storage(tmp_path, teacher):
    s = spec(solver="unipc", order=3, steps_per_interval=40, dtype="float16", output_times=[1.0, 0.3, 0.05, 0.0])
    generate(teacher, tmp_path, s, progress=False)
    ds = TrajectoryDataset(tmp_path, dtype=F64)
    assert json.loads((tmp_path / "manifest.json").read_text())["dtypes"]["trajectory"] == "float16"
    ref = ls.reference_solve(teacher, ds.tensors["x_T"], torch.tensor([1.0, 0.3, 0.05, 0.0], dtype=F64),
                             rtol=1e-9, atol=1e-9).trajectory.transpose(0, 1)
    assert (ds.tensors["trajectory"] - ref).abs().max() < 5e-3  # fp16 rounding of values ~1


def test_datamodule_generates_then_splits(tmp_path, teacher):
    dm = TrajectoryDataModule(tmp_path / "d", batch_size=4, val_fraction=0.2, teacher=teacher, spec=spec())
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_set) == 8 and len(dm.val_set) == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["trajectory"].shape == (4, 4, 6)
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    assert isinstance(dm.val_dataloader(), torch.utils.data.DataLoader)  # one loader unless asked for the seen one


def test_datamodule_validates_on_seen_trajectories_too(tmp_path, teacher):
    dm = TrajectoryDataModule(tmp_path / "d", batch_size=4, val_fraction=0.2, teacher=teacher, spec=spec(), seen=True)
    dm.prepare_data()
    dm.setup()
    held_out, seen = dm.val_dataloader()
    assert held_out.dataset.indices == dm.val_set.indices and len(seen.dataset) == len(dm.val_set) == 2
    assert set(seen.dataset.indices) <= set(dm.train_set.indices)  # trajectories the student trains on

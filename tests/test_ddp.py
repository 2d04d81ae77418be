"""Lightning DDP, unchanged: every training mode launched on 2 CPU ranks (gloo) in a subprocess gives what one
rank gives with the same global batch (per-rank batch halved). SeededShuffle deals each step's global batch over
the ranks, BatchDraws gives every sample the same noise on any number of ranks, and DDP averages the ranks'
gradients, so the runs differ only by the order of float sums. Tolerances: LD3's float64 grid 1e-12; float32
networks 1e-5 after their few steps (measured: 4e-16, 1e-6 and 3e-8). LD3 runs without soft teacher forcing here:
its keep-or-reject decision compares two losses per sample, and where they nearly tie the order of float sums picks
a different side on 2 ranks (measured with it on: 1.4e-7), which is a rounding effect, not a DDP one. DSNO's
training split is a whole number of global batches: a last, partial batch is split unevenly over the ranks and DDP
averages the ranks' means, not the samples (with 61 training samples, 13 in the last batch: 5.5e-6 after that step,
4e-5 at the end, where every full step agrees to 1e-8)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from learnsteps.teachers import load_teacher
from learnsteps.trajectories import TrajectoryDataset, TrajectorySpec, generate

ROOT = Path(__file__).resolve().parents[1]
TWO_RANKS = ["trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu"]
COMMON = ["trainer.progress_bar=false", "wandb.mode=disabled"]
MODES = {  # args, the global batch, the output to compare
    "ld3": (["mode=ld3", "teacher=toy_mixture", "nfe=4", "solver=unipc", "order=2", "pairs.train=16", "pairs.val=8",
             "pairs.test=8", "pairs.solver=reference", "soft_forcing=false", "rounds_theta=2", "rounds_joint=2", "val_every_n_steps=2"],
            4, "schedule.json"),
    "dsno": (["mode=dsno", "teacher=gmm_digits", "unet.channels=8", "trajectories.n=67",  # 64 train + 3 validation
              "trajectories.steps_per_interval=3", "trainer.max_steps=12", "trainer.val_check_interval=6"],
             16, "student/model.safetensors"),
    "teacher": (["mode=teacher", "unet.channels=8", "unet.blocks_per_level=1", "trainer.max_steps=12",
                 "trainer.val_check_interval=6", "sample_steps=3"], 32, "teacher/model.safetensors"),
}


def train(args: list[str]) -> None:
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, *COMMON], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_two_ranks_train_what_one_rank_trains(tmp_path, mode):
    args, batch, result = MODES[mode]
    shared = [f"data_dir={tmp_path / 'data'}"] if mode == "dsno" else \
        [f"pairs.directory={tmp_path / 'data'}"] if mode == "ld3" else []
    train([*args, *shared, f"batch_size={batch}", f"run_dir={tmp_path / 'one'}"])
    train([*args, *shared, f"batch_size={batch // 2}", f"run_dir={tmp_path / 'two'}", *TWO_RANKS])
    one, two = tmp_path / "one" / result, tmp_path / "two" / result
    if result.endswith(".json"):
        a, b = json.loads(one.read_text()), json.loads(two.read_text())
        for key in ("times", "eval_times"):
            torch.testing.assert_close(torch.tensor(a[key], dtype=torch.float64), torch.tensor(b[key], dtype=torch.float64),
                                       rtol=0, atol=1e-12)
        assert a["provenance"]["best_step"] == b["provenance"]["best_step"]
    else:
        a, b = load_file(str(one)), load_file(str(two))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
    assert not (tmp_path / "two" / "checkpoints" / "last.ckpt.tmp").exists()


def test_two_ranks_generate_the_shards_of_one_without_gaps_or_duplicates(tmp_path):
    spec = dict(n=40, shard_size=6, output_times=[1.0, 0.3, 0.0], solver="unipc", order=3, steps_per_interval=3)
    train(["mode=trajectories", "teacher=gmm_digits", f"out_dir={tmp_path / 'two'}", *TWO_RANKS,
           *(f"spec.{k}={json.dumps(v)}" for k, v in spec.items())])
    generate(load_teacher("gmm_digits"), tmp_path / "one", TrajectorySpec(**spec), teacher_name="gmm_digits")
    one, two = TrajectoryDataset(tmp_path / "one"), TrajectoryDataset(tmp_path / "two")
    assert two.tensors["index"].tolist() == list(range(40))  # every sample once, in order
    for k in one.tensors:
        torch.testing.assert_close(one.tensors[k], two.tensors[k], rtol=0, atol=0, msg=k)
    assert len(two.manifest["shards"]) == 7

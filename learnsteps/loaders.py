"""Training data order and per-sample random draws: seeded, resumable mid-epoch, sharded over DDP ranks, the
same for every sample whatever the number of ranks."""
from __future__ import annotations

import torch


def rank_and_world() -> tuple[int, int]:
    """This process's DDP rank and the number of ranks (0, 1 outside DDP)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class SeededShuffle(torch.utils.data.Sampler):
    """A permutation per epoch drawn from (seed, epoch) alone, sharded over DDP ranks like DistributedSampler
    (padded to a multiple of the world size), that can start part-way through an epoch. `consumed` counts this
    rank's samples trained on so far in the epoch (kept by training.common.ExactResume)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.start, self.consumed = n, seed, 0, 0, 0

    def set_epoch(self, epoch: int) -> None:  # called by Lightning at every epoch start
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n // rank_and_world()[1])

    def __iter__(self):
        rank, world = rank_and_world()
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        perm = torch.cat([perm, perm[: len(self) * world - self.n]])  # every rank the same number of samples
        self.consumed, self.start = self.start, 0
        return iter(perm[rank::world][self.consumed:].tolist())


class BatchDraws:
    """Random draws (noise levels, noise, label dropout) for this rank's share of a training batch, drawn for the
    whole global batch from (seed, step) alone and sliced the way SeededShuffle deals samples (rank::world).
    Every sample meets the same draws on 1 rank or on many (where a shared global seed would give each rank the
    same noise), and a resumed run needs no generator state to continue them."""

    def __init__(self, seed: int, step: int, n_local: int, device=None):
        self.rank, self.world = rank_and_world()
        self.n, self.device = n_local * self.world, device
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + step)

    def _mine(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.rank::self.world].to(self.device)

    def rand(self, *shape: int) -> torch.Tensor:
        return self._mine(torch.rand(self.n, *shape, generator=self.generator))

    def randn(self, *shape: int) -> torch.Tensor:
        return self._mine(torch.randn(self.n, *shape, generator=self.generator))


class ResumableLoader(torch.utils.data.DataLoader):
    """A DataLoader over a SeededShuffle whose position Lightning checkpoints (state_dict) and puts back before
    it iterates again (load_state_dict): a run resumed from a mid-epoch checkpoint trains on exactly the
    batches the uninterrupted run would have."""

    def state_dict(self) -> dict:
        return dict(epoch=self.sampler.epoch, consumed=self.sampler.consumed)

    def load_state_dict(self, state: dict) -> None:
        epoch, consumed = state["epoch"], state["consumed"]
        if consumed >= len(self.sampler):  # checkpointed at the end of an epoch: the next one starts afresh
            epoch, consumed = epoch + 1, 0
        self.sampler.epoch, self.sampler.start = epoch, consumed


def train_loader(dataset, batch_size: int, seed: int, drop_last: bool = False) -> ResumableLoader:
    """The training DataLoader of every mode: seeded, resumable mid-epoch, DDP-sharded by its own sampler."""
    return ResumableLoader(dataset, batch_size=batch_size, sampler=SeededShuffle(len(dataset), seed),
                           drop_last=drop_last)

"""Which faces each process trains on: :class:`GlobalBatchSampler` (rank ``r`` takes the rows ``r::W`` of every global
batch, strided so the discriminator's minibatch-std groups on each rank are exactly groups of the single-process
batch) and :func:`make_loader`."""

from __future__ import annotations

from typing import Iterator

import torch

from portrait3d.errors import UsageError
from portrait3d.training.distributed import DistInfo
from portrait3d.training.randomness import derive_seed
from portrait3d.training.run_config import RunConfig

__all__ = ["GlobalBatchSampler", "make_loader"]


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Infinite batch sampler: for each step, this rank's rows ``rank::world`` of the global batch.

    Global batch ``s`` holds positions ``s*B .. s*B+B-1`` of an endless sequence of epochs, each a
    permutation of the dataset seeded by ``(seed, epoch)``. Everything depends only on the step,
    so a resumed run (``start_step``) reads exactly what the uninterrupted run would have.
    """

    _EPOCH_KEY = 0x5A3

    def __init__(self, size: int, batch: int, seed: int, rank: int = 0, world: int = 1, start_step: int = 0) -> None:
        if size <= 0:
            raise UsageError("the dataset is empty")
        if batch % world:
            raise UsageError(f"batch {batch} is not divisible by the number of processes {world}")
        self.size, self.batch, self.seed = size, batch, seed
        self.rank, self.world, self.start_step = rank, world, start_step
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(derive_seed(self.seed, self._EPOCH_KEY, epoch))
            self._perms[epoch] = torch.randperm(self.size, generator=g)
        return self._perms[epoch]

    def positions(self, start: int, stop: int) -> list[int]:
        """Dataset indices at positions ``start .. stop-1`` of the endless sequence."""
        return [int(self._perm(q // self.size)[q % self.size]) for q in range(start, stop)]

    def global_batch(self, step: int) -> list[int]:
        return self.positions(step * self.batch, (step + 1) * self.batch)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.global_batch(step)[self.rank::self.world]
            step += 1

    def __len__(self) -> int:  # DataLoader wants a length; the sampler is endless
        return 2**62


def make_loader(dataset: torch.utils.data.Dataset, run: RunConfig, info: DistInfo,
                start_step: int) -> tuple[GlobalBatchSampler, torch.utils.data.DataLoader]:
    """This rank's endless loader over global batches from ``start_step`` (see :class:`GlobalBatchSampler`).

    The loader gets its own generator so that it never touches the global RNG (which a snapshot
    saves and restores).
    """
    sampler = GlobalBatchSampler(len(dataset), run.batch, run.seed, info.rank, info.world, start_step)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=run.workers,
                                         pin_memory=info.device.type == "cuda", persistent_workers=run.workers > 0,
                                         generator=torch.Generator().manual_seed(run.seed))
    return sampler, loader

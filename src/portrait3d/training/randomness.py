"""Reproducible randomness: every random draw of a step (latents, cameras, augmentation, noise inputs, ray jitter)
comes from a generator seeded by ``(seed, step, phase)``, is drawn for the *global* batch and sliced like the data
(:class:`Shard`), so **a run on W processes computes the same thing as one process on the same global batch**.
Networks receive the stream explicitly (:attr:`BatchRandom.source`, their ``random=`` argument).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from portrait3d.networks.ops import RandomSource
from portrait3d.training.distributed import DistInfo

__all__ = ["Shard", "derive_seed", "BatchRandom"]


@dataclass(frozen=True)
class Shard:
    """The rows ``index::count`` of a global batch (a rank, or a rank's accumulation round)."""

    index: int = 0
    count: int = 1

    def take(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.count == 1 else x[self.index::self.count]

    @staticmethod
    def rounds(info: DistInfo, rounds: int) -> list["Shard"]:
        """The shards of this rank's ``rounds`` accumulation rounds (round k: local rows ``k::rounds``)."""
        return [Shard(info.rank + info.world * k, info.world * rounds) for k in range(rounds)]


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed from ``(seed, *keys)`` (NumPy's SeedSequence hashing: nearby keys give unrelated streams)."""
    a, b = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(k) for k in keys]]).generate_state(2, np.uint32)
    return (int(a) << 31) ^ int(b)




class BatchRandom:
    """All random numbers of one phase of one step, for one :class:`Shard` of the global batch.

    Per-sample draws are made for the global batch (``rows * shard.count`` rows) and this shard's
    rows are kept, so sample ``i`` gets the same numbers however the batch is split. Shared draws
    (one value for the whole batch, e.g. the style-mixing cutoff) come from a separate CPU generator
    and are identical on every shard. Building a ``BatchRandom`` with the same ``(seed, keys)``
    replays the same sequence (that is how accumulation rounds of one phase line up).

    Args:
        seed, keys: the stream, e.g. ``(run seed, step, phase id)``.
        shard: which rows of the global batch this process handles.
        rows: rows of this shard.
        device: where per-sample draws are made.
    """

    def __init__(self, seed: int, keys: Sequence[int], shard: Shard, rows: int, device: torch.device) -> None:
        self.shard = shard
        self.rows = rows
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(derive_seed(seed, *keys, 0))
        self._shared = torch.Generator()
        self._shared.manual_seed(derive_seed(seed, *keys, 1))

    @property
    def global_rows(self) -> int:
        return self.rows * self.shard.count

    def _per_sample(self, fn: Callable[..., torch.Tensor], rest: Sequence[int], **kw: Any) -> torch.Tensor:
        full = fn([self.global_rows, *rest], generator=self.generator, device=self.device, **kw)
        return self.shard.take(full)

    def randn(self, *rest: int) -> torch.Tensor:
        """Standard normal ``[rows, *rest]``."""
        return self._per_sample(torch.randn, rest)

    def rand(self, *rest: int) -> torch.Tensor:
        """Uniform ``[0, 1)`` ``[rows, *rest]``."""
        return self._per_sample(torch.rand, rest)

    def randint(self, low: int, high: int, *rest: int) -> torch.Tensor:
        """Integers in ``[low, high)``, ``[rows, *rest]``."""
        full = torch.randint(low, high, [self.global_rows, *rest], generator=self.generator, device=self.device)
        return self.shard.take(full)

    def shared_rand(self) -> float:
        return float(torch.rand([], generator=self._shared))

    def shared_randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high, [], generator=self._shared))

    def _draw(self, fn: Callable[..., torch.Tensor], size: Sequence[int], device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
        """Draw ``size`` (batch-major: first dimension ``rows * k``) as the global batch would and keep this
        shard's rows; a size whose first dimension is not a multiple of ``rows`` gets one draw shared by all."""
        size = tuple(int(v) for v in size)
        if size and size[0] > 0 and size[0] % self.rows == 0:
            k = size[0] // self.rows
            full = fn([self.global_rows, k, *size[1:]], generator=self.generator, device=self.device, dtype=dtype)
            t = self.shard.take(full).reshape(size)
        else:
            t = fn(list(size), generator=self.generator, device=self.device, dtype=dtype)
        return t.to(device)

    @property
    def source(self) -> "RandomSource":
        """This stream as the networks' :class:`~portrait3d.networks.ops.RandomSource` (pass it as ``random=``):
        the numbers a network draws inside its forward pass (noise inputs, ray jitter, importance samples) are
        then, like the rest, the same for a sample however the batch is split, and replayable from the seed."""
        return _ShardedSource(self)


class _ShardedSource:
    """:class:`~portrait3d.networks.ops.RandomSource` view of a :class:`BatchRandom`."""

    def __init__(self, rnd: BatchRandom) -> None:
        self._rnd = rnd

    def rand(self, size: Sequence[int], *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return self._rnd._draw(torch.rand, size, device, dtype)

    def randn(self, size: Sequence[int], *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return self._rnd._draw(torch.randn, size, device, dtype)

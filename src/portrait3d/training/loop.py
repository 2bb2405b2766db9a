"""Training-loop infrastructure shared by the StyleGAN2 and EG3D trainers.

Small, separate pieces that :mod:`portrait3d.training.stylegan2` and
:mod:`portrait3d.training.eg3d` compose:

* :class:`RunConfig`: batch, schedule, EMA, intervals, device, seed (typed, JSON round-trip);
* distributed helpers: :func:`init_distributed` reads ``torchrun``'s environment (``WORLD_SIZE``,
  ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and starts gloo on CPU or NCCL on CUDA;
  single-process runs need no process group and every helper is then a no-op.
  Gradients are averaged by one flat all-reduce per optimiser step (as NVIDIA's trainers do rather
  than wrapping the nets in ``DistributedDataParallel``: the GAN phases run several forward passes,
  double backward (R1) and toggle ``requires_grad``, which DDP's hooks do not like);
* :class:`GlobalBatchSampler`, :class:`Shard` and :class:`BatchRandom`: **a run on W processes
  computes the same thing as one process on the same global batch.** Rank ``r`` takes the rows
  ``r::W`` of every global batch; every random draw of a step (latents, cameras, augmentation, noise
  inputs, ray jitter) comes from a generator seeded by ``(seed, step, phase)``, is drawn for the
  *global* batch and sliced the same way. Why the *strided* slice: the discriminator's
  minibatch-standard-deviation layer groups samples ``{j, j + N/G, j + 2N/G, ...}``
  (``x.reshape(G, -1, ...)``), so with strided shards each rank's groups are exactly groups of the
  single-process batch (contiguous shards would mix different samples into a group). The same
  holds one level down for gradient-accumulation rounds (rows ``k::R`` of the local batch are the
  global rows ``r + W k :: W R``): a round is just a shard of a finer split. Exactness needs the
  local (round) batch to be a multiple of the minibatch-std group size; the one exception is the
  mapping network's tracked ``w_avg`` statistic, which, as in NVIDIA's code, moves once per round;
* EMA (:func:`ema_beta`, :func:`ema_update`), lazy-regularisation Adam (:func:`lazy_adam`);
* checkpoints: one folder per snapshot with ``state.safetensors`` (networks, flattened optimiser
  states, RNG states as ``uint8``) and ``state.json`` (configs, counters, optimiser
  hyper-parameters, metric history), written into a temporary folder and renamed into place;
  :func:`load_training_state` restores bit-exactly (the next steps equal an uninterrupted run);
* sample grids (:func:`save_grid`), progress bar and JSON-lines log (:class:`Progress`), and
  :func:`run_loop`, the outer loop that the trainers hand a per-step function to.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from portrait3d.config import ConfigMixin
from portrait3d.errors import UsageError
from portrait3d.networks.ops import RandomSource

__all__ = [
    "RunConfig", "DistInfo", "init_distributed", "shutdown_distributed", "all_reduce_grads", "all_reduce_mean",
    "broadcast_module", "average_buffers", "Shard", "derive_seed", "BatchRandom", "GlobalBatchSampler",
    "ema_beta", "ema_update", "lazy_adam", "optimizer_phase", "Networks", "Counters", "save_training_state",
    "load_training_state", "read_snapshot", "state_with_prefix", "find_snapshot", "write_snapshot_folder", "prune_snapshots", "optimizer_tensors",
    "load_optimizer", "rng_tensors", "restore_rng", "due", "save_grid", "Progress", "MetricsFn", "run_loop",
    "make_loader", "run_local_processes", "StepFn",
    "apply_run_options", "apply_cli_options",
]

MetricsFn = Callable[[nn.Module, int], dict[str, float]]
"""A metrics hook: ``fn(G_ema, step) -> {name: value}``; called on rank 0 only."""

STATE_FORMAT = "portrait3d-train-state"
STATE_VERSION = 1


# ----------------------------------------------------------------------------- configuration


@dataclass
class RunConfig(ConfigMixin):
    """What every trainer shares: batch, duration, EMA, intervals, data, device.

    Intervals are in thousands of real images shown to the discriminator (kimg); 0 disables.
    """

    batch: int = 32                    # global batch over all processes
    batch_gpu: int | None = None       # per-process micro-batch (gradient accumulation); None: batch / world
    total_kimg: float = 5000.0
    seed: int = 0
    ema_kimg: float | None = None      # EMA half-life; None: batch * 10 / 32 (NVIDIA's default)
    ema_rampup: float | None = 0.05    # half-life <= rampup * images seen; None: no ramp-up
    snapshot_kimg: float = 100.0       # resumable snapshot (+ exported EMA generator)
    sample_kimg: float = 20.0          # sample grid from fixed latents
    metrics_kimg: float = 0.0          # metrics hook
    keep_snapshots: int = 0            # keep only the newest N snapshot folders; 0: keep all
    grid_samples: int = 16
    amp: bool = True                   # mixed precision on CUDA (the networks' fp16 blocks)
    device: str = "auto"               # 'auto' | 'cpu' | 'cuda'
    workers: int = 2                   # DataLoader worker processes per rank
    mirror: bool = True                # x-flip augmentation of the dataset (cameras mirrored too)
    limit: int | None = None           # use only the first N faces
    progress: bool = True              # tqdm bar on rank 0
    threads: int | None = None         # torch CPU threads per process; None: torch's default
    precision: str = "fp32"            # 'fp32' | 'bf16' (autocast; AMX on CPU): see training.fast
    channels_last: bool = False        # NHWC weights and activations
    compile: bool = False              # torch.compile the generator
    compile_d: bool = False            # torch.compile the discriminator too (slower for the projected D here)
    max_minutes: float = 0.0           # stop (with a snapshot) after this much wall time; 0: no limit

    def fast_path(self) -> "FastPath":  # noqa: F821  (imported when called: fast imports loop)
        from portrait3d.training.fast import FastPath

        return FastPath(self.precision, self.channels_last, self.compile, self.compile_d)

    def apply_threads(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)

    def resolved_ema_kimg(self) -> float:
        return self.ema_kimg if self.ema_kimg is not None else self.batch * 10 / 32


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we started the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the ``torchrun`` process group if ``WORLD_SIZE > 1`` (gloo on CPU, NCCL on CUDA).

    Reuses a process group that is already initialised. ``device``: ``'auto'`` (CUDA when
    available), ``'cpu'`` or ``'cuda'``; under ``torchrun`` each process takes ``cuda:LOCAL_RANK``.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"device must be 'auto', 'cpu' or 'cuda', not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' requested but CUDA is not available")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    owns = False
    if tdist.is_available() and tdist.is_initialized():
        return DistInfo(tdist.get_rank(), tdist.get_world_size(), local_rank, dev, False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        # Generous timeout: rank 0 alone runs the metrics hook and writes snapshots.
        tdist.init_process_group("nccl" if cuda else "gloo", init_method="env://",
                                 timeout=datetime.timedelta(minutes=60))
        owns = True
        return DistInfo(tdist.get_rank(), tdist.get_world_size(), local_rank, dev, owns)
    return DistInfo(0, 1, 0, dev, False)


def shutdown_distributed(info: DistInfo) -> None:
    if info.owns_group and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def all_reduce_grads(params: Iterable[nn.Parameter], info: DistInfo) -> None:
    """Average ``.grad`` over ranks (one flat all-reduce) and replace NaN/inf (as NVIDIA's loop).

    Parameters without a gradient are left alone; every rank runs the same code, so the set of
    parameters with gradients is the same everywhere.
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    if info.world > 1:
        flat = torch.cat([p.grad.flatten() for p in params])
        tdist.all_reduce(flat)
        flat /= info.world
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad = g.view_as(p)
    for p in params:
        torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of ``values`` over ranks (identity in a single process)."""
    if info.world == 1:
        return values
    values = values.clone()
    tdist.all_reduce(values)
    return values / info.world


@torch.no_grad()
def broadcast_module(module: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if info.world == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        tdist.broadcast(t.data, src=0)


@torch.no_grad()
def average_buffers(module: nn.Module, info: DistInfo, suffix: str = "w_avg") -> None:
    """Average buffers whose name ends with ``suffix`` over ranks.

    The mapping network's tracked ``w_avg`` is updated from the local batch mean,
    ``w_avg <- lerp(mean_local(w), w_avg, beta)``, which is linear in the mean: averaging over
    ranks gives exactly the single-process update with the global batch mean.
    """
    if info.world == 1:
        return
    for name, b in module.named_buffers():
        if name.endswith(suffix) and b.is_floating_point():
            tdist.all_reduce(b)
            b /= info.world


# ----------------------------------------------------------------------------- reproducible randomness


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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _local_worker(rank: int, world: int, port: int, threads: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)})
    if threads:
        torch.set_num_threads(threads)
    fn(*args)


def run_local_processes(fn: Callable[..., Any], world: int, *args: Any, threads: int = 1,
                        start_method: str = "spawn") -> None:
    """Run ``fn(*args)`` in ``world`` new local processes wired up as ``torchrun`` would (CPU, gloo).

    A stand-in for ``torchrun --nproc_per_node=world`` on one machine without CUDA (tests, laptops);
    with ``'spawn'`` ``fn`` must be importable (e.g. :func:`portrait3d.training.stylegan2.train_stylegan2`).
    ``'fork'`` (Linux) starts much faster; it is safe here because each child limits torch to
    ``threads`` CPU threads before doing any work (use it from CPU-only parents).
    """
    import torch.multiprocessing as mp

    mp.start_processes(_local_worker, args=(world, _free_port(), threads, fn, args), nprocs=world, join=True,
                       start_method=start_method)


# ----------------------------------------------------------------------------- optimisation


def ema_beta(batch: int, ema_kimg: float, rampup: float | None, images_seen: int) -> float:
    """NVIDIA's EMA decay per step: half-life ``ema_kimg`` (capped at ``rampup * images_seen``)."""
    ema_nimg = ema_kimg * 1000
    if rampup is not None:
        ema_nimg = min(ema_nimg, images_seen * rampup)
    return 0.5 ** (batch / max(ema_nimg, 1e-8))


@torch.no_grad()
def ema_update(G_ema: nn.Module, G: nn.Module, beta: float) -> None:
    """``p_ema <- lerp(p, p_ema, beta)`` for parameters; buffers are copied."""
    for p_ema, p in zip(G_ema.parameters(), G.parameters()):
        p_ema.copy_(p.detach().lerp(p_ema, beta))
    for b_ema, b in zip(G_ema.buffers(), G.buffers()):
        b_ema.copy_(b)


def lazy_adam(params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float], eps: float,
              reg_interval: int | None) -> torch.optim.Adam:
    """Adam for lazy regularisation: a regulariser run every ``k`` steps adds a step, so lr and
    betas are rescaled by ``k / (k + 1)`` (StyleGAN2 paper, Appendix B). ``None``: plain Adam."""
    ratio = reg_interval / (reg_interval + 1) if reg_interval else 1.0
    return torch.optim.Adam(params, lr=lr * ratio, betas=(betas[0] ** ratio, betas[1] ** ratio), eps=eps)


def optimizer_phase(module: nn.Module, opt: torch.optim.Optimizer, info: DistInfo,
                    rounds: Sequence[Callable[[], torch.Tensor]], gain: float = 1.0) -> None:
    """One optimiser step of ``module``: backward each round's loss (scaled by ``gain / rounds``),
    average gradients over ranks, step. Only ``module`` gets gradients during the phase."""
    module.requires_grad_(True)
    opt.zero_grad(set_to_none=True)
    for loss_fn in rounds:
        loss = loss_fn()
        (loss * (gain / len(rounds))).backward()
    module.requires_grad_(False)
    all_reduce_grads(module.parameters(), info)
    opt.step()


def gan_step(nets: "Networks", info: DistInfo, step: int, shards: Sequence[Any], parts: Sequence[Any],
             g_main: Callable[[Any], torch.Tensor], g_reg: Callable[[Any], torch.Tensor],
             d_main: Callable[[Any, Any], torch.Tensor], d_reg: Callable[[Any, Any], torch.Tensor], *,
             g_reg_interval: int | None, d_reg_interval: int | None,
             stats: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """One GAN training step as in StyleGAN2-ADA: G main, lazy G regulariser, D main, lazy D
    regulariser (a regulariser runs every ``*_reg_interval`` steps with its loss scaled by the
    interval; ``None`` disables it). ``g_*`` take a shard, ``d_*`` a shard and its real-data part.
    Returns the mean of each statistic collected in ``stats`` during the step."""
    optimizer_phase(nets.G, nets.opt_G, info, [lambda s=s: g_main(s) for s in shards])
    if g_reg_interval and step % g_reg_interval == 0:
        optimizer_phase(nets.G, nets.opt_G, info, [lambda s=s: g_reg(s) for s in shards], gain=g_reg_interval)
    optimizer_phase(nets.D, nets.opt_D, info, [lambda s=s, p=p: d_main(s, p) for s, p in zip(shards, parts)])
    if d_reg_interval and step % d_reg_interval == 0:
        optimizer_phase(nets.D, nets.opt_D, info, [lambda s=s, p=p: d_reg(s, p) for s, p in zip(shards, parts)],
                        gain=d_reg_interval)
    return {k: float(torch.stack(v).mean()) for k, v in stats.items()}


# ----------------------------------------------------------------------------- checkpoints


@dataclass
class Networks:
    """Everything a snapshot stores besides counters: nets, optimisers, trainer tensors."""

    G: nn.Module
    D: nn.Module
    G_ema: nn.Module
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. the path-length mean


@dataclass
class Counters:
    step: int = 0
    images_seen: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return v


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``opt``'s state as ``({prefix.state.<i>.<k>: tensor}, JSON metadata)`` (type, param groups, scalar states)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.state.{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = _jsonable(v)
    groups = [{k: _jsonable(v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"type": type(opt).__name__, "param_groups": groups, "state_scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str,
                    meta: dict[str, Any]) -> None:
    """Restore ``opt`` in place from what :func:`optimizer_tensors` wrote under ``prefix``."""
    if meta["type"] != type(opt).__name__:
        raise UsageError(f"snapshot optimiser is {meta['type']}, not {type(opt).__name__}")
    state: dict[int, dict[str, Any]] = {}
    head = prefix + ".state."
    for key, v in tensors.items():
        if key.startswith(head):
            idx, name = key[len(head):].split(".", 1)
            state.setdefault(int(idx), {})[name] = v
    for idx, st in meta.get("state_scalars", {}).items():
        state.setdefault(int(idx), {}).update(st)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, torch.Tensor]:
    """The global torch (and initialised CUDA) RNG states: ``rng.torch``, ``rng.cuda.<i>``."""
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    """Set the global RNG states saved by :func:`rng_tensors` (those present in ``tensors``)."""
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"].to(torch.uint8))
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        states = [tensors[k].to(torch.uint8) for k in cuda][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)


def write_snapshot_folder(folder: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                          extra_files: dict[str, Callable[[Path], Any]] | None = None) -> Path:
    """Write a snapshot folder atomically (a temporary sibling renamed into place).

    ``tensors`` go to ``state.safetensors`` (detached, contiguous CPU copies), ``meta`` to ``state.json``;
    ``extra_files``: ``name -> write(path)`` for more files (an exported network), written last. An existing
    ``folder`` is replaced only once everything is written.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        for name, write in (extra_files or {}).items():
            write(tmp / name)
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def save_training_state(folder: str | os.PathLike[str], trainer: str, config: dict[str, Any], nets: Networks,
                        counters: Counters, extra_files: dict[str, Callable[[Path], Any]] | None = None) -> Path:
    """Write a snapshot folder atomically (:func:`write_snapshot_folder`).

    ``state.safetensors``: ``G.*``, ``D.*``, ``G_ema.*`` state dicts, ``opt_G.state.<i>.<k>``,
    ``opt_D...`` optimiser tensors, ``extra.*`` trainer tensors, ``rng.*`` RNG states (``uint8``).
    ``state.json``: format, trainer, config, step, images seen, optimiser hyper-parameters,
    metric history. ``extra_files``: ``name -> write(path)`` for more files (the exported generator).
    """
    tensors: dict[str, torch.Tensor] = {}
    for name in ("G", "D", "G_ema"):
        for k, v in getattr(nets, name).state_dict().items():
            tensors[f"{name}.{k}"] = v
    opt_meta = {}
    for name in ("opt_G", "opt_D"):
        t, m = optimizer_tensors(getattr(nets, name), name)
        tensors.update(t)
        opt_meta[name] = m
    tensors.update({f"extra.{k}": v for k, v in nets.extra.items()})
    tensors.update(rng_tensors())
    meta = {"format": STATE_FORMAT, "format_version": STATE_VERSION, "trainer": trainer, "config": config,
            "step": counters.step, "images_seen": counters.images_seen, "kimg": counters.images_seen / 1000,
            "optimizers": opt_meta, "metrics": counters.metrics, "saved": time.strftime("%Y-%m-%d %H:%M:%S")}
    return write_snapshot_folder(folder, tensors, meta, extra_files)


def prune_snapshots(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` ``snapshot-*`` folders of ``run_dir`` (``keep <= 0``: keep all)."""
    if keep > 0:
        for old in sorted(run_dir.glob("snapshot-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def find_snapshot(path: str | os.PathLike[str]) -> Path:
    """``path`` itself if it is a snapshot folder, else its newest ``snapshot-*`` sub-folder."""
    p = Path(path)
    if (p / "state.json").exists():
        return p
    snaps = sorted(q for q in p.glob("snapshot-*") if (q / "state.json").exists()) if p.is_dir() else []
    if not snaps:
        raise FileNotFoundError(f"no training snapshot in {p}")
    return snaps[-1]


def read_snapshot(path: str | os.PathLike[str], trainer: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON metadata and tensors of a ``trainer`` snapshot (``path``: a snapshot or run folder)."""
    from safetensors.torch import load_file

    folder = find_snapshot(path)
    meta = json.loads((folder / "state.json").read_text())
    if meta.get("format") != STATE_FORMAT:
        raise UsageError(f"{folder} is not a portrait3d training snapshot")
    if meta.get("trainer") != trainer:
        raise UsageError(f"{folder} is a {meta.get('trainer')} snapshot, not {trainer}")
    meta["folder"] = str(folder)
    return meta, load_file(str(folder / "state.safetensors"))


def state_with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The state dict stored under ``prefix.`` in snapshot tensors (``'G'``, ``'D'``, ``'G_ema'``)."""
    head = prefix + "."
    return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}


def load_training_state(path: str | os.PathLike[str], nets: Networks, trainer: str) -> tuple[Counters, dict[str, Any]]:
    """Restore ``nets`` (in place) from a snapshot; returns the counters and the JSON metadata."""
    from portrait3d.checkpoints.state import load_state_strict

    meta, tensors = read_snapshot(path, trainer)
    for name in ("G", "D", "G_ema"):
        load_state_strict(getattr(nets, name), state_with_prefix(tensors, name), f"snapshot {name}")
    for name in ("opt_G", "opt_D"):
        load_optimizer(getattr(nets, name), tensors, name, meta["optimizers"][name])
    for k in list(nets.extra):
        v = tensors.get(f"extra.{k}")
        if v is not None:
            nets.extra[k].copy_(v)
    restore_rng(tensors)
    return Counters(int(meta["step"]), int(meta["images_seen"]), list(meta.get("metrics", []))), meta


# ----------------------------------------------------------------------------- samples and progress


def save_grid(path: str | os.PathLike[str], images: torch.Tensor, cols: int | None = None) -> Path:
    """Write ``images [N, 3, H, W]`` in ``[-1, 1]`` as one PNG grid."""
    from portrait3d.face.io import save_image
    from portrait3d.utils.visualize import make_grid, to_uint8

    arr = images if isinstance(images, np.ndarray) else to_uint8(images)
    cols = cols or max(1, int(math.ceil(math.sqrt(len(arr)))))
    return save_image(path, make_grid(arr, cols), overwrite=True)


class Progress:
    """Rank-0 tqdm bar (postfix = current losses) and a JSON-lines log (``log.jsonl``)."""

    def __init__(self, info: DistInfo, total: int, initial: int, log_path: Path | None, enabled: bool = True) -> None:
        self.info = info
        self.log_path = log_path if info.is_main else None
        self.bar = None
        if info.is_main and enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="img", unit_scale=True, dynamic_ncols=True,
                            smoothing=0.1)

    def update(self, n: int, record: dict[str, Any]) -> None:
        if self.bar is not None:
            shown = {k: f"{v:.3g}" for k, v in record.items() if k not in ("step", "kimg", "sec")}
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(n)
        self.log(record)

    def log(self, record: dict[str, Any]) -> None:
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def write(self, msg: str) -> None:
        if not self.info.is_main:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- the outer loop


def due(prev: int, cur: int, interval_kimg: float) -> bool:
    """Whether going from ``prev`` to ``cur`` images crosses a multiple of ``interval_kimg`` (0: never)."""
    if interval_kimg <= 0:
        return False
    n = interval_kimg * 1000
    return math.floor(cur / n) > math.floor(prev / n)


StepFn = Callable[[int, int, Any], dict[str, float]]
"""``step_fn(step, images_seen, local_batch) -> {stat: local mean}``: runs all phases of one step."""


def run_loop(*, trainer: str, config: dict[str, Any], run: RunConfig, info: DistInfo, out_dir: Path,
             nets: Networks, counters: Counters, batches: Iterator[Any], step_fn: StepFn,
             grid_fn: Callable[[], dict[str, torch.Tensor]], export_fn: Callable[[Path], Any],
             metrics: MetricsFn | None = None) -> Path:
    """Train until ``run.total_kimg``: steps, EMA, buffer sync, progress, grids, metrics, snapshots.

    ``grid_fn() -> {name: images}`` renders fixed-latent samples from ``G_ema`` (rank 0);
    ``export_fn(path)`` writes the EMA generator in portrait3d's format. Returns the path of the final
    export (``out_dir / 'G_ema.safetensors'``).
    """
    total = int(round(run.total_kimg * 1000))
    final = out_dir / "G_ema.safetensors"
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "samples").mkdir(exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps({"trainer": trainer, "config": config}, indent=1))
    progress = Progress(info, total, min(counters.images_seen, total), out_dir / "log.jsonl", run.progress)

    def grids() -> None:
        if info.is_main and run.grid_samples > 0:
            for name, imgs in grid_fn().items():
                save_grid(out_dir / "samples" / f"{name}-{counters.step:08d}.png", imgs)

    def snapshot() -> None:
        if not info.is_main:
            return
        folder = out_dir / f"snapshot-{counters.step:08d}"
        save_training_state(folder, trainer, config, nets, counters, {"G_ema.safetensors": export_fn})
        prune_snapshots(out_dir, run.keep_snapshots)
        progress.write(f"snapshot {folder} (kimg {counters.images_seen / 1000:.3f})")

    if counters.step == 0 and run.sample_kimg > 0:
        grids()
    ema_kimg = run.resolved_ema_kimg()
    started = time.monotonic()
    try:
        while counters.images_seen < total:
            t0 = time.perf_counter()
            batch = next(batches)
            stats = step_fn(counters.step, counters.images_seen, batch)
            average_buffers(nets.G, info)
            ema_update(nets.G_ema, nets.G, ema_beta(run.batch, ema_kimg, run.ema_rampup, counters.images_seen))
            prev = counters.images_seen
            counters.images_seen += run.batch
            counters.step += 1
            names = sorted(stats)
            vals = torch.tensor([float(stats[k]) for k in names], dtype=torch.float64, device=info.device)
            vals = all_reduce_mean(vals, info).cpu()  # NCCL reduces CUDA tensors only
            sec = time.perf_counter() - t0
            record = {"step": counters.step, "kimg": counters.images_seen / 1000, "sec": round(sec, 4),
                      "sec_per_kimg": round(sec / run.batch * 1000, 2), **dict(zip(names, vals.tolist()))}
            progress.update(run.batch, record)
            # A wall-time limit ends the run like the end of the schedule (grids, metrics, snapshot), so a
            # time-boxed job (a lent accelerator) always leaves a resumable snapshot behind.
            timed_out = run.max_minutes > 0 and time.monotonic() - started >= run.max_minutes * 60
            if run.max_minutes > 0 and info.world > 1:  # every rank stops at the same step
                flag = torch.tensor([float(timed_out)], device=info.device)
                tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
                timed_out = bool(flag.item())
            done = counters.images_seen >= total or timed_out
            if due(prev, counters.images_seen, run.sample_kimg) or (done and run.sample_kimg > 0):
                grids()
            if metrics is not None and info.is_main and (due(prev, counters.images_seen, run.metrics_kimg) or done):
                vals_m = {k: float(v) for k, v in metrics(nets.G_ema, counters.step).items()}
                entry = {"step": counters.step, "kimg": counters.images_seen / 1000, **vals_m}
                counters.metrics.append(entry)
                progress.log({"metrics": entry})
                progress.write("metrics " + json.dumps(entry))
            if due(prev, counters.images_seen, run.snapshot_kimg) or done:
                snapshot()
            if timed_out:
                progress.write(f"stopping after {run.max_minutes:g} min (max_minutes)")
                break
        if info.is_main:
            export_fn(final)
    finally:
        progress.close()
    return final



def apply_run_options(run: RunConfig, **opts: Any) -> RunConfig:
    """``RunConfig`` with the CLI options that were given (None = keep the preset's)."""
    return dataclasses.replace(run, **{k: v for k, v in opts.items() if v is not None})


def apply_cli_options(cfg: Any, *, kimg: float | None, batch: int | None, batch_gpu: int | None, seed: int | None,
                      snap: float | None, sample_every: float | None, metrics_every: float | None,
                      workers: int | None, threads: int | None, limit: int | None, mirror: bool | None,
                      device: str | None, amp: bool | None, progress: bool | None, gamma: float | None,
                      lr_g: float | None, lr_d: float | None, precision: str | None = None,
                      channels_last: bool | None = None, compile_: bool | None = None,
                      compile_d: bool | None = None, max_minutes: float | None = None) -> None:
    """Apply the overrides of :func:`run_options` that were given to a train config (in place).

    ``cfg`` is a trainer config with ``run`` (:class:`RunConfig`), ``r1_gamma``, ``lr_G`` and ``lr_D``.
    """
    cfg.run = apply_run_options(cfg.run, total_kimg=kimg, batch=batch, batch_gpu=batch_gpu, seed=seed,
                                snapshot_kimg=snap, sample_kimg=sample_every, metrics_kimg=metrics_every,
                                workers=workers, threads=threads, limit=limit, mirror=mirror, device=device, amp=amp,
                                progress=progress, precision=precision, channels_last=channels_last,
                                compile=compile_, compile_d=compile_d, max_minutes=max_minutes)
    for name, v in (("r1_gamma", gamma), ("lr_G", lr_g), ("lr_D", lr_d)):
        if v is not None:
            setattr(cfg, name, v)

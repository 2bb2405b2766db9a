"""Distributed training helpers: :func:`init_distributed` reads ``torchrun``'s environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and starts gloo on CPU or NCCL on CUDA; single-process runs need no
process group and every helper is then a no-op. Gradients are averaged by one flat all-reduce per optimiser step (as
NVIDIA's trainers do, rather than wrapping the nets in ``DistributedDataParallel``: the GAN phases run several forward
passes, double backward (R1) and toggle ``requires_grad``, which DDP's hooks do not like).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as tdist
from torch import nn

from portrait3d.errors import UsageError

__all__ = ["DistInfo", "init_distributed", "shutdown_distributed", "all_reduce_grads", "all_reduce_mean", "broadcast_module", "average_buffers", "run_local_processes"]


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

"""A memory guard for training options: fail at start, with a clear message, instead of being OOM-killed later.

A training step keeps every activation of the forward passes for the backward pass. Its peak therefore grows
linearly with the micro-batch, and so does its cost: a batch or a resolution too large for the machine is
otherwise found out minutes later, when the kernel kills the process without a word.

:func:`activation_bytes` measures what autograd keeps per image: one forward of one image through G and D, with
saved-tensor hooks adding up what the backward pass would need. :func:`check_batch_memory` scales that to the
micro-batch, with a factor for what a step holds besides (the fake and real passes through D, gradients, the
augmentations and the regularisers' double backward). It refuses only what cannot fit, so the factor errs low.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from portrait3d.errors import UsageError

__all__ = ["STEP_FACTOR", "activation_bytes", "available_bytes", "check_batch_memory", "check_training_memory"]

STEP_FACTOR = 0.5
"""Peak memory growth of a training step per image, over :func:`activation_bytes` of one fp32 forward of G and D.

Measured on the CPU trainers as the growth of the peak resident memory from a micro-batch of 4 to one of 16:
StyleGAN2 ``cpu-proj`` in bf16, projected D, 0.59 at 64 px and 0.57 at 128 px; ``--discriminator both`` 0.76;
``tiny`` in fp32 with the pixel D and R1, 1.7. The guard takes the lowest, rounded down, so that it never refuses a
step that fits: it is there for the batch or resolution that is out by a large factor. The EG3D trainer uses the
same factor (its ratio was not measured separately)."""


def activation_bytes(forward: Callable[[], Any], modules: Iterable[nn.Module]) -> int:
    """Bytes that autograd saves for the backward pass while ``forward()`` runs, counting each storage once and
    leaving out the parameters of ``modules`` (they do not grow with the batch). ``forward`` must start from an
    input that requires grad; call it with a batch of one: what a training step keeps per image."""
    modules = list(modules)
    params = {p.data_ptr() for net in modules for p in net.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.data_ptr() not in params:
            seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return t

    # the probe leaves no trace: running statistics and the global random streams are put back, so a resumed
    # run stays bit-exact
    buffers = [(b, b.detach().clone()) for net in modules for b in net.buffers()]
    devices = sorted({b.device.index or 0 for b, _ in buffers if b.is_cuda}) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                forward()
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
    return sum(seen.values())


def available_bytes(device: torch.device | str) -> int | None:
    """Memory this process can still take: free GPU memory for CUDA; on Linux CPUs, ``MemAvailable`` capped by
    the cgroup's limit; ``None`` where unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    if dev.type != "cpu":
        return None
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max" and avail is not None:
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def check_batch_memory(per_image: int, micro_batch: int, device: torch.device | str, *, what: str,
                       hint: str, factor: float = STEP_FACTOR, available: int | None = None) -> None:
    """Raise :class:`UsageError` when ``micro_batch`` images of ``per_image`` activation bytes (times ``factor``)
    need more memory than ``available`` (default :func:`available_bytes`); ``what`` names the setting, ``hint``
    says what to change."""
    avail = available_bytes(device) if available is None else available
    need = factor * per_image * micro_batch
    if avail is not None and need > avail:
        raise UsageError(f"{what} needs about {need / 2**30:.1f} GiB of memory per step, and "
                         f"{max(avail, 0) / 2**30:.1f} GiB are free: {hint}")


def check_training_memory(forward: Callable[[], Any], modules: Iterable[nn.Module], batch: int, batch_gpu: int | None,
                          world: int, device: torch.device | str, where: str) -> None:
    """The GAN trainers' guard before their first step: :func:`activation_bytes` of ``forward`` (one image through
    G and D) scaled to the micro-batch (``batch_gpu``, else ``batch / world``) by :func:`check_batch_memory`;
    ``where`` completes "a batch of N at ..." in the message."""
    micro = batch_gpu or batch // world
    check_batch_memory(activation_bytes(forward, modules), micro, device, what=f"a batch of {micro} at {where}",
                       hint="lower --batch, or set --batch-gpu to accumulate gradients over smaller batches")

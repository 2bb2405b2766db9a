"""Where and how wide to compute: one convention for every command (``--device``, ``--threads``)."""

from __future__ import annotations

import os

import torch

from portrait3d.errors import UsageError

__all__ = ["auto_threads", "resolve_device", "setup_compute"]


def auto_threads() -> int:
    """CPU threads for PyTorch: the cores not already kept busy by other processes.

    With every core taken, PyTorch's OpenMP threads wait on each other at every operation: on a 2-core machine that
    is also training, 2 threads ran the demo 3x slower than 1 thread.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(torch.get_num_threads(), int(cores - busy + 0.5)))


def resolve_device(device: str) -> str:
    """``'auto'`` -> ``'cuda'`` when a GPU is visible, else ``'cpu'``; other names are checked (``cpu``, ``cuda``,
    ``cuda:N``, ``mps``) and a GPU that is not there is a one-line :class:`UsageError`."""
    name = (device or "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device must be auto, cpu, cuda, cuda:N or mps, not {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA GPU is visible (use --device cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError(f"--device {device}: MPS is not available here")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device must be auto, cpu, cuda, cuda:N or mps, not {device!r}")
    return str(dev)


def setup_compute(device: str = "auto", threads: int | None = None) -> str:
    """Set PyTorch's CPU threads (``None``: :func:`auto_threads`) and return the resolved device name."""
    torch.set_num_threads(int(threads) if threads else auto_threads())
    return resolve_device(device)

"""The run settings every trainer shares (:class:`RunConfig`) and how command-line overrides apply to them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from portrait3d.config import ConfigMixin
from portrait3d.training.fast import FastPath

__all__ = ["RunConfig", "apply_run_options", "apply_cli_options"]


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

    def fast_path(self) -> FastPath:
        return FastPath(self.precision, self.channels_last, self.compile, self.compile_d)

    def apply_threads(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)

    def resolved_ema_kimg(self) -> float:
        return self.ema_kimg if self.ema_kimg is not None else self.batch * 10 / 32


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

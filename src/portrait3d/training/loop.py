"""The outer training loop shared by the StyleGAN2 and EG3D trainers: :func:`run_loop` takes a per-step function
and handles EMA, snapshots, sample grids, metrics and progress.

The pieces it composes live beside it, one module per job:

* :mod:`.run_config`: :class:`~.run_config.RunConfig` (batch, schedule, EMA, intervals, device, seed, fast path);
* :mod:`.distributed`: ``torchrun`` process groups and gradient averaging (no-ops in a single process);
* :mod:`.batches` and :mod:`.randomness`: **a run on W processes computes the same thing as one process on the
  same global batch** -- strided shards of the data, and every random draw made for the global batch and sliced
  the same way (the minibatch-std groups then match too; exactness needs the local batch to be a multiple of the
  group size, and the mapping network's ``w_avg`` moves once per accumulation round, as in NVIDIA's code);
* :mod:`.optim`: EMA, lazy-regularisation Adam, one GAN phase;
* :mod:`.snapshots`: bit-exact resumable checkpoints (safetensors + JSON, written atomically);
* :mod:`.progress`: sample grids, progress bar and JSON-lines log.

:func:`fit_module` is the smaller loop of the one-network trainers (PIE's estimator and RigNets, the W_tri
encoder): a loss function per step, Adam, progress, samples and module snapshots.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as tdist
from torch import nn

from portrait3d.training.distributed import DistInfo, all_reduce_mean, average_buffers
from portrait3d.training.optim import Counters, Networks, ema_beta, ema_update
from portrait3d.training.progress import Progress, save_grid
from portrait3d.training.run_config import RunConfig
from portrait3d.training.snapshots import prune_snapshots, save_module_snapshot, save_training_state

__all__ = ["MetricsFn", "due", "StepFn", "fit_module", "run_loop"]

MetricsFn = Callable[[nn.Module, int], dict[str, float]]
"""A metrics hook: ``fn(G_ema, step) -> {name: value}``; called on rank 0 only."""



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


def fit_module(net: nn.Module, opt: torch.optim.Optimizer, out: Path, trainer: str, config: dict[str, Any],
               export_name: str, step: int, images_seen: int, total: int, batch: int, snapshot_kimg: float,
               keep: int, progress: bool, losses: Callable[[int], dict[str, torch.Tensor]],
               samples: Callable[[int], None] | None = None, sample_kimg: float = 0.0,
               max_minutes: float = 0.0, device: torch.device = torch.device("cpu")) -> int:
    """Train one network until ``total`` images: ``losses(step)`` -> terms with ``loss``, an optimiser step,
    progress and ``log.jsonl``, ``samples(step)`` every ``sample_kimg``, and snapshots (``snapshot-<step>/``, the
    network and optimiser, exported as ``export_name`` by ``net.save``) every ``snapshot_kimg`` and at the end.
    Resumed runs pass the ``step`` / ``images_seen`` of their snapshot; batches must be drawn from ``(seed, step)``
    for a resume to be bit-exact. ``max_minutes`` (> 0) ends the run early after that long, with a snapshot and
    the export (a lent device's time slot). Returns the images seen."""
    bar = Progress(DistInfo(device=device), total, min(images_seen, total), out / "log.jsonl", progress)
    started = time.monotonic()
    try:
        while images_seen < total:
            t0 = time.perf_counter()
            terms = losses(step)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            prev, images_seen, step = images_seen, images_seen + batch, step + 1
            bar.update(batch, {"step": step, "kimg": images_seen / 1000, "sec": round(time.perf_counter() - t0, 4),
                               **{k: float(v.detach()) for k, v in terms.items()}})
            timed_out = max_minutes > 0 and time.monotonic() - started >= max_minutes * 60
            done = images_seen >= total or timed_out
            if timed_out:
                bar.write(f"stopping after {max_minutes:g} min (max_minutes)")
            if samples is not None and (due(prev, images_seen, sample_kimg) or done):
                samples(step)
            if due(prev, images_seen, snapshot_kimg) or done:
                folder = out / f"snapshot-{step:08d}"
                save_module_snapshot(folder, trainer, config, net, opt, step, images_seen,
                                     {export_name: lambda p: net.save(p, overwrite=True)}, rng=False)
                prune_snapshots(out, keep)
                bar.write(f"snapshot {folder} (kimg {images_seen / 1000:.3f})")
            if timed_out:
                break
    finally:
        bar.close()
    return images_seen

"""Images per second of a full StyleGAN2 training step: fp32 eager against the fast CPU path.

For each preset, one run builds the networks twice (same seed, same config) and times full steps
(G main, D main, and the lazy R1 every ``D_reg_interval`` steps, so the regulariser's cost is
amortised as in training) on a synthetic real batch: first in fp32 eager mode, then on the fast
path (bf16 autocast on AMX, channels_last, compiled generator; see
:mod:`portrait3d.training.fast`). Compilation happens in untimed warm-up steps. Prints img/s of
each and their ratio.

    PYTHONPATH=src python bench/bench_training.py --preset cpu-proj --preset cpu-small --threads 2
    PYTHONPATH=src python bench/bench_training.py --preset cpu-proj --resolution 64 --threads 1
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from portrait3d.training.distributed import DistInfo  # noqa: E402
from portrait3d.training.stylegan2 import PRESETS, build_networks, make_step, preset  # noqa: E402

MODES = {
    "fp32-eager": dict(precision="fp32", channels_last=False, compile=False, compile_d=False),
    "fast": dict(precision="bf16", channels_last=True, compile=True, compile_d=False),
    "fast+compiled-D": dict(precision="bf16", channels_last=True, compile=True, compile_d=True),
}


def time_mode(name: str, resolution: int | None, mode: dict, steps: int, warmup: int,
              discriminator: str | None) -> dict:
    cfg = preset(name)
    if resolution:
        cfg.G.img_resolution = cfg.D.img_resolution = resolution
    if discriminator:
        cfg.discriminator = discriminator
    cfg.run = dataclasses.replace(cfg.run, **mode)
    cfg.validate()
    info = DistInfo()
    nets = build_networks(cfg, info.device)
    step_fn = make_step(cfg, nets, info)
    g = torch.Generator().manual_seed(0)
    res = cfg.G.img_resolution
    real = torch.rand([cfg.run.batch, 3, res, res], generator=g) * 2 - 1
    t0 = time.perf_counter()
    for s in range(warmup):
        step_fn(s, s * cfg.run.batch, (real,))
    t_warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in range(warmup, warmup + steps):
        step_fn(s, s * cfg.run.batch, (real,))
    sec = time.perf_counter() - t0
    return {"img_per_s": steps * cfg.run.batch / sec, "sec_per_step": sec / steps, "warmup_s": t_warm,
            "resolution": res, "batch": cfg.run.batch, "discriminator": cfg.discriminator,
            "reg_steps": sum(1 for s in range(warmup, warmup + steps) if s % cfg.D_reg_interval == 0)}


@click.command(context_settings={"show_default": True})
@click.option("--preset", "presets", multiple=True, type=click.Choice(sorted(PRESETS)), default=["cpu-proj"])
@click.option("--resolution", type=int, default=None, help="Override the preset's resolution.")
@click.option("--discriminator", type=click.Choice(["stylegan2", "projected", "both"]), default=None)
@click.option("--steps", type=click.IntRange(1), default=16, help="Timed steps (16 = one lazy R1 at the default interval).")
@click.option("--warmup", type=click.IntRange(1), default=3, help="Untimed steps (compilation).")
@click.option("--threads", type=click.IntRange(1), default=2)
@click.option("--modes", multiple=True, type=click.Choice(sorted(MODES)), default=["fp32-eager", "fast"])
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(presets: tuple[str, ...], resolution: int | None, discriminator: str | None, steps: int, warmup: int,
         threads: int, modes: tuple[str, ...], json_out: Path | None) -> None:
    torch.set_num_threads(threads)
    results = {}
    for name in presets:
        row = {}
        for m in modes:
            r = time_mode(name, resolution, MODES[m], steps, warmup, discriminator)
            row[m] = r
            print(f"{name:10s} {m:16s} {r['img_per_s']:7.2f} img/s  ({r['sec_per_step']:.3f} s/step, "
                  f"{r['resolution']} px, batch {r['batch']}, D {r['discriminator']}, warm-up {r['warmup_s']:.0f} s)",
                  flush=True)
        base = row.get("fp32-eager")
        for m, r in row.items():
            if base and m != "fp32-eager":
                r["speedup_vs_fp32_eager"] = r["img_per_s"] / base["img_per_s"]
                print(f"{name:10s} {m:16s} speed-up over fp32 eager: {r['speedup_vs_fp32_eager']:.2f}x", flush=True)
        results[name] = row
    if json_out:
        json_out.write_text(json.dumps({"threads": threads, "torch": torch.__version__, "results": results}, indent=1))


if __name__ == "__main__":
    main()

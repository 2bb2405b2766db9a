"""What EG3D's rendering settings cost, and what the cheaper ones lose (issue 13, item 3).

Two tables, each measured in one run on this machine:

1. **Training cost** of one full ``cpu-proj`` step (G main with the camera-conditioned projected D, D main, lazy
   density regularisation), random weights, for the preset and each single change from it: samples per ray,
   neural-rendering resolution, tri-plane width, tri-plane resolution, and the discriminator (EG3D's dual pixel D
   with its lazy R1, or both). Prints images/s and the ratio to the preset. Lazy regularisers run every 4 (G) /
   16 (D) steps: time at least 16 steps (``--steps``) for their cost to be amortised as in training. (What a
   changed setting does to the *trained* quality needs a training run per row; only the inference-time settings
   below can be judged on the shipped weights.)
2. **Inference quality** of a trained generator (default ``default-3d``) when rendered with fewer or more samples
   per ray, or at a higher neural-rendering resolution than it was trained at: seconds per image, PSNR of the
   128 px image against the densest render of the same latent and camera, and the geometry checks of
   :mod:`portrait3d.metrics.geometry3d` (detection at +-30 deg, yaw slope) on ``--n`` latents.

    PYTHONPATH=src python bench/bench_eg3d_cost.py --threads 1 --n 32 --json cost.json
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from portrait3d.checkpoints import load_network  # noqa: E402
from portrait3d.metrics.geometry3d import geometry_checks  # noqa: E402
from portrait3d.metrics.psnr import psnr  # noqa: E402
from portrait3d.networks.eg3d.camera import camera_from_angles  # noqa: E402
from portrait3d.training import eg3d as E  # noqa: E402
from portrait3d.training.distributed import DistInfo  # noqa: E402
from portrait3d.utils.io import write_json  # noqa: E402
from portrait3d.utils.visualize import to_uint8  # noqa: E402

# name -> change to the cpu-proj preset's generator (one setting at a time)
TRAIN_VARIANTS = {
    "preset (32 px rendering, 24+24 samples, 32-channel 128 px planes)": {},
    "12+12 samples per ray": {"depth": (12, 12)},
    "48+48 samples per ray": {"depth": (48, 48)},
    "64 px neural rendering": {"nrr": 64},
    "16-channel planes": {"plane_channels": 16},
    "64 px planes": {"plane_resolution": 64},
    "EG3D's dual pixel D (R1) instead of the projected D": {"discriminator": "stylegan2"},
    "both discriminators": {"discriminator": "both"},
}

# name -> (coarse samples, importance samples, neural rendering resolution) at inference
INFER_VARIANTS = {"12+12": (12, 12, None), "24+24 (trained)": (24, 24, None), "48+48": (48, 48, None),
                  "24+24 at 64 px rendering": (24, 24, 64)}


def _train_config(change: dict) -> E.EG3DTrainConfig:
    cfg = E.preset("cpu-proj")
    g = cfg.G
    if "depth" in change:
        g.rendering = dataclasses.replace(g.rendering, depth_resolution=change["depth"][0],
                                          depth_resolution_importance=change["depth"][1])
    if "nrr" in change:
        g.neural_rendering_resolution = change["nrr"]
    for key in ("plane_channels", "plane_resolution"):
        if key in change:
            setattr(g, key, change[key])
    if "discriminator" in change:
        cfg.discriminator = change["discriminator"]
    cfg.validate()
    return cfg


def time_training(change: dict, steps: int, warmup: int) -> dict:
    cfg = _train_config(change)
    info = DistInfo()
    nets = E.build_networks(cfg, info.device)
    g = torch.Generator().manual_seed(0)
    cams = camera_from_angles(np.linspace(-30, 30, 16).tolist(), [0.0] * 16).reshape(-1, 25)
    step_fn = E.make_step(cfg, nets, info, cams)
    b = cfg.run.batch
    real = torch.rand([b, 3, 128, 128], generator=g) * 2 - 1
    real_c = cams[torch.randint(0, len(cams), [b], generator=g)]
    for s in range(warmup):
        step_fn(s, s * b, (real, real_c))
    t0 = time.perf_counter()
    for s in range(warmup, warmup + steps):
        step_fn(s, s * b, (real, real_c))
    sec = (time.perf_counter() - t0) / steps
    return {"img_per_s": b / sec, "sec_per_step": sec, "G_params": sum(p.numel() for p in nets.G.parameters())}


@torch.no_grad()
def _renders(G, ws: torch.Tensor, cams: torch.Tensor, nrr: int | None) -> tuple[torch.Tensor, float]:
    out, t0 = [], time.perf_counter()
    for w, c in zip(ws.split(8), cams.split(8)):
        out.append(G.synthesis(w, c, neural_rendering_resolution=nrr, noise_mode="const",
                               deterministic=True)["image"].float())
    return torch.cat(out), (time.perf_counter() - t0) / len(ws)


def inference_quality(network: str, n: int, seed: int) -> dict:
    base = load_network(network).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, base.z_dim, generator=gen)
    front = camera_from_angles(0.0, 0.0).reshape(1, 25)
    ws = base.mapping(z, front.expand(n, -1), truncation_psi=0.7)
    cams = camera_from_angles(np.tile([-30.0, 0.0, 30.0], n // 3 + 1)[:n].tolist(), [0.0] * n).reshape(n, 25)
    ref_G = copy.deepcopy(base)
    ref_G.rendering_kwargs.update(depth_resolution=96, depth_resolution_importance=96)
    ref, _ = _renders(ref_G, ws, cams, None)
    rows = {}
    for name, (d, di, nrr) in INFER_VARIANTS.items():
        G = copy.deepcopy(base)
        G.rendering_kwargs.update(depth_resolution=d, depth_resolution_importance=di)
        if nrr is not None:
            G.neural_rendering_resolution = nrr
        img, sec = _renders(G, ws, cams, nrr)
        geo = geometry_checks(G, n=n, seed=seed)
        a, b = to_uint8(img), to_uint8(ref)
        rows[name] = {"sec_per_image": sec, "psnr_vs_96_96": float(np.mean([psnr(x, y) for x, y in zip(a, b)])),
                      "detection": geo.detection, "yaw_slope": geo.yaw_slope, "identity_kept": geo.identity_kept}
        print(f"  {name:26s} {sec:6.3f} s/img  PSNR {rows[name]['psnr_vs_96_96']:5.2f} dB  detection "
              + " / ".join(f"{v:.2f}" for v in geo.detection.values()) + f"  slope {geo.yaw_slope:.2f}")
    return rows


@click.command(context_settings={"show_default": True})
@click.option("--network", type=str, default="default-3d", help="Trained generator for the inference table.")
@click.option("--n", type=click.IntRange(3), default=32, help="Latents for the inference table.")
@click.option("--steps", type=click.IntRange(1), default=4, help="Timed training steps per variant.")
@click.option("--warmup", type=click.IntRange(1), default=2)
@click.option("--threads", type=click.IntRange(1), default=1)
@click.option("--seed", type=int, default=0)
@click.option("--skip-training", is_flag=True, help="Only the inference table.")
@click.option("--skip-inference", is_flag=True, help="Only the training table.")
@click.option("--only", multiple=True, type=click.Choice(sorted(TRAIN_VARIANTS)),
              help="Training rows to time (default: all; the preset row is always timed first, as the reference).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(network: str, n: int, steps: int, warmup: int, threads: int, seed: int, skip_training: bool,
         skip_inference: bool, only: tuple[str, ...], json_path: Path | None) -> None:
    torch.set_num_threads(threads)
    result: dict = {"threads": threads}
    if not skip_training:
        print(f"training step, cpu-proj (bf16, channels_last), {threads} thread(s):")
        train = {}
        preset_row = next(iter(TRAIN_VARIANTS))
        for name, change in TRAIN_VARIANTS.items():
            if only and name not in only and name != preset_row:
                continue
            train[name] = time_training(change, steps, warmup)
            base = next(iter(train.values()))["img_per_s"]
            print(f"  {name:62s} {train[name]['img_per_s']:5.2f} img/s  x{train[name]['img_per_s'] / base:4.2f}")
        result["training"] = train
    if not skip_inference:
        print(f"inference, {network}, {n} latents at yaw -30/0/+30 (PSNR against 96+96 samples per ray):")
        result["inference"] = inference_quality(network, n, seed)
    print(json.dumps(result, indent=1, default=float))
    if json_path is not None:
        write_json(json_path, result, overwrite=True)


if __name__ == "__main__":
    main()

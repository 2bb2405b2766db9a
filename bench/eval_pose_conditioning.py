"""How far a pose-conditioned 2D generator follows its camera label (issue 13, pose-conditioned pretraining).

For ``--n`` seeded latents, renders ``G(z, c)`` with ``c`` the EG3D camera at each commanded yaw (pitch 0) and
measures with the face pipeline (dlib's 68 landmarks, PnP; :func:`portrait3d.face.pose.estimate_head_pose`): the
detection rate per yaw, the least-squares slope of measured against commanded yaw, the mean measured yaw per
commanded yaw, and the dlib distance between each turned view and the frontal one (same person below 0.6). An
unconditional generator has no label to follow; a 2D generator that learnt the camera turns the head with it.
Saves a grid (rows: latents; columns: yaws) beside ``--out``.

    PYTHONPATH=src python bench/eval_pose_conditioning.py RUN/G_ema.safetensors --n 64 --out pose_cond.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from portrait3d.checkpoints.load import load_network  # noqa: E402
from portrait3d.face.analyzer import FaceAnalyzer  # noqa: E402
from portrait3d.metrics.geometry3d import SAME_PERSON_DISTANCE, YawTally, turned_identity_distances  # noqa: E402
from portrait3d.networks.eg3d.camera import camera_from_angles  # noqa: E402
from portrait3d.utils.visualize import to_uint8  # noqa: E402


@click.command(context_settings={"show_default": True})
@click.argument("network", type=str)
@click.option("--n", type=click.IntRange(2), default=64, help="Latents.")
@click.option("--yaws", type=str, default="-30,0,30", help="Commanded yaws in degrees (must include 0).")
@click.option("--psi", type=click.FloatRange(0, 1), default=0.7, help="Truncation psi.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Grid PNG of the first 8 latents (and OUT.json with the figures).")
@click.option("--threads", type=click.IntRange(1), default=1)
def main(network: str, n: int, yaws: str, psi: float, out: Path | None, threads: int) -> None:
    from portrait3d.training.progress import save_grid

    torch.set_num_threads(threads)
    G = load_network(network).eval()
    if getattr(G, "c_dim", 0) != 25 or not hasattr(G, "synthesis") or hasattr(G, "backbone"):
        raise click.UsageError(f"{network}: not a pose-conditioned 2D StyleGAN2 (c_dim 25)")
    ys = [float(y) for y in yaws.split(",")]
    if 0.0 not in ys:
        raise click.UsageError("--yaws must include 0")
    gen = torch.Generator().manual_seed(0)
    tally = YawTally(tuple(ys))
    dists: list[float] = []
    kept = total = 0
    grid = []
    with torch.no_grad(), FaceAnalyzer("mediapipe") as fa:
        for start in range(0, n, 8):
            k = min(8, n - start)
            z = torch.randn(k, G.z_dim, generator=gen)
            views = {}
            for y in ys:
                c = camera_from_angles(y, 0.0).reshape(1, 25).expand(k, -1)
                views[y] = to_uint8(G(z, c, truncation_psi=psi, noise_mode="const"))
            if start == 0:
                grid = [torch.from_numpy(views[y][i]).permute(2, 0, 1).float() / 127.5 - 1
                        for i in range(k) for y in ys]
            for i in range(k):
                one = {y: views[y][i] for y in ys}
                d = turned_identity_distances(fa, one, tally.add(fa, one))
                if d is not None:
                    dists.extend(d)
                    total += 1
                    kept += all(x < SAME_PERSON_DISTANCE for x in d)
    report = {"network": network, "n": n, "psi": psi,
              "detection": {str(y): r for y, r in tally.rates(n).items()}, "yaw_slope": tally.slope(),
              "measured_yaw_mean": {str(y): None if np.isnan(m) else m for y, m in tally.mean_yaws().items()},
              "identity_distance_mean": float(np.mean(dists)) if dists else None,
              "identity_kept": kept / total if total else None}
    print(json.dumps(report))
    if out is not None:
        save_grid(out, torch.stack(grid), cols=len(ys))
        out.with_suffix(".json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

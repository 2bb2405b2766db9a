"""Camera recovery on generated images with a known camera: initial estimate vs. after Algorithm 1.

Ko et al. (WACV 2023) show that optimising the camera together with the latent corrects the pose
estimator's error. This script measures that on images whose latent and camera are known:
``--n`` pseudo pairs ``x = G(w, pi)`` from :func:`~portrait3d.methods.inversion3d.pseudo.sample_pseudo_pairs`
(yaw / pitch drawn uniformly in ``--yaw-range`` / ``--pitch-range``, no roll, truncation
``--truncation``; the evaluation seed is independent of the pose estimator's training stream), and

1. the initial camera: the pose estimator's ``P.camera(x)`` (``--pose``), else the face pipeline's PnP
   camera on the generated image itself (BlazeFace + dlib 68 landmarks ->
   :func:`~portrait3d.face.pose.estimate_head_pose` with EG3D's field of view ->
   :func:`~portrait3d.face.pose.camera_from_pose`; no re-alignment, so the camera is that of the
   rendered crop). Images without a detected face start from the frontal camera and are counted and
   reported in their own rows;
2. the camera after Algorithm 1 (:func:`~portrait3d.methods.inversion3d.optimize.invert`, ``--steps``,
   no PTI) started from that camera and from ``w_avg`` (or the encoder's latent, ``--encoder``).

Errors are absolute differences, in degrees, of yaw, pitch and roll with the EG3D label angles the
pair was rendered with. A camera is read the way the optimiser parameterises it: the initial label by
:func:`~portrait3d.networks.eg3d.camera.pose_angles_from_camera` (the angles
:class:`~portrait3d.methods.inversion3d.camera_params.CameraParams` starts from; for ``P`` this
includes its camera offset, if it predicts one), the optimised camera by its ``camera_state``
(yaw / pitch of the untranslated camera position, roll). Algorithm 1 does not optimise roll by default,
so the roll error stays the initial one.

Run from the repository root::

    PYTHONPATH=src python bench/eval_camera_recovery.py --n 2 --steps 5
    PYTHONPATH=src python bench/eval_camera_recovery.py --network eg3d.pkl --pose P.safetensors --n 50 \\
        --json camera_recovery.json
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from portrait3d.methods.inversion3d.pipeline import load_networks
from portrait3d.networks.eg3d.camera import camera_from_angles, pose_angles_from_camera
from portrait3d.utils.io import write_json

EVAL_SEED_KEY = 0xCA3E  # pseudo-pair seed offset: keeps these pairs apart from the training streams' seeds


def label_angles(camera: torch.Tensor) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees of an EG3D label ``[25]`` / ``[1, 25]``."""
    yaw, pitch, roll, _ = pose_angles_from_camera(camera.reshape(-1)[:25].detach().float().cpu())
    return float(yaw), float(pitch), float(roll)


def pnp_camera(image: np.ndarray, pipe: Any) -> tuple[torch.Tensor | None, np.ndarray | None]:
    """Face pipeline's camera ``[1, 25]`` of a rendered crop ``uint8 [R, R, 3]`` and its ``[68, 2]`` landmarks
    (:meth:`FacePipeline.find_landmarks68`, then PnP); ``(None, None)`` when no face is found."""
    from portrait3d.face.errors import FaceError
    from portrait3d.face.pipeline import EG3D_FOV_DEG
    from portrait3d.face.pose import camera_from_pose, estimate_head_pose

    lm = pipe.find_landmarks68(image)
    if lm is None:
        return None, None
    lm = np.asarray(lm, np.float64)
    try:
        pose = estimate_head_pose(lm, (image.shape[1], image.shape[0]), fov_deg=EG3D_FOV_DEG)
    except (FaceError, ValueError):
        return None, None
    return camera_from_pose(pose).reshape(1, 25), lm


def errors(est: tuple[float, float, float], truth: tuple[float, float, float]) -> dict[str, float]:
    """Absolute yaw / pitch / roll errors in degrees (angle differences wrapped to [-180, 180))."""
    def d(a: float, b: float) -> float:
        return abs((a - b + 180.0) % 360.0 - 180.0)

    return {"yaw": d(est[0], truth[0]), "pitch": d(est[1], truth[1]), "roll": d(est[2], truth[2])}


def summarise(errs: list[dict[str, float]]) -> dict[str, float]:
    """Mean and median of each error (NaN when empty)."""
    out: dict[str, float] = {"n": len(errs)}
    for k in ("yaw", "pitch", "roll"):
        v = [e[k] for e in errs]
        out[f"{k}_mean"] = statistics.fmean(v) if v else math.nan
        out[f"{k}_median"] = statistics.median(v) if v else math.nan
    return out


def _fmt(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.2f}"


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--network", default="default-3d", help="EG3D checkpoint path or built-in name.")
@click.option("--n", "n", type=click.IntRange(min=1), default=20, help="Generated images.")
@click.option("--yaw-range", type=(float, float), default=(-30.0, 30.0), help="Yaw range (degrees).")
@click.option("--pitch-range", type=(float, float), default=(-20.0, 20.0), help="Pitch range (degrees).")
@click.option("--truncation", type=float, default=0.7, help="Truncation psi of the sampled latents.")
@click.option("--pose", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="PoseEstimator file (default: the face pipeline's PnP camera).")
@click.option("--encoder", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="LatentEncoder file for Algorithm 1's initial latent (default: w_avg).")
@click.option("--steps", type=click.IntRange(min=0), default=None, show_default="InversionConfig's default",
              help="Algorithm 1 steps (0: initial camera only).")
@click.option("--batch", type=click.IntRange(min=1), default=8, help="Pairs rendered at once.")
@click.option("--seed", type=int, default=0, help="Pair seed (offset by a fixed evaluation key) and optimiser seed.")
@click.option("--threads", type=click.IntRange(min=1), default=1, help="torch.set_num_threads.")
@click.option("--device", default="cpu", help="torch device.")
@click.option("--progress/--no-progress", default=True, help="Progress bars.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the summary and per-image errors as JSON.")
def main(network: str, n: int, yaw_range: tuple[float, float], pitch_range: tuple[float, float], truncation: float,
         pose: Path | None, encoder: Path | None, steps: int | None, batch: int, seed: int, threads: int,
         device: str, progress: bool, json_path: Path | None) -> None:
    """Camera error of P (or PnP) alone and after Algorithm 1, on generated images with known cameras."""
    from tqdm import tqdm

    from portrait3d.face.pipeline import FacePipeline
    from portrait3d.methods.inversion3d.optimize import InversionConfig, invert
    from portrait3d.methods.inversion3d.pseudo import PseudoPairConfig, sample_pseudo_pairs
    from portrait3d.utils.visualize import to_uint8

    torch.set_num_threads(threads)
    dev = torch.device(device)
    G, enc, P = load_networks(network, encoder, pose, dev)
    rk = getattr(G, "rendering_kwargs", {}) or {}
    pivot = tuple(float(v) for v in rk.get("avg_camera_pivot", (0.0, 0.0, 0.2)))
    radius = float(rk.get("avg_camera_radius", 2.7))
    pcfg = PseudoPairConfig(yaw_range=tuple(yaw_range), pitch_range=tuple(pitch_range), truncation_psi=truncation,
                            seed=seed + EVAL_SEED_KEY, radius=radius, pivot=pivot)
    pcfg.validate()
    cfg = InversionConfig(algorithm=1, seed=seed)
    if steps is not None:
        cfg.steps = int(steps)
    init_name = "P" if P is not None else "PnP"

    gen = torch.Generator().manual_seed(pcfg.seed)
    per_image: list[dict[str, Any]] = []
    loss_description = ""
    t_start = time.perf_counter()
    pipe = FacePipeline() if P is None else None
    try:
        bar = tqdm(total=n, desc="camera recovery", unit="image", disable=not progress)
        done = 0
        while done < n:
            m = min(batch, n - done)
            pairs = sample_pseudo_pairs(G, m, pcfg, generator=gen)
            for j in range(m):
                x = pairs["image"][j:j + 1].float()
                truth = tuple(float(v) for v in pairs["angles"][j].tolist())
                lm = None
                t0 = time.perf_counter()
                if P is not None:
                    with torch.no_grad():
                        cam0 = P.camera(x).detach().float().reshape(1, 25)
                    source = "P"
                else:
                    cam0, lm = pnp_camera(to_uint8(x)[0], pipe)
                    source = "PnP" if cam0 is not None else "frontal (no face)"
                    if cam0 is None:
                        cam0 = camera_from_angles(0.0, 0.0, radius=radius, pivot=pivot).reshape(1, 25)
                t_init = time.perf_counter() - t0
                cam0 = cam0.to(dev)
                rec: dict[str, Any] = {"index": done + j, "truth": truth, "init_source": source,
                                       "init_angles": label_angles(cam0), "init_seconds": t_init}
                rec["init_error"] = errors(rec["init_angles"], truth)
                if cfg.steps > 0:
                    with torch.no_grad():
                        ws0 = enc(x.to(dev)).detach().float() if enc is not None else None
                    t0 = time.perf_counter()
                    res = invert(G, x.to(dev), ws0, cam0, cfg, landmarks=lm, progress=False)
                    rec["alg1_seconds"] = time.perf_counter() - t0
                    st = res.camera_state
                    rec["alg1_angles"] = (st["yaw"], st["pitch"], st["roll"])
                    rec["alg1_error"] = errors(rec["alg1_angles"], truth)
                    rec["alg1_translation"] = (st["tx"], st["ty"], st["tz"])
                    loss_description = res.loss_description
                per_image.append(rec)
                bar.update(1)
            done += m
        bar.close()
    finally:
        if pipe is not None:
            pipe.close()

    no_face = "frontal (no face)"
    groups = [("PnP found a face" if P is None else "all", [r for r in per_image if r["init_source"] != no_face])]
    if P is None:
        groups.append(("no face: frontal start", [r for r in per_image if r["init_source"] == no_face]))
    rows = []
    for label, sel in groups:
        if not sel:
            continue
        rows.append({"camera": f"initial ({init_name if 'frontal' not in label else 'frontal'})", "images": label,
                     **summarise([r["init_error"] for r in sel])})
        if cfg.steps > 0:
            rows.append({"camera": f"after Alg. 1 ({cfg.steps} steps)", "images": label,
                         **summarise([r["alg1_error"] for r in sel]),
                         "seconds_per_image": statistics.fmean(r["alg1_seconds"] for r in sel)})

    found = sum(r["init_source"] == "PnP" for r in per_image)
    click.echo("")
    click.echo(f"network {network}: {n} generated images, yaw {yaw_range[0]:g}..{yaw_range[1]:g}, pitch "
               f"{pitch_range[0]:g}..{pitch_range[1]:g} (uniform), roll 0, truncation {truncation:g}; initial latent "
               f"{'encoder ' + str(encoder) if encoder else 'w_avg'}; {threads} thread(s), device {device}")
    if P is None:
        click.echo(f"initial camera: face pipeline PnP on the generated image; a face was found in {found} / {n} "
                   "images (the others start from the frontal camera)")
    else:
        click.echo(f"initial camera: pose estimator {pose}")
    if loss_description:
        click.echo(f"Algorithm 1 image loss: {loss_description}")
    click.echo("absolute errors in degrees against the rendering camera's label angles (mean / median)")
    click.echo("")
    click.echo("| camera | images | n | yaw mean | yaw median | pitch mean | pitch median | roll mean | roll median "
               "| s / image |")
    click.echo("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sec = r.get("seconds_per_image")
        click.echo(f"| {r['camera']} | {r['images']} | {r['n']} | {_fmt(r['yaw_mean'])} | {_fmt(r['yaw_median'])} | "
                   f"{_fmt(r['pitch_mean'])} | {_fmt(r['pitch_median'])} | {_fmt(r['roll_mean'])} | "
                   f"{_fmt(r['roll_median'])} | {'-' if sec is None else f'{sec:.1f}'} |")
    total = time.perf_counter() - t_start
    click.echo(f"\nwall time {total:.1f} s")
    if json_path is not None:
        payload = {"config": {"network": network, "n": n, "pseudo_pairs": pcfg.to_dict(), "pose": pose,
                              "encoder": encoder, "steps": cfg.steps, "seed": seed, "threads": threads,
                              "device": device},
                   "initial_camera": "pose estimator" if P is not None else "face pipeline PnP (frontal if no face)",
                   "faces_found": found if P is None else None, "image_loss": loss_description,
                   "rows": rows, "images": per_image, "wall_time_s": total,
                   "environment": {"torch": torch.__version__, "machine": platform.processor() or platform.machine()}}
        click.echo(f"wrote {write_json(json_path, payload, overwrite=True)}")


if __name__ == "__main__":
    main()

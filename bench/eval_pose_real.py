"""The pose estimator P on real photos: its camera against the face pipeline's head pose, photo by photo.

Real photos have no ground-truth camera, so this measures agreement, not error: for each held-out photo the face
pipeline aligns the face in the generator's crop (as ``invert3d`` does) and estimates the head pose by PnP; P then
reads the aligned crop. Reported: mean / median absolute yaw and pitch differences, their correlation, and P's
systematic offset (mean signed difference). P's error on images with known cameras is ``bench/eval_camera_recovery.py``.

    PYTHONPATH=src python bench/eval_pose_real.py --pose src/portrait3d/models/default-3d/pose.safetensors \\
        --photos ../shared/data/utkface --holdout ~/.cache/portrait3d/utkface128/holdout.txt --n 200
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import torch


@click.command(context_settings={"show_default": True})
@click.option("--pose", "pose_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--network", default="default-3d", help="The generator whose crop P was trained on.")
@click.option("--photos", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--holdout", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="File names to use, one per line [every photo in --photos].")
@click.option("--n", type=int, default=200, help="Photos, evenly spaced.")
@click.option("--threads", type=int, default=1)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(pose_path: Path, network: str, photos: Path, holdout: Path | None, n: int, threads: int,
         json_path: Path | None) -> None:
    from portrait3d.face.errors import FaceError
    from portrait3d.face.io import load_image
    from portrait3d.face.pipeline import FacePipeline
    from portrait3d.methods.inversion3d.networks import load_module
    from portrait3d.methods.inversion3d.pipeline import load_generator, resolve_align, to_tensor
    from portrait3d.networks.eg3d.camera import pose_angles_from_camera

    torch.set_num_threads(threads)
    G, _ = load_generator(network, torch.device("cpu"))
    P = load_module(pose_path).eval()
    names = [s for s in holdout.read_text().split() if s] if holdout else sorted(p.name for p in photos.iterdir())
    picks = [names[int(i)] for i in np.linspace(0, len(names) - 1, n)] if n < len(names) else names
    rows = []
    with FacePipeline(style=resolve_align("auto", network), output_size=int(G.img_resolution)) as pipe, \
            torch.no_grad():
        for name in picks:
            try:
                face = pipe(load_image(photos / name))
            except FaceError:
                continue
            cam = P.camera(to_tensor(face.aligned.image, "cpu")).reshape(1, 25)
            yaw_p, pitch_p = (float(v) for v in pose_angles_from_camera(cam)[:2])
            yaw_f, pitch_f = (float(v) for v in pose_angles_from_camera(face.camera.reshape(1, 25).float())[:2])
            rows.append({"photo": name, "yaw_P": yaw_p, "pitch_P": pitch_p, "yaw_pipeline": yaw_f,
                         "pitch_pipeline": pitch_f})
    if not rows:
        raise SystemExit("no photo had a face")
    out = {"photos": len(picks), "with_face": len(rows), "pose": str(pose_path), "network": network}
    for k in ("yaw", "pitch"):
        a = np.array([r[f"{k}_P"] for r in rows])
        b = np.array([r[f"{k}_pipeline"] for r in rows])
        d = a - b
        out[k] = {"mean_abs_diff": float(np.abs(d).mean()), "median_abs_diff": float(np.median(np.abs(d))),
                  "mean_signed_diff": float(d.mean()), "correlation": float(np.corrcoef(a, b)[0, 1]),
                  "std_P": float(a.std()), "std_pipeline": float(b.std())}
    click.echo("| angle | photos | mean abs diff | median abs diff | mean signed diff (P - pipeline) | correlation | "
               "std P | std pipeline |")
    click.echo("|---|---|---|---|---|---|---|---|")
    for k in ("yaw", "pitch"):
        s = out[k]
        click.echo(f"| {k} | {len(rows)} | {s['mean_abs_diff']:.2f} | {s['median_abs_diff']:.2f} | "
                   f"{s['mean_signed_diff']:+.2f} | {s['correlation']:.3f} | {s['std_P']:.2f} | {s['std_pipeline']:.2f} |")
    if json_path:
        json_path.write_text(json.dumps({"summary": out, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

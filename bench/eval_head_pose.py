"""Head pose up to profile (issue 18, item 1): the 468-point mesh fit against the 68-point fit, on renders of the
face rig with known poses and on real photos.

1. **Synthetic renders** of the shipped face rig (``models/face-rig``): per yaw bin (``--yaws``), ``--per-bin``
   faces with random identity, expression, albedo and SH light, pitch uniform in +-``--pitch``, on a random grey
   background, rendered at ``--size`` px with EG3D's field of view. Each goes through the face pipeline's
   detector and both predictors (:meth:`~portrait3d.face.analyzer.FaceAnalyzer.landmarks_and_mesh`), then
   :func:`~portrait3d.face.pose.estimate_head_pose_mesh` (all 468 points, visibility refits) and
   :func:`~portrait3d.face.pose.estimate_head_pose` (68 points). Prints, per bin, detections and the median and
   largest absolute yaw error of each; writes a plot of estimated against true yaw.
2. **Real photos** (``--photos``, e.g. ``../shared/data/portraits/deepface``): both estimates per photo, and the
   ones where they disagree by more than 10 degrees or :func:`~portrait3d.face.pose.pose_confidence` says the mesh
   fit is not confident.

    PYTHONPATH=src python bench/eval_head_pose.py --per-bin 4 --photos ../shared/data/portraits/deepface \\
        --out bench_out/head_pose
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from portrait3d.face.analyzer import FaceAnalyzer  # noqa: E402
from portrait3d.face.pose import EG3D_FOV_DEG, estimate_head_pose, estimate_head_pose_mesh, pose_confidence  # noqa: E402
from portrait3d.utils.io import save_image, write_json, write_text  # noqa: E402

FOV = EG3D_FOV_DEG


def render_rig(rig, yaw: float, pitch: float, size: int, g: torch.Generator) -> np.ndarray:
    """A random face of the rig at ``(yaw, pitch)`` on a grey background, ``uint8 [S, S, 3]`` (gamma 2.2)."""
    p = rig.neutral(1)
    p = p.replace(identity=0.7 * torch.randn(p.identity.shape, generator=g),
                  expression=0.5 * torch.randn(p.expression.shape, generator=g),
                  albedo=0.7 * torch.randn(p.albedo.shape, generator=g),
                  angles=torch.tensor([[yaw, pitch, 0.0]]))
    lt = p.light.clone().reshape(1, 3, 9)
    lt[:, :, 0] = 1.4 + 0.4 * torch.rand(1, generator=g)
    lt[:, :, 1:4] = (torch.rand(3, generator=g) - 0.5) * 0.8
    p = p.replace(light=lt.reshape(1, 27))
    with torch.no_grad():
        out = rig(p, size)
    img = out["image"].clamp(0, 1) ** (1 / 2.2)
    bg = (0.3 + 0.4 * torch.rand(1, generator=g)) * torch.ones(1, 3, 1, 1)
    img = torch.where(out["mask"] > 0.5, img, bg)
    return (img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def both_poses(fa: FaceAnalyzer, img: np.ndarray) -> dict | None:
    found = fa.landmarks_and_mesh(img)
    if found is None:
        return None
    lm, mesh = found
    size = (img.shape[1], img.shape[0])
    pm = estimate_head_pose_mesh(mesh, size, fov_deg=FOV)
    p68 = estimate_head_pose(lm, size, fov_deg=FOV)
    width = float(np.ptp(mesh[:, 0]))
    ok, reasons = pose_confidence(pm, width)
    return {"mesh_yaw": pm.yaw_deg, "mesh_pitch": pm.pitch_deg, "mesh_error_px": pm.reprojection_error,
            "yaw68": p68.yaw_deg, "pitch68": p68.pitch_deg, "confident": ok, "reasons": reasons}


@click.command(context_settings={"show_default": True})
@click.option("--yaws", type=str, default="-80,-70,-60,-45,-30,-15,0,15,30,45,60,70,80")
@click.option("--per-bin", type=click.IntRange(1), default=4)
@click.option("--pitch", type=float, default=10.0, help="Pitch drawn uniformly in +- this.")
@click.option("--size", type=click.IntRange(64), default=256)
@click.option("--photos", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None)
@click.option("--seed", type=int, default=0)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def main(yaws: str, per_bin: int, pitch: float, size: int, photos: Path | None, seed: int, out: Path) -> None:
    from portrait3d.face.io import load_image
    from portrait3d.methods.pie.face_model import FaceModel

    torch.set_num_threads(1)
    rig = FaceModel.load("face-rig")
    g = torch.Generator().manual_seed(seed)
    bins = [float(y) for y in yaws.split(",")]
    rows, shown = [], []
    out.mkdir(parents=True, exist_ok=True)
    with FaceAnalyzer("mediapipe", work_size=0) as fa:
        for yaw in bins:
            for k in range(per_bin):
                p = float((torch.rand(1, generator=g) * 2 - 1) * pitch)
                img = render_rig(rig, yaw, p, size, g)
                if k == 0:
                    shown.append(img)
                m = both_poses(fa, img)
                rows.append({"yaw": yaw, "pitch": p, **(m or {"found": False})})
        lines = ["| true yaw | found | mesh: median / max yaw error | 68 points: median / max | mesh confident |",
                 "|---|---|---|---|---|"]
        for yaw in bins:
            r = [x for x in rows if x["yaw"] == yaw and x.get("found", True)]
            em = [abs(x["mesh_yaw"] - yaw) for x in r]
            e68 = [abs(x["yaw68"] - yaw) for x in r]
            fmt = (lambda e: f"{np.median(e):.1f} / {np.max(e):.1f}" if e else "n/a")
            lines.append(f"| {yaw:+.0f} | {len(r)}/{per_bin} | {fmt(em)} | {fmt(e68)} | "
                         f"{sum(x['confident'] for x in r)}/{len(r)} |")
        within = [x for x in rows if abs(x["yaw"]) <= 75 and x.get("found", True)]
        for key, name in (("mesh_yaw", "mesh"), ("yaw68", "68 points")):
            e = [abs(x[key] - x["yaw"]) for x in within]
            lines.append(f"\n{name}, |yaw| <= 75 ({len(e)} found of "
                         f"{sum(abs(x['yaw']) <= 75 for x in rows)}): median {np.median(e):.1f}, max {np.max(e):.1f} deg")
        real = []
        if photos is not None:
            for path in sorted(photos.glob("*.jpg")):
                m = both_poses(fa, load_image(path))
                if m is None:
                    continue
                m["photo"] = path.name
                real.append(m)
            odd = [m for m in real if abs(m["mesh_yaw"] - m["yaw68"]) > 10 or not m["confident"]]
            lines.append(f"\nReal photos ({photos}): {len(real)} with a face; mesh and 68-point yaw differ by more "
                         f"than 10 deg, or the mesh fit is not confident, on {len(odd)}:")
            lines += [f"- {m['photo']}: mesh yaw {m['mesh_yaw']:+.1f}, 68-point yaw {m['yaw68']:+.1f}"
                      + (f" ({'; '.join(m['reasons'])})" if m["reasons"] else "") for m in odd]
    table = "\n".join(lines)
    print(table)
    write_text(out / "head_pose.md", table + "\n", overwrite=True)
    write_json(out / "head_pose.json", {"synthetic": rows, "real": real}, overwrite=True)
    save_image(out / "renders.png", np.concatenate(shown, 1), overwrite=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    found = [x for x in rows if x.get("found", True)]
    ax.plot([-90, 90], [-90, 90], "k:", lw=1)
    ax.scatter([x["yaw"] for x in found], [x["mesh_yaw"] for x in found], s=12, label="468-point mesh")
    ax.scatter([x["yaw"] for x in found], [x["yaw68"] for x in found], s=12, marker="x", label="68 points")
    ax.set_xlabel("true yaw (deg)")
    ax.set_ylabel("estimated yaw (deg)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "yaw.png", dpi=100)


if __name__ == "__main__":
    main()

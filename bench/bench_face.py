"""Milliseconds per photo for the face pipeline on CPU: detect + landmarks + align + camera.

    python bench/bench_face.py                    # photos from ../shared/data/portraits
    python bench/bench_face.py --style eg3d --json out.json

Each stage is timed separately on every photo (after one warm-up pass), for each detector
backend; the medians are printed with the total. Timings are machine-dependent.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import click
import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "portraits"


def _photos(folder: Path, limit: int) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return files[:limit]


@click.command(context_settings={"show_default": True})
@click.option("--photos", "folder", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=SHARED / "deepface", help="Folder of portrait photos.")
@click.option("--limit", type=int, default=30, help="At most this many photos.")
@click.option("--style", type=click.Choice(["ffhq", "eg3d", "default"]), default="default")
@click.option("--detectors", default="mediapipe,dlib-hog,dlib", help="Comma-separated detector backends.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(folder: Path, limit: int, style: str, detectors: str, json_path: Path | None) -> None:
    import torch
    from tqdm import tqdm

    from portrait3d.face.align import ALIGNERS
    from portrait3d.face.detect import FaceDetector, select_face
    from portrait3d.face.errors import FaceError
    from portrait3d.face.io import load_image
    from portrait3d.face.landmarks import LandmarkDetector
    from portrait3d.face.pipeline import DEFAULT_SIZES, EG3D_FOV_DEG
    from portrait3d.face.pose import camera_from_pose, estimate_head_pose

    photos = _photos(folder, limit)
    images = [load_image(p) for p in photos]
    print(f"{len(images)} photos from {folder}, median size "
          f"{int(np.median([i.shape[1] for i in images]))}x{int(np.median([i.shape[0] for i in images]))}, "
          f"style {style}, torch threads {torch.get_num_threads()}")
    results = {}
    for backend in detectors.split(","):
        times: dict[str, list[float]] = {k: [] for k in ("detect", "landmarks", "align", "camera", "total")}
        misses = 0
        with FaceDetector(backend, fallback=False) as det, LandmarkDetector("dlib") as lmk:
            for warm, seq in ((True, images[:1]), (False, images)):
                for image in tqdm(seq, desc=backend, disable=warm, leave=False):
                    t0 = time.perf_counter()
                    try:
                        face = select_face(det.detect(image))
                    except FaceError:
                        misses += 0 if warm else 1
                        continue
                    t1 = time.perf_counter()
                    lm = lmk.landmarks68(image, face)
                    t2 = time.perf_counter()
                    aligned = ALIGNERS[style](image, lm, output_size=DEFAULT_SIZES[style])
                    t3 = time.perf_counter()
                    pose = estimate_head_pose(aligned.landmarks, aligned.image.shape[1::-1], fov_deg=EG3D_FOV_DEG)
                    camera_from_pose(pose)
                    t4 = time.perf_counter()
                    if not warm:
                        for k, a, b in (("detect", t0, t1), ("landmarks", t1, t2), ("align", t2, t3),
                                        ("camera", t3, t4), ("total", t0, t4)):
                            times[k].append((b - a) * 1000)
        med = {k: statistics.median(v) if v else float("nan") for k, v in times.items()}
        results[backend] = {"median_ms": med, "photos": len(times["total"]), "no_face": misses}
        print(f"{backend:10s} " + "  ".join(f"{k} {v:7.1f} ms" for k, v in med.items())
              + f"   ({len(times['total'])} photos, {misses} without a face)")
    if json_path:
        json_path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

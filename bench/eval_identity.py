"""Face verification with dlib's descriptor and with portrait3d's PyTorch port of it.

Runs every pair of ``deepface/master.csv`` (``file_x,file_y,Decision``): for each image, dlib's HOG
detector finds the faces (the largest one is used), dlib's 5-point shape predictor places the
landmarks, and the same landmarks feed both

* dlib: ``face_recognition_model_v1.compute_face_descriptor(img, shape, num_jitters=0)``;
* the port: :class:`portrait3d.face.identity.IdentityEncoder` (differentiable chip extraction +
  :class:`DlibFaceResNet`).

A pair is predicted "same person" when the descriptors are closer than 0.6 (Euclidean, dlib's
rule). Printed: accuracy of both, their agreement rate, min/mean cosine(port, dlib) over all faces,
pairs skipped because an image had no detected face, and ms per face for each (descriptor only,
landmarks given; the port's time includes its chip extraction).

Detection runs on a copy of each image downscaled to ``--detect-max-side`` (speed); the shape
predictor always runs on the full-resolution image. Run from the repository root::

    PYTHONPATH=src python bench/eval_identity.py
    PYTHONPATH=src python bench/eval_identity.py --json identity_eval.json --threads 2

Timings are machine-dependent (CPU, threads, load); compare them within one run only.
"""

from __future__ import annotations

import csv
import json
import platform
import statistics
import time
from pathlib import Path

import click
import numpy as np
import torch

from portrait3d.face.identity import (
    SAME_PERSON_THRESHOLD,
    DlibFaceResNet,
    IdentityEncoder,
    cosine_similarity,
    descriptor_distance,
    dlib_descriptor,
)
from portrait3d.face.models import dlib_model_path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "portraits" / "deepface"


def _load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def _largest_face_shape(img: np.ndarray, detector, predictor, upsample: int, max_side: int):
    import dlib
    from PIL import Image

    s = 1.0 if max_side <= 0 else min(1.0, max_side / max(img.shape[:2]))
    small = img if s == 1 else np.asarray(Image.fromarray(img).resize(
        (round(img.shape[1] * s), round(img.shape[0] * s)), Image.BILINEAR))
    dets = list(detector(small, upsample))
    if not dets:
        return None
    d = max(dets, key=lambda r: r.width() * r.height())
    box = dlib.rectangle(*(round(v / s) for v in (d.left(), d.top(), d.right(), d.bottom())))
    return predictor(img, box)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=DEFAULT_DATA,
              show_default=True, help="Folder with master.csv and the images.")
@click.option("--pairs", "pairs_name", default="master.csv", show_default=True, help="Pair list inside --data.")
@click.option("--upsample", type=click.IntRange(min=0), default=1, show_default=True,
              help="dlib HOG detector upsampling steps.")
@click.option("--detect-max-side", type=click.IntRange(min=0), default=1200, show_default=True,
              help="Detect on a copy downscaled to this longest side (0 = full resolution).")
@click.option("--quantize/--no-quantize", default=True, show_default=True,
              help="Port: reproduce dlib's 8-bit chip truncation (straight-through) or keep smooth chips.")
@click.option("--threads", type=click.IntRange(min=1), default=None, show_default="torch's default",
              help="torch.set_num_threads for the port.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the results (summary + per-pair + per-face) as JSON.")
def main(data: Path, pairs_name: str, upsample: int, detect_max_side: int, quantize: bool,
         threads: int | None, json_path: Path | None) -> None:
    import dlib

    if threads is not None:
        torch.set_num_threads(threads)
    with open(data / pairs_name, newline="") as f:
        rows = [(r["file_x"].strip(), r["file_y"].strip(), r["Decision"].strip().lower() == "yes")
                for r in csv.DictReader(f)]
    files = sorted({p for r in rows for p in r[:2]})
    click.echo(f"{len(rows)} pairs over {len(files)} images from {data / pairs_name}")

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(dlib_model_path("shape_5")))
    encoder = IdentityEncoder(DlibFaceResNet.from_dlib(), quantize=quantize)

    # warm-up (first calls allocate / build kernels)
    warm = np.zeros((200, 200, 3), np.uint8)
    with torch.no_grad():
        encoder(torch.from_numpy(warm).permute(2, 0, 1)[None].float(),
                np.array([[[130, 80], [110, 80], [60, 80], [80, 80], [95, 120]]], float))
    dlib_descriptor(warm, np.array([[130, 80], [110, 80], [60, 80], [80, 80], [95, 120]], float))

    faces: dict[str, dict] = {}
    t_dlib, t_port = [], []
    for i, name in enumerate(files):
        img = _load_rgb(data / name)
        shape = _largest_face_shape(img, detector, predictor, upsample, detect_max_side)
        if shape is None:
            faces[name] = {"face": False}
            click.echo(f"[{i + 1}/{len(files)}] {name}: no face")
            continue
        t0 = time.perf_counter()
        ref = dlib_descriptor(img, shape)
        t1 = time.perf_counter()
        pts = np.array([[[shape.part(k).x, shape.part(k).y] for k in range(5)]], np.float64)
        with torch.no_grad():
            x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
            t2 = time.perf_counter()
            ours = encoder(x, pts)[0].double().numpy()
            t3 = time.perf_counter()
        t_dlib.append(1000 * (t1 - t0))
        t_port.append(1000 * (t3 - t2))
        cos = float(cosine_similarity(ours, ref))
        faces[name] = {"face": True, "dlib": ref, "port": ours, "cosine": cos,
                       "distance": float(descriptor_distance(ours, ref))}
        click.echo(f"[{i + 1}/{len(files)}] {name}: cosine(port, dlib) = {cos:.7f}")

    results, skipped = [], 0
    for fx, fy, same in rows:
        a, b = faces[fx], faces[fy]
        if not (a["face"] and b["face"]):
            skipped += 1
            continue
        d_dlib = float(descriptor_distance(a["dlib"], b["dlib"]))
        d_port = float(descriptor_distance(a["port"], b["port"]))
        results.append({"file_x": fx, "file_y": fy, "same": same, "dist_dlib": d_dlib, "dist_port": d_port,
                        "pred_dlib": d_dlib < SAME_PERSON_THRESHOLD, "pred_port": d_port < SAME_PERSON_THRESHOLD})

    n = len(results)
    acc_dlib = sum(r["pred_dlib"] == r["same"] for r in results) / max(n, 1)
    acc_port = sum(r["pred_port"] == r["same"] for r in results) / max(n, 1)
    agree = sum(r["pred_dlib"] == r["pred_port"] for r in results) / max(n, 1)
    cosines = [f["cosine"] for f in faces.values() if f["face"]]
    max_dd = max((abs(r["dist_dlib"] - r["dist_port"]) for r in results), default=float("nan"))
    summary = {
        "pairs": len(rows), "pairs_evaluated": n, "pairs_skipped_no_face": skipped,
        "images": len(files), "images_without_face": sum(not f["face"] for f in faces.values()),
        "threshold": SAME_PERSON_THRESHOLD,
        "accuracy_dlib": acc_dlib, "accuracy_port": acc_port, "agreement": agree,
        "disagreeing_pairs": sum(r["pred_dlib"] != r["pred_port"] for r in results),
        "max_abs_pair_distance_diff": max_dd,
        "cosine_min": min(cosines, default=float("nan")), "cosine_mean": statistics.fmean(cosines) if cosines else float("nan"),
        "ms_per_face_dlib": statistics.median(t_dlib) if t_dlib else float("nan"),
        "ms_per_face_port": statistics.median(t_port) if t_port else float("nan"),
        "quantize": quantize, "upsample": upsample, "detect_max_side": detect_max_side,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "dlib": dlib.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    click.echo("")
    click.echo(f"pairs evaluated: {n} / {len(rows)}   skipped (no face in an image): {skipped}")
    click.echo(f"accuracy @ distance < {SAME_PERSON_THRESHOLD}:  dlib {acc_dlib:.4f}   port {acc_port:.4f}")
    click.echo(f"agreement (same decision): {agree:.4f}  ({summary['disagreeing_pairs']} pairs differ); "
               f"max |distance_port - distance_dlib| over pairs: {max_dd:.2e}")
    click.echo(f"cosine(port, dlib) over {len(cosines)} faces: min {summary['cosine_min']:.7f}   "
               f"mean {summary['cosine_mean']:.7f}")
    click.echo(f"ms per face (median, threads={torch.get_num_threads()}): dlib {summary['ms_per_face_dlib']:.1f}   "
               f"port {summary['ms_per_face_port']:.1f} (chip extraction + network, CPU)")
    if json_path is not None:
        payload = {
            "summary": summary,
            "pairs": results,
            "faces": {k: {kk: vv for kk, vv in v.items() if kk not in ("dlib", "port")} for k, v in faces.items()},
        }
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload, indent=2))
        click.echo(f"wrote {json_path}")


if __name__ == "__main__":
    main()

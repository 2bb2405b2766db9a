"""Landmark accuracy of the face pipeline against dlib's labelled example faces.

Data: ``shared/data/portraits/dlib_faces/testing_with_face_landmarks.xml`` (dlib's imglab
format: per image, face boxes with 68 ``<part>`` points in iBUG 300-W order; 25 faces in 5
PASCAL VOC photos). Read the file's own comment before trusting the numbers: its landmarks
"are from dlib's shape_predictor_68_face_landmarks.dat landmarking model", i.e. the labels
are dlib's predictions on the labelled box (checked by hand by dlib's author). So:

* ``dlib`` with the *labelled* box (``--oracle-box``) reproduces the labels almost exactly:
  a consistency check, not an accuracy figure;
* ``dlib`` with *detected* boxes measures how much the box convention of our detector moves
  dlib's answer;
* ``mediapipe`` (face mesh mapped to 68 points by ``MESH_TO_IBUG68``) measures agreement with
  dlib's landmark definition -- what matters when either backend feeds the same alignment.

Protocol: every labelled face is matched to the detection with the highest IoU (>= ``--min-iou``);
faces with no such detection count as "not detected". Normalised mean error (NME) per face =
mean over the 68 points of the point-to-point distance divided by

* the outer-eye-corner distance |p36 - p45| (the 300-W "inter-ocular" convention), and
* the pupil distance, the distance between the two eye-contour centroids (mean of 36-41 and of
  42-47; the XML has no pupil labels), reported as ``nme_pupil``.

We report mean and median NME per backend and per region (jaw, brows, nose, eyes, mouth), the
failure rate (faces with inter-ocular NME > 0.1, among landmarked faces and counting
undetected faces as failures) and timings. Points missing from a box (absent ``<part>`` or
negative coordinates) are left out of that face's mean; boxes marked ``ignore='1'`` are
skipped; both are counted in the output.

Run from the repository root::

    PYTHONPATH=src python bench/eval_landmarks.py
    PYTHONPATH=src python bench/eval_landmarks.py --oracle-box --json landmarks.json
    PYTHONPATH=src python bench/eval_landmarks.py --xml ../shared/data/portraits/dlib_faces/training_with_face_landmarks.xml
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_XML = ROOT.parent / "shared" / "data" / "portraits" / "dlib_faces" / "testing_with_face_landmarks.xml"
REGIONS = {
    "jaw": list(range(0, 17)),
    "brows": list(range(17, 27)),
    "nose": list(range(27, 36)),
    "eyes": list(range(36, 48)),
    "mouth": list(range(48, 68)),
}


@dataclass
class LabelledFace:
    """One labelled face: box in pixel-centre coordinates, 68 points, which are present."""

    image: Path
    box: tuple[float, float, float, float]
    points: np.ndarray  # [68, 2], NaN where missing
    present: np.ndarray  # [68] bool


@dataclass
class Dataset:
    faces: list[LabelledFace] = field(default_factory=list)
    ignored_boxes: int = 0
    missing_points: int = 0
    images: int = 0


def parse_dlib_xml(path: Path) -> Dataset:
    """Parse dlib's imglab XML (``<image file=..><box top left width height><part name x y/>``).

    dlib boxes are inclusive pixel rectangles: ``left .. left + width - 1``; in our
    pixel-centre convention their edges are ``left - 0.5`` and ``left + width - 0.5``.
    """
    root = ET.parse(path).getroot()
    ds = Dataset()
    for img in root.iter("image"):
        ds.images += 1
        file = (path.parent / img.get("file", "")).resolve()
        for b in img.iter("box"):
            if b.get("ignore", "0") not in ("0", ""):
                ds.ignored_boxes += 1
                continue
            top, left = float(b.get("top")), float(b.get("left"))
            width, height = float(b.get("width")), float(b.get("height"))
            box = (left - 0.5, top - 0.5, left + width - 0.5, top + height - 0.5)
            pts = np.full((68, 2), np.nan)
            for p in b.iter("part"):
                i = int(p.get("name"))
                x, y = float(p.get("x")), float(p.get("y"))
                if 0 <= i < 68 and x >= 0 and y >= 0:
                    pts[i] = (x, y)
            present = ~np.isnan(pts[:, 0])
            ds.missing_points += int((~present).sum())
            ds.faces.append(LabelledFace(file, box, pts, present))
    return ds


def nme(pred: np.ndarray, gt: np.ndarray, present: np.ndarray) -> dict[str, float]:
    """Normalised mean errors of one face (both normalisations, all regions)."""
    err = np.linalg.norm(pred - gt, axis=1)
    iod = float(np.linalg.norm(gt[36] - gt[45]))
    pupil = float(np.linalg.norm(np.nanmean(gt[36:42], 0) - np.nanmean(gt[42:48], 0)))
    out = {"nme": float(np.mean(err[present]) / iod), "nme_pupil": float(np.mean(err[present]) / pupil)}
    for name, idx in REGIONS.items():
        sel = [i for i in idx if present[i]]
        out[f"nme_{name}"] = float(np.mean(err[sel]) / iod) if sel else float("nan")
    return out


def summarise(rows: list[dict[str, float]], n_faces: int, n_undetected: int,
              threshold: float) -> dict[str, object]:
    keys = ["nme", "nme_pupil"] + [f"nme_{r}" for r in REGIONS]
    s: dict[str, object] = {"faces": n_faces, "landmarked": len(rows), "not_detected": n_undetected}
    if rows:
        for k in keys:
            v = np.array([r[k] for r in rows])
            s[f"{k}_mean"] = round(float(np.nanmean(v)), 5)
            s[f"{k}_median"] = round(float(np.nanmedian(v)), 5)
        fails = int(sum(r["nme"] > threshold for r in rows))
        s["failures"] = fails
        s["failure_rate"] = round(fails / len(rows), 4)
        s["failure_rate_incl_undetected"] = round((fails + n_undetected) / max(n_faces, 1), 4)
        s["ms_per_face"] = round(1000 * float(np.mean([r["seconds"] for r in rows])), 1)
    return s


@click.command()
@click.option("--xml", "xml_paths", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              multiple=True, help=f"dlib imglab XML(s) [default: {DEFAULT_XML.name}].")
@click.option("--backend", "backends", type=click.Choice(["dlib", "mediapipe"]), multiple=True,
              help="Landmark backend(s) [default: both].")
@click.option("--detector", type=click.Choice(["mediapipe", "dlib", "dlib-hog"]),
              default="mediapipe", show_default=True, help="Face detector backend.")
@click.option("--min-iou", type=float, default=0.3, show_default=True,
              help="A labelled face matches a detection with at least this IoU.")
@click.option("--oracle-box", is_flag=True,
              help="Also landmark from the labelled boxes (no detector).")
@click.option("--threshold", type=float, default=0.1, show_default=True,
              help="Failure: inter-ocular NME above this.")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the results as JSON.")
def main(xml_paths: tuple[Path, ...], backends: tuple[str, ...], detector: str, min_iou: float,
         oracle_box: bool, threshold: float, json_path: Path | None) -> None:
    """Landmark NME per backend on dlib's labelled faces."""
    from portrait3d.face.detect import FaceDetector, box_iou
    from portrait3d.face.errors import FaceError
    from portrait3d.face.io import load_image
    from portrait3d.face.landmarks import LandmarkDetector

    xml_paths = xml_paths or (DEFAULT_XML,)
    if not xml_paths[0].exists():
        raise click.ClickException(f"{xml_paths[0]} not found (../shared is absent?)")
    backends = backends or ("dlib", "mediapipe")
    faces: list[LabelledFace] = []
    meta = {"images": 0, "ignored_boxes": 0, "missing_points": 0}
    for p in xml_paths:
        ds = parse_dlib_xml(p)
        faces += ds.faces
        meta["images"] += ds.images
        meta["ignored_boxes"] += ds.ignored_boxes
        meta["missing_points"] += ds.missing_points
    click.echo(f"{len(faces)} labelled faces in {meta['images']} images; "
               f"{meta['ignored_boxes']} ignored boxes, {meta['missing_points']} missing points")

    det = FaceDetector(detector)
    images: dict[Path, np.ndarray] = {}
    detections: dict[Path, list] = {}
    t0 = time.perf_counter()
    for f in faces:
        if f.image not in images:
            images[f.image] = load_image(f.image)
            detections[f.image] = det.detect(images[f.image])
    det_seconds = time.perf_counter() - t0

    matched: list[object | None] = []
    for f in faces:
        best = max(detections[f.image], key=lambda d: box_iou(d.box, f.box), default=None)
        ok = best is not None and box_iou(best.box, f.box) >= min_iou
        matched.append(best if ok else None)
    n_undetected = sum(m is None for m in matched)
    ious = [box_iou(m.box, f.box) for m, f in zip(matched, faces) if m is not None]

    results: dict[str, object] = {
        "xml": [str(p) for p in xml_paths], "detector": detector, "min_iou": min_iou,
        "threshold": threshold, **meta, "faces": len(faces), "detected": len(faces) - n_undetected,
        "mean_iou_matched": round(float(np.mean(ious)), 3) if ious else None,
        "detector_seconds_per_image": round(det_seconds / max(len(images), 1), 3),
        "note": "labels are dlib shape_predictor_68 outputs on the labelled boxes (see XML comment)",
        "backends": {},
    }
    modes = [("detected", False)] + ([("oracle_box", True)] if oracle_box else [])
    for backend in backends:
        lmd = LandmarkDetector(backend)
        try:  # load the model outside the timings
            lmd.landmarks68(images[faces[0].image], faces[0].box)
        except FaceError:
            pass
        for mode, oracle in modes:
            rows: list[dict[str, float]] = []
            undetected = 0
            for f, m in zip(faces, matched):
                face = f.box if oracle else m
                if face is None:
                    undetected += 1
                    continue
                t = time.perf_counter()
                try:
                    lm = lmd.landmarks68(images[f.image], face)
                except FaceError:
                    undetected += 1
                    continue
                row = nme(lm, f.points, f.present)
                row["seconds"] = time.perf_counter() - t
                rows.append(row)
            s = summarise(rows, len(faces), undetected, threshold)
            results["backends"][f"{backend}/{mode}"] = s  # type: ignore[index]

    click.echo(f"detector {detector}: {len(faces) - n_undetected}/{len(faces)} faces matched "
               f"(IoU >= {min_iou}, mean IoU {results['mean_iou_matched']})")
    cols = ["nme", "nme_pupil"] + [f"nme_{r}" for r in REGIONS]
    head = f"{'backend/boxes':24s} {'n':>3s} {'miss':>4s} " + " ".join(
        f"{c.replace('nme_', ''):>13s}" for c in cols) + f" {'fail>0.1':>8s} {'ms':>6s}"
    click.echo("NME as mean / median (inter-ocular = outer eye corners 36-45, except 'pupil')")
    click.echo(head)
    for name, s in results["backends"].items():  # type: ignore[union-attr]
        if not s.get("landmarked"):
            click.echo(f"{name:24s} no face landmarked")
            continue
        vals = " ".join(f"{s[c + '_mean']:6.4f}/{s[c + '_median']:6.4f}" for c in cols)
        click.echo(f"{name:24s} {s['landmarked']:3d} {s['not_detected']:4d} {vals} "
                   f"{s['failure_rate']:8.3f} {s['ms_per_face']:6.1f}")
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2))
        click.echo(f"wrote {json_path}")


if __name__ == "__main__":
    main()

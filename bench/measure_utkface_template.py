"""Measure the default-alignment template (``portrait3d.face.align.DEFAULT_TEMPLATE``) on UTKFace.

UTKFace's crops (200x200, already aligned) are the framing our default models are trained
on. This script runs the default face pipeline on a random sample of them -- BlazeFace
detection (dlib CNN fallback), largest face, dlib's 68 landmarks -- reduces each face to the
5-point set of :func:`portrait3d.face.landmarks.five_points` (eye centre = mean of the 6 eye
contour points, nose tip 30, mouth corners 48 / 54), normalises to [0, 1] by the crop size
(a pixel centre ``p`` of a 200 px crop is ``(p + 0.5) / 200``) and prints the mean: the
constants to paste into ``align.py``. It also reports the spread, the MediaPipe-mesh-based
estimate for comparison, and how much of each UTKFace photo re-aligned with the template at
200 px falls outside the photo (the part ``align_default`` fills by mirroring).

``--mesh-map`` also re-derives ``portrait3d.face.landmarks.MESH_TO_IBUG68`` (see the comment
there): the mesh's left/right vertex correspondence from flipped photos, then, per iBUG
point, the vertex or adjacent-vertex pair nearest dlib's point on average.

Run from the repository root::

    PYTHONPATH=src python bench/measure_utkface_template.py --n 1000 --seed 0
    PYTHONPATH=src python bench/measure_utkface_template.py --n 600 --seed 7 --mesh-map
"""

from __future__ import annotations

import itertools
import json
import random
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "utkface"
NAMES = ("right_eye", "left_eye", "nose_tip", "mouth_right", "mouth_left")


def _sample(data: Path, n: int, seed: int) -> list[Path]:
    files = sorted(data.glob("*.jpg"))
    if not files:
        raise click.ClickException(f"no *.jpg under {data}")
    rng = random.Random(seed)
    return rng.sample(files, min(n, len(files)))


def _fit_mesh_map(dlib68: np.ndarray, mesh: np.ndarray, mirror: np.ndarray) -> list[tuple[int, ...]]:
    """Per-iBUG-point mesh vertex / adjacent pair minimising the mean distance to dlib's point."""
    from portrait3d.face.landmarks import IBUG68_MIRROR

    m2 = mesh[:, :468, :2]
    iod = np.linalg.norm(dlib68[:, 36] - dlib68[:, 45], axis=1)
    keep = np.linalg.norm(dlib68[:, 36] - m2[:, 33], axis=1) / iod < 0.15  # drop gross misfits
    d68, m2, iod = dlib68[keep], m2[keep], iod[keep]
    meanpos = (m2 / iod[:, None, None]).mean(0)

    def cost(i: int, vs: tuple[int, ...]) -> float:
        p = m2[:, list(vs)].mean(1)
        return float(np.mean(np.minimum(np.linalg.norm(p - d68[:, i], axis=1) / iod, 0.3)))

    # Mesh contours (subject's right side; the left side follows by mirroring).
    eye_up = [33, 246, 161, 160, 159, 158, 157, 173, 133]
    eye_lo = [33, 7, 163, 144, 145, 153, 154, 155, 133]
    mo_up = [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291]
    mo_lo = [61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291]
    mi_up = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308]
    mi_lo = [78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308]
    br_up = [70, 63, 105, 66, 107]
    br_lo = [46, 53, 52, 65, 55]

    def chain(ch: list[int]) -> list[tuple[int, ...]]:
        return [(v,) for v in ch] + list(zip(ch[:-1], ch[1:]))

    semantic: dict[int, list[tuple[int, ...]]] = {36: chain(eye_up[:3]) + chain(eye_lo[:3]),
                                                 39: chain(eye_up[-3:]) + chain(eye_lo[-3:]),
                                                 48: chain(mo_up[:3]) + chain(mo_lo[:3])
                                                 + [(61, 78), (61, 76), (76,), (62,), (76, 62)],
                                                 60: chain(mi_up[:3]) + chain(mi_lo[:3])}
    for i in (37, 38):
        semantic[i] = chain(eye_up)
    for i in (40, 41):
        semantic[i] = chain(eye_lo)
    for i in (49, 50, 51):
        semantic[i] = chain(mo_up)
    for i in (55, 56, 57, 58, 59):
        semantic[i] = chain(mo_lo)
    for i in (61, 62, 63):
        semantic[i] = chain(mi_up)
    for i in (65, 66, 67):
        semantic[i] = chain(mi_lo)
    for i in range(17, 22):
        semantic[i] = ([(a,) for a in br_up + br_lo] + list(zip(br_up, br_lo))
                       + list(zip(br_up[:-1], br_up[1:])))

    def free(i: int) -> list[tuple[int, ...]]:
        single = np.array([cost(i, (v,)) for v in range(468)])
        cand = [int(v) for v in np.argsort(single)[:14]]
        opts: list[tuple[int, ...]] = [(v,) for v in cand]
        opts += [(a, b) for a, b in itertools.combinations(cand, 2)
                 if np.linalg.norm(meanpos[a] - meanpos[b]) < 0.1]
        return opts

    def mir(vs: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(int(mirror[v]) for v in vs)

    table: dict[int, tuple[int, ...]] = {}
    for i in range(68):
        if i in table:
            continue
        j = IBUG68_MIRROR[i]
        if i in semantic:
            opts = semantic[i]
        elif j in semantic:
            opts = [mir(v) for v in semantic[j]]
        else:
            opts = free(i)
        if i == j:  # midline point: a midline vertex or a symmetric pair
            opts = ([v for v in opts if sorted(mir(v)) == sorted(v)]
                    + [(v[0], int(mirror[v[0]])) for v in opts if len(v) == 1 and mirror[v[0]] != v[0]])
            scored = [(v, cost(i, v)) for v in opts]
        else:
            scored = [(v, cost(i, v) + cost(j, mir(v))) for v in opts]
        scored.sort(key=lambda o: o[1])
        best = scored[0]
        singles = [o for o in scored if len(o[0]) == 1]
        if singles and singles[0][1] <= best[1] * 1.05:
            best = singles[0]
        table[i] = tuple(int(v) for v in best[0])
        table[j] = mir(best[0])
    return [table[i] for i in range(68)]


@click.command()
@click.option("--data", type=click.Path(path_type=Path, file_okay=False), default=DEFAULT_DATA,
              show_default=True, help="UTKFace folder (200x200 *.jpg crops).")
@click.option("--n", "n", type=int, default=1000, show_default=True, help="Photos to sample.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--mesh/--no-mesh", default=True, show_default=True,
              help="Also estimate the template from the MediaPipe mesh (mapped to 68 points).")
@click.option("--mesh-map", is_flag=True, help="Re-derive MESH_TO_IBUG68 (adds ~2 s / 100 photos).")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the results as JSON.")
def main(data: Path, n: int, seed: int, mesh: bool, mesh_map: bool, json_path: Path | None) -> None:
    """Measure the UTKFace 5-point template and print the DEFAULT_TEMPLATE constants."""
    from portrait3d.face.align import DEFAULT_TEMPLATE, default_transform, warp_image
    from portrait3d.face.detect import FaceDetector, select_face
    from portrait3d.face.errors import FaceError
    from portrait3d.face.io import load_image
    from portrait3d.face.landmarks import LandmarkDetector, five_points

    files = _sample(data, n, seed)
    detector = FaceDetector("mediapipe")
    dlib_lm = LandmarkDetector("dlib")
    mesh_lm = LandmarkDetector("mediapipe") if (mesh or mesh_map) else None
    pts_dlib, pts_mesh, all68, allmesh, sizes = [], [], [], [], []
    failures = {"no_face": 0, "mesh": 0}
    t0 = time.perf_counter()
    with click.progressbar(files, label="UTKFace") as bar:
        for f in bar:
            try:
                img = load_image(f)
                face = select_face(detector.detect(img))
            except FaceError:
                failures["no_face"] += 1
                continue
            h, w = img.shape[:2]
            norm = np.array([w, h], dtype=np.float64)
            lm = dlib_lm.landmarks68(img, face)
            pts_dlib.append((five_points(lm) + 0.5) / norm)
            sizes.append((w, h))
            if mesh_lm is not None:
                try:
                    ml = mesh_lm.detect(img, face)
                except FaceError:
                    failures["mesh"] += 1
                    continue
                pts_mesh.append((ml.five() + 0.5) / norm)
                all68.append(lm)
                allmesh.append(ml.points3d)
    elapsed = time.perf_counter() - t0

    d = np.array(pts_dlib)
    mean, std, med = d.mean(0), d.std(0), np.median(d, 0)
    result: dict[str, object] = {
        "sampled": len(files), "landmarked": len(d), "failures": failures, "seed": seed,
        "seconds": round(elapsed, 1),
        "template_dlib_mean": mean.round(5).tolist(), "template_dlib_std": std.round(4).tolist(),
        "template_dlib_median": med.round(5).tolist(),
    }
    click.echo(f"\n{len(d)}/{len(files)} photos landmarked in {elapsed:.1f} s "
               f"(no face: {failures['no_face']}, mesh failed: {failures['mesh']})")
    click.echo("5-point template (dlib 68 -> 5 points), normalised [0, 1]:")
    click.echo(f"{'point':12s} {'mean x':>8s} {'mean y':>8s} {'std x':>7s} {'std y':>7s} "
               f"{'median x':>9s} {'median y':>9s}")
    for k, name in enumerate(NAMES):
        click.echo(f"{name:12s} {mean[k, 0]:8.5f} {mean[k, 1]:8.5f} {std[k, 0]:7.4f} "
                   f"{std[k, 1]:7.4f} {med[k, 0]:9.5f} {med[k, 1]:9.5f}")
    if pts_mesh:
        m = np.array(pts_mesh)
        result["template_mesh_mean"] = m.mean(0).round(5).tolist()
        diff = np.abs(m.mean(0) - mean).max()
        click.echo(f"MediaPipe mesh (mapped to 68) estimate differs by at most {diff:.4f} "
                   f"(normalised units) from dlib's")
    # How much padding does re-aligning UTKFace with the template need? Fraction of the
    # 200 px output that maps outside the source photo.
    outside = []
    for p5, (w, h) in zip(pts_dlib, sizes):
        t = default_transform(p5 * np.array([w, h]) - 0.5, output_size=w, template=mean)
        cover = warp_image(np.ones((h, w), np.float32), t, (w, w), border="constant",
                           interpolation="linear")
        outside.append(float((cover < 0.5).mean()))
    result["realign_outside_fraction_mean"] = round(float(np.mean(outside)), 4)
    result["realign_outside_fraction_p95"] = round(float(np.percentile(outside, 95)), 4)
    click.echo(f"re-aligning these photos with the measured template: on average "
               f"{100 * np.mean(outside):.2f}% of the output lies outside the photo "
               f"(95th percentile {100 * np.percentile(outside, 95):.2f}%)")
    click.echo(f"current DEFAULT_TEMPLATE differs from this estimate by at most "
               f"{np.abs(DEFAULT_TEMPLATE - mean).max():.5f}")
    click.echo("\nDEFAULT_TEMPLATE = np.array([")
    comments = ("right-eye centre (image left)", "left-eye centre", "nose tip (iBUG 30)",
                "right mouth corner (iBUG 48)", "left mouth corner (iBUG 54)")
    for k in range(5):
        click.echo(f"    [{mean[k, 0]:.5f}, {mean[k, 1]:.5f}],   # {comments[k]}")
    click.echo("])")

    if mesh_map:
        if len(allmesh) < 50:
            raise click.ClickException("too few mesh results to fit the mapping")
        mirror = _mesh_mirror(files[: min(150, len(files))])
        table = _fit_mesh_map(np.array(all68), np.array(allmesh), mirror)
        result["mesh_to_ibug68"] = table
        click.echo("\nMESH_TO_IBUG68 = (")
        for lo, hi in ((0, 17), (17, 27), (27, 36), (36, 48), (48, 60), (60, 68)):
            click.echo("    " + ", ".join(str(t) for t in table[lo:hi]) + ",")
        click.echo(")")
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2))
        click.echo(f"wrote {json_path}")


def _mesh_mirror(files: list[Path]) -> np.ndarray:
    """The mesh's mirror map: vertex v of a face <-> vertex mirror[v] of the flipped face."""
    from mediapipe.python.solutions import face_mesh

    from portrait3d.face.io import load_image

    a, b = [], []
    with face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True,
                            min_detection_confidence=0.3) as fm:
        for f in files:
            img = load_image(f)
            h, w = img.shape[:2]
            r1 = fm.process(img)
            r2 = fm.process(np.ascontiguousarray(img[:, ::-1]))
            if not (r1.multi_face_landmarks and r2.multi_face_landmarks):
                continue
            a.append([[p.x * w, p.y * h] for p in r1.multi_face_landmarks[0].landmark])
            b.append([[w - p.x * w, p.y * h] for p in r2.multi_face_landmarks[0].landmark])
    pa, pb = np.array(a), np.array(b)
    iod = np.linalg.norm(pa[:, 33] - pa[:, 263], axis=1)
    mirror = np.array([int(np.argmin(np.mean(np.linalg.norm(pb - pa[:, v:v + 1], axis=2)
                                             / iod[:, None], 0))) for v in range(pa.shape[1])])
    if not np.all(mirror[mirror] == np.arange(len(mirror))):
        click.echo("warning: the estimated mesh mirror map is not an involution", err=True)
    return mirror


if __name__ == "__main__":
    main()

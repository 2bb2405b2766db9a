"""Build PIE's face rig (:class:`~.face_model.FaceModel`) from MediaPipe face meshes of real photos.

Steps (each a closed-form fit, no training loop):

1. **Meshes.** MediaPipe's 468-point mesh of every aligned photo (pixels; its ``z`` in the same units, smaller =
   nearer) and the photo's colour at each vertex. Pixels become world units of EG3D's camera: the 128 px crop spans
   ``2 d tan(fov / 2)`` at the camera distance ``d``.
2. **Rigid pose.** Generalised Procrustes analysis: each mesh is aligned to the running mean by the similarity
   ``P ~ s R X + t`` (Umeyama 1991, rotations kept proper); the head-frame shape is ``X = R^T (P - t) / s``.
   Scale is removed with pose: distance to the camera and head size are not told apart by a single photo. The
   frame is then turned so the mean face is left-right symmetric (:func:`symmetric_frame`: yaw and roll zero);
   pitch zero is the photos' mean pitch, which symmetry cannot fix.
3. **Expression, then identity.** Photos of one person under several expressions are not available, and a PCA of
   the shapes mixes the two (its first component opened the mouth; a region split failed too, as a smile also
   raises the cheeks). So expression is defined by measurement: five action-unit-like features of every fitted
   mesh (:func:`expression_features`: mouth opening, mouth width, eye opening, brow height, mouth-corner height,
   each over the eye distance), standardised; the expression basis is the least-squares regression of the shape
   on them, ``B^exp = argmin ||(S - S_mean) - f B||``, so one unit of ``delta_k`` moves the face as one standard
   deviation of feature ``k`` does across the photos, the others held. Identity components are the PCA of what
   the features leave unexplained. Person-specific traits that correlate with a feature (a wide mouth) are
   counted as expression; the model card says so.
4. **Reflectance and light.** With the vertex normals of each fitted mesh, alternate: per-photo SH light ``gamma``
   by least squares given the mean albedo, then per-photo albedo ``colour / (H(n) gamma)`` (visible vertices only),
   for a few rounds; the PCA of the albedos gives ``B^alb``. The albedo/light scale ambiguity is fixed by the mean
   albedo's brightness.

Every basis is stored scaled by its standard deviation, so coefficients are ``N(0, I)`` on the training photos.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from portrait3d.methods.pie.face_model import FaceModel, FaceModelConfig, sh_basis, vertex_normals

__all__ = ["EXPRESSION_NAMES", "build_face_model", "build_from_dataset", "collect_meshes", "expression_features",
           "facing_camera", "fit_sh_light", "measured_render_yaw", "mesh_triangles", "model_card", "pixel_unit",
           "pixels_to_world", "preview_grid", "procrustes", "symmetric_frame"]

VERTICES = 468


def _mp_connections() -> Any:
    from mediapipe.python.solutions import face_mesh_connections as fmc

    return fmc


def mesh_triangles(reference: np.ndarray | None = None) -> np.ndarray:
    """The triangles ``[F, 3]`` of MediaPipe's face mesh, recovered from its tessellation edges.

    Every 3-clique of the edge graph is a candidate; where an edge borders more than two candidates, the largest
    (a triangle spanning others, not a face) is dropped. With a head-frame ``reference [468, 3]`` the winding is
    made outward (the normal points away from a centre behind the face)."""
    edges = {tuple(sorted(e)) for e in _mp_connections().FACEMESH_TESSELATION}
    adj: dict[int, set[int]] = {}
    for a, b in edges:
        adj.setdefault(a, set()).add(b)
        adj.setdefault(b, set()).add(a)
    tris = {tuple(sorted((a, b, c))) for a, b in edges for c in adj[a] & adj[b]}
    if reference is not None:
        ref2 = reference[:, :2]

        def area(t: tuple[int, int, int]) -> float:
            p = ref2[list(t)]
            e1, e2 = p[1] - p[0], p[2] - p[0]
            return abs(float(e1[0] * e2[1] - e1[1] * e2[0]))

        while True:
            count = Counter(e for t in tris for e in itertools.combinations(t, 2))
            crowded = [e for e, k in count.items() if k > 2]
            if not crowded:
                break
            worst = max((t for t in tris if any(set(e) <= set(t) for e in crowded)), key=area)
            tris.discard(worst)
    faces = np.array(sorted(tris), np.int64)
    if reference is not None:
        centre = reference.mean(0) - np.array([0.0, 0.0, 0.5 * np.ptp(reference[:, 0])])
        v0, v1, v2 = (reference[faces[:, k]] for k in range(3))
        outward = (np.cross(v1 - v0, v2 - v0) * ((v0 + v1 + v2) / 3 - centre)).sum(1) > 0
        faces[~outward] = faces[~outward][:, [0, 2, 1]]
    return faces


# MediaPipe mesh indices of the points that measure expression (the subject's right eye is the image's left).
_LIP_INNER = (13, 14)          # upper and lower inner lip
_MOUTH_CORNERS = (61, 291)
_EYE_OUTER = (33, 263)
_EYE_LIDS = ((159, 145), (386, 374))   # (upper, lower) lid of each eye
_EYE_INNER = (133, 362)
_BROWS = (105, 334)


def expression_features(shapes: np.ndarray) -> np.ndarray:
    """Action-unit-like measurements ``[N, 5]`` of head-frame meshes ``[N, 468, 3]`` (``y`` up), each divided by
    the outer-eye-corner distance so head size cancels: ``mouth_open`` (inner lip gap), ``smile`` (mouth width),
    ``eyes_open`` (mean lid gap over eye width), ``brows_up`` (brow height above the upper lids) and
    ``corners_up`` (mouth corners above the upper inner lip, so that opening the jaw does not change it). See :data:`EXPRESSION_NAMES`."""
    s = np.asarray(shapes, np.float64)
    iod = np.linalg.norm(s[:, _EYE_OUTER[0]] - s[:, _EYE_OUTER[1]], axis=-1)
    mouth_open = s[:, _LIP_INNER[0], 1] - s[:, _LIP_INNER[1], 1]
    smile = np.linalg.norm(s[:, _MOUTH_CORNERS[0]] - s[:, _MOUTH_CORNERS[1]], axis=-1)
    lids = [s[:, u, 1] - s[:, lo, 1] for u, lo in _EYE_LIDS]
    widths = [np.linalg.norm(s[:, o] - s[:, i], axis=-1) for o, i in zip(_EYE_OUTER, _EYE_INNER)]
    eyes_open = (lids[0] / widths[0] + lids[1] / widths[1]) / 2 * iod
    brows_up = (s[:, _BROWS[0], 1] - s[:, _EYE_LIDS[0][0], 1] + s[:, _BROWS[1], 1] - s[:, _EYE_LIDS[1][0], 1]) / 2
    corners_up = s[:, list(_MOUTH_CORNERS), 1].mean(1) - s[:, _LIP_INNER[0], 1]  # the upper lip: the jaw moves the lower
    return np.stack([mouth_open, smile, eyes_open, brows_up, corners_up], 1) / iod[:, None]


EXPRESSION_NAMES = ("mouth_open", "smile", "eyes_open", "brows_up", "corners_up")


def pixel_unit(image_size: int, fov_deg: float, distance: float) -> float:
    """World units per pixel at the camera distance (the renderer's focal length spans pixel centres:
    ``f = (S - 1) / (2 tan(fov / 2))``)."""
    return 2 * distance * float(np.tan(np.radians(fov_deg) / 2)) / (image_size - 1)


def facing_camera(normals: np.ndarray) -> np.ndarray:
    """Vertices whose camera-frame normals ``[..., V, 3]`` face the camera (``z`` forward), ``[..., V]`` bool."""
    return normals[..., 2] < -0.2


def fit_sh_light(basis: np.ndarray, albedo: np.ndarray, colors: np.ndarray, visible: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares SH light of one photo, per colour channel: ``colors ~ albedo (.) (H gamma)`` on the
    ``visible`` vertices (SH basis ``[V, 9]``, albedo and colours ``[V, 3]``). Returns the light ``[3, 9]`` and the
    residuals of the visible vertices ``[M, 3]``."""
    light = np.stack([np.linalg.lstsq(basis[visible] * albedo[visible, c, None], colors[visible, c], rcond=None)[0]
                      for c in range(3)])
    return light, colors[visible] - albedo[visible] * (basis[visible] @ light.T)


def pixels_to_world(points: np.ndarray, image_size: int, fov_deg: float, distance: float) -> np.ndarray:
    """MediaPipe mesh points ``[..., 3]`` in pixels of a ``image_size`` crop -> camera-frame world units (``x``
    right, ``y`` down, ``z`` forward, centred on the crop; ``z`` relative). The inverse of the renderer's
    projection at the camera distance (its focal length spans pixel centres: ``f = (S - 1) / (2 tan(fov / 2))``)."""
    unit = pixel_unit(image_size, fov_deg, distance)
    out = np.asarray(points, np.float64).copy()
    out[..., :2] -= (image_size - 1) / 2
    return out * unit


def procrustes(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity ``dst ~ s R src + t`` (Umeyama 1991) of point sets ``[V, 3]``; ``R`` proper. Returns s, R, t."""
    ms, md = src.mean(0), dst.mean(0)
    a, b = src - ms, dst - md
    u, sig, vt = np.linalg.svd(b.T @ a)
    d = np.ones(3)
    d[2] = np.sign(np.linalg.det(u @ vt)) or 1.0
    rot = u @ np.diag(d) @ vt
    s = float((sig * d).sum() / (a * a).sum())
    return s, rot, md - s * rot @ ms


def symmetric_frame(shape: np.ndarray) -> np.ndarray:
    """The rotation ``Q [3, 3]`` (``X' = Q X``) that makes a roughly frontal head-frame face ``[V, 3]`` left-right
    symmetric about the plane ``x = 0``, with the least turn: mirror pairs are matched by nearest neighbour of
    ``(-x, y, z)``, the plane's normal is the principal direction of the pair differences, and ``Q`` turns it onto
    ``+x`` about the axis perpendicular to both (so pitch, which symmetry cannot fix, is left alone)."""
    c = shape - shape.mean(0)
    mirror = c * np.array([-1.0, 1.0, 1.0])
    pair = np.linalg.norm(c[:, None] - mirror[None], axis=-1).argmin(1)
    diff = c - c[pair]
    keep = np.linalg.norm(diff, axis=1) > 1e-9                      # vertices on the mid-line pair with themselves
    normal = np.linalg.svd(diff[keep] * np.sign(diff[keep, :1] + 1e-12), full_matrices=False)[2][0]
    normal *= np.sign(normal[0]) or 1.0
    axis = np.cross(normal, [1.0, 0.0, 0.0])
    sin, cos = np.linalg.norm(axis), float(normal[0])
    if sin < 1e-12:
        return np.eye(3)
    k = axis / sin
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + sin * kx + (1 - cos) * kx @ kx                # Rodrigues: normal -> +x


def collect_meshes(images: Iterable[np.ndarray], total: int | None = None, progress: bool = False,
                   analyzer: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MediaPipe meshes ``[M, 468, 3]`` (pixels), vertex colours ``[M, 468, 3]`` (``[0, 1]``, bilinear) and the
    indices ``[M]`` of the images (uint8 ``[H, W, 3]`` RGB) in which a face was found."""
    from portrait3d.face.analyzer import FaceAnalyzer

    it: Iterable[np.ndarray] = images
    if progress:
        from tqdm import tqdm

        it = tqdm(images, total=total, desc="face meshes", unit="img")
    own = analyzer is None
    fa = FaceAnalyzer("mediapipe") if own else analyzer
    pts, cols, idx = [], [], []
    try:
        for i, img in enumerate(it):
            found = fa.landmarks_and_mesh(np.ascontiguousarray(img))
            if found is None:
                continue
            mesh = found[1]
            pts.append(mesh)
            cols.append(_bilinear(np.asarray(img, np.float64) / 255.0, mesh[:, :2]))
            idx.append(i)
    finally:
        if own:
            fa.close()
    return (np.asarray(pts, np.float64).reshape(-1, VERTICES, 3), np.asarray(cols, np.float64).reshape(-1, VERTICES, 3),
            np.asarray(idx, np.int64))


def _bilinear(img: np.ndarray, xy: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    x = np.clip(xy[:, 0], 0, w - 1)
    y = np.clip(xy[:, 1], 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    return ((1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x1]) + fy * ((1 - fx) * img[y1, x0] + fx * img[y1, x1]))


def _pca(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Top ``k`` principal directions ``[k, D]`` of centred rows ``x [N, D]``, their standard deviations ``[k]`` and
    the share of the variance they keep."""
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    var = s ** 2 / max(len(x) - 1, 1)
    k = min(k, len(s))
    return vt[:k], np.sqrt(var[:k]), float(var[:k].sum() / var.sum()) if var.sum() > 0 else 1.0


def build_face_model(points: np.ndarray, colors: np.ndarray, config: FaceModelConfig | None = None,
                     rounds: int = 5, light_rounds: int = 3) -> tuple[FaceModel, dict[str, Any]]:
    """Fit the rig to MediaPipe meshes ``points [N, 468, 3]`` (pixels of ``config.image_size`` crops) with vertex
    ``colors [N, 468, 3]`` (steps 2-4 of the module docstring). Returns the model and a report (explained variance,
    per-photo poses, residuals)."""
    cfg = config or FaceModelConfig()
    n = len(points)
    if n < max(cfg.identity_components, len(EXPRESSION_NAMES), cfg.albedo_components) + 2:
        raise ValueError(f"{n} meshes are too few for the requested components")
    flip = np.diag([1.0, -1.0, -1.0])
    cam = pixels_to_world(points, cfg.image_size, cfg.fov_deg, cfg.camera_distance)
    mean = (cam - cam.mean(1, keepdims=True)) @ flip              # head frame of the first guess: camera -> head
    mean = mean.mean(0)
    poses: list[tuple[float, np.ndarray, np.ndarray]] = []
    for _ in range(rounds):                                        # generalised Procrustes
        poses = [procrustes(mean, p) for p in cam]
        shapes = np.stack([rot.T @ (p - t).T / s for (s, rot, t), p in zip(poses, cam)]).transpose(0, 2, 1)
        new = shapes.mean(0)
        new -= new.mean(0)
        new *= np.sqrt((mean ** 2).sum() / (new ** 2).sum())      # keep the first guess's size
        mean = new
    # Yaw and roll zero where the mean face is left-right symmetric; pitch zero at the photos' mean pitch.
    sym = symmetric_frame(mean)
    poses = [(s, rot @ sym.T, t) for s, rot, t in poses]
    shapes = np.stack([rot.T @ (p - t).T / s for (s, rot, t), p in zip(poses, cam)]).transpose(0, 2, 1)
    mean = shapes.mean(0)
    centred = (shapes - mean).reshape(n, -1)

    feats = expression_features(shapes)
    f_mean, f_std = feats.mean(0), feats.std(0, ddof=1)
    delta = (feats - f_mean) / np.where(f_std > 0, f_std, 1.0)        # [N, K_exp] standardised features
    b_exp = np.linalg.lstsq(delta, centred, rcond=None)[0]           # [K_exp, 3V]: one std of each feature
    residual = centred - delta @ b_exp
    dirs_i, i_std, kept_i = _pca(residual, cfg.identity_components)
    total_var = float((centred ** 2).sum())
    exp_var = float(((delta @ b_exp) ** 2).sum())

    faces = mesh_triangles(mean)
    albedo, light_err = _albedo_and_light(shapes, poses, colors, faces, light_rounds)
    a_mean = albedo.mean(0)
    dirs_a, al_std, kept_a = _pca((albedo - a_mean).reshape(n, -1), cfg.albedo_components)

    cfg.expression_components = len(EXPRESSION_NAMES)
    cfg.expression_names = list(EXPRESSION_NAMES)
    cfg.explained_variance = {"expression": exp_var / total_var,
                              "identity": (1 - exp_var / total_var) * kept_i, "identity_of_rest": kept_i,
                              "albedo": kept_a}
    t = torch.from_numpy
    model = FaceModel(
        cfg, t(mean).float(), t((dirs_i * i_std[:, None]).reshape(-1, VERTICES, 3)).float(),
        t(b_exp.reshape(-1, VERTICES, 3)).float(), t(np.clip(a_mean, 0, 1)).float(),
        t((dirs_a * al_std[:, None]).reshape(-1, VERTICES, 3)).float(), t(faces))
    from portrait3d.geometry.rotations import head_angles

    rots = torch.from_numpy(np.stack([r for _, r, _ in poses])).float()
    angles = head_angles(rots).numpy()
    report = {"faces": n, "triangles": len(faces), "explained_variance": cfg.explained_variance,
              "light_fit_rmse": light_err, "yaw_deg": angles[:, 0].tolist(), "pitch_deg": angles[:, 1].tolist(),
              "expression_feature_mean": f_mean.tolist(), "expression_feature_std": f_std.tolist()}
    return model, report


def _albedo_and_light(shapes: np.ndarray, poses: list, colors: np.ndarray, faces: np.ndarray,
                      rounds: int) -> tuple[np.ndarray, float]:
    """Per-photo albedo ``[N, V, 3]`` with per-photo SH light, alternating least squares (step 4)."""
    n = len(shapes)
    cam = np.stack([(s * rot @ x.T).T for (s, rot, _), x in zip(poses, shapes)])   # rotated, camera frame
    normals = vertex_normals(torch.from_numpy(cam).float(), torch.from_numpy(faces)).double().numpy()
    visible = facing_camera(normals)
    basis = sh_basis(torch.from_numpy(normals)).numpy()             # [N, V, 9]
    albedo = np.repeat(np.median(colors, 0, keepdims=True), n, 0)
    light = np.zeros((n, 3, 9))
    err = float("nan")
    for _ in range(rounds):
        a_mean = albedo.mean(0)
        res = []
        for i in range(n):
            light[i], r = fit_sh_light(basis[i], a_mean, colors[i], visible[i])
            res.append(r.reshape(-1))
        err = float(np.sqrt(np.mean(np.concatenate(res) ** 2)))
        shading = np.einsum("nvb,ncb->nvc", basis, light)
        albedo = np.where(visible[..., None] & (shading > 0.05), colors / np.maximum(shading, 0.05), a_mean)
        albedo = np.clip(albedo, 0, 1.5)
        # the albedo / light scale is ambiguous: pin the mean albedo's brightness to the photos' mean colour
        k = colors[visible].mean() / max(albedo.mean(), 1e-6)
        albedo *= k
    return albedo, err


def preview_grid(model: FaceModel, size: int = 128) -> np.ndarray:
    """``uint8 [3 S, 7 S, 3]``: the mean face; each expression at -3 / +3 (row 1, first three); identity components
    1-3 at -3 / +3 and a 30 deg yaw (row 2); yaw -30, pitch +-15, light from the right / left / above and albedo
    component 1 at +3 (row 3)."""
    from portrait3d.methods.pie.face_model import ambient_light

    base = model.neutral(1)

    def draw(p: Any) -> np.ndarray:
        with torch.no_grad():
            o = model(p, size)
        img = o["image"][0].clamp(0, 1) * o["mask"][0] + 0.5 * (1 - o["mask"][0])
        return (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

    def coeff(field: str, k: int, v: float) -> Any:
        x = getattr(base, field).clone()
        if k < x.shape[1]:
            x[0, k] = v
        return base.replace(**{field: x})

    def angles(y: float, p: float) -> Any:
        return base.replace(angles=torch.tensor([[y, p, 0.0]]))

    def light(dx: float, dy: float) -> Any:
        lt = ambient_light(1, 0.7).reshape(1, 3, 9)
        lt[:, :, 3] = -0.5 * dx     # band-1 x term: brighter where n_x > 0 (the image's right) for dx > 0
        lt[:, :, 1] = 0.5 * dy      # band-1 y term is -n_y and camera y points down: brighter above for dy > 0
        return base.replace(light=lt.reshape(1, 27))

    rows = [[base] + [coeff("expression", k, s) for k in range(3) for s in (-3.0, 3.0)],
            [coeff("identity", k, s) for k in range(3) for s in (-3.0, 3.0)] + [angles(30.0, 0.0)],
            [angles(-30.0, 0.0), angles(0.0, 15.0), angles(0.0, -15.0), light(1, 0), light(-1, 0), light(0, 1),
             coeff("albedo", 0, 3.0)]]
    return np.concatenate([np.concatenate([draw(p) for p in row], 1) for row in rows], 0)


def measured_render_yaw(model: FaceModel, yaws: Iterable[float] = (-20.0, 20.0), size: int = 128) -> dict[float, Any]:
    """The yaw the face pipeline measures on renders of the mean face at ``yaws`` (None where it finds no face):
    an independent check of the rig's pose convention."""
    from portrait3d.face.analyzer import FaceAnalyzer
    from portrait3d.face.pose import estimate_head_pose

    out: dict[float, Any] = {}
    with FaceAnalyzer("mediapipe") as fa:
        for y in yaws:
            with torch.no_grad():
                o = model(model.neutral(1).replace(angles=torch.tensor([[float(y), 0.0, 0.0]])), size)
            img = o["image"][0].clamp(0, 1) * o["mask"][0] + 0.5 * (1 - o["mask"][0])
            lm = fa.landmarks((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            out[float(y)] = None if lm is None else float(estimate_head_pose(lm, (size, size)).yaw_deg)
    return out


def model_card(model: FaceModel, report: dict[str, Any], command: str) -> str:
    """Markdown model card of a built face rig (what it was built from, its parts, what was measured)."""
    c = model.config
    ev = c.explained_variance
    pose = report.get("pose_agreement")
    pose_line = (f"- Head pose agreement on the fitted photos: the rig's Procrustes yaw / pitch against the face "
                 f"pipeline's PnP estimate correlate {pose['yaw_corr']:.3f} / {pose['pitch_corr']:.3f} (slopes "
                 f"{pose['yaw_slope']:.2f} / {pose['pitch_slope']:.2f}).\n" if pose else "")
    ry = report.get("render_yaw", {})
    render_line = ("- Renders of the mean face at yaw " + ", ".join(
        f"{k:+.0f}: measured {'no face' if v is None else f'{v:+.1f}'}" for k, v in ry.items())
        + " deg by the face pipeline (MediaPipe + dlib 68 + PnP); the rendered mask has no hair or ears, which "
        "makes the measured angle smaller than the commanded one.\n" if ry else "")
    names = ", ".join(f"`{n}`" for n in c.expression_names)
    return f"""# Model card: PIE face rig (`face_model.safetensors`)

A linear 3D face model with reflectance, spherical-harmonics light and a perspective camera, built for PIE
(Tewari et al. 2020) and StyleRig-style rig networks in place of the Basel Face Model, whose weights are not
available here. Built by `portrait3d.methods.pie.build` from MediaPipe face meshes of real photos; no network is
trained. Rendered with `portrait3d.geometry.render` (pure PyTorch, differentiable).

Built with

    {command}

## Data

- {report['faces']:,} UTKFace training photos (of {report.get('images', report['faces']):,} tried, evenly spaced over the
  aligned 128 px training set; the held-out split is never used) in which MediaPipe found a face. UTKFace is for
  **non-commercial research use only**; this model inherits that restriction. It stores mean shapes and
  components, no photo and no per-person data.

## Parts

- Geometry: {c.vertices} vertices (MediaPipe's mesh), {report['triangles']} triangles recovered from MediaPipe's
  tessellation edges, head frame of `portrait3d.geometry.rotations`, EG3D world units (camera at
  {c.camera_distance}, field of view {c.fov_deg} deg).
- Expression: {c.expression_components} coefficients, each one standard deviation of a measured feature across the
  photos, the others held: {names}. They explain {ev.get('expression', float('nan')):.1%} of the shape variance.
  A person's own traits that correlate with a feature (a wide mouth) count as expression.
- Identity: {c.identity_components} principal components of what expression leaves; they keep
  {ev.get('identity_of_rest', float('nan')):.1%} of it ({ev.get('identity', float('nan')):.1%} of all shape variance).
- Reflectance: per-vertex RGB albedo, mean plus {c.albedo_components} principal components keeping
  {ev.get('albedo', float('nan')):.1%} of the albedo variance; estimated by alternating per-photo SH light and albedo
  (RMS colour residual of the light fit {report['light_fit_rmse']:.3f} on a 0-1 scale).
- Light: 27 second-order SH coefficients (9 per colour channel, Ramamoorthi & Hanrahan's irradiance basis).
- Pose: yaw, pitch, roll in degrees (head-to-camera, `yaw > 0` turns the head to its left) and a translation.

## Checks

{pose_line}{render_line}
## Limitations

- The mesh covers the face only (no ears, hair, neck, teeth or eye interiors); renders are for losses and
  overlays, not for display as portraits.
- MediaPipe's depth is a learned estimate from single photos, so the relief is MediaPipe's, not a scan's.
- Scale is removed with pose (one photo cannot tell head size from distance).

![preview](preview.png)

`preview.png`: the mean face; expressions 1-3 at -3 / +3; identity components 1-3 at -3 / +3 and yaw +30 (row
2); yaw -30, pitch +15 / -15, light from the right / left / above, albedo component 1 at +3 (row 3).
"""


def build_from_dataset(root: str | os.PathLike[str], out_dir: str | os.PathLike[str], count: int = 3000,
                       config: FaceModelConfig | None = None, command: str = "", overwrite: bool = False,
                       progress: bool = False) -> dict[str, Any]:
    """Build the rig from ``count`` evenly spaced faces of a built dataset (``images.npy``, ``labels.json``) and
    write ``face_model.safetensors``, ``face_model.json`` (the report), ``preview.png`` and ``MODEL_CARD.md`` into
    ``out_dir`` (each atomically; existing files only with ``overwrite``). Returns the report."""
    import json as _json

    from PIL import Image

    from portrait3d.checkpoints.native import atomic_write

    root, out = Path(root), Path(out_dir)
    names = ("face_model.safetensors", "face_model.json", "preview.png", "MODEL_CARD.md")
    clash = [n for n in names if (out / n).exists()]
    if clash and not overwrite:
        raise FileExistsError(f"{out / clash[0]} already exists (pass --force to overwrite)")
    images = np.load(root / "images.npy", mmap_mode="r")
    pick = np.linspace(0, len(images) - 1, min(count, len(images))).round().astype(int)
    pts, cols, ok = collect_meshes((np.asarray(images[i]) for i in pick), total=len(pick), progress=progress)
    cfg = config or FaceModelConfig(image_size=int(images.shape[1]))
    cfg.source = f"{len(pts)} faces of {root.name}"
    model, report = build_face_model(pts, cols, cfg)
    report["images"] = len(pick)
    try:
        labels = _json.loads((root / "labels.json").read_text())
        poses = np.array([labels["poses"][labels["labels"][pick[i]][0]][:2] for i in ok], np.float64)
        agree = {}
        for k, key in enumerate(("yaw", "pitch")):
            mine = np.asarray(report[f"{key}_deg"])
            agree[f"{key}_corr"] = float(np.corrcoef(mine, poses[:, k])[0, 1])
            agree[f"{key}_slope"] = float(np.polyfit(poses[:, k], mine, 1)[0])
        report["pose_agreement"] = agree
    except (OSError, KeyError, IndexError, ValueError, TypeError):
        pass  # a dataset without the face pipeline's poses: no agreement row
    report["render_yaw"] = measured_render_yaw(model)
    summary = {k: v for k, v in report.items() if k not in ("yaw_deg", "pitch_deg")}
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "face_model.safetensors", overwrite=overwrite)
    atomic_write(out / "face_model.json", lambda tmp: Path(tmp).write_text(_json.dumps(summary, indent=1)),
                 overwrite=overwrite)
    atomic_write(out / "preview.png", lambda tmp: Image.fromarray(preview_grid(model)).save(tmp, format="PNG"),
                 overwrite=overwrite)
    atomic_write(out / "MODEL_CARD.md", lambda tmp: Path(tmp).write_text(model_card(model, summary, command)),
                 overwrite=overwrite)
    return summary

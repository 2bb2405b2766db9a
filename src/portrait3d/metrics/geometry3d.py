"""Is a 3D generator's geometry really 3D? Checks made by the face pipeline, not by the generator's own code.

For each latent, the generator renders views at commanded head yaws (default -30, 0, +30 degrees, pitch 0) and
its depth map; then (:func:`geometry_checks`):

* **detection**: the fraction of views at each yaw in which the face pipeline finds a face;
* **yaw following**: the least-squares slope of the yaw the face pipeline measures (PnP on dlib's 68 landmarks,
  :func:`portrait3d.face.pose.estimate_head_pose`) against the commanded yaw, over all detected views. A head that
  turns as asked has slope 1; a billboard or a head that barely turns has a slope near 0;
* **identity kept**: the fraction of latents whose +-30 degree views are within dlib's same-person distance (0.6)
  of the frontal view;
* **head-shaped depth**: the fraction of depth maps in which the nose tip (landmark 30) is nearer the camera than
  both cheeks (landmarks 2 and 14, on the face contour at the nose's height), read at the frontal view's landmarks;
* **no billboard**: parallax. The frontal landmarks are mapped onto each turned view by the best homography; a
  flat picture turned in 3D is exactly a homography, so only relief leaves a residual. The residual (RMS, in units
  of the inter-ocular distance) is compared with the residual of the same fit on the 68-point 3D mean face turned
  by the same yaw (:func:`mean_face_parallax`): a view counts as 3D when its parallax reaches half the mean
  face's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["GeometryReport", "geometry_checks", "homography_residual", "mean_face_parallax", "measure_yaws",
           "nose_nearer", "turned_identity_distances", "yaw_slope", "YawTally"]

NOSE_TIP, CHEEK_RIGHT, CHEEK_LEFT = 30, 2, 14
SAME_PERSON_DISTANCE = 0.6


def homography_residual(src: np.ndarray, dst: np.ndarray) -> float:
    """RMS distance between ``dst [N, 2]`` and ``src [N, 2]`` mapped by their least-squares homography (DLT on
    normalised points), in units of ``dst``'s inter-ocular distance when ``N == 68`` (else its RMS radius)."""
    import cv2

    h, _ = cv2.findHomography(src.astype(np.float64), dst.astype(np.float64), 0)
    if h is None:
        return float("nan")
    p = np.c_[src, np.ones(len(src))] @ h.T
    mapped = p[:, :2] / p[:, 2:3]
    rms = float(np.sqrt(np.mean(np.sum((mapped - dst) ** 2, axis=1))))
    if len(dst) == 68:
        scale = float(np.linalg.norm(dst[36:42].mean(0) - dst[42:48].mean(0)))
    else:
        scale = float(np.sqrt(np.mean(np.sum((dst - dst.mean(0)) ** 2, axis=1))))
    return rms / max(scale, 1e-9)


def mean_face_parallax(yaw_deg: float, size: int = 128) -> float:
    """The parallax (:func:`homography_residual`) of the 3D mean face between yaw 0 and ``yaw_deg``, seen by
    EG3D's camera: what a real head shape produces, the reference of the billboard check."""
    from portrait3d.face.pipeline import EG3D_FOV_DEG
    from portrait3d.face.pose import HeadPose, focal_from_fov, mean_face_68, project_points

    pts = mean_face_68()
    focal = focal_from_fov(EG3D_FOV_DEG, (size, size))
    t = np.array([0.0, 0.0, 2.7])

    def view(yaw: float) -> np.ndarray:
        return project_points(pts, HeadPose.from_angles(yaw, 0.0, 0.0).rotation, t, focal, (size, size))

    return homography_residual(view(0.0), view(yaw_deg))


def nose_nearer(depth: np.ndarray, landmarks: np.ndarray) -> bool:
    """Whether the depth map ``[H, W]`` (distance from the camera) is smaller at the nose tip than at both cheeks,
    read at the 68 landmarks ``[68, 2]`` given in the depth map's pixels."""
    h, w = depth.shape

    def at(i: int) -> float:
        x, y = landmarks[i]
        return float(depth[int(np.clip(round(y), 0, h - 1)), int(np.clip(round(x), 0, w - 1))])

    return at(NOSE_TIP) < at(CHEEK_RIGHT) and at(NOSE_TIP) < at(CHEEK_LEFT)


def yaw_slope(commanded: Sequence[float], measured: Sequence[float]) -> float:
    """Least-squares slope of ``measured`` against ``commanded`` (``nan`` with fewer than two distinct yaws)."""
    x, y = np.asarray(commanded, np.float64), np.asarray(measured, np.float64)
    if len(x) < 2 or np.ptp(x) == 0:
        return float("nan")
    return float(np.polyfit(x, y, 1)[0])


@dataclass
class GeometryReport:
    """What :func:`geometry_checks` measured (see the module docstring)."""

    n: int
    yaws: tuple[float, ...]
    detection: dict[float, float]                 # commanded yaw -> detection rate
    yaw_slope: float
    measured_yaw_mean: dict[float, float]         # commanded yaw -> mean measured yaw of detected views
    identity_kept: float                          # fraction of latents (frontal + both turned views detected)
    identity_distance_mean: float
    nose_nearer: float                            # fraction of frontal depth maps with a landmarked face
    parallax: dict[float, float]                  # commanded yaw (non-zero) -> mean parallax of detected views
    parallax_mean_face: dict[float, float]
    three_d: float                                # fraction of turned views whose parallax reaches half the mean face's
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from portrait3d.utils.io import jsonable

        return jsonable({k: getattr(self, k) for k in self.__dataclass_fields__})


def measure_yaws(analyzer: Any, views: dict[float, np.ndarray]
                 ) -> tuple[dict[float, np.ndarray | None], dict[float, float]]:
    """Each view's 68 landmarks (``None`` where ``analyzer``, a :class:`~portrait3d.face.analyzer.FaceAnalyzer`,
    finds no face) and, where PnP succeeds on them, the head yaw it measures in degrees
    (:func:`portrait3d.face.pose.estimate_head_pose`); ``views``: commanded yaw -> ``uint8 [R, R, 3]``."""
    from portrait3d.face.pose import estimate_head_pose

    lms: dict[float, np.ndarray | None] = {}
    yaw: dict[float, float] = {}
    for y, img in views.items():
        lms[y] = lm = analyzer.landmarks(img)
        if lm is None:
            continue
        try:
            yaw[y] = estimate_head_pose(lm, img.shape[:2]).yaw_deg
        except ValueError:
            continue
    return lms, yaw


def turned_identity_distances(analyzer: Any, views: dict[float, np.ndarray],
                              landmarks: dict[float, np.ndarray | None]) -> list[float] | None:
    """dlib descriptor distances from the frontal view (yaw 0) to each turned view, in the order of ``views``
    (commanded yaw -> ``uint8 [R, R, 3]``, with ``landmarks`` from :func:`measure_yaws`); ``None`` when a view has
    no face. Below :data:`SAME_PERSON_DISTANCE` counts as the same person."""
    if any(landmarks[y] is None for y in views):
        return None
    d0 = analyzer.descriptor(views[0.0], landmarks[0.0])
    return [float(np.linalg.norm(analyzer.descriptor(img, landmarks[y]) - d0)) for y, img in views.items() if y != 0.0]


@dataclass
class YawTally:
    """Per commanded yaw: how many views had a face, and the yaws measured on them (:func:`measure_yaws`)."""

    yaws: tuple[float, ...]
    detected: dict[float, int] = field(default_factory=dict)
    measured: dict[float, list[float]] = field(default_factory=dict)

    def add(self, analyzer: Any, views: dict[float, np.ndarray]) -> dict[float, np.ndarray | None]:
        """Measure one latent's views (commanded yaw -> image); returns their landmarks."""
        lms, yaw = measure_yaws(analyzer, views)
        for y in self.yaws:
            self.detected[y] = self.detected.get(y, 0) + (lms[y] is not None)
            if y in yaw:
                self.measured.setdefault(y, []).append(yaw[y])
        return lms

    def rates(self, n: int) -> dict[float, float]:
        """Per commanded yaw, the fraction of ``n`` views with a detected face."""
        return {y: self.detected.get(y, 0) / n for y in self.yaws}

    def mean_yaws(self) -> dict[float, float]:
        """Per commanded yaw, the mean measured yaw (nan where no view was measured)."""
        return {y: float(np.mean(self.measured[y])) if self.measured.get(y) else float("nan") for y in self.yaws}

    def slope(self) -> float:
        """:func:`yaw_slope` over every measured view."""
        pairs = [(y, m) for y in self.yaws for m in self.measured.get(y, [])]
        return yaw_slope([p[0] for p in pairs], [p[1] for p in pairs])


@torch.no_grad()
def geometry_checks(G: Any, n: int = 200, yaws: Sequence[float] = (-30.0, 0.0, 30.0), seed: int = 0,
                    truncation_psi: float = 0.7, batch: int = 8, detector: str = "mediapipe",
                    progress: bool = False) -> GeometryReport:
    """Render ``n`` latents of the EG3D generator ``G`` at ``yaws`` and run the checks of the module docstring.

    Renders use constant noise and deterministic ray samples; latents are mapped with the frontal camera and
    ``truncation_psi`` (EG3D's evaluation setting).
    """
    from portrait3d.face.analyzer import FaceAnalyzer
    from portrait3d.networks.eg3d.camera import camera_from_angles
    from portrait3d.utils.visualize import to_uint8

    yaws = tuple(float(y) for y in yaws)
    if 0.0 not in yaws:
        raise ValueError("the views must include the frontal one (yaw 0)")
    dev = next(G.parameters()).device
    gen = torch.Generator().manual_seed(int(seed))
    cams = {y: camera_from_angles(y, 0.0).reshape(1, 25).to(dev) for y in yaws}
    res = int(G.img_resolution)
    tally = YawTally(yaws)
    id_kept = id_total = 0
    id_dists: list[float] = []
    nose_ok = nose_total = 0
    turned = [y for y in yaws if y != 0.0]
    ref = {y: mean_face_parallax(y, res) for y in turned}
    par = {y: [] for y in turned}
    three_d = three_d_total = 0
    it = range(0, n, batch)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="3D geometry checks", unit="batch")
    with FaceAnalyzer(detector) as fa:
        for start in it:
            k = min(batch, n - start)
            z = torch.randn(k, G.z_dim, generator=gen).to(dev)
            ws = G.mapping(z, cams[0.0].expand(k, -1), truncation_psi=truncation_psi)
            views: dict[float, np.ndarray] = {}
            depth0 = None
            for y in yaws:
                o = G.synthesis(ws, cams[y].expand(k, -1), noise_mode="const", deterministic=True)
                views[y] = to_uint8(o["image"])
                if y == 0.0:
                    d = torch.nn.functional.interpolate(o["image_depth"].float(), size=(res, res), mode="bilinear",
                                                        align_corners=False)
                    depth0 = d[:, 0].cpu().numpy()
            for i in range(k):
                one = {y: views[y][i] for y in yaws}
                lms = tally.add(fa, one)
                front = lms[0.0]
                if front is not None:
                    nose_total += 1
                    nose_ok += bool(nose_nearer(depth0[i], front))
                    for y in turned:
                        if lms[y] is not None:
                            p = homography_residual(front, lms[y])
                            if np.isfinite(p):
                                par[y].append(p)
                                three_d_total += 1
                                three_d += p >= 0.5 * ref[y]
                    dists = turned_identity_distances(fa, one, lms)
                    if dists is not None:
                        id_total += 1
                        id_dists.extend(dists)
                        id_kept += all(d < SAME_PERSON_DISTANCE for d in dists)
    nan = float("nan")
    return GeometryReport(
        n=n, yaws=yaws, detection=tally.rates(n), yaw_slope=tally.slope(), measured_yaw_mean=tally.mean_yaws(),
        identity_kept=id_kept / id_total if id_total else nan,
        identity_distance_mean=float(np.mean(id_dists)) if id_dists else nan,
        nose_nearer=nose_ok / nose_total if nose_total else nan,
        parallax={y: float(np.mean(v)) if v else nan for y, v in par.items()}, parallax_mean_face=ref,
        three_d=three_d / three_d_total if three_d_total else nan,
        counts={"identity_latents": id_total, "depth_maps": nose_total, "turned_views": three_d_total})

"""Head pose and EG3D cameras from 68 facial landmarks.

:func:`estimate_head_pose` fits portrait3d's 3D mean face (``data/mean_face_68.npy``, see
``data/MEAN_FACE.md``) to 68 iBUG/dlib landmarks with PnP (``cv2.solvePnP``, several starts,
Levenberg-Marquardt refinement) and returns a :class:`HeadPose`. :func:`camera_from_pose` turns a
pose into EG3D's 25-d camera label; :func:`pose_from_camera` inverts it.

Conventions
-----------
All angles are in **degrees**. The same as :mod:`portrait3d.networks.eg3d.camera`.

* **Head frame** (= EG3D world): +x = the subject's **left**, +y = **up**, +z = the direction the
  face **looks**. Units are EG3D world units (1 unit is about 0.37 m; the mean face's outer eye
  corners are 0.24 apart and its landmark centroid is at (0, 0, 0.16), about 0.16 in front of the
  head centre at the origin).
* **Camera frame** (OpenCV): x = image right, y = image down, z = viewing direction. Image
  coordinates are pixels with pixel centres at integers (dlib's convention); the principal point
  is the image centre ``((W - 1) / 2, (H - 1) / 2)``.
* ``HeadPose.rotation`` ``R`` maps head to camera coordinates, ``p_cam = R @ p_head + t``, with

      R = Rz(roll) @ F @ Rx(-pitch) @ Ry(yaw),   F = diag(1, -1, -1)

  (``Rx``, ``Ry``, ``Rz`` the right-handed rotations about x, y, z). ``F`` is the frontal view: yaw
  = pitch = roll = 0 means the face looks straight into the camera, upright.
* **yaw > 0**: the head is turned to **its left**; in the image the nose points toward the image
  **right** and we see more of the subject's right cheek. Yaw turns about the head's own vertical
  axis.
* **pitch > 0**: the head is tilted **up** (chin up); the nose points toward the image **top** and
  we see more of the underside of the chin and nose.
* **roll > 0**: the head is tilted toward **its left shoulder**; the face turns **clockwise** in
  the image (the top of the head moves toward the image right; the subject's left eye, which is on
  the image right, drops lower).
* Yaw and pitch are the longitude and latitude of the camera's viewing direction as seen from the
  head: the camera looks along ``(sin(yaw) cos(pitch), sin(pitch), -cos(yaw) cos(pitch))`` in head
  coordinates.

EG3D cameras
------------
:func:`camera_from_pose` returns the EG3D look-at camera (radius from the world origin, looking at
``pivot``, as ``LookAtPoseSampler`` and :func:`~portrait3d.networks.eg3d.camera.camera_from_angles`)
whose **rotation equals the head pose**: it sees the head at exactly ``(yaw, pitch, roll)`` along
its optical axis, like EG3D's FFHQ labels (whose rotations are Deep3DFaceRecon's head rotations).
Because the camera looks at the pivot ``(0, 0, 0.2)`` and not at the origin, its *position* angles,
which ``camera_from_angles`` takes, are slightly smaller than the pose angles (parallax: pose yaw
20 deg is camera-position yaw 18.5 deg, 40 deg is 37.3 deg); frontal poses coincide exactly. To place
a camera by position angles, call ``camera_from_angles`` directly. :func:`pose_from_camera` reads the
pose back from the rotation of any 25-d label (EG3D dataset labels included).

For EG3D, estimate the pose on the aligned crop with ``fov_deg=EG3D_FOV_DEG`` (18.837, EG3D's
FFHQ intrinsics), so that PnP uses the same pinhole camera as the generator.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Tuple, Union

import numpy as np
import torch

from portrait3d.errors import UsageError
from portrait3d.geometry.rotations import head_angles_np as angles_from_rotation
from portrait3d.geometry.rotations import head_rotation_np as rotation_from_angles
from portrait3d.networks.eg3d.camera import camera_from_angles, fov_to_intrinsics, roll_from_camera

__all__ = [
    "EG3D_FOV_DEG",
    "MEAN_FACE_PATH",
    "HeadPose",
    "mean_face_68",
    "rotation_from_angles",
    "angles_from_rotation",
    "focal_from_fov",
    "project_points",
    "estimate_head_pose",
    "estimate_head_pose_mesh",
    "mean_face_468",
    "pose_confidence",
    "camera_from_pose",
    "pose_from_camera",
]

EG3D_FOV_DEG = 18.837
MEAN_FACE_PATH = Path(__file__).resolve().parent / "data" / "mean_face_68.npy"
MEAN_MESH_PATH = Path(__file__).resolve().parent / "data" / "mean_face_468.npz"
MESH_YAW_LIMIT_DEG = 75.0       # beyond this the 468-point fit was not validated (bench/eval_camera_recovery.py)
TRAINING_YAW_DEG = 35.0         # the built-in generators' training faces hardly turn further (UTKFace)
LOW_CONFIDENCE_ERROR = 0.03     # RMS reprojection error, as a share of the face's width, above which a fit is suspect


@functools.lru_cache(maxsize=1)
def mean_face_68() -> np.ndarray:
    """The 3D mean face, float64 ``[68, 3]`` (iBUG order, head frame, EG3D world units), read-only."""
    points = np.load(MEAN_FACE_PATH).astype(np.float64)
    if points.shape != (68, 3):
        raise RuntimeError(f"{MEAN_FACE_PATH} has shape {points.shape}, expected (68, 3)")
    points.setflags(write=False)
    return points


@dataclass(frozen=True, eq=False)
class HeadPose:
    """A head pose relative to a pinhole camera (see the module docstring for the conventions).

    Attributes:
        yaw_deg: positive = head turned to its left (nose toward the image right).
        pitch_deg: positive = head tilted up (nose toward the image top).
        roll_deg: positive = head tilted toward its left shoulder (face turns clockwise in the image).
        rotation: float64 ``[3, 3]``, head to camera (OpenCV axes): ``p_cam = rotation @ p_head + translation``.
        translation: float64 ``[3]``, the head-frame origin (about the head centre) in camera
            coordinates, in EG3D world units (the mean face's scale; depth is only as good as that).
        reprojection_error: RMS distance in pixels between the landmarks and the projected mean
            face (``nan`` for poses not fitted to landmarks).
        focal: focal length in pixels used for the fit (``nan`` if none).
    """

    yaw_deg: float
    pitch_deg: float
    roll_deg: float
    rotation: np.ndarray = field(repr=False)
    translation: np.ndarray
    reprojection_error: float = float("nan")
    focal: float = float("nan")

    @classmethod
    def from_angles(cls, yaw_deg: float, pitch_deg: float, roll_deg: float = 0.0,
                    translation: Sequence[float] = (0.0, 0.0, 2.7)) -> "HeadPose":
        """A pose from angles (rotation from :func:`rotation_from_angles`); no fit, no focal."""
        return cls(float(yaw_deg), float(pitch_deg), float(roll_deg),
                   rotation_from_angles(yaw_deg, pitch_deg, roll_deg),
                   np.asarray(translation, dtype=np.float64).reshape(3))

    @property
    def angles(self) -> Tuple[float, float, float]:
        """``(yaw_deg, pitch_deg, roll_deg)``."""
        return self.yaw_deg, self.pitch_deg, self.roll_deg

    @property
    def camera_position(self) -> np.ndarray:
        """The camera centre in head coordinates (EG3D world units), ``-R^T t``."""
        return -self.rotation.T @ self.translation


def focal_from_fov(fov_deg: float, image_size: Tuple[int, int]) -> float:
    """Focal length in pixels for EG3D's field of view convention.

    EG3D's ``fov_deg`` is the field of view across the image diagonal (normalised focal
    ``1 / (sqrt(2) tan(fov / 2))`` for a square image): ``focal = f_norm * diagonal / sqrt(2)``, i.e.
    ``f_norm * W`` for a square ``W x W`` crop (4.2634 W for 18.837 deg).
    """
    w, h = image_size
    return float(fov_to_intrinsics(fov_deg)[0, 0]) * math.hypot(w, h) / math.sqrt(2.0)


def _camera_matrix(focal: float, image_size: Tuple[int, int]) -> np.ndarray:
    w, h = image_size
    return np.array([[focal, 0.0, (w - 1) / 2.0], [0.0, focal, (h - 1) / 2.0], [0.0, 0.0, 1.0]])


def project_points(points: np.ndarray, rotation: np.ndarray, translation: np.ndarray, focal: float,
                   image_size: Tuple[int, int]) -> np.ndarray:
    """Pinhole projection (the model :func:`estimate_head_pose` fits) of head-frame points ``[N, 3]`` -> px ``[N, 2]``."""
    cam = np.asarray(points, np.float64) @ np.asarray(rotation, np.float64).T + np.asarray(translation, np.float64)
    k = _camera_matrix(focal, image_size)
    return cam[:, :2] / cam[:, 2:3] * focal + k[:2, 2]


def _check_size(image_size) -> Tuple[int, int]:
    try:
        w, h = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise UsageError(f"image_size must be (width, height), got {image_size!r}") from None
    if w <= 0 or h <= 0:
        raise UsageError(f"image_size must be positive, got {image_size!r}")
    return w, h


def estimate_head_pose(
    landmarks: np.ndarray,
    image_size: Tuple[int, int],
    focal: float | None = None,
    *,
    fov_deg: float | None = None,
    shape: np.ndarray | None = None,
) -> HeadPose:
    """Head pose from 68 iBUG/dlib landmarks by PnP against the 3D mean face.

    The pinhole camera has its principal point at the image centre, no distortion, and focal
    length ``focal`` (pixels) if given, else :func:`focal_from_fov` of ``fov_deg`` if given (use
    ``fov_deg=EG3D_FOV_DEG`` for an EG3D-aligned crop), else the image diagonal (a 53 deg diagonal
    field of view, a moderate guess for an ordinary photo). The angles hardly depend on the focal
    length for faces that fill a small part of the field; the translation does.

    PnP is solved from several starts (``cv2.SOLVEPNP_SQPNP`` plus iterative PnP from a grid of
    yaw/pitch guesses), each refined by Levenberg-Marquardt (``cv2.solvePnPRefineLM``). Solutions
    with the head behind the camera or facing away from it (the mirrored depth-reversed fits
    that PnP can return for near-planar point sets) are discarded; the lowest RMS reprojection
    error wins.

    Args:
        landmarks: ``[68, 2]`` pixel coordinates (x right, y down) in iBUG order.
        image_size: ``(width, height)`` in pixels of the image the landmarks live in.
        focal: focal length in pixels (overrides ``fov_deg``).
        fov_deg: EG3D-style (diagonal) field of view in degrees.
        shape: optional ``[68, 3]`` 3D model points (head frame) instead of the mean face.

    Returns:
        :class:`HeadPose`.

    Raises:
        ValueError: malformed landmarks / size / focal, or no pose with the face toward the camera.
    """
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape != (68, 2) or not np.isfinite(pts).all():
        raise UsageError(f"landmarks must be a finite array [68, 2], got shape {pts.shape}")
    size = _check_size(image_size)
    focal = _resolve_focal(focal, fov_deg, size)
    obj = mean_face_68() if shape is None else np.asarray(shape, dtype=np.float64)
    if obj.shape != (68, 3):
        raise UsageError(f"shape must be [68, 3], got {obj.shape}")

    err, rot, t = _fit_pnp(obj, pts, focal, size)
    yaw, pitch, roll = angles_from_rotation(rot)
    return HeadPose(yaw, pitch, roll, rot, t.copy(), err, focal)


def _resolve_focal(focal: float | None, fov_deg: float | None, size: Tuple[int, int]) -> float:
    """``focal`` (pixels), else from ``fov_deg``, else the image diagonal; checked positive."""
    if focal is None:
        focal = focal_from_fov(fov_deg, size) if fov_deg is not None else math.hypot(*size)
    focal = float(focal)
    if not (math.isfinite(focal) and focal > 0):
        raise UsageError(f"focal must be a positive number of pixels, got {focal}")
    return focal


def _fit_pnp(obj: np.ndarray, pts: np.ndarray, focal: float, size: Tuple[int, int],
             starts_from: np.ndarray | None = None) -> tuple[float, np.ndarray, np.ndarray]:
    """``(RMS reprojection error in px, rotation [3, 3], translation [3])`` of model points ``obj [K, 3]`` fitted to
    image points ``pts [K, 2]``: SQPnP plus iterative PnP from a grid of yaw / pitch starts (and from the rotation
    ``starts_from``, when given), each refined by Levenberg-Marquardt; fits with the head behind the camera or
    facing away from it are discarded (:func:`estimate_head_pose`)."""
    import cv2

    k = _camera_matrix(focal, size)
    obj_c = np.ascontiguousarray(obj)
    img_c = np.ascontiguousarray(pts)

    # Weak-perspective depth guess: RMS radius ratio of the 2D points and the model.
    r2d = np.sqrt(((pts - pts.mean(0)) ** 2).sum(1).mean())
    r3d = np.sqrt(((obj[:, :2] - obj[:, :2].mean(0)) ** 2).sum(1).mean())
    depth = focal * r3d / max(r2d, 1e-9)
    ray = np.array([*((pts.mean(0) - k[:2, 2]) / focal), 1.0]) * depth

    starts = []
    ok, rvec, tvec = cv2.solvePnP(obj_c, img_c, k, None, flags=cv2.SOLVEPNP_SQPNP)
    if ok:
        starts.append((rvec, tvec))
    guesses = [rotation_from_angles(y, p, 0.0) for y in (-60.0, -30.0, 0.0, 30.0, 60.0) for p in (-30.0, 0.0, 30.0)]
    if starts_from is not None:
        guesses.append(np.asarray(starts_from, np.float64))
    for r0 in guesses:
        t0 = ray - r0 @ obj.mean(0)
        ok, rvec, tvec = cv2.solvePnP(obj_c, img_c, k, None, cv2.Rodrigues(r0)[0].copy(),
                                      t0.reshape(3, 1).copy(), useExtrinsicGuess=True,
                                      flags=cv2.SOLVEPNP_ITERATIVE)
        if ok:
            starts.append((rvec, tvec))

    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_COUNT, 100, 1e-10)
    best = None
    for rvec, tvec in starts:
        rvec, tvec = cv2.solvePnPRefineLM(obj_c, img_c, k, None, rvec.copy(), tvec.copy(), criteria)
        rot = cv2.Rodrigues(rvec)[0]
        t = tvec.reshape(3)
        cam = obj @ rot.T + t
        # In front of the camera, and the face (head +z) pointing toward it, not away.
        if not (cam[:, 2] > 0).all() or rot[2, 2] >= 0:
            continue
        err = float(np.sqrt(((project_points(obj, rot, t, focal, size) - pts) ** 2).sum(1).mean()))
        if best is None or err < best[0]:
            best = (err, rot, t)
    if best is None:
        raise UsageError("no head pose with the face toward the camera fits these landmarks")
    return best


@functools.lru_cache(maxsize=1)
def mean_face_468() -> tuple[np.ndarray, np.ndarray]:
    """The face rig's mean shape on MediaPipe's 468-point mesh: ``(vertices float64 [468, 3], triangles int64
    [F, 3])`` in the head frame (``data/MEAN_FACE.md``; the rig's units, about twice the 68-point face's: scale does
    not change the angles), read-only."""
    with np.load(MEAN_MESH_PATH, allow_pickle=False) as d:
        v, f = d["vertices"].astype(np.float64), d["faces"].astype(np.int64)
    if v.shape != (468, 3) or f.ndim != 2 or f.shape[1] != 3:
        raise RuntimeError(f"{MEAN_MESH_PATH} holds vertices {v.shape} and faces {f.shape}")
    v.setflags(write=False)
    f.setflags(write=False)
    return v, f


def _vertex_normals(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    n = np.zeros_like(v)
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    for k in range(3):
        np.add.at(n, f[:, k], fn)
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def estimate_head_pose_mesh(
    mesh: np.ndarray,
    image_size: Tuple[int, int],
    focal: float | None = None,
    *,
    fov_deg: float | None = None,
    visibility_rounds: int = 2,
    min_visible: int = 60,
    grazing: float = 0.2,
) -> HeadPose:
    """Head pose from MediaPipe's 468-point face mesh, robust to profile views.

    PnP (:func:`estimate_head_pose`'s multi-start solver with Levenberg-Marquardt refinement) fits the face rig's
    mean mesh (:func:`mean_face_468`) to all 468 points, then refits ``visibility_rounds`` times on the points
    whose mean-mesh normal faces the camera under the current pose: beyond about 45 degrees of yaw the far cheek is
    hidden, and MediaPipe's guesses for it (and the 68-point predictor's) pull a fit of every point toward frontal.
    ``HeadPose.reprojection_error`` is the RMS over the points used; :func:`pose_confidence` judges it.

    Args:
        mesh: ``[468, 2]`` or ``[468, 3]`` (``z`` ignored) pixel coordinates, as from
            :meth:`~portrait3d.face.analyzer.FaceAnalyzer.landmarks_and_mesh`.
        image_size, focal, fov_deg: the camera, as :func:`estimate_head_pose`.
        min_visible: fewest points a visibility refit may use (else the previous fit stands).
        grazing: a point counts as visible when the cosine between its normal and the direction to the camera
            exceeds this: points near the silhouette are where mesh predictors err most.
    """
    pts = np.asarray(mesh, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[0] != 468 or pts.shape[1] not in (2, 3) or not np.isfinite(pts).all():
        raise UsageError(f"mesh must be a finite array [468, 2 or 3], got shape {pts.shape}")
    pts = pts[:, :2]
    size = _check_size(image_size)
    focal = _resolve_focal(focal, fov_deg, size)
    obj, tri = mean_face_468()
    normals = _vertex_normals(obj, tri)
    err, rot, t = _fit_pnp(obj, pts, focal, size)
    for _ in range(visibility_rounds):
        cam = obj @ rot.T + t
        to_camera = -cam / np.linalg.norm(cam, axis=1, keepdims=True)
        facing = ((normals @ rot.T) * to_camera).sum(1) > grazing
        if facing.sum() < min_visible or facing.all():
            break
        err, rot, t = _fit_pnp(obj[facing], pts[facing], focal, size, starts_from=rot)
    yaw, pitch, roll = angles_from_rotation(rot)
    return HeadPose(yaw, pitch, roll, rot, t.copy(), err, focal)


def pose_confidence(pose: HeadPose, face_width_px: float) -> tuple[bool, list[str]]:
    """``(confident, reasons)`` for a fitted pose: not confident when the RMS reprojection error exceeds
    ``LOW_CONFIDENCE_ERROR`` of the face's width (the landmarks do not look like a face seen this way) or the yaw
    lies beyond ``MESH_YAW_LIMIT_DEG``; a yaw beyond ``TRAINING_YAW_DEG`` is reported too (the built-in generators
    were trained on faces that hardly turn further), without lowering the confidence."""
    reasons = []
    rel = pose.reprojection_error / max(float(face_width_px), 1e-9)
    confident = True
    if not math.isfinite(rel) or rel > LOW_CONFIDENCE_ERROR:
        confident = False
        reasons.append(f"the landmarks fit a head pose poorly (RMS error {rel:.1%} of the face width)")
    if abs(pose.yaw_deg) > MESH_YAW_LIMIT_DEG:
        confident = False
        reasons.append(f"yaw {pose.yaw_deg:+.0f} deg is beyond the validated range (+-{MESH_YAW_LIMIT_DEG:.0f})")
    elif abs(pose.yaw_deg) > TRAINING_YAW_DEG:
        reasons.append(f"yaw {pose.yaw_deg:+.0f} deg is beyond what the built-in generators were trained on "
                       f"(+-{TRAINING_YAW_DEG:.0f})")
    return confident, reasons


PoseLike = Union[HeadPose, Sequence[float]]


def camera_from_pose(
    pose: PoseLike,
    radius: float = 2.7,
    fov_deg: float = EG3D_FOV_DEG,
    pivot: Sequence[float] = (0.0, 0.0, 0.2),
) -> torch.Tensor:
    """EG3D 25-d camera label (float32 ``[25]``) that sees the head at ``pose``.

    The camera sits at ``radius`` from the world origin, looks at ``pivot`` (EG3D's look-at
    convention) and has the pose's rotation: its viewing direction is the pose's (see the module
    docstring) and it is rolled about that axis by ``roll``. Its position is where the line
    through ``pivot`` along the viewing direction meets the sphere; the label is then
    ``camera_from_angles(yaw_c, pitch_c, radius, fov_deg, pivot, roll_deg=roll)`` with
    ``(yaw_c, pitch_c)`` that position's angles. The frontal pose gives exactly
    ``camera_from_angles(0, 0)``.

    Args:
        pose: a :class:`HeadPose` or ``(yaw_deg, pitch_deg, roll_deg)``.
        radius: camera distance from the world origin (EG3D: 2.7); must exceed ``|pivot|``.
        fov_deg: field of view of the intrinsics (EG3D: 18.837).
        pivot: point looked at (EG3D: ``(0, 0, 0.2)``).

    Returns:
        float32 tensor ``[25]``: row-major cam2world (16) then normalised intrinsics (9).
    """
    yaw, pitch, roll = pose.angles if isinstance(pose, HeadPose) else (float(a) for a in pose)
    y, p = math.radians(yaw), math.radians(pitch)
    forward = np.array([math.sin(y) * math.cos(p), math.sin(p), -math.cos(y) * math.cos(p)])
    piv = np.asarray(pivot, dtype=np.float64).reshape(3)
    b = float(piv @ forward)
    disc = b * b - float(piv @ piv) + radius * radius
    if disc < 0 or radius <= np.linalg.norm(piv):
        raise UsageError("radius must exceed the distance of the pivot from the origin")
    origin = piv - (b + math.sqrt(disc)) * forward
    yaw_c = math.degrees(math.atan2(-origin[0], origin[2]))
    pitch_c = math.degrees(math.asin(max(-1.0, min(1.0, -origin[1] / radius))))
    return camera_from_angles(yaw_c, pitch_c, radius=radius, fov_deg=fov_deg, pivot=pivot, roll_deg=roll)


def pose_from_camera(
    c: torch.Tensor,
) -> Tuple[Union[float, torch.Tensor], Union[float, torch.Tensor], Union[float, torch.Tensor]]:
    """Head pose ``(yaw_deg, pitch_deg, roll_deg)`` seen by an EG3D camera (inverse of :func:`camera_from_pose`).

    Read from the rotation only (the world-to-camera rotation is the head-to-camera rotation), so
    it also applies to EG3D's dataset labels, whatever their position. With ``R`` the cam2world
    rotation (columns: camera right, down, forward): ``yaw = atan2(R[0,2], -R[2,2])``,
    ``pitch = asin(R[1,2])``, ``roll = atan2(R[1,0], -R[1,1])``, in float64.

    Args:
        c: label ``[25]`` or ``[N, 25]`` (or cam2world ``[4, 4]`` / ``[N, 4, 4]``).

    Returns:
        Python floats for one camera, float64 tensors ``[N]`` otherwise.
    """
    single = c.dim() == 1 or (c.dim() == 2 and c.shape == (4, 4))
    flat = (c.reshape(-1, 16) if c.shape[-1] == 4 else c.reshape(-1, c.shape[-1]))[:, :16].to(torch.float64)
    yaw = torch.rad2deg(torch.atan2(flat[:, 2], -flat[:, 10]))
    pitch = torch.rad2deg(torch.asin(flat[:, 6].clamp(-1, 1)))
    roll = roll_from_camera(c)
    if single:
        return float(yaw[0]), float(pitch[0]), float(roll)
    return yaw, pitch, roll

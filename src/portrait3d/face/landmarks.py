"""Facial landmarks: dlib's 68-point iBUG predictor and MediaPipe's 468/478-point face mesh.

Coordinates are ``(x, y)`` pixels, float, pixel centres at integers (see
:mod:`portrait3d.face.detect`). Both backends can give the 68 iBUG 300-W points, so the
alignment recipes of :mod:`portrait3d.face.align` work with either.

iBUG 68 order (0-based; "right"/"left" are the *subject's*, so the subject's right eye is on
the image's left in a non-mirrored photo)::

    0-16  jaw line, from the subject's right ear down to the chin (8) and up to the left ear
    17-21 right eyebrow (outer -> inner)       22-26 left eyebrow (inner -> outer)
    27-30 nose bridge (top -> tip 30)          31-35 nostrils / nose base (right -> left)
    36-41 right eye (36 outer corner, 39 inner corner; 37-38 upper lid, 40-41 lower lid)
    42-47 left eye (42 inner corner, 45 outer corner; 43-44 upper lid, 46-47 lower lid)
    48-59 outer lip contour (48 right corner, 51 top centre, 54 left corner, 57 bottom centre)
    60-67 inner lip contour (60 right corner, 62 top, 64 left corner, 66 bottom)

The five-point set (:func:`five_points`) is ``[right-eye centre, left-eye centre, nose tip,
right mouth corner, left mouth corner]`` -- i.e. image-left eye first, the order of MTCNN /
Deep3DFaceRecon / insightface templates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from portrait3d.errors import UsageError
from portrait3d.face.detect import Detection
from portrait3d.face.errors import NoFaceError
from portrait3d.face.models import ReleasesOnExit, quiet_native_stderr

__all__ = [
    "IBUG68_REGIONS",
    "IBUG68_MIRROR",
    "MESH_TO_IBUG68",
    "FaceLandmarks",
    "LandmarkDetector",
    "five_points",
    "mesh_to_ibug68",
]

IBUG68_REGIONS: dict[str, tuple[int, ...]] = {
    "jaw": tuple(range(0, 17)),
    "right_brow": tuple(range(17, 22)),
    "left_brow": tuple(range(22, 27)),
    "nose": tuple(range(27, 36)),
    "right_eye": tuple(range(36, 42)),
    "left_eye": tuple(range(42, 48)),
    "mouth_outer": tuple(range(48, 60)),
    "mouth_inner": tuple(range(60, 68)),
}
"""Index ranges of the iBUG 68 regions (subject's left/right)."""

IBUG68_MIRROR: tuple[int, ...] = (
    tuple(range(16, -1, -1)) + (26, 25, 24, 23, 22, 21, 20, 19, 18, 17) + (27, 28, 29, 30)
    + (35, 34, 33, 32, 31) + (45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40)
    + (54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55) + (64, 63, 62, 61, 60, 67, 66, 65))
"""``lm[IBUG68_MIRROR]`` re-indexes the landmarks of a horizontally flipped face."""

# MediaPipe face-mesh vertex(es) for each iBUG point; a pair means "the midpoint of the two".
# Only vertices 0..467 are used, so the table works with and without refine_landmarks.
#
# How it was chosen (bench/measure_utkface_template.py --n 600 --seed 7 --mesh-map re-derives it,
# up to two near-tie jaw points, 5 and 11, where it may prefer a vertex pair): on 588
# UTKFace photos we ran dlib's 68-point predictor and the mesh, and for each iBUG point scored
# candidate vertices by their mean distance to dlib's point (normalised by the 36-45 outer-eye
# distance). Eye, lip and eyebrow points were restricted to the matching mesh contour (upper
# lid, lower lid, outer/inner lip, brow) and to single vertices or adjacent contour pairs, so
# the semantics hold (an upper-lid point stays on the upper lid when the eye closes); the other
# points (jaw, nose) chose among the 14 nearest vertices. Left/right pairs were fitted jointly
# through the mesh's own mirror symmetry, so the table is exactly symmetric. A single vertex
# was kept unless a pair was >5% better. Mean residual against dlib: 0.037 inter-ocular
# (eyes 0.02, nose/lips 0.03, brows 0.04, jaw 0.06: dlib's jaw points are a 2D silhouette that
# no fixed mesh vertex follows exactly as the head turns).
MESH_TO_IBUG68: tuple[tuple[int, ...], ...] = (
    # jaw 0-16
    (127,), (227,), (177,), (215,), (172,), (136,), (149,), (148,), (152,),
    (377,), (378,), (365,), (397,), (435,), (401,), (447,), (356,),
    # right brow 17-21, left brow 22-26
    (70,), (63,), (105, 66), (66, 107), (107, 55),
    (336, 285), (296, 336), (334, 296), (293,), (300,),
    # nose bridge 27-30, nose base 31-35
    (193, 417), (197,), (5, 195), (4,),
    (98, 60), (97,), (94, 164), (326,), (327, 290),
    # right eye 36-41, left eye 42-47
    (33, 7), (160, 159), (158, 157), (155,), (153,), (144,),
    (382,), (385, 384), (387, 386), (263, 249), (373,), (380,),
    # outer lips 48-59
    (61,), (40, 39), (37,), (0,), (267,), (270, 269), (291,),
    (405, 321), (314,), (17,), (84,), (181, 91),
    # inner lips 60-67
    (78,), (82,), (13,), (312,), (308,), (317,), (14,), (87,),
)
"""For each of the 68 iBUG points, the face-mesh vertex or vertex pair (midpoint) it maps to."""

# Gather / weight matrix form of the table, built once: ibug = _MESH_W @ mesh[_MESH_IDX].
_MESH_IDX = np.array(sorted({v for vs in MESH_TO_IBUG68 for v in vs}), dtype=np.int64)
_MESH_W = np.zeros((68, len(_MESH_IDX)))
for _i, _vs in enumerate(MESH_TO_IBUG68):
    for _v in _vs:
        _MESH_W[_i, int(np.searchsorted(_MESH_IDX, _v))] += 1.0 / len(_vs)

# dlib's 68-point predictor was trained on boxes from dlib's HOG detector. BlazeFace boxes are
# about 11% larger and sit a little lower; measured on 457 faces found by both detectors
# (UTKFace + the portrait photos), the median HOG box relative to the BlazeFace box, in units
# of the BlazeFace box size sqrt(w*h), is: centre shifted by (-0.032, -0.057), size x0.892.
_MEDIAPIPE_TO_DLIB_BOX = (-0.032, -0.057, 0.892)

# Eye-landmark indices for the 5-point set.
_RIGHT_EYE = list(range(36, 42))
_LEFT_EYE = list(range(42, 48))


def mesh_to_ibug68(mesh: np.ndarray) -> np.ndarray:
    """Map MediaPipe face-mesh points to the 68 iBUG points (table :data:`MESH_TO_IBUG68`).

    Args:
        mesh: ``[468, D]`` or ``[478, D]`` (``D`` = 2 or 3), or batched ``[..., 468|478, D]``.

    Returns:
        ``[..., 68, D]`` float64 array.
    """
    mesh = np.asarray(mesh, dtype=np.float64)
    if mesh.ndim < 2 or mesh.shape[-2] not in (468, 478):
        raise UsageError(f"expected mesh points [..., 468 or 478, D], got {mesh.shape}")
    return np.einsum("ij,...jd->...id", _MESH_W, mesh[..., _MESH_IDX, :])


def five_points(lm68: np.ndarray, eyes: str = "mean") -> np.ndarray:
    """The 5-point set from 68 iBUG landmarks.

    Args:
        lm68: ``[68, 2]`` (or ``[68, D]``) landmarks.
        eyes: how an eye centre is formed: ``'mean'`` of its 6 contour points (the FFHQ recipe's
            eye centre) or ``'corners'``, the midpoint of its two corners (Deep3DFaceRecon's
            ``extract_5p``, used by EG3D's cropping).

    Returns:
        ``[5, D]``: right-eye centre (image left), left-eye centre, nose tip (30),
        right mouth corner (48), left mouth corner (54).
    """
    lm68 = np.asarray(lm68, dtype=np.float64)
    if lm68.shape[0] != 68:
        raise UsageError(f"expected 68 landmarks, got {lm68.shape}")
    if eyes == "mean":
        r, l = lm68[_RIGHT_EYE].mean(0), lm68[_LEFT_EYE].mean(0)
    elif eyes == "corners":
        r, l = 0.5 * (lm68[36] + lm68[39]), 0.5 * (lm68[42] + lm68[45])
    else:
        raise UsageError(f"eyes must be 'mean' or 'corners', got {eyes!r}")
    return np.stack([r, l, lm68[30], lm68[48], lm68[54]])


@dataclass(frozen=True)
class FaceLandmarks:
    """Landmarks of one face.

    Attributes:
        points: ``[K, 2]`` float ``(x, y)`` pixels; ``K = 68`` (dlib) or 468 / 478 (mesh;
            478 adds the iris centres and contours, 468-477, with ``refine_landmarks``).
        points3d: mesh only: ``[K, 3]``, ``(x, y)`` as ``points`` and ``z`` the relative depth in
            pixels at the image's scale (the mesh's own unit: smaller = nearer the camera,
            roughly zero at the face's centre). ``None`` for dlib.
        backend: ``'dlib'`` or ``'mediapipe'``.
    """

    points: np.ndarray
    points3d: np.ndarray | None
    backend: str

    @property
    def ibug68(self) -> np.ndarray:
        """The 68 iBUG points ``[68, 2]`` (mapped through :func:`mesh_to_ibug68` for the mesh)."""
        if self.points.shape[0] == 68:
            return self.points
        return mesh_to_ibug68(self.points)

    def five(self, eyes: str = "mean") -> np.ndarray:
        """The 5-point set ``[5, 2]`` (see :func:`five_points`)."""
        return five_points(self.ibug68, eyes=eyes)


def _box_of(face: Detection | Sequence[float]) -> tuple[tuple[float, float, float, float], str]:
    if isinstance(face, Detection):
        return face.box, face.backend
    box = tuple(float(v) for v in face)
    if len(box) != 4:
        raise UsageError(f"expected a Detection or an (x0, y0, x1, y1) box, got {face!r}")
    return box, "box"  # type: ignore[return-value]


class LandmarkDetector(ReleasesOnExit):
    """Landmarks of a detected face.

    Args:
        backend: ``'dlib'`` (68 iBUG points from a box; ~2 ms) or ``'mediapipe'`` (face mesh,
            468 points, 478 with ``refine_landmarks``; ~15 ms).
        refine_landmarks: mesh only: also predict the irises (478 points) and refine the eyes
            and lips with MediaPipe's attention model.
        crop_scale: mesh only: side of the square crop around the detection, in units of the
            box size ``sqrt(w*h)`` (the mesh's own short-range face detector then sees one
            large face, whatever the photo's size).
        crop_size: mesh only: the crop is resampled to ``crop_size`` x ``crop_size`` pixels.

    Boxes from BlazeFace are converted to the box convention dlib's predictor was trained on
    (see ``_MEDIAPIPE_TO_DLIB_BOX``); dlib boxes and plain ``(x0, y0, x1, y1)`` tuples are used
    as they are. Not thread-safe (one instance per thread).
    """

    def __init__(
        self,
        backend: str = "dlib",
        *,
        refine_landmarks: bool = True,
        crop_scale: float = 2.0,
        crop_size: int = 256,
    ) -> None:
        if backend not in ("dlib", "mediapipe"):
            raise UsageError(f"unknown landmark backend {backend!r} (choose 'dlib' or 'mediapipe')")
        self.backend = backend
        self.refine_landmarks = bool(refine_landmarks)
        self.crop_scale = float(crop_scale)
        self.crop_size = int(crop_size)
        self._predictor: Any = None
        self._mesh: Any = None

    def close(self) -> None:
        """Release the MediaPipe graph."""
        if self._mesh is not None:
            try:
                self._mesh.close()
            except Exception:  # pragma: no cover
                pass
            self._mesh = None

    # ------------------------------------------------------------------ API
    def detect(self, image: np.ndarray, face: Detection | Sequence[float]) -> FaceLandmarks:
        """Landmarks of the face in ``face`` (a :class:`Detection` or an ``(x0, y0, x1, y1)`` box).

        Args:
            image: ``uint8 [H, W, 3]`` RGB.
            face: where the face is.

        Raises:
            NoFaceError: the mesh found no face in the region (dlib always answers).
        """
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise UsageError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
        box, source = _box_of(face)
        if self.backend == "dlib":
            return self._dlib(image, box, source)
        return self._mediapipe(image, box)

    def landmarks68(self, image: np.ndarray, face: Detection | Sequence[float]) -> np.ndarray:
        """Shortcut: the 68 iBUG points ``[68, 2]`` of ``face``, whatever the backend."""
        return self.detect(image, face).ibug68

    # ------------------------------------------------------------------ dlib
    def _dlib(self, image: np.ndarray, box: tuple[float, float, float, float],
              source: str) -> FaceLandmarks:
        import dlib

        if self._predictor is None:
            from portrait3d.face.models import dlib_model_path

            self._predictor = dlib.shape_predictor(str(dlib_model_path("shape_68")))
        x0, y0, x1, y1 = box
        if source == "mediapipe":
            dx, dy, k = _MEDIAPIPE_TO_DLIB_BOX
            size = float(np.sqrt(max(x1 - x0, 1e-6) * max(y1 - y0, 1e-6)))
            cx = 0.5 * (x0 + x1) + dx * size
            cy = 0.5 * (y0 + y1) + dy * size
            half = 0.5 * k * size
            x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
        # Box edges -> dlib's inclusive integer rectangle (edges at left - 0.5, right + 0.5).
        left, top = int(round(x0 + 0.5)), int(round(y0 + 0.5))
        right = max(int(round(x1 - 0.5)), left)
        bottom = max(int(round(y1 - 0.5)), top)
        # dlib copies the whole array it is given; hand it the face's neighbourhood only (one
        # box size of margin: the predictor reads pixels within the face shape's extent).
        h, w = image.shape[:2]
        m = max(right - left, bottom - top) + 1
        cx0, cy0 = min(max(left - m, 0), w - 1), min(max(top - m, 0), h - 1)
        cx1, cy1 = max(min(right + m + 1, w), cx0 + 1), max(min(bottom + m + 1, h), cy0 + 1)
        roi = np.ascontiguousarray(image[cy0:cy1, cx0:cx1])
        rect = dlib.rectangle(left - cx0, top - cy0, right - cx0, bottom - cy0)
        shape = self._predictor(roi, rect)
        pts = np.array([[p.x + cx0, p.y + cy0] for p in shape.parts()], dtype=np.float64)
        return FaceLandmarks(points=pts, points3d=None, backend="dlib")

    # ------------------------------------------------------------------ mediapipe
    def _mesh_solution(self) -> Any:
        if self._mesh is None:
            from mediapipe.python.solutions import face_mesh

            with quiet_native_stderr():
                self._mesh = face_mesh.FaceMesh(static_image_mode=True, max_num_faces=3,
                                                refine_landmarks=self.refine_landmarks,
                                                min_detection_confidence=0.3)
        return self._mesh

    def _mediapipe(self, image: np.ndarray, box: tuple[float, float, float, float]) -> FaceLandmarks:
        from portrait3d.face.warp import warp_image

        x0, y0, x1, y1 = box
        size = float(np.sqrt(max(x1 - x0, 1.0) * max(y1 - y0, 1.0)))
        cx, cy = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
        mesh = self._mesh_solution()
        for scale in (self.crop_scale, 1.5 * self.crop_scale):
            side = scale * size  # crop side in original pixels
            r = self.crop_size
            # original (x, y) -> crop pixel coordinates: the crop's edges are at cx +- side/2.
            k = r / side
            m = np.array([[k, 0.0, (side / 2 - cx) * k - 0.5],
                          [0.0, k, (side / 2 - cy) * k - 0.5],
                          [0.0, 0.0, 1.0]])
            crop = warp_image(image, m, (r, r), border="constant")
            with quiet_native_stderr():
                result = mesh.process(crop)
            faces = result.multi_face_landmarks or []
            if not faces:
                continue
            cands = [np.array([[p.x * r - 0.5, p.y * r - 0.5, p.z * r] for p in f.landmark])
                     for f in faces]
            # The face nearest the crop's centre is the detected one.
            pts = min(cands, key=lambda c: float(np.hypot(*(c[:, :2].mean(0) - (r / 2 - 0.5)))))
            xy = (pts[:, :2] + 0.5) / k - side / 2 + np.array([cx, cy])
            z = pts[:, 2:] / k
            pts3 = np.concatenate([xy, z], axis=1)
            return FaceLandmarks(points=pts3[:, :2].copy(), points3d=pts3, backend="mediapipe")
        raise NoFaceError("the face mesh found no face in the detected region")

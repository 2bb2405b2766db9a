"""Face detection: MediaPipe BlazeFace, with dlib's CNN (MMOD) and HOG detectors as alternatives.

Coordinates follow the whole face pipeline's convention: ``(x, y)`` in pixels, float, with the
*centre* of pixel ``(col, row)`` at ``x = col, y = row`` (OpenCV / dlib / kornia convention).
A box ``(x0, y0, x1, y1)`` covers ``x0 <= x <= x1`` in those coordinates, so a box around the
whole ``W x H`` image is ``(-0.5, -0.5, W - 0.5, H - 0.5)``. Boxes are not clipped: a face at
the border gives a box that overhangs the image, as the detectors report it.

Backends:

* ``'mediapipe'`` (default): BlazeFace from ``mediapipe.solutions.face_detection``. Both bundled
  models run on every image -- full-range (``model_selection=1``, faces up to ~5 m, small in the
  frame) and short-range (``model_selection=0``, close-ups within ~2 m, the selfie case) -- and
  their detections are merged by non-maximum suppression. ~25 ms per model on a CPU core. Gives
  6 keypoints per face, in this order (left/right from the *subject's* point of view, so
  "right eye" is the eye on the image's left in a non-mirrored photo): right eye, left eye,
  nose tip, mouth centre, right ear tragion, left ear tragion.
  If it finds nothing and ``fallback=True``, dlib's CNN detector is tried (slow, but it finds
  faces BlazeFace misses: strong profiles, unusual scale).
* ``'dlib'``: dlib's CNN MMOD detector (``mmod_human_face_detector.dat``). Accurate, but about
  10 s per megapixel on one CPU core; images are downscaled to ``dlib_max_side`` first
  (both dlib backends).
* ``'dlib-hog'``: dlib's HOG + linear SVM frontal detector; fast (0.1-0.5 s), frontal faces only.

dlib boxes are the boxes dlib's 68-point shape predictor was trained with; boxes from BlazeFace
differ slightly and :mod:`portrait3d.face.landmarks` adjusts them before landmarking.

The detectors hold native resources; a :class:`FaceDetector` is not thread-safe (use one per
thread) and can be closed with :meth:`FaceDetector.close` or used as a context manager.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from portrait3d.errors import UsageError
from portrait3d.face.errors import NoFaceError
from portrait3d.face.models import ReleasesOnExit, quiet_native_stderr

__all__ = ["BACKENDS", "MEDIAPIPE_KEYPOINTS", "Detection", "FaceDetector", "box_iou", "select_face"]

BACKENDS = ("mediapipe", "dlib", "dlib-hog")

_MEDIAPIPE_MAX_SIDE = 1920  # larger photos are downscaled before BlazeFace

MEDIAPIPE_KEYPOINTS = ("right_eye", "left_eye", "nose_tip", "mouth_center",
                       "right_ear_tragion", "left_ear_tragion")
"""Names of BlazeFace's 6 keypoints, in order (subject's left/right)."""


@dataclass(frozen=True)
class Detection:
    """One detected face.

    Attributes:
        box: ``(x0, y0, x1, y1)`` in pixels (pixel-centre convention, see module docstring).
        score: detector confidence; comparable only within one backend (BlazeFace: probability
            in [0, 1]; dlib CNN / HOG: SVM-like margin, typically 0..2+).
        keypoints: ``[K, 2]`` float ``(x, y)`` pixels, or ``None`` (dlib gives none).
            BlazeFace: ``K = 6``, named by :data:`MEDIAPIPE_KEYPOINTS`.
        backend: ``'mediapipe'``, ``'dlib'`` or ``'dlib-hog'``.
    """

    box: tuple[float, float, float, float]
    score: float
    keypoints: np.ndarray | None
    backend: str

    @property
    def width(self) -> float:
        """Box width in pixels."""
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        """Box height in pixels."""
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        """Box area in square pixels."""
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def center(self) -> tuple[float, float]:
        """Box centre ``(x, y)`` in pixels."""
        return (0.5 * (self.box[0] + self.box[2]), 0.5 * (self.box[1] + self.box[3]))


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes (0 when disjoint)."""
    ix = min(a[2], b[2]) - max(a[0], b[0])
    iy = min(a[3], b[3]) - max(a[1], b[1])
    if ix <= 0 or iy <= 0:
        return 0.0
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _sort_largest_first(dets: list[Detection]) -> list[Detection]:
    return sorted(dets, key=lambda d: (-d.area, -d.score))


def _nms(dets: list[Detection], iou_threshold: float) -> list[Detection]:
    """Greedy non-maximum suppression by score."""
    kept: list[Detection] = []
    for d in sorted(dets, key=lambda d: -d.score):
        if all(box_iou(d.box, k.box) < iou_threshold for k in kept):
            kept.append(d)
    return kept


def select_face(detections: Sequence[Detection], face_index: int | None = None) -> Detection:
    """Pick one face: the largest by default, else ``face_index`` into the largest-first list.

    Args:
        detections: detections in any order (they are sorted largest box first here).
        face_index: ``None`` for the largest face, or ``0 <= face_index < len(detections)``.

    Raises:
        NoFaceError: no detections, or ``face_index`` out of range (the message gives the count).
    """
    dets = _sort_largest_first(list(detections))
    if not dets:
        raise NoFaceError("no face found in the image")
    if face_index is None:
        return dets[0]
    n = len(dets)
    if not isinstance(face_index, (int, np.integer)) or not 0 <= face_index < n:
        plural = "face" if n == 1 else "faces"
        raise NoFaceError(f"face index {face_index} is out of range: {n} {plural} found "
                          f"(valid indices 0..{n - 1}, largest first)")
    return dets[int(face_index)]


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise UsageError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)


class FaceDetector(ReleasesOnExit):
    """Detect faces in an RGB image.

    Args:
        backend: ``'mediapipe'`` (default), ``'dlib'`` (CNN MMOD) or ``'dlib-hog'``.
        min_score: minimum BlazeFace confidence (``min_detection_confidence``), 0..1.
        fallback: with ``'mediapipe'``, try dlib's CNN detector when BlazeFace finds nothing.
        dlib_max_side: dlib's detectors run on a copy downscaled to at most this many pixels
            on the long side (the CNN costs ~10 s per megapixel on one CPU core; HOG ~0.5 s).
        upsample: dlib's ``upsample_num_times`` (finds smaller faces, 4x slower per step);
            ``None`` = 1 when the (downscaled) image's long side is at most 640 px, else 0.
        nms_iou: IoU above which BlazeFace's two models' boxes count as the same face.

    Example:
        >>> with FaceDetector() as det:                       # doctest: +SKIP
        ...     face = select_face(det.detect(image))
    """

    def __init__(
        self,
        backend: str = "mediapipe",
        *,
        min_score: float = 0.5,
        fallback: bool = True,
        dlib_max_side: int = 1024,
        upsample: int | None = None,
        nms_iou: float = 0.4,
    ) -> None:
        if backend not in BACKENDS:
            raise UsageError(f"unknown face detector backend {backend!r} (choose from {BACKENDS})")
        self.backend = backend
        self.min_score = float(min_score)
        self.fallback = bool(fallback)
        self.dlib_max_side = int(dlib_max_side)
        self.upsample = upsample
        self.nms_iou = float(nms_iou)
        self._mp: dict[int, Any] = {}
        self._cnn: Any = None
        self._hog: Any = None

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Release the MediaPipe graphs (dlib models are plain memory)."""
        for sol in self._mp.values():
            try:
                sol.close()
            except Exception:  # pragma: no cover - closing twice / during interpreter exit
                pass
        self._mp.clear()

    # ------------------------------------------------------------------ API
    def detect(self, image: np.ndarray) -> list[Detection]:
        """All faces in ``image``, largest box first.

        Args:
            image: ``uint8 [H, W, 3]`` RGB.

        Returns:
            A list of :class:`Detection` (empty when no face is found).
        """
        image = _as_rgb_uint8(image)
        if self.backend == "mediapipe":
            dets = self._detect_mediapipe(image)
            if not dets and self.fallback:
                dets = self._detect_dlib(image, cnn=True)
        elif self.backend == "dlib":
            dets = self._detect_dlib(image, cnn=True)
        else:
            dets = self._detect_dlib(image, cnn=False)
        return _sort_largest_first(dets)

    # ------------------------------------------------------------------ backends
    def _mediapipe_solution(self, model_selection: int) -> Any:
        sol = self._mp.get(model_selection)
        if sol is None:
            from mediapipe.python.solutions import face_detection

            with quiet_native_stderr():
                sol = face_detection.FaceDetection(model_selection=model_selection,
                                                   min_detection_confidence=self.min_score)
            self._mp[model_selection] = sol
        return sol

    def _detect_mediapipe(self, image: np.ndarray) -> list[Detection]:
        h, w = image.shape[:2]
        if max(h, w) > _MEDIAPIPE_MAX_SIDE:
            # BlazeFace sees 128 / 192 px anyway; a smaller copy only saves time. Relative
            # coordinates do not depend on the copy's size.
            import cv2

            k = _MEDIAPIPE_MAX_SIDE / max(h, w)
            image = cv2.resize(image, (max(1, round(w * k)), max(1, round(h * k))),
                               interpolation=cv2.INTER_AREA)
        found: list[Detection] = []
        for model_selection in (1, 0):  # full-range, then short-range (close-ups)
            solution = self._mediapipe_solution(model_selection)
            with quiet_native_stderr():  # the first run logs its XNNPACK delegate
                result = solution.process(image)
            for d in result.detections or ():
                loc = d.location_data
                bb = loc.relative_bounding_box
                x0 = bb.xmin * w - 0.5
                y0 = bb.ymin * h - 0.5
                x1 = (bb.xmin + bb.width) * w - 0.5
                y1 = (bb.ymin + bb.height) * h - 0.5
                box = (x0, y0, x1, y1)  # may overhang the image border
                if x1 <= x0 or y1 <= y0:
                    continue
                kps = np.array([[k.x * w - 0.5, k.y * h - 0.5] for k in loc.relative_keypoints],
                               dtype=np.float64).reshape(-1, 2)
                found.append(Detection(box=tuple(float(v) for v in box), score=float(d.score[0]),
                                       keypoints=kps, backend="mediapipe"))
        return _nms(found, self.nms_iou)

    def _detect_dlib(self, image: np.ndarray, cnn: bool) -> list[Detection]:
        import dlib

        h, w = image.shape[:2]
        scale = 1.0
        if max(h, w) > self.dlib_max_side:
            import cv2

            scale = self.dlib_max_side / max(h, w)
            image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                               interpolation=cv2.INTER_AREA)
        up = self.upsample
        if up is None:
            up = 1 if max(image.shape[:2]) <= 640 else 0
        sx = w / image.shape[1]
        sy = h / image.shape[0]
        out: list[Detection] = []
        if cnn:
            if self._cnn is None:
                from portrait3d.face.models import dlib_model_path

                self._cnn = dlib.cnn_face_detection_model_v1(str(dlib_model_path("cnn_detector")))
            pairs = [(r.rect, float(r.confidence)) for r in self._cnn(image, up)]
            name = "dlib"
        else:
            if self._hog is None:
                self._hog = dlib.get_frontal_face_detector()
            rects, scores, _ = self._hog.run(image, up, 0.0)
            pairs = list(zip(rects, (float(s) for s in scores)))
            name = "dlib-hog"
        for r, s in pairs:
            # dlib rectangles are inclusive pixel indices: the box edges are at left - 0.5 and
            # right + 0.5; map them from the (possibly downscaled) copy to the full image.
            x0 = r.left() * sx - 0.5
            y0 = r.top() * sy - 0.5
            x1 = (r.right() + 1) * sx - 0.5
            y1 = (r.bottom() + 1) * sy - 0.5
            box = (x0, y0, x1, y1)  # may overhang the image border, as dlib's boxes do
            out.append(Detection(box=tuple(float(v) for v in box), score=s, keypoints=None,
                                 backend=name))
        return out

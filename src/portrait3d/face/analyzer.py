"""The face pipeline as a measuring instrument on small generated images: a detector, dlib's 68
landmarks and dlib's 128-D descriptor, shared by the metrics (:mod:`portrait3d.metrics.face_stats`)
and the methods' evaluations."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from portrait3d.errors import UsageError

__all__ = ["DETECTORS", "TEMPLATE_BOX", "FaceTools", "FaceAnalyzer"]

DETECTORS = ("mediapipe", "dlib", "dlib-hog", "template")
"""Face detectors of :class:`FaceAnalyzer` (``template``: the fixed box of aligned crops, never fails)."""

TEMPLATE_BOX = (0.051, 0.048, 0.906, 0.912)
"""The face box of the ``default`` aligned crop, as fractions of the image (x0, y0, x1, y1): where
the landmarks of aligned faces sit, so it stands in for a detector on aligned generated faces."""


class FaceTools(Protocol):
    """What the metrics need from the face pipeline (:class:`FaceAnalyzer`, or a stand-in in tests)."""

    def landmarks(self, image: np.ndarray) -> np.ndarray | None:
        """68 iBUG points ``[68, 2]`` in pixels of ``image`` (uint8 ``[H, W, 3]``), or None (no face)."""

    def descriptor(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """Face descriptor of ``image`` given its 68 landmarks (pixels of ``image``)."""


class FaceAnalyzer:
    """The face pipeline on small generated images: detector, dlib 68 landmarks, dlib descriptor.

    Images are upscaled (bilinear) to ``work_size`` on the long side before anything runs (BlazeFace,
    dlib's predictor and its recognition chip want more than 64 px); landmarks are returned in the
    input image's pixels (pixel centres at integers).

    Args:
        detector: ``'mediapipe'`` (BlazeFace), ``'dlib'`` (CNN), ``'dlib-hog'``, or ``'template'``
            (the fixed face box of the aligned training crops: always "finds" a face, so only the
            landmark predictor judges the image).
        work_size: long side of the upscaled copy (0 = use the image as it is).
    """

    def __init__(self, detector: str = "mediapipe", work_size: int = 256) -> None:
        if detector not in DETECTORS:
            raise UsageError(f"unknown detector {detector!r} (choose from {DETECTORS})")
        from portrait3d.face.landmarks import LandmarkDetector

        self.detector_name = detector
        self.work_size = int(work_size)
        self._lm = LandmarkDetector("dlib")
        self._mesh: Any = None  # MediaPipe's face mesh, made on first use by landmarks_and_mesh
        self._det: Any = None
        if detector != "template":
            from portrait3d.face.detect import FaceDetector

            # no dlib-CNN fallback: seconds per image on this CPU for images that have no face
            self._det = FaceDetector(detector, fallback=False)

    def close(self) -> None:
        """Release the detector's native graphs."""
        self._lm.close()
        if self._mesh is not None:
            self._mesh.close()
        if self._det is not None:
            self._det.close()

    def __enter__(self) -> "FaceAnalyzer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _work(self, image: np.ndarray) -> tuple[np.ndarray, float, float]:
        img = np.ascontiguousarray(image)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise UsageError(f"expected a uint8 RGB image [H, W, 3], got {img.dtype} {img.shape}")
        h, w = img.shape[:2]
        if not self.work_size or max(h, w) == self.work_size:
            return img, 1.0, 1.0
        import cv2

        k = self.work_size / max(h, w)
        big = cv2.resize(img, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_LINEAR)
        return big, big.shape[1] / w, big.shape[0] / h

    def _locate(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, Any] | None:
        """``(upscaled copy, its scale [kx, ky], face box in it)`` (the template's box or the first detection),
        or None when the detector finds no face."""
        big, kx, ky = self._work(image)
        hb, wb = big.shape[:2]
        if self._det is None:
            x0, y0, x1, y1 = TEMPLATE_BOX
            face: Any = (x0 * wb, y0 * hb, x1 * wb, y1 * hb)
        else:
            dets = self._det.detect(big)
            if not dets:
                return None
            face = dets[0]
        return big, np.array([kx, ky]), face

    def landmarks(self, image: np.ndarray) -> np.ndarray | None:
        """68 points ``[68, 2]`` in pixels of ``image``, or None when no face is found."""
        from portrait3d.face.errors import FaceError

        found = self._locate(image)
        if found is None:
            return None
        big, scale, face = found
        try:
            pts = np.asarray(self._lm.detect(big, face).points[:68, :2], dtype=np.float64)
        except FaceError:
            return None
        return (pts + 0.5) / scale - 0.5

    def landmarks_and_mesh(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The 68 points ``[68, 2]`` and MediaPipe's 468-point face mesh ``[468, 3]`` of the same detected face,
        in pixels of ``image`` (the mesh's ``z`` in those pixel units, smaller = nearer the camera); None when
        either finds no face."""
        from portrait3d.face.errors import FaceError
        from portrait3d.face.landmarks import LandmarkDetector

        found = self._locate(image)
        if found is None:
            return None
        big, scale, face = found
        if self._mesh is None:
            self._mesh = LandmarkDetector("mediapipe", refine_landmarks=False)
        try:
            pts = np.asarray(self._lm.detect(big, face).points[:68, :2], dtype=np.float64)
            mesh = np.asarray(self._mesh.detect(big, face).points3d[:468], dtype=np.float64)
        except FaceError:
            return None
        mesh = np.concatenate([(mesh[:, :2] + 0.5) / scale - 0.5, mesh[:, 2:] / np.sqrt(scale.prod())], axis=1)
        return (pts + 0.5) / scale - 0.5, mesh

    def descriptor(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """dlib's 128-d descriptor (:func:`portrait3d.face.identity.dlib_descriptor`) on the upscaled copy."""
        from portrait3d.face.identity import dlib_descriptor

        big, kx, ky = self._work(image)
        lm = (np.asarray(landmarks, np.float64) + 0.5) * np.array([kx, ky]) - 0.5
        return dlib_descriptor(big, lm)

"""One call from a photo to what a generator needs: aligned crop, landmarks, head pose, EG3D camera.

    pipe = FacePipeline(style="eg3d")
    face = pipe("photo.jpg")              # FaceResult
    face.aligned.image                    # uint8 [512, 512, 3], EG3D in-the-wild crop
    face.camera                           # torch [25], EG3D label of the aligned crop
    face.pose.yaw_deg                     # degrees; positive = head turned to its left

Steps: :func:`~portrait3d.face.io.load_image` (EXIF, colour modes, size limits) ->
:class:`~portrait3d.face.detect.FaceDetector` (BlazeFace, dlib CNN fallback; largest face unless
``face_index``) -> :class:`~portrait3d.face.landmarks.LandmarkDetector` (68 iBUG points) ->
:data:`~portrait3d.face.align.ALIGNERS` -> :func:`~portrait3d.face.pose.estimate_head_pose` on the
aligned landmarks with EG3D's field of view -> :func:`~portrait3d.face.pose.camera_from_pose`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from portrait3d.errors import UsageError
from portrait3d.face.align import ALIGNERS, AlignedFace, apply_transform
from portrait3d.face.detect import Detection, FaceDetector, select_face
from portrait3d.face.io import load_image
from portrait3d.face.landmarks import LandmarkDetector
from portrait3d.face.models import ReleasesOnExit
from portrait3d.face.pose import (
    HeadPose,
    camera_from_pose,
    estimate_head_pose,
    estimate_head_pose_mesh,
    pose_confidence,
)

__all__ = ["FaceResult", "FacePipeline", "EG3D_FOV_DEG", "DEFAULT_SIZES"]

EG3D_FOV_DEG = 18.837
# Output size of each alignment style unless the caller asks for another.
DEFAULT_SIZES = {"ffhq": 1024, "eg3d": 512, "default": 128}


@dataclass
class FaceResult:
    """Everything the pipeline found for one face.

    Attributes:
        image: the loaded photo, ``uint8 [H, W, 3]`` RGB (EXIF orientation applied).
        detection: the chosen face box (largest unless ``face_index``); ``num_faces`` were found.
        landmarks: 68 iBUG points in photo pixels ``[68, 2]``.
        aligned: the aligned crop and its photo -> crop transform.
        pose: head pose of the aligned crop (degrees; see :mod:`portrait3d.face.pose`).
        camera: EG3D 25-d camera label of the aligned crop, float32 ``[25]``.
    """

    image: np.ndarray
    detection: Detection
    num_faces: int
    landmarks: np.ndarray
    aligned: AlignedFace
    pose: HeadPose
    camera: torch.Tensor


class FacePipeline(ReleasesOnExit):
    """Detection, landmarks, alignment and camera estimation with one policy for every tool.

    Args:
        style: ``'ffhq'``, ``'eg3d'`` or ``'default'`` (the crop portrait3d's default models use).
        output_size: aligned crop side in pixels (default per style, :data:`DEFAULT_SIZES`).
        detector: face detector backend (``'mediapipe'``, ``'dlib'``, ``'dlib-hog'``).
        landmarks: landmark backend (``'dlib'`` 68 points or ``'mediapipe'`` mesh mapped to 68).
    """

    def __init__(self, style: str = "default", output_size: int | None = None, detector: str = "mediapipe",
                 landmarks: str = "dlib") -> None:
        if style not in ALIGNERS:
            raise UsageError(f"unknown alignment style {style!r} (choose from {', '.join(ALIGNERS)})")
        self.style = style
        self.output_size = int(output_size or DEFAULT_SIZES[style])
        self.detector = FaceDetector(detector)
        self.landmarker = LandmarkDetector(landmarks)

    def __call__(self, photo: str | os.PathLike[str] | np.ndarray, face_index: int | None = None) -> FaceResult:
        """Process one photo (a path or an ``uint8 [H, W, 3]`` RGB array)."""
        image = photo if isinstance(photo, np.ndarray) else load_image(Path(photo))
        detections = self.detector.detect(image)
        face = select_face(detections, face_index)
        lm68 = self.landmarker.landmarks68(image, face)
        aligned = ALIGNERS[self.style](image, lm68, output_size=self.output_size)
        lm_aligned = aligned.landmarks if len(aligned.landmarks) == 68 else apply_transform(aligned.transform, lm68)
        size = aligned.image.shape[1], aligned.image.shape[0]
        pose = estimate_head_pose(lm_aligned, size, fov_deg=EG3D_FOV_DEG)
        return FaceResult(image=image, detection=face, num_faces=len(detections), landmarks=lm68, aligned=aligned,
                          pose=pose, camera=camera_from_pose(pose))

    def find_landmarks68(self, image: np.ndarray) -> np.ndarray | None:
        """The largest face's 68 iBUG landmarks ``[68, 2]`` (pixels) in ``image`` (uint8 ``[H, W, 3]``), or ``None``
        where no face is found: the measuring instrument for generated renders, which may have no face."""
        from portrait3d.face.errors import FaceError

        try:
            dets = self.detector.detect(image)
            return self.landmarker.landmarks68(image, select_face(dets)) if dets else None
        except FaceError:
            return None

    def pose_notes(self, face: FaceResult, name: str, disagree_deg: float = 15.0) -> list[str]:
        """Warnings about the head pose behind ``face.camera`` (``[]`` when there is nothing to say): MediaPipe's
        468-point mesh is fitted too (:func:`~portrait3d.face.pose.estimate_head_pose_mesh`, robust to profile
        views where the 68-point fit breaks down); a low-confidence mesh fit, a yaw beyond what the built-in
        generators were trained on, or a disagreement of more than ``disagree_deg`` with the 68-point yaw is
        reported. The camera itself stays the 68-point one (the shipped generators were trained on it)."""
        from portrait3d.face.errors import FaceError

        if getattr(self, "_mesh", None) is None:
            self._mesh = LandmarkDetector("mediapipe", refine_landmarks=False)
        try:
            mesh = np.asarray(self._mesh.detect(face.image, face.detection).points[:468, :2], np.float64)
        except FaceError:
            return [f"{name}: MediaPipe's face mesh found no face to check the head pose against"]
        mesh = apply_transform(face.aligned.transform, mesh)
        size = face.aligned.image.shape[1], face.aligned.image.shape[0]
        try:
            check = estimate_head_pose_mesh(mesh, size, fov_deg=EG3D_FOV_DEG)
        except UsageError:
            return [f"{name}: the head pose could not be checked against MediaPipe's face mesh"]
        ok, reasons = pose_confidence(check, float(np.ptp(mesh[:, 0])))
        notes = [f"{name}: head pose {r}" for r in reasons]
        if abs(check.yaw_deg - face.pose.yaw_deg) > disagree_deg:
            notes.append(f"{name}: the 68-point head yaw ({face.pose.yaw_deg:+.0f} deg) and the face mesh's "
                         f"({check.yaw_deg:+.0f} deg) disagree: the camera may be off (profile views break the "
                         "68-point fit)")
        if not ok and not notes:
            notes.append(f"{name}: low-confidence head pose")
        return notes

    def close(self) -> None:
        self.detector.close()
        self.landmarker.close()
        if getattr(self, "_mesh", None) is not None:
            self._mesh.close()



def face_landmarks68(face: Any) -> np.ndarray:
    """``[68, 2]`` float64 landmarks of a :class:`FacePipeline` result in its aligned crop (the aligned landmarks,
    or the photo's 68 points moved into the crop when those are fewer)."""
    lm = np.asarray(face.aligned.landmarks, np.float64)
    if len(lm) != 68:
        lm = apply_transform(face.aligned.transform, face.landmarks)
    return lm


def several_faces_note(face: Any, face_index: int | None, name: str) -> list[str]:
    """The one convention for photos with several faces: without ``face_index`` the largest is used, and the
    caller reports this note (``[]`` when there is nothing to say)."""
    n = int(getattr(face, "num_faces", 1))
    if n > 1 and face_index is None:
        return [f"{n} faces found in {name}: the largest was used (--face-index N chooses another, 0 = largest)"]
    return []


def compare_photos(photo_a: str | os.PathLike[str], photo_b: str | os.PathLike[str], backend: str = "port",
                   face_index_a: int | None = None, face_index_b: int | None = None,
                   detector: str = "mediapipe") -> dict[str, float | bool]:
    """Identity similarity of the chosen face in two photos (dlib's descriptor, 0.6 distance threshold).

    Args:
        backend: ``'port'`` (portrait3d's PyTorch port, differentiable) or ``'dlib'`` (reference).
    Returns:
        ``{'distance', 'cosine', 'threshold', 'same_person', 'notes'}``; ``notes`` says when a photo had several
        faces and the largest was used.
    """
    from portrait3d.face import identity as idm

    if backend not in ("port", "dlib"):
        raise UsageError(f"unknown identity backend {backend!r} (choose 'port' or 'dlib')")
    descriptors, notes = [], []
    with FaceDetector(detector) as det, LandmarkDetector("dlib") as lmk:
        for photo, index in ((photo_a, face_index_a), (photo_b, face_index_b)):
            image = load_image(Path(photo))
            try:
                dets = det.detect(image)
                lm68 = lmk.landmarks68(image, select_face(dets, index))
                if len(dets) > 1 and index is None:
                    notes.append(f"{len(dets)} faces found in {Path(photo).name}: the largest was used "
                                 "(--face-index-a/-b choose another, 0 = largest)")
            except ValueError as e:
                raise type(e)(f"{photo}: {e}") from None
            if backend == "dlib":
                descriptors.append(idm.dlib_descriptor(image, lm68))
            else:
                encoder = _identity_encoder()
                x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
                with torch.no_grad():
                    descriptors.append(encoder(x, lm68[None]).double().numpy()[0])
    a, b = descriptors
    distance = float(idm.descriptor_distance(a, b))
    return {"distance": distance, "cosine": float(idm.cosine_similarity(a, b)),
            "threshold": idm.SAME_PERSON_THRESHOLD, "same_person": distance < idm.SAME_PERSON_THRESHOLD, "notes": notes}


@functools.lru_cache(maxsize=1)
def _identity_encoder():
    """One :class:`IdentityEncoder` per process (parsing dlib's network takes ~0.2 s)."""
    from portrait3d.face.identity import IdentityEncoder

    return IdentityEncoder().eval()

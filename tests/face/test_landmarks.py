"""portrait3d.face.landmarks: dlib 68 points, MediaPipe mesh, mesh -> iBUG 68 mapping."""

from __future__ import annotations

import numpy as np
import pytest
from tests.conftest import shared_path

from portrait3d.face.errors import NoFaceError
from portrait3d.face.landmarks import (
    IBUG68_MIRROR,
    IBUG68_REGIONS,
    MESH_TO_IBUG68,
    FaceLandmarks,
    LandmarkDetector,
    five_points,
    mesh_to_ibug68,
)


@pytest.fixture(scope="module")
def obama():
    from portrait3d.face.detect import FaceDetector, select_face
    from portrait3d.face.io import load_image

    img = load_image(shared_path("data/portraits/face_recognition/examples/obama.jpg"))
    with FaceDetector() as det:
        face = select_face(det.detect(img))
    return img, face


@pytest.fixture(scope="module")
def mesh_landmarks(obama):
    img, face = obama
    with LandmarkDetector("mediapipe") as lmd:
        return lmd.detect(img, face)


def _check_ibug_layout(lm: np.ndarray) -> None:
    """Anatomical order of the 68 iBUG points in an upright frontal face."""
    r_eye, l_eye = lm[36:42].mean(0), lm[42:48].mean(0)
    assert r_eye[0] < l_eye[0]                      # subject's right eye on the image left
    assert lm[36, 0] < lm[39, 0] < lm[42, 0] < lm[45, 0]  # corners left to right
    assert lm[37, 1] < lm[41, 1] and lm[44, 1] < lm[46, 1]  # upper lid above lower lid
    assert lm[48, 0] < lm[51, 0] < lm[54, 0]        # mouth corners around the top centre
    assert lm[51, 1] < lm[62, 1] <= lm[66, 1] < lm[57, 1]  # outer top, inner, outer bottom
    assert max(r_eye[1], l_eye[1]) < lm[30, 1] < lm[51, 1] < lm[8, 1]  # eyes, nose, mouth, chin
    assert lm[19, 1] < lm[37, 1] and lm[24, 1] < lm[44, 1]  # brows above the eyes
    assert lm[0, 0] < lm[8, 0] < lm[16, 0] and lm[8, 1] == lm[:17, 1].max()
    assert lm[27, 1] < lm[28, 1] < lm[29, 1] < lm[30, 1]   # nose bridge downwards
    assert lm[31, 0] < lm[33, 0] < lm[35, 0]


def test_dlib_68_inside_box(obama) -> None:
    img, face = obama
    lm = LandmarkDetector("dlib").detect(img, face)
    assert isinstance(lm, FaceLandmarks) and lm.backend == "dlib" and lm.points3d is None
    pts = lm.points
    assert pts.shape == (68, 2) and pts.dtype == np.float64
    x0, y0, x1, y1 = face.box
    m = 0.1 * np.sqrt(face.area)
    assert np.all((pts[:, 0] > x0 - m) & (pts[:, 0] < x1 + m))
    assert np.all((pts[:, 1] > y0 - m) & (pts[:, 1] < y1 + m))
    _check_ibug_layout(pts)
    # a plain (x0, y0, x1, y1) box works too
    assert LandmarkDetector("dlib").landmarks68(img, face.box).shape == (68, 2)


def test_mediapipe_mesh(obama, mesh_landmarks: FaceLandmarks) -> None:
    img, face = obama
    lm = mesh_landmarks
    assert lm.backend == "mediapipe"
    assert lm.points.shape == (478, 2) and lm.points3d.shape == (478, 3)
    assert np.allclose(lm.points, lm.points3d[:, :2])
    x0, y0, x1, y1 = face.box
    s = np.sqrt(face.area)
    inner = lm.ibug68[17:]
    assert np.all((inner[:, 0] > x0 - 0.1 * s) & (inner[:, 0] < x1 + 0.1 * s))
    # z: the nose tip is nearer the camera (smaller z) than the ears' region
    z = lm.points3d[:, 2]
    assert z[4] < z[234] and z[4] < z[454]
    with LandmarkDetector("mediapipe", refine_landmarks=False) as lmd:
        assert lmd.detect(img, face).points.shape == (468, 2)


def test_mesh_to_ibug68_order_and_agreement(obama, mesh_landmarks: FaceLandmarks) -> None:
    img, face = obama
    m68 = mesh_landmarks.ibug68
    assert m68.shape == (68, 2)
    _check_ibug_layout(m68)
    d68 = LandmarkDetector("dlib").landmarks68(img, face)
    iod = np.linalg.norm(d68[36] - d68[45])
    err = np.linalg.norm(m68 - d68, axis=1) / iod
    assert err.mean() < 0.06
    for region in ("right_eye", "left_eye", "nose", "mouth_outer"):
        assert err[list(IBUG68_REGIONS[region])].mean() < 0.06, region


def test_mesh_to_ibug68_table() -> None:
    assert len(MESH_TO_IBUG68) == 68
    assert all(1 <= len(v) <= 2 and all(0 <= i < 468 for i in v) for v in MESH_TO_IBUG68)
    mesh = np.random.default_rng(0).random((478, 3))
    out = mesh_to_ibug68(mesh)
    assert out.shape == (68, 3)
    assert np.allclose(out[30], mesh[MESH_TO_IBUG68[30][0]])
    a, b = MESH_TO_IBUG68[36]
    assert np.allclose(out[36], 0.5 * (mesh[a] + mesh[b]))
    assert np.allclose(mesh_to_ibug68(mesh[:468, :2]), out[:, :2])
    assert mesh_to_ibug68(np.stack([mesh, mesh])).shape == (2, 68, 3)
    with pytest.raises(ValueError):
        mesh_to_ibug68(np.zeros((68, 2)))
    # the mirror permutation is an involution and keeps the midline
    mir = np.array(IBUG68_MIRROR)
    assert np.array_equal(mir[mir], np.arange(68))
    assert all(mir[i] == i for i in (8, 27, 28, 29, 30, 33, 51, 57, 62, 66))


def test_five_points() -> None:
    lm = np.zeros((68, 2))
    lm[36:42] = [[0, 0], [1, -1], [2, -1], [3, 0], [2, 1], [1, 1]]
    lm[42:48] = lm[36:42] + [10, 0]
    lm[30] = [6.5, 5]
    lm[48], lm[54] = [2, 9], [11, 9]
    five = five_points(lm)
    assert np.allclose(five, [[1.5, 0], [11.5, 0], [6.5, 5], [2, 9], [11, 9]])
    corners = five_points(lm, eyes="corners")
    assert np.allclose(corners[:2], [[1.5, 0], [11.5, 0]])
    with pytest.raises(ValueError):
        five_points(lm, eyes="pupils")


def test_mesh_on_a_faceless_region_raises(obama) -> None:
    img, _ = obama
    blank = np.full_like(img[:300, :300], 200)
    with LandmarkDetector("mediapipe") as lmd, pytest.raises(NoFaceError):
        lmd.detect(blank, (100.0, 100.0, 200.0, 200.0))


def test_bad_backend() -> None:
    with pytest.raises(ValueError):
        LandmarkDetector("face_alignment")

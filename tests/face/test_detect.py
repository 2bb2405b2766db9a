"""portrait3d.face.detect: detection backends, ordering and the face-selection policy."""

from __future__ import annotations

import numpy as np
import pytest
from tests.conftest import shared_path

from portrait3d.face.detect import Detection, FaceDetector, box_iou, select_face
from portrait3d.face.errors import NoFaceError

FR = "data/portraits/face_recognition/examples/"


@pytest.fixture(scope="module")
def detector():
    with FaceDetector() as det:
        yield det


def _load(rel: str) -> np.ndarray:
    from portrait3d.face.io import load_image

    return load_image(shared_path(rel))


def _det(box, score=0.9):
    return Detection(box=box, score=score, keypoints=None, backend="mediapipe")


def test_select_face_policy() -> None:
    small, big, mid = _det((0, 0, 10, 10)), _det((0, 0, 50, 50)), _det((0, 0, 20, 30))
    dets = [small, big, mid]
    assert select_face(dets) is big
    assert select_face(dets, 0) is big
    assert select_face(dets, 1) is mid
    assert select_face(dets, 2) is small
    with pytest.raises(NoFaceError, match="3 faces found"):
        select_face(dets, 3)
    with pytest.raises(NoFaceError, match="out of range"):
        select_face(dets, -1)
    with pytest.raises(NoFaceError, match="no face"):
        select_face([])
    with pytest.raises(NoFaceError, match="1 face found"):
        select_face([big], 1)


def test_box_iou() -> None:
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == pytest.approx(1.0)
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0


def test_bad_backend_and_input() -> None:
    with pytest.raises(ValueError):
        FaceDetector("opencv")
    with pytest.raises(ValueError):
        FaceDetector().detect(np.zeros((64, 64), np.uint8))


def test_obama_one_face(detector: FaceDetector) -> None:
    img = _load(FR + "obama.jpg")
    dets = detector.detect(img)
    assert len(dets) == 1
    d = dets[0]
    assert d.backend == "mediapipe" and 0.5 <= d.score <= 1.0
    x0, y0, x1, y1 = d.box
    h, w = img.shape[:2]
    assert 0.2 * w < x1 - x0 < 0.5 * w
    assert d.keypoints is not None and d.keypoints.shape == (6, 2)
    # eyes, nose and mouth keypoints lie in the box; the subject's right eye is on the image left
    inner = d.keypoints[:4]
    assert np.all((inner[:, 0] > x0) & (inner[:, 0] < x1) & (inner[:, 1] > y0) & (inner[:, 1] < y1))
    assert d.keypoints[0, 0] < d.keypoints[1, 0]
    assert d.keypoints[0, 1] < d.keypoints[2, 1] < d.keypoints[3, 1]


def test_two_people_largest_first_and_face_index(detector: FaceDetector) -> None:
    img = _load(FR + "two_people.jpg")
    dets = detector.detect(img)
    assert len(dets) == 2
    assert dets[0].area >= dets[1].area
    assert box_iou(dets[0].box, dets[1].box) == 0.0
    assert select_face(dets) is dets[0]
    assert select_face(dets, face_index=1) is dets[1]
    with pytest.raises(NoFaceError, match="2 faces found"):
        select_face(dets, face_index=2)


def test_blank_image_has_no_face() -> None:
    blank = np.full((200, 240, 3), 127, np.uint8)
    with FaceDetector(upsample=0) as det:  # with the dlib CNN fallback
        dets = det.detect(blank)
    assert dets == []
    with pytest.raises(NoFaceError):
        select_face(dets)


def test_dlib_faces_many(detector: FaceDetector) -> None:
    """dlib's example photos: several faces each, most labelled faces found."""
    import xml.etree.ElementTree as ET

    from portrait3d.face.io import load_image

    xml = shared_path("data/portraits/dlib_faces/testing_with_face_landmarks.xml")
    found = total = 0
    for image in ET.parse(xml).getroot().iter("image"):
        dets = detector.detect(load_image(xml.parent / image.get("file")))
        assert len(dets) >= 2
        for b in image.iter("box"):  # dlib boxes: inclusive pixel rectangles
            top, left = float(b.get("top")), float(b.get("left"))
            box = (left - 0.5, top - 0.5, left + float(b.get("width")) - 0.5,
                   top + float(b.get("height")) - 0.5)
            total += 1
            found += max(box_iou(d.box, box) for d in dets) >= 0.3
    assert total == 25 and found >= 0.9 * total
    bald = detector.detect(_load("data/portraits/dlib_faces/bald_guys.jpg"))
    assert len(bald) >= 10
    assert all(a.area >= b.area for a, b in zip(bald, bald[1:]))


def test_dlib_backends_agree_with_mediapipe(detector: FaceDetector) -> None:
    img = _load(FR + "obama_small.jpg")
    ref = detector.detect(img)[0]
    hog = FaceDetector("dlib-hog").detect(img)
    cnn = FaceDetector("dlib", upsample=0).detect(img)
    for dets, name in ((hog, "dlib-hog"), (cnn, "dlib")):
        assert len(dets) == 1 and dets[0].backend == name and dets[0].keypoints is None
        assert box_iou(dets[0].box, ref.box) > 0.4

"""portrait3d.face.align: transforms are exact, recipes give the documented framing, paste-back."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from tests.conftest import shared_path

from portrait3d.face.align import (
    ALIGNERS,
    DEFAULT_TEMPLATE,
    AlignedFace,
    align_default,
    align_eg3d,
    align_ffhq,
    apply_transform,
    ffhq_quad,
    paste_back,
    similarity_transform,
    warp_image,
)
from portrait3d.face.landmarks import five_points


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random colour texture (so sub-pixel misregistration shows as a clear error)."""
    rng = np.random.default_rng(seed)
    small = rng.random((max(h // 12, 2), max(w // 12, 2), 3)).astype(np.float32)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    img = (img - img.min()) / (img.max() - img.min())
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def _face68(cx: float, cy: float, iod: float, angle_deg: float = 0.0) -> np.ndarray:
    """Synthetic 68 landmarks: eyes, nose tip and mouth where a face has them (others filler)."""
    u = np.zeros((68, 2))
    u[:] = [0.0, 0.3]
    eye = np.array([[-0.25, 0], [-0.12, -0.07], [0.02, -0.07], [0.15, 0], [0.02, 0.06], [-0.12, 0.06]])
    u[36:42] = eye + [-0.45, 0]
    u[42:48] = eye * [-1, 1] + [0.45, 0]
    u[30] = [0.0, 0.45]
    u[48], u[54] = [-0.4, 0.85], [0.4, 0.85]
    a = np.deg2rad(angle_deg)
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return (u * iod) @ r.T + [cx, cy]


def _interior(transform: np.ndarray, src_shape, size: int, erode: int = 9) -> np.ndarray:
    """Aligned-image pixels whose source lies well inside the source photo."""
    cover = warp_image(np.ones(src_shape[:2], np.float32), transform, (size, size),
                       border="constant", interpolation="linear") > 0.999
    return cv2.erode(cover.astype(np.uint8), np.ones((erode, erode), np.uint8)) > 0


def _registration(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(mean abs difference inside mask, sub-pixel shift magnitude between a and b)."""
    diff = float(np.abs(a.astype(np.float32) - b.astype(np.float32))[mask].mean())
    ga = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY).astype(np.float32) * mask
    gb = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY).astype(np.float32) * mask
    (dx, dy), _ = cv2.phaseCorrelate(ga, gb)
    return diff, float(np.hypot(dx, dy))


# ------------------------------------------------------------------ geometry helpers
def test_similarity_transform_recovers_known_map() -> None:
    rng = np.random.default_rng(1)
    src = rng.random((5, 2)) * 100
    a, s, t = np.deg2rad(17), 1.7, np.array([12.0, -4.0])
    r = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    m = similarity_transform(src, src @ r.T + t)
    assert np.allclose(m[:2, :2], r) and np.allclose(m[:2, 2], t)
    # never a reflection
    mirrored = src * [-1, 1]
    m2 = similarity_transform(src, mirrored)
    assert np.linalg.det(m2[:2, :2]) > 0


def test_warp_image_identity_translation_and_reflect() -> None:
    img = _texture(50, 60)
    assert np.array_equal(warp_image(img, np.eye(3), (60, 50)), img)
    shift = np.array([[1.0, 0, 5], [0, 1.0, 0], [0, 0, 1]])  # content moves 5 px right
    out = warp_image(img, shift, (60, 50), border="reflect")
    assert np.array_equal(out[:, 5:], img[:, :-5])
    assert np.array_equal(out[:, :5], img[:, 5:0:-1])  # mirrored about column 0
    assert np.all(warp_image(img, shift, (60, 50), border="constant")[:, :5] == 0)
    # strong downscale is anti-aliased: a 1-px checkerboard becomes flat grey
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, 2)
    small = warp_image(checker, np.diag([0.125, 0.125, 1.0]) @ np.array(
        [[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1.0]]) - np.array([[0, 0, 0.5], [0, 0, 0.5], [0, 0, 0]]),
        (8, 8))
    assert np.abs(small.astype(float) - 127.5).max() < 20


# ------------------------------------------------------------------ recipes: transform exact
@pytest.mark.parametrize("recipe,kwargs,size", [
    ("ffhq", dict(output_size=256, transform_size=512), 256),
    ("ffhq", dict(output_size=64, transform_size=256), 64),  # shrink path (qsize >> 2 * 64)
    ("eg3d", dict(output_size=256), 256),
    ("default", dict(output_size=128), 128),
])
@pytest.mark.parametrize("where", ["centre", "border"])
def test_transform_describes_the_pixels(recipe: str, kwargs: dict, size: int, where: str) -> None:
    img = _texture(600, 700)
    cx, cy = (350.0, 300.0) if where == "centre" else (90.0, 120.0)  # border: crop leaves the photo
    lm = _face68(cx, cy, iod=110.0, angle_deg=12.0)
    face = ALIGNERS[recipe](img, lm, **kwargs)
    assert isinstance(face, AlignedFace) and face.recipe == recipe
    assert face.image.shape == (size, size, 3) and face.image.dtype == np.uint8
    assert face.image.flags.writeable
    assert np.allclose(face.transform @ face.inverse, np.eye(3), atol=1e-9)
    assert np.allclose(face.landmarks, apply_transform(face.transform, lm))
    # The recipe's own resampling and a direct warp by `transform` agree: no offset, little error.
    ref = warp_image(img, face.transform, (size, size), border="constant")
    # FFHQ's padding blur also softens a band inside the photo, 10% of the quad wide.
    erode = int(0.12 * size) | 1 if recipe == "ffhq" and where == "border" else 9
    mask = _interior(face.transform, img.shape, size, erode)
    assert mask.mean() > (0.5 if where == "centre" else 0.2)
    diff, shift = _registration(face.image, ref, mask)
    assert shift < 0.08, shift
    assert diff < 4.0, diff  # different resampling filters, same geometry


def test_ffhq_square_and_centre() -> None:
    img = _texture(500, 500)
    lm = _face68(250, 230, iod=90.0, angle_deg=-8.0)
    face = align_ffhq(img, lm, output_size=256, transform_size=256)
    c, x, y = ffhq_quad(lm)
    a = face.transform[:2, :2]
    assert np.isclose(a[0, 0], a[1, 1]) and np.isclose(a[0, 1], -a[1, 0])  # similarity
    corners = apply_transform(face.transform, np.stack([c - x - y, c + x - y, c - x + y, c + x + y]))
    assert np.allclose(corners, [[-0.5, -0.5], [255.5, -0.5], [-0.5, 255.5], [255.5, 255.5]], atol=1e-6)
    # eyes level and symmetric about the vertical centre line in the output
    eyes = np.stack([face.landmarks[36:42].mean(0), face.landmarks[42:48].mean(0)])
    assert abs(eyes[0, 1] - eyes[1, 1]) < 1e-6
    assert np.isclose(eyes.mean(0)[0], 127.5, atol=1e-6)


def test_default_lands_on_template() -> None:
    img = _texture(400, 400)
    s = 128
    target = DEFAULT_TEMPLATE * s - 0.5
    # 5 points that are an exact similarity of the template land on it exactly
    a = np.deg2rad(-20)
    r = 2.3 * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    lm5 = target @ r.T + [80, 60]
    face = align_default(img, lm5, output_size=s)
    assert np.allclose(face.landmarks, target, atol=1e-6)
    # realistic landmarks: a least-squares fit, within a few pixels
    lm68 = _face68(200, 180, iod=80.0, angle_deg=25.0)
    face = align_default(img, lm68, output_size=s)
    assert np.abs(apply_transform(face.transform, five_points(lm68)) - target).max() < 0.06 * s


def test_eg3d_five_and_68_points_agree_and_constants() -> None:
    img = _texture(500, 400)
    lm = _face68(200, 240, iod=100.0, angle_deg=10.0)
    a = align_eg3d(img, lm, output_size=128)
    b = align_eg3d(img, five_points(lm, eyes="corners"), output_size=128)
    assert np.allclose(a.transform, b.transform) and np.array_equal(a.image, b.image)
    # EG3D crops without rotation: the transform is a pure scale + translation.
    assert a.transform[0, 1] == 0 and a.transform[1, 0] == 0
    # and the face fills a stable share of the crop: eye distance ~ 0.30-0.40 of the side
    eyes = five_points(a.landmarks, eyes="corners")[:2]
    assert 0.25 < np.linalg.norm(eyes[0] - eyes[1]) / 128 < 0.45


def test_bad_landmarks() -> None:
    img = _texture(100, 100)
    with pytest.raises(ValueError):
        align_ffhq(img, np.zeros((5, 2)))
    with pytest.raises(ValueError):
        align_default(img, np.full((68, 2), np.nan))
    assert set(ALIGNERS) == {"ffhq", "eg3d", "default"}


# ------------------------------------------------------------------ paste back
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_paste_back_roundtrip(scale: float) -> None:
    img = _texture(360, 420, seed=3)
    lm = _face68(210, 170, iod=60.0, angle_deg=15.0)
    # choose the output size so the aligned crop has `scale` crop pixels per photo pixel
    size = int(round(scale * 60.0 / (DEFAULT_TEMPLATE[1, 0] - DEFAULT_TEMPLATE[0, 0])))
    face = align_default(img, lm, output_size=size)
    out = paste_back(img, face.image, face.transform, feather=0.1)
    assert out.shape == img.shape and out.dtype == np.uint8
    alpha = warp_image(np.ones((size, size), np.float32), face.inverse, (420, 360),
                       border="constant", interpolation="linear")
    inner = cv2.erode((alpha > 0.999).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    core = warp_image(np.pad(np.ones((int(size * 0.8),) * 2, np.float32), int(size * 0.1)),
                      face.inverse, (420, 360), border="constant", interpolation="linear") > 0.999
    assert core.sum() > 1000
    err = np.abs(out.astype(float) - img)[core]
    assert err.mean() < 2.0 and np.percentile(err, 99) < 12
    assert np.array_equal(out[alpha == 0], img[alpha == 0])  # untouched outside the crop
    assert inner.sum() > core.sum()


def test_paste_back_edited_and_resized() -> None:
    img = _texture(300, 300, seed=4)
    lm = _face68(150, 140, iod=50.0)
    face = align_default(img, lm, output_size=64)
    edited = np.zeros((128, 128, 3), np.uint8)  # a "generator" output at twice the crop size
    out = paste_back(img, edited, face.transform, feather=0.0, aligned_size=(64, 64))
    centre = np.round(apply_transform(face.inverse, [[31.5, 31.5]])[0]).astype(int)
    assert np.all(out[centre[1], centre[0]] == 0)
    far = out[:20, :20]
    assert np.array_equal(far, img[:20, :20])
    # a mask limits the edit to part of the crop
    mask = np.zeros((128, 128), np.float32)
    mask[:, :64] = 1.0
    out2 = paste_back(img, edited, face.transform, feather=0.0, aligned_size=(64, 64), mask=mask)
    right = np.round(apply_transform(face.inverse, [[56.0, 32.0]])[0]).astype(int)
    assert np.array_equal(out2[right[1], right[0]], img[right[1], right[0]])


# ------------------------------------------------------------------ real photo
def test_recipes_on_a_photo() -> None:
    from portrait3d.face.detect import FaceDetector, select_face
    from portrait3d.face.io import load_image
    from portrait3d.face.landmarks import LandmarkDetector

    img = load_image(shared_path("data/portraits/face_recognition/examples/obama.jpg"))
    with FaceDetector() as det:
        face = select_face(det.detect(img))
    lm = LandmarkDetector("dlib").landmarks68(img, face)
    ffhq = align_ffhq(img, lm, output_size=256, transform_size=1024)
    eyes = np.stack([ffhq.landmarks[36:42].mean(0), ffhq.landmarks[42:48].mean(0)]) / 256
    # FFHQ framing: eyes near (0.37, 0.47) and (0.63, 0.47) of the crop
    assert np.allclose(eyes, [[0.375, 0.47], [0.625, 0.47]], atol=0.04)
    eg3d = align_eg3d(img, lm)
    assert eg3d.image.shape == (512, 512, 3)
    default = align_default(img, lm)
    assert default.image.shape == (128, 128, 3)
    five = apply_transform(default.transform, five_points(lm))
    assert np.abs(five - (DEFAULT_TEMPLATE * 128 - 0.5)).max() < 6

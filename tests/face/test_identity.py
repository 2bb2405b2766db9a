"""Identity: dlib serialization reader, the PyTorch port of dlib's face ResNet vs dlib itself,
differentiable chip extraction, gradients, batching and the distance/similarity helpers."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import shared_path

from portrait3d.face.dlib_serialize import DlibReader, read_dlib_network
from portrait3d.face.identity import (
    SAME_PERSON_THRESHOLD,
    DlibFaceResNet,
    IdentityEncoder,
    cosine_similarity,
    descriptor_distance,
    dlib_descriptor,
    face_chip_details,
    face_chip_transform,
    load_dlib_network,
    same_person,
)
from portrait3d.face.models import dlib_model_path

dlib = pytest.importorskip("dlib")

# Face photos for the parity check: every detected face in these files (~20 faces). The deepface
# images include large faces (img49: 3 pyramid levels in dlib's chip extraction, img54: 2).
PHOTOS = (
    [f"face_recognition/examples/knn_examples/train/{p}" for p in (
        "alex_lacamoire/img1.jpg", "biden/biden.jpg", "biden/biden2.jpg", "kit_harington/john1.jpeg",
        "kit_harington/john2.jpeg", "obama/obama.jpg", "obama/obama2.jpg", "rose_leslie/img1.jpg",
        "rose_leslie/img2.jpg")]
    + [f"deepface/{p}" for p in ("img1.jpg", "img49.jpg", "img54.jpg", "img67.jpg", "couple.jpg")]
    + ["face_recognition/examples/two_people.jpg", "dlib_faces/2008_002506.jpg"]
)


@lru_cache(maxsize=None)
def _model() -> DlibFaceResNet:
    return DlibFaceResNet.from_dlib()


@lru_cache(maxsize=None)
def _dlib_tools():
    return (dlib.get_frontal_face_detector(), dlib.shape_predictor(str(dlib_model_path("shape_5"))))


def _load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _faces(rel: str):
    """(image uint8 RGB, [dlib 5-point shapes]) for a photo under ../shared/data/portraits.

    HOG detection runs on a copy downscaled to <= 1000 px (speed); the shape predictor runs on the
    full-resolution image, so the landmarks are what dlib itself would give for that box."""
    from PIL import Image

    img = _load_rgb(shared_path(f"data/portraits/{rel}"))
    detector, predictor = _dlib_tools()
    s = min(1.0, 1000 / max(img.shape[:2]))
    small = img if s == 1 else np.asarray(Image.fromarray(img).resize(
        (round(img.shape[1] * s), round(img.shape[0] * s)), Image.BILINEAR))
    boxes = [dlib.rectangle(*(round(v / s) for v in (d.left(), d.top(), d.right(), d.bottom())))
             for d in detector(small, 0)]
    return img, [predictor(img, b) for b in boxes]


def _points(shape) -> np.ndarray:
    return np.array([[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)], np.float64)


def _as_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()


# ---------------------------------------------------------------------------------------------
# (a) serialization reader
# ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _dat_bytes() -> bytes:
    return dlib_model_path("recognition").read_bytes()


def test_primitive_decoding():
    r = DlibReader(b"\x01\x96" b"\x81\x1c" b"\x00" b"\x02\x80\x12" b"\x03\x9a\x99\x99\x81\x18" b"10" b"\x01\x03abc")
    assert r.read_int() == 150
    assert r.read_int() == -28
    assert r.read_int() == 0
    assert r.read_int() == 0x1280
    assert r.read_float() == pytest.approx(0.6, abs=1e-6)
    assert r.read_bool() is True and r.read_bool() is False
    assert r.read_str() == "abc" and r.remaining == 0
    with pytest.raises(ValueError, match="truncated"):
        r.read_int()
    with pytest.raises(ValueError, match="control byte"):
        DlibReader(b"\x31").read_int()


def test_parse_real_model_file():
    net = load_dlib_network()
    assert net.loss.version == "loss_metric_2"
    assert net.loss.params["dist_thresh"] == pytest.approx(0.6, abs=1e-6)
    assert net.input.params["nr"] == net.input.params["nc"] == 150
    assert net.input.params["avg_rgb"] == pytest.approx([122.782, 117.001, 104.298], abs=1e-3)
    kinds = net.kinds()
    assert len(net.layers) == 108 and kinds.count("con") == 29 and kinds.count("tag") == 22
    assert kinds[:4] == ["con", "affine", "relu", "max_pool"] and kinds[-2:] == ["avg_pool", "fc"]
    assert net.layers[0].params["weight"].shape == (32, 3, 7, 7)
    assert net.layers[-1].params["weight"].shape == (256, 128) and net.layers[-1].params["bias"] is None


@pytest.mark.parametrize("cut", [0, 1, 5, 290, 400, 5000, 1_000_000, -4000, -1])
def test_truncated_file_raises(cut, tmp_path):
    data = _dat_bytes()
    p = tmp_path / "cut.dat"
    p.write_bytes(data[:cut])
    with pytest.raises(ValueError) as e:
        read_dlib_network(p)
    msg = str(e.value)
    assert "\n" not in msg and "cut.dat" in msg and ("truncated" in msg or "empty" in msg or "corrupt" in msg)


def test_corrupt_file_raises():
    data = bytearray(_dat_bytes())
    with pytest.raises(ValueError, match="trailing bytes"):
        read_dlib_network(bytes(data) + b"\x00")
    i = data.index(b"con_4")
    bad = data[:i] + b"cxn_4" + data[i + 5:]
    with pytest.raises(ValueError, match="unsupported layer record 'cxn_4'"):
        read_dlib_network(bytes(bad))
    with pytest.raises(ValueError):
        read_dlib_network(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="cannot read"):
        read_dlib_network("/nonexistent/model.dat")


# ---------------------------------------------------------------------------------------------
# (b) parity with dlib on real photos
# ---------------------------------------------------------------------------------------------

def test_network_matches_dlib_on_dlib_chip():
    img, shapes = _faces("face_recognition/examples/knn_examples/train/obama/obama.jpg")
    chip = dlib.get_face_chip(img, shapes[0], size=150, padding=0.25)
    rec = dlib.face_recognition_model_v1(str(dlib_model_path("recognition")))
    ref = np.asarray(rec.compute_face_descriptor(chip))
    with torch.no_grad():
        out = _model()(_as_tensor(chip))[0].double().numpy()
    np.testing.assert_allclose(out, ref, atol=2e-5)


def test_chip_details_match_dlib():
    img, shapes = _faces("deepface/couple.jpg")
    for s in shapes:
        ours, ref = face_chip_details(_points(s)), dlib.get_face_chip_details(s, 150, 0.25)
        r = ref.rect
        np.testing.assert_allclose(ours.rect, (r.left(), r.top(), r.right(), r.bottom()), atol=1e-3)
        assert ours.angle == pytest.approx(ref.angle, abs=1e-6)


def test_port_matches_dlib_on_real_photos():
    model = _model()
    encoder = IdentityEncoder(model)               # dlib-exact chips (8-bit truncation, STE)
    smooth = IdentityEncoder(model, quantize=False)  # no truncation: fully smooth chips
    cosines, n_faces = [], 0
    for rel in PHOTOS:
        img, shapes = _faces(rel)
        if not shapes:
            continue
        x = _as_tensor(img).expand(len(shapes), -1, -1, -1)
        pts = np.stack([_points(s) for s in shapes])
        with torch.no_grad():
            chips = encoder.chips(x, pts)
            ours = model(chips).double().numpy()
            ours_smooth = smooth(x, pts).double().numpy()
        for k, s in enumerate(shapes):
            ref = dlib_descriptor(img, s)
            dchip = dlib.get_face_chip(img, s, size=150, padding=0.25).astype(np.float64)
            diff = np.abs(chips[k].permute(1, 2, 0).numpy() - dchip)
            assert diff.mean() < 0.01, f"{rel} face {k}: chip differs from dlib.get_face_chip by {diff.mean():.3f}"
            c, c_smooth = cosine_similarity(ours[k], ref), cosine_similarity(ours_smooth[k], ref)
            assert c >= 0.999 and c_smooth >= 0.999, f"{rel} face {k}: cosine {c:.6f} / {c_smooth:.6f}"
            assert descriptor_distance(ours[k], ref) < 0.02
            cosines.append(c)
            n_faces += 1
    assert n_faces >= 18
    assert min(cosines) >= 0.9999


def test_68_point_landmarks():
    img, shapes = _faces("face_recognition/examples/knn_examples/train/obama/obama2.jpg")
    sp68 = dlib.shape_predictor(str(dlib_model_path("shape_68")))
    shape = sp68(img, shapes[0].rect)
    ref = dlib_descriptor(img, shape)
    with torch.no_grad():
        ours = IdentityEncoder(_model())(_as_tensor(img), _points(shape)[None])[0].double().numpy()
    assert cosine_similarity(ours, ref) >= 0.999


# ---------------------------------------------------------------------------------------------
# (c) gradients, (d) batching
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rel", ["face_recognition/examples/knn_examples/train/kit_harington/john2.jpeg",
                                 "face_recognition/examples/knn_examples/train/obama/obama2.jpg"])
def test_gradient_wrt_image(rel):
    img, shapes = _faces(rel)
    pts = _points(shapes[0])[None]
    encoder = IdentityEncoder(_model())
    with torch.no_grad():
        target = encoder(_as_tensor(img), pts)
    x = (_as_tensor(img) + torch.randn(1, 3, *img.shape[:2]) * 8).requires_grad_(True)
    loss = 1 - cosine_similarity(encoder(x, pts), target).mean()
    loss.backward()
    g = x.grad
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # the gradient lives around the face: the chip's footprint in the image
    t = face_chip_transform(pts[0])
    corners = t[:, :2] @ np.array([[0, 149, 0, 149], [0, 0, 149, 149]]) + t[:, 2:]
    x0, y0 = np.floor(corners.min(1)).astype(int) - 8
    x1, y1 = np.ceil(corners.max(1)).astype(int) + 8
    inside = g[..., max(y0, 0):y1, max(x0, 0):x1].abs().sum()
    assert inside / g.abs().sum() > 0.999


def test_batch_equals_singles():
    img, shapes = _faces("face_recognition/examples/two_people.jpg")
    assert len(shapes) == 2
    encoder = IdentityEncoder(_model())
    pts = np.stack([_points(s) for s in shapes])
    x = _as_tensor(img)
    with torch.no_grad():
        batch = encoder(x.expand(2, -1, -1, -1), pts)
        singles = torch.cat([encoder(x, pts[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(batch, singles, atol=1e-5, rtol=1e-5)
    assert descriptor_distance(batch[0], batch[1]) > SAME_PERSON_THRESHOLD  # two different people


def test_embed_aligned_and_shapes():
    model = _model()
    chips = torch.rand(3, 3, 150, 150) * 255
    with torch.no_grad():
        d = IdentityEncoder(model).embed_aligned(chips)
    assert d.shape == (3, 128) and d.dtype == torch.float32
    with pytest.raises(ValueError):
        model(torch.zeros(1, 150, 150))


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------

def test_metrics():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[1.0, 0.5], [0.0, -1.0]])
    np.testing.assert_allclose(cosine_similarity(a, b), [1 / np.sqrt(1.25), -1.0])
    np.testing.assert_allclose(descriptor_distance(a, b), [0.5, 3.0])
    assert same_person(a, b).tolist() == [True, False]
    ta, tb = torch.tensor(a), torch.tensor(b)
    torch.testing.assert_close(cosine_similarity(ta, tb), torch.tensor(cosine_similarity(a, b)))
    torch.testing.assert_close(descriptor_distance(ta, tb), torch.tensor([0.5, 3.0], dtype=torch.float64))
    assert SAME_PERSON_THRESHOLD == 0.6
    assert bool(same_person(np.zeros(128), np.full(128, 0.59 / np.sqrt(128))))

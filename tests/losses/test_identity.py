"""IdentityLoss: zero for the reference itself, gradients through pixels only, same person closer
than a different person, transform rescaling, and the non-differentiable similarity helper."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch
from tests.conftest import shared_path

from portrait3d.losses.identity import IdentityLoss, identity_similarity, rescale_transform

TRAIN = "data/portraits/face_recognition/examples/knn_examples/train"


pytestmark = pytest.mark.usefixtures("one_thread")


def _synthetic(size: int = 200, seed: int = 0):
    """A smooth random image in [-1, 1] and 68 made-up landmark points around its centre (any
    point set defines a chip transform: dlib's alignment is a least-squares similarity fit)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.interpolate(torch.rand(1, 3, size // 8, size // 8, generator=g), size=(size, size),
                                          mode="bicubic", align_corners=False) * 2 - 1
    rng = np.random.default_rng(seed)
    lm = rng.uniform(0.3 * size, 0.7 * size, (68, 2))
    return img.clamp(-1, 1), lm


@lru_cache(maxsize=None)
def _face(rel: str):
    """(image [1, 3, H, W] in [-1, 1], dlib 68 landmarks) of the largest face of a photo (<= 600 px)."""
    dlib = pytest.importorskip("dlib")
    from PIL import Image

    from portrait3d.face.models import dlib_model_path

    with Image.open(shared_path(f"{TRAIN}/{rel}")) as im:
        im = im.convert("RGB")
        s = min(1.0, 600 / max(im.size))
        if s < 1:
            im = im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.BILINEAR)
        arr = np.array(im)
    det = max(dlib.get_frontal_face_detector()(arr, 1), key=lambda r: r.area())
    shape = dlib.shape_predictor(str(dlib_model_path("shape_68")))(arr, det)
    lm = np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], np.float64)
    return torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 127.5 - 1, lm


def test_reference_itself_has_zero_loss():
    img, lm = _synthetic()
    loss = IdentityLoss(img, lm)
    out = loss(img)
    assert out.shape == (1,)
    assert out.abs().item() < 1e-5
    # batch-1 reference broadcasts
    assert loss(img.repeat(3, 1, 1, 1)).abs().max() < 1e-5


def test_gradient_flows_to_pixels_only():
    img, lm = _synthetic()
    loss = IdentityLoss(img, lm)
    x = (img + 0.3 * torch.randn(img.shape, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    value = loss(x)
    assert value.item() > 1e-4
    value.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.parameters())
    assert not loss.reference_embedding.requires_grad
    # a gradient step on the pixels lowers the loss
    with torch.no_grad():
        y = x - 0.01 * x.grad / x.grad.abs().max()
    assert loss(y).item() < value.item()


def test_fixed_transform_constructor_and_errors():
    img, lm = _synthetic()
    by_landmarks = IdentityLoss(img, lm)
    by_transform = IdentityLoss(img, transforms=by_landmarks.transforms)
    x = img.flip(3)
    torch.testing.assert_close(by_transform(x), by_landmarks(x))
    by_embedding = IdentityLoss(reference_embedding=by_landmarks.reference_embedding,
                                transforms=by_landmarks.transforms, image_size=img.shape[2:])
    torch.testing.assert_close(by_embedding(x), by_landmarks(x))
    with pytest.raises(ValueError, match="exactly one of"):
        IdentityLoss(img)
    with pytest.raises(ValueError, match="exactly one of"):
        IdentityLoss(img, lm, transforms=by_landmarks.transforms)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        by_landmarks(img[0])
    with pytest.raises(ValueError, match="2 images for 3"):
        IdentityLoss(img.repeat(3, 1, 1, 1), np.stack([lm] * 3))(img.repeat(2, 1, 1, 1))


def test_transform_follows_image_resizing():
    img, lm = _synthetic(size=160)
    loss = IdentityLoss(img, lm)
    big = torch.nn.functional.interpolate(img, scale_factor=2, mode="bicubic", align_corners=False)
    assert loss(big).item() < 0.02
    t = rescale_transform(loss.transforms, (160, 160), (320, 320))
    np.testing.assert_allclose(t[0, :, :2], 2 * loss.transforms[0, :, :2])


def test_same_person_closer_than_different_person():
    ref, ref_lm = _face("obama/obama.jpg")
    same, same_lm = _face("obama/obama2.jpg")
    other, other_lm = _face("biden/biden.jpg")
    loss = IdentityLoss(ref, ref_lm)
    assert loss(ref).abs().item() < 1e-5
    emb = loss.reference_embedding
    # the other photos are framed differently: their chips come from their own landmarks
    l_same = IdentityLoss(reference_embedding=emb, landmarks=same_lm, image_size=same.shape[2:])(same).item()
    l_other = IdentityLoss(reference_embedding=emb, landmarks=other_lm, image_size=other.shape[2:])(other).item()
    assert l_same < l_other
    assert l_same < 0.1 and l_other > 0.1
    sim_same = identity_similarity(ref, same, ref_lm, same_lm).item()
    sim_other = identity_similarity(ref, other, ref_lm, other_lm).item()
    assert sim_same > sim_other
    assert abs((1 - sim_same) - l_same) < 1e-4
    # uint8 arrays are accepted too
    u8 = ((ref[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    assert identity_similarity(u8, ref, ref_lm, ref_lm).item() > 0.999

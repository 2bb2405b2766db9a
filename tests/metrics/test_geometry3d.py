"""3D-geometry checks (:mod:`portrait3d.metrics.geometry3d`) on constructed cases and a tiny random EG3D."""

from __future__ import annotations

import math

import numpy as np
import pytest

from portrait3d.metrics.geometry3d import (
    YawTally,
    geometry_checks,
    homography_residual,
    mean_face_parallax,
    nose_nearer,
    yaw_slope,
)


def test_a_flat_picture_has_no_parallax_a_head_has_some():
    from portrait3d.face.pose import HeadPose, focal_from_fov, mean_face_68, project_points

    flat = mean_face_68().copy()
    flat[:, 2] = flat[:, 2].mean()  # a photo of the face held in front of the camera
    f = focal_from_fov(18.837, (128, 128))

    def view(pts, yaw):
        return project_points(pts, HeadPose.from_angles(yaw, 0, 0).rotation, np.array([0, 0, 2.7]), f, (128, 128))

    assert homography_residual(view(flat, 0), view(flat, 30)) < 1e-6  # a billboard is exactly a homography
    head = mean_face_parallax(30)
    assert head > 0.02 and mean_face_parallax(15) < head  # relief shows, more at larger turns
    assert mean_face_parallax(0) < 1e-9


def test_nose_nearer_reads_the_depth_at_the_landmarks():
    lm = np.zeros((68, 2))
    lm[30] = (32, 32)
    lm[2], lm[14] = (10, 32), (54, 32)
    depth = np.full((64, 64), 2.7)
    depth[28:36, 28:36] = 2.5  # the nose sticks out
    assert nose_nearer(depth, lm)
    assert not nose_nearer(np.full((64, 64), 2.7), lm)  # flat: not nearer
    assert not nose_nearer(5.2 - depth, lm)  # a hollow face


def test_yaw_slope():
    assert yaw_slope([-30, 0, 30], [-27, 0, 27]) == pytest.approx(0.9)
    assert yaw_slope([-30, 0, 30], [2, 1, 0]) == pytest.approx(-1 / 30)
    assert math.isnan(yaw_slope([0, 0], [1, 2]))


def test_yaw_tally_rates_and_means():
    t = YawTally((-30.0, 0.0, 30.0), detected={0.0: 4, 30.0: 1}, measured={0.0: [1.0, 3.0], 30.0: [25.0]})
    assert t.rates(4) == {-30.0: 0.0, 0.0: 1.0, 30.0: 0.25}
    m = t.mean_yaws()
    assert m[0.0] == 2.0 and m[30.0] == 25.0 and math.isnan(m[-30.0])  # no view measured at -30
    assert t.slope() == pytest.approx(yaw_slope([0, 0, 30], [1, 3, 25]))


@pytest.mark.usefixtures("one_thread")
def test_checks_run_on_a_tiny_generator(tiny_eg3d):
    rep = geometry_checks(tiny_eg3d, n=2, batch=2)
    assert set(rep.detection) == {-30.0, 0.0, 30.0} and all(0 <= v <= 1 for v in rep.detection.values())
    assert rep.parallax_mean_face[30.0] > 0.02
    d = rep.to_dict()
    assert d["n"] == 2 and "yaw_slope" in d
    with pytest.raises(ValueError):
        geometry_checks(tiny_eg3d, n=1, yaws=(-30.0, 30.0))

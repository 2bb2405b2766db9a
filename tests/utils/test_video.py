"""portrait3d.utils.video: H.264 MP4 writing and the EG3D orbit cameras."""

from __future__ import annotations

import numpy as np
import pytest

from portrait3d.utils.video import orbit_cameras, write_mp4


def test_write_mp4_roundtrip_odd_size(tmp_path):
    import imageio.v2 as imageio

    frames = np.zeros((7, 33, 47, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(7)[:, None, None] * 30  # a red ramp over time
    path = write_mp4(frames, tmp_path / "v.mp4", fps=10)
    assert path == tmp_path / "v.mp4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]  # no temporary file left
    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        meta = reader.get_meta_data()
        assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
        assert meta["size"] == (48, 34)  # padded to even sizes
        assert meta["fps"] == 10
        assert reader.count_frames() == 7
        last = reader.get_data(6)
    finally:
        reader.close()
    assert abs(float(last[..., 0].mean()) - 180) < 8  # colours survive the lossy encode


def test_write_mp4_refuses_to_overwrite_and_bad_input(tmp_path):
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    p = write_mp4(frames, tmp_path / "a.mp4")
    before = p.read_bytes()
    with pytest.raises(FileExistsError):
        write_mp4(frames, p)
    assert p.read_bytes() == before
    write_mp4(frames[:1], p, overwrite=True)
    with pytest.raises(ValueError):
        write_mp4(frames.astype(np.float32), tmp_path / "b.mp4")
    with pytest.raises(ValueError):
        write_mp4(frames[:0], tmp_path / "c.mp4")


def test_orbit_cameras():
    from portrait3d.networks.eg3d.camera import angles_from_camera, camera_from_angles

    c = orbit_cameras(8, yaw_range_deg=30, pitch_range_deg=10)
    assert c.shape == (8, 25)
    yaw, pitch, radius = angles_from_camera(c)
    assert np.allclose(yaw.numpy(), 30 * np.sin(2 * np.pi * np.arange(8) / 8), atol=1e-4)
    assert np.allclose(pitch.numpy(), 10 * np.cos(2 * np.pi * np.arange(8) / 8), atol=1e-4)
    assert np.allclose(radius.numpy(), 2.7, atol=1e-5)
    assert np.allclose(c[2].numpy(), camera_from_angles(30.0, 0.0).numpy(), atol=1e-5)
    with pytest.raises(ValueError):
        orbit_cameras(0)

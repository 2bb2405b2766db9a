"""MP4 writing (H.264 through the ffmpeg binary bundled with ``imageio-ffmpeg``) and orbit cameras.

:func:`write_mp4` writes ``uint8 [T, H, W, 3]`` frames as H.264 / yuv420p (plays in browsers and
every common player), padding odd sizes to even ones by repeating the last row / column, into a
temporary file that is renamed into place only once ffmpeg has finished: a reader never sees a
half-written video.

:func:`orbit_cameras` gives EG3D camera labels on the elliptical orbit of EG3D's
``gen_videos.py``: ``yaw = yaw_range * sin(2 pi t)``, ``pitch = pitch_range * cos(2 pi t)``, for
``t = i / n_frames``, in the true-angle convention of
:func:`portrait3d.networks.eg3d.camera.camera_from_angles` (positive yaw = head turned to its
left, positive pitch = head tilted up). Frame 0 is seen from straight ahead and slightly below
(pitch ``+pitch_range``); the orbit closes, so the video loops seamlessly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from portrait3d.errors import UsageError

__all__ = ["write_mp4", "orbit_cameras"]


def write_mp4(frames: np.ndarray, path: str | os.PathLike[str], fps: int = 24, crf: int = 18,
              overwrite: bool = False) -> Path:
    """Write ``uint8 [T, H, W, 3]`` RGB frames to an H.264 (yuv420p) MP4, atomically.

    Args:
        frames: ``uint8`` array (or sequence of ``[H, W, 3]`` arrays of one size), at least 1 frame.
        path: destination (``.mp4``).
        fps: frames per second.
        crf: x264 constant rate factor (0 lossless .. 51 worst; 18 is visually lossless).
        overwrite: replace an existing file (else :class:`FileExistsError`).
    Returns:
        The written path.
    """
    import imageio_ffmpeg

    from portrait3d.checkpoints.native import atomic_write

    arr = np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or len(arr) == 0:
        raise UsageError(f"write_mp4 expects uint8 frames [T, H, W, 3] with T >= 1, got {arr.dtype} {arr.shape}")
    if fps <= 0:
        raise UsageError(f"fps must be positive, got {fps}")
    t, h, w, _ = arr.shape
    if h % 2 or w % 2:  # yuv420p needs even sizes: repeat the last row / column
        arr = np.pad(arr, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        h, w = arr.shape[1:3]

    def write(tmp: str) -> None:
        gen = imageio_ffmpeg.write_frames(
            tmp, (w, h), fps=fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p", quality=None,
            macro_block_size=1, ffmpeg_log_level="error",
            output_params=["-crf", str(int(crf)), "-preset", "medium", "-movflags", "+faststart", "-f", "mp4"])
        gen.send(None)  # start ffmpeg
        try:
            for frame in arr:
                gen.send(np.ascontiguousarray(frame).tobytes())
        finally:
            gen.close()  # waits for ffmpeg to finish the file

    return atomic_write(path, write, overwrite=overwrite)


def orbit_cameras(n_frames: int, yaw_range_deg: float = 35.0, pitch_range_deg: float = 10.0,
                  radius: float = 2.7, fov_deg: float = 18.837,
                  pivot: tuple[float, float, float] = (0.0, 0.0, 0.2)) -> torch.Tensor:
    """EG3D camera labels ``[n_frames, 25]`` on a closed elliptical orbit (see module docstring).

    Args:
        n_frames: number of frames (cameras), >= 1.
        yaw_range_deg: yaw amplitude in degrees.
        pitch_range_deg: pitch amplitude in degrees.
        radius, fov_deg, pivot: as :func:`~portrait3d.networks.eg3d.camera.camera_from_angles`.
    """
    from portrait3d.networks.eg3d.camera import camera_from_angles

    if n_frames < 1:
        raise UsageError(f"n_frames must be >= 1, got {n_frames}")
    t = torch.arange(n_frames, dtype=torch.float64) / n_frames
    yaw = yaw_range_deg * torch.sin(2 * math.pi * t)
    pitch = pitch_range_deg * torch.cos(2 * math.pi * t)
    return camera_from_angles(yaw, pitch, radius=radius, fov_deg=fov_deg, pivot=pivot)

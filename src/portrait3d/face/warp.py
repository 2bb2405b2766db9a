"""Affine image geometry shared by alignment and landmarking: point transforms and anti-aliased warps.

Convention: transforms are ``[3, 3]`` matrices acting on pixel coordinates ``(x, y, 1)`` where pixel centres are at
integer positions (OpenCV's convention), source -> output.
"""

from __future__ import annotations

import math

import numpy as np

from portrait3d.errors import UsageError

__all__ = ["apply_transform", "similarity_transform", "warp_image"]


def apply_transform(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 3x3 affine (or 2x3) transform to ``[..., 2]`` points (pixels)."""
    t = np.asarray(transform, dtype=np.float64)
    pts = np.asarray(points, dtype=np.float64)
    return pts @ t[:2, :2].T + t[:2, 2]


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection).

    Umeyama's closed form: the 3x3 matrix ``M`` minimising ``sum |M src_i - dst_i|^2``.

    Args:
        src, dst: ``[N, 2]`` corresponding points, ``N >= 2``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    var = (s0 ** 2).sum() / len(src)
    if var <= 0:
        raise UsageError("degenerate landmarks (all points coincide)")
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    r = u @ np.diag(d) @ vt
    scale = (sig * d).sum() / var
    m = np.eye(3)
    m[:2, :2] = scale * r
    m[:2, 2] = mu_d - scale * r @ mu_s
    return m


def _pixel_scale(out_size: int, in_size: int) -> np.ndarray:
    """Exact pixel-centre mapping of a resize from ``in_size`` to ``out_size`` pixels (1 axis)."""
    r = out_size / in_size
    return np.array([r, 0.5 * r - 0.5])


def _scale_matrix(sx: float, sy: float, tx: float = 0.0, ty: float = 0.0) -> np.ndarray:
    return np.array([[sx, 0.0, tx], [0.0, sy, ty], [0.0, 0.0, 1.0]])


def _resize_matrix(in_wh: tuple[int, int], out_wh: tuple[int, int]) -> np.ndarray:
    """Pixel coordinates of an image -> pixel coordinates of it resized to ``out_wh``."""
    ax = _pixel_scale(out_wh[0], in_wh[0])
    ay = _pixel_scale(out_wh[1], in_wh[1])
    return _scale_matrix(ax[0], ay[0], ax[1], ay[1])


_BORDERS = {"reflect": "reflect", "constant": "constant", "replicate": "edge"}


def _roi_with_border(image: np.ndarray, x0: int, y0: int, x1: int, y1: int,
                     border: str) -> np.ndarray:
    """``image[y0:y1, x0:x1]`` where out-of-image parts are filled per ``border``.

    ``'reflect'`` mirrors about the edge pixel (``d c b | a b c d`` -> OpenCV REFLECT_101).
    """
    h, w = image.shape[:2]
    # The part inside the image (at least one pixel, so there is something to mirror) ...
    cx0 = min(max(x0, 0), w - 1)
    cx1 = min(max(x1, cx0 + 1), w)
    cy0 = min(max(y0, 0), h - 1)
    cy1 = min(max(y1, cy0 + 1), h)
    roi = image[cy0:cy1, cx0:cx1]
    # ... padded out to cover [min(x0, cx0), max(x1, cx1)), then cut to [x0, x1).
    ox, oy = min(x0, cx0), min(y0, cy0)
    pads = ((cy0 - oy, max(y1, cy1) - cy1), (cx0 - ox, max(x1, cx1) - cx1))
    if any(p for pair in pads for p in pair):
        mode = _BORDERS[border]
        if mode == "reflect" and (roi.shape[0] < 2 or roi.shape[1] < 2):
            mode = "edge"
        roi = np.pad(roi, pads + ((0, 0),) * (image.ndim - 2), mode=mode)
    roi = roi[y0 - oy: y1 - oy, x0 - ox: x1 - ox]
    return roi


def warp_image(
    image: np.ndarray,
    transform: np.ndarray,
    size: tuple[int, int],
    *,
    border: str = "reflect",
    interpolation: str = "cubic",
    antialias: bool = True,
) -> np.ndarray:
    """Resample ``image`` under an affine map, with anti-aliasing when it shrinks.

    Args:
        image: ``[H, W]`` or ``[H, W, C]`` (``C <= 4``), ``uint8`` or ``float32``.
        transform: ``[3, 3]`` (or ``[2, 3]``): source pixel ``(x, y, 1)`` -> output pixel.
        size: output ``(width, height)``.
        border: outside the source: ``'reflect'`` (mirror about the edge pixel, like
            OpenCV ``BORDER_REFLECT_101`` / ``np.pad(mode='reflect')``), ``'constant'`` (zeros)
            or ``'replicate'``.
        interpolation: ``'cubic'``, ``'linear'`` or ``'nearest'``.
        antialias: when the map shrinks by more than 2x, first box-filter the source
            (``cv2.INTER_AREA``) by an integer factor so no source pixel is skipped.

    Only the source region the output needs is read, so warping a small crop out of a very
    large photo costs about the crop's size, not the photo's.

    Returns:
        ``[height, width(, C)]`` array of ``image``'s dtype.
    """
    import cv2

    if border not in _BORDERS:
        raise UsageError(f"border must be one of {tuple(_BORDERS)}, got {border!r}")
    flags = {"cubic": cv2.INTER_CUBIC, "linear": cv2.INTER_LINEAR,
             "nearest": cv2.INTER_NEAREST}[interpolation]
    m = np.eye(3)
    m[:2] = np.asarray(transform, dtype=np.float64)[:2]
    out_w, out_h = int(size[0]), int(size[1])
    inv = np.linalg.inv(m)
    corners = np.array([[-0.5, -0.5], [out_w - 0.5, -0.5], [-0.5, out_h - 0.5],
                        [out_w - 0.5, out_h - 0.5]])
    src = apply_transform(inv, corners)
    scale = math.sqrt(abs(np.linalg.det(m[:2, :2])))  # output pixels per source pixel
    margin = int(math.ceil(3.0 / min(scale, 1.0))) + 2
    x0 = int(math.floor(src[:, 0].min())) - margin
    y0 = int(math.floor(src[:, 1].min())) - margin
    x1 = int(math.ceil(src[:, 0].max())) + margin + 1
    y1 = int(math.ceil(src[:, 1].max())) + margin + 1
    roi = _roi_with_border(np.asarray(image), x0, y0, x1, y1, border)
    m = m @ _scale_matrix(1.0, 1.0, x0, y0)  # ROI pixel -> source pixel -> output
    if antialias and scale < 0.5:
        f = int(math.floor(1.0 / scale))
        rh, rw = roi.shape[:2]
        sw, sh = max(1, round(rw / f)), max(1, round(rh / f))
        roi = cv2.resize(roi, (sw, sh), interpolation=cv2.INTER_AREA)
        m = m @ np.linalg.inv(_resize_matrix((rw, rh), (sw, sh)))
    cv_border = {"reflect": cv2.BORDER_REFLECT_101, "constant": cv2.BORDER_CONSTANT,
                 "replicate": cv2.BORDER_REPLICATE}[border]
    out = cv2.warpAffine(np.ascontiguousarray(roi), m[:2], (out_w, out_h), flags=flags,
                         borderMode=cv_border, borderValue=0)
    if out.ndim == 2 and np.asarray(image).ndim == 3:
        out = out[..., None]
    return out

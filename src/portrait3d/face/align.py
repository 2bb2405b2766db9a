"""Face alignment recipes (FFHQ, EG3D in-the-wild, our default) and pasting results back.

Every recipe returns an :class:`AlignedFace` whose ``transform`` is the exact 3x3 matrix taking
original-image pixel coordinates to aligned-image pixel coordinates (homogeneous ``(x, y, 1)``
column vectors; pixel centres at integers, as everywhere in :mod:`portrait3d.face`)::

    aligned_xy = apply_transform(face.transform, original_xy)

so landmarks, masks and edits can move between the photo and the aligned crop, and
:func:`paste_back` can put an edited crop back into the photo.

Recipes (``ALIGNERS``):

* ``'ffhq'`` -- :func:`align_ffhq`: the FFHQ recipe (NVlabs/ffhq-dataset
  ``recreate_aligned_images``), used by StyleGAN 1-3, e4e, PTI: an oriented square from the eye
  and mouth positions, with FFHQ's shrink / crop / reflect-pad-and-blur / quad-transform
  pipeline, 1024 px.
* ``'eg3d'`` -- :func:`align_eg3d`: EG3D's in-the-wild crop (NVlabs/eg3d
  ``dataset_preprocessing/ffhq/crop_images_in_the_wild.py``): Deep3DFaceRecon's 5-point
  ``align_img`` (POS fit to the BFM 5-point template, ``target_size=1024``,
  ``rescale_factor=300``), the central 700 px, resized to 512. No rotation: EG3D leaves roll
  to the camera pose.
* ``'default'`` -- :func:`align_default`: the crop our default models are trained on, matching
  the UTKFace crops (128 px): a least-squares similarity to :data:`DEFAULT_TEMPLATE`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from portrait3d.errors import UsageError
from portrait3d.face.landmarks import five_points
from portrait3d.face.warp import (
    _resize_matrix,
    _roi_with_border,
    _scale_matrix,
    apply_transform,
    similarity_transform,
    warp_image,
)

__all__ = [
    "ALIGNERS",
    "AlignedFace",
    "DEFAULT_TEMPLATE",
    "LM3D_STD",
    "align_default",
    "align_eg3d",
    "align_ffhq",
    "apply_transform",
    "default_transform",
    "eg3d_crop_params",
    "feather_mask",
    "ffhq_quad",
    "paste_back",
    "similarity_transform",
    "warp_image",
]

# Mean positions of the 5 points (right-eye centre, left-eye centre, nose tip, right and left
# mouth corners; eye centre = mean of its 6 iBUG contour points) in the UTKFace crops, in
# normalised image coordinates: 0 and 1 are the crop's outer edges, so a point at pixel centre
# p of a 200 px crop is (p + 0.5) / 200. Measured by bench/measure_utkface_template.py
# (--n 1000 --seed 0) on 1000 random UTKFace photos with the default pipeline (BlazeFace box
# -> dlib 68 points), all 1000 landmarked; per-coordinate standard deviation 0.013-0.039 (the
# nose and mouth vary with head pose); the MediaPipe-mesh estimate agrees within 0.008.
DEFAULT_TEMPLATE = np.array([
    [0.29948, 0.30077],   # right-eye centre (image left)
    [0.68519, 0.30069],   # left-eye centre
    [0.49259, 0.51071],   # nose tip (iBUG 30)
    [0.31726, 0.69211],   # right mouth corner (iBUG 48)
    [0.66794, 0.69190],   # left mouth corner (iBUG 54)
])
"""Default-alignment 5-point template, normalised to [0, 1] (see the comment above)."""

LM3D_STD = np.array([
    [-0.31148657, 0.29036078, 0.13377953],
    [0.30979887, 0.28972036, 0.13179526],
    [0.0032535, -0.04617932, 0.55244243],
    [-0.25216928, -0.38133916, 0.22405732],
    [0.2484662, -0.38128236, 0.22235769],
])
"""Deep3DFaceRecon's 5-point 3D template (BFM ``similarity_Lm3D_all.mat`` through ``load_lm3d``):
eye centres, nose tip, mouth corners; x right, y up, in BFM decimetres."""


@dataclass(frozen=True)
class AlignedFace:
    """An aligned face crop.

    Attributes:
        image: ``uint8 [S, S, 3]`` aligned RGB crop.
        transform: ``[3, 3]`` float64, original pixel ``(x, y, 1)`` -> aligned pixel.
        inverse: ``[3, 3]``, aligned -> original (``np.linalg.inv(transform)``).
        landmarks: the landmarks passed in, in aligned coordinates ``[K, 2]``.
        recipe: ``'ffhq'``, ``'eg3d'`` or ``'default'``.
    """

    image: np.ndarray
    transform: np.ndarray
    inverse: np.ndarray
    landmarks: np.ndarray
    recipe: str


# ---------------------------------------------------------------------------- geometry helpers
def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise UsageError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
    return image


def _check_landmarks(landmarks: np.ndarray, allowed: tuple[int, ...]) -> np.ndarray:
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.ndim != 2 or lm.shape[1] < 2 or lm.shape[0] not in allowed:
        raise UsageError(f"expected landmarks [{' or '.join(map(str, allowed))}, 2], got {lm.shape}")
    if not np.all(np.isfinite(lm[:, :2])):
        raise UsageError("landmarks contain NaN or infinity")
    return lm[:, :2]


def _finish(image: np.ndarray, transform: np.ndarray, lm: np.ndarray, recipe: str) -> AlignedFace:
    image = np.asarray(image)
    if not (image.flags.writeable and image.flags.c_contiguous):
        image = np.array(image, order="C")  # Pillow arrays are read-only
    return AlignedFace(image=image, transform=transform,
                       inverse=np.linalg.inv(transform), landmarks=apply_transform(transform, lm),
                       recipe=recipe)


# ---------------------------------------------------------------------------- FFHQ
def ffhq_quad(lm68: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FFHQ's oriented square: centre ``c`` and half-axes ``x`` (rightwards), ``y`` (downwards).

    The square's corners are ``c -+ x -+ y``; its side is ``2 |x|``.
    """
    lm = np.asarray(lm68, dtype=np.float64)
    eye_l = lm[36:42].mean(0)  # image-left eye
    eye_r = lm[42:48].mean(0)
    eye_avg = 0.5 * (eye_l + eye_r)
    eye_to_eye = eye_r - eye_l
    mouth_avg = 0.5 * (lm[48] + lm[54])
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * np.array([-1.0, 1.0])
    x = x / np.hypot(*x)
    x = x * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * np.array([-1.0, 1.0])
    c = eye_avg + eye_to_mouth * 0.1
    return c, x, y


def align_ffhq(
    image: np.ndarray,
    landmarks: np.ndarray,
    output_size: int = 1024,
    transform_size: int = 4096,
    enable_padding: bool = True,
) -> AlignedFace:
    """FFHQ alignment (StyleGAN / e4e / PTI).

    Steps, as in ``recreate_aligned_images``: the oriented square from the eyes (mean of the 6
    contour points each) and mouth corners; *shrink* the photo by an integer factor with
    Lanczos when the square is over twice ``output_size``; *crop* to the square plus a 10%
    border; *pad* by reflection where the square leaves the photo (at least 30% of its size),
    blur the padding (sigma 2% of the size) and fade it to the median colour; sample the square
    bilinearly at ``transform_size`` and Lanczos-resize to ``output_size``.

    The pixels are FFHQ's (identical on our tests, up to 1 grey level where the padding blur
    runs: we blur with OpenCV, mirror border as scipy's default, instead of scipy). FFHQ moves
    the quad through the shrink as ``p / shrink``, while the resize really maps pixel centres
    as ``(p + 0.5) * new / old - 0.5``; ``transform`` follows what the pixels went through
    (the exact resize map, then the crop and pad offsets, then the quad), so it is exact, and
    when a shrink happens the landmarks land up to ``(shrink - 1) / 2`` working pixels (about
    0.1-0.2 output pixels) away from where the quad alone would put them.

    Args:
        image: ``uint8 [H, W, 3]`` RGB.
        landmarks: ``[68, 2]`` iBUG points.
        output_size: side of the result (FFHQ: 1024; e4e / PTI use 256 with
            ``transform_size=256``).
        transform_size: size of the intermediate bilinear resampling (FFHQ: 4096).
        enable_padding: reflect-pad and blur outside the photo (else black).
    """
    image = _check_image(image)
    lm = _check_landmarks(landmarks, (68,))
    c, x, y = ffhq_quad(lm)
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])  # NW, SW, SE, NE
    qsize = float(np.hypot(*x) * 2)

    img = Image.fromarray(image)
    g = np.eye(3)  # original pixel -> working-image pixel, exactly
    q = quad.copy()  # the quad in working-image pixels, as FFHQ computes it
    shrink = int(math.floor(qsize / output_size * 0.5))
    if shrink > 1:
        rsize = (int(np.rint(float(img.size[0]) / shrink)), int(np.rint(float(img.size[1]) / shrink)))
        g = _resize_matrix(img.size, rsize) @ g
        img = img.resize(rsize, Image.Resampling.LANCZOS)
        q = q / shrink
        qsize /= shrink

    border = max(int(np.rint(qsize * 0.1)), 3)
    crop = (int(np.floor(q[:, 0].min())), int(np.floor(q[:, 1].min())),
            int(np.ceil(q[:, 0].max())), int(np.ceil(q[:, 1].max())))
    crop = (max(crop[0] - border, 0), max(crop[1] - border, 0),
            min(crop[2] + border, img.size[0]), min(crop[3] + border, img.size[1]))
    if crop[2] - crop[0] < img.size[0] or crop[3] - crop[1] < img.size[1]:
        img = img.crop(crop)
        q = q - np.array(crop[:2], dtype=np.float64)
        g = _scale_matrix(1.0, 1.0, -crop[0], -crop[1]) @ g

    pad = (int(np.floor(q[:, 0].min())), int(np.floor(q[:, 1].min())),
           int(np.ceil(q[:, 0].max())), int(np.ceil(q[:, 1].max())))
    pad = (max(-pad[0] + border, 0), max(-pad[1] + border, 0),
           max(pad[2] - img.size[0] + border, 0), max(pad[3] - img.size[1] + border, 0))
    if enable_padding and max(pad) > border - 4:
        import cv2

        pad = tuple(np.maximum(pad, int(np.rint(qsize * 0.3))).tolist())
        arr = np.pad(np.asarray(img, dtype=np.float32),
                     ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), mode="reflect")
        h, w, _ = arr.shape
        yy, xx = np.ogrid[:h, :w]
        xx = xx.astype(np.float32)
        yy = yy.astype(np.float32)
        mask = np.maximum(1.0 - np.minimum(xx / pad[0], (w - 1 - xx) / pad[2]),
                          1.0 - np.minimum(yy / pad[1], (h - 1 - yy) / pad[3]))[..., None]
        blur = qsize * 0.02
        blurred = cv2.GaussianBlur(arr, (0, 0), sigmaX=blur, sigmaY=blur,
                                   borderType=cv2.BORDER_REFLECT)
        arr += (blurred - arr) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
        arr += (np.median(arr, axis=(0, 1)) - arr) * np.clip(mask, 0.0, 1.0)
        img = Image.fromarray(np.uint8(np.clip(np.rint(arr), 0, 255)), "RGB")
        q = q + np.array(pad[:2], dtype=np.float64)
        g = _scale_matrix(1.0, 1.0, pad[0], pad[1]) @ g

    img = img.transform((transform_size, transform_size), Image.Transform.QUAD,
                        tuple((q + 0.5).flatten().tolist()), Image.Resampling.BILINEAR)
    if output_size != transform_size:
        img = img.resize((output_size, output_size), Image.Resampling.LANCZOS)

    # Pillow's QUAD samples working pixel q0 + B u for output u = (o + 0.5) / O in [0, 1]^2,
    # B = [NE - NW, SW - NW] (exactly affine: the quad is a parallelogram); the Lanczos resize
    # keeps u. So output pixel o = O B^-1 (p_w - q0) - 0.5, and transform = that after g.
    basis = np.stack([q[3] - q[0], q[1] - q[0]], axis=1)
    a = output_size * np.linalg.inv(basis)
    out_map = np.eye(3)
    out_map[:2, :2] = a
    out_map[:2, 2] = -a @ q[0] - 0.5
    transform = out_map @ g
    return _finish(np.asarray(img), transform, lm, "ffhq")


# ---------------------------------------------------------------------------- EG3D
def _pos(xp: np.ndarray, x3: np.ndarray) -> tuple[np.ndarray, float]:
    """Deep3DFaceRecon's ``POS``: affine camera fit of 3D points ``x3 [N,3]`` to ``xp [N,2]``.

    Returns the translation ``t`` (image position of the 3D origin) and the mean scale ``s``.
    """
    n = len(xp)
    a = np.zeros((2 * n, 8))
    a[0::2, 0:3] = x3
    a[0::2, 3] = 1.0
    a[1::2, 4:7] = x3
    a[1::2, 7] = 1.0
    b = xp.reshape(2 * n)
    k = np.linalg.lstsq(a, b, rcond=None)[0]
    s = 0.5 * (np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7]))
    return np.array([k[3], k[7]]), float(s)


def eg3d_crop_params(landmarks: np.ndarray, image_size: tuple[int, int],
                     output_size: int = 512) -> tuple[np.ndarray, dict[str, float]]:
    """The EG3D in-the-wild crop as a transform (no pixels touched).

    Returns ``(transform, info)``: the 3x3 original -> output pixel map, and the intermediate
    quantities of ``align_img`` / ``crop_images_in_the_wild`` (``s``, ``t``, resized size, crop
    offsets) for inspection.
    """
    lm = _check_landmarks(landmarks, (5, 68))
    lm5 = five_points(lm, eyes="corners") if len(lm) == 68 else lm
    w0, h0 = image_size
    target_size, rescale_factor, center_crop_size = 1024.0, 300.0, 700
    # crop_images_in_the_wild.py flips y (lm[:, 1] = H - 1 - y) before align_img's POS fit.
    flipped = np.stack([lm5[:, 0], h0 - 1 - lm5[:, 1]], axis=1)
    t, s_pos = _pos(flipped, LM3D_STD)
    s = rescale_factor / s_pos
    w, h = int(w0 * s), int(h0 * s)
    left = int(w / 2 - target_size / 2 + float((t[0] - w0 / 2) * s))
    up = int(h / 2 - target_size / 2 + float((h0 / 2 - t[1]) * s))
    cx = int(target_size / 2 - center_crop_size / 2)  # 162
    r = output_size / center_crop_size
    # original pixel -> continuous (+0.5) -> resized (x w/w0) -> crop -> output -> pixel (-0.5)
    transform = _scale_matrix(r * w / w0, r * h / h0,
                              r * (0.5 * w / w0 - left - cx) - 0.5,
                              r * (0.5 * h / h0 - up - cx) - 0.5)
    info = {"s": s, "tx": float(t[0]), "ty": float(t[1]), "resized_w": w, "resized_h": h,
            "left": left + cx, "up": up + cx, "crop": center_crop_size}
    return transform, info


def align_eg3d(
    image: np.ndarray,
    landmarks: np.ndarray,
    output_size: int = 512,
    border: str = "reflect",
) -> AlignedFace:
    """EG3D's in-the-wild crop (``crop_images_in_the_wild.py`` + Deep3DFaceRecon ``align_img``).

    With 68 landmarks the 5 points are Deep3DFaceRecon's ``extract_5p`` (eye centre = midpoint
    of the two eye corners, nose tip 30, mouth corners 48 / 54); 5 points are used as given
    (right eye, left eye, nose, right and left mouth corner, image-left first).

    Pipeline and constants as EG3D: POS fit of the 5 points (y flipped) to the BFM 5-point
    template :data:`LM3D_STD` gives translation ``t`` and scale ``s``; the photo is scaled by
    ``300 / s`` (bicubic), a 1024 px window is cut around ``t``, its central 700 px are
    Lanczos-resized to ``output_size`` (512). The resampling is the same Pillow chain
    (bicubic, then Lanczos) applied to just the region needed.

    Deviations: EG3D's 5 points come from MTCNN (eye points near the pupils); ours from the
    68 landmarks as Deep3DFaceRecon's own ``extract_5p`` makes them. The crop needs only the 5
    points -- Deep3DFaceRecon's network is used by EG3D only for the camera pose (see
    ``portrait3d.face.pose``). Outside the photo EG3D leaves black (Pillow's crop);
    ``border='reflect'`` (default) mirrors the photo instead, ``'constant'`` gives EG3D's black.

    Args:
        image: ``uint8 [H, W, 3]`` RGB.
        landmarks: ``[68, 2]`` or ``[5, 2]``.
        output_size: side of the result (EG3D: 512).
        border: ``'reflect'``, ``'constant'`` or ``'replicate'``.
    """
    image = _check_image(image)
    lm = _check_landmarks(landmarks, (5, 68))
    h0, w0 = image.shape[:2]
    transform, info = eg3d_crop_params(lm, (w0, h0), output_size)
    w, h, crop = info["resized_w"], info["resized_h"], int(info["crop"])
    sx, sy = w0 / w, h0 / h  # source pixels per resized pixel
    # The 700 px window of the resized photo, as a box in source continuous coordinates.
    box = np.array([info["left"] * sx, info["up"] * sy,
                    (info["left"] + crop) * sx, (info["up"] + crop) * sy])
    margin = int(math.ceil(2.0 * max(sx, sy, 1.0))) + 3  # bicubic support, in source pixels
    x0, y0 = int(math.floor(box[0])) - margin, int(math.floor(box[1])) - margin
    x1, y1 = int(math.ceil(box[2])) + margin, int(math.ceil(box[3])) + margin
    roi = _roi_with_border(image, x0, y0, x1, y1, border)
    pil = Image.fromarray(np.ascontiguousarray(roi))
    rbox = (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)
    win = pil.resize((crop, crop), Image.Resampling.BICUBIC, box=rbox)
    out = win.resize((output_size, output_size), Image.Resampling.LANCZOS)
    return _finish(np.asarray(out), transform, lm, "eg3d")


# ---------------------------------------------------------------------------- default
def default_transform(landmarks: np.ndarray, output_size: int = 128,
                      template: np.ndarray | None = None) -> np.ndarray:
    """The 3x3 map of :func:`align_default`: least-squares similarity of the 5 points to
    ``template`` (``[5, 2]`` normalised; default :data:`DEFAULT_TEMPLATE`) at ``output_size``."""
    lm = _check_landmarks(landmarks, (5, 68))
    lm5 = five_points(lm) if len(lm) == 68 else lm
    tpl = DEFAULT_TEMPLATE if template is None else np.asarray(template, dtype=np.float64)
    target = tpl * output_size - 0.5  # normalised -> pixel-centre coordinates
    return similarity_transform(lm5, target)


def align_default(
    image: np.ndarray,
    landmarks: np.ndarray,
    output_size: int = 128,
    border: str = "reflect",
) -> AlignedFace:
    """The crop our default models are trained on: UTKFace-like framing.

    A least-squares similarity maps the 5 points (68 landmarks are reduced with
    :func:`~portrait3d.face.landmarks.five_points`, eye centre = mean of the 6 contour points,
    as when the template was measured) onto :data:`DEFAULT_TEMPLATE` scaled to
    ``output_size``. Parts of the crop outside the photo are filled by mirroring the photo
    about its edge (``border='reflect'``): UTKFace's own crops re-aligned this way need only a
    few pixels of it, and mirrored skin / hair is closer to the training data than black.

    Args:
        image: ``uint8 [H, W, 3]`` RGB.
        landmarks: ``[68, 2]`` or ``[5, 2]`` (5-point order of :func:`five_points`).
        output_size: side of the result.
        border: ``'reflect'``, ``'constant'`` (black) or ``'replicate'``.
    """
    image = _check_image(image)
    lm = _check_landmarks(landmarks, (5, 68))
    transform = default_transform(lm, output_size)
    out = warp_image(image, transform, (output_size, output_size), border=border)
    return _finish(out, transform, lm, "default")


ALIGNERS: dict[str, Callable[..., AlignedFace]] = {
    "ffhq": align_ffhq,
    "eg3d": align_eg3d,
    "default": align_default,
}
"""Recipe name -> function ``(image, landmarks, output_size=...) -> AlignedFace``."""


# ---------------------------------------------------------------------------- paste back
def feather_mask(size: tuple[int, int], feather: float) -> np.ndarray:
    """``float32 [H, W]`` mask: 1 inside, falling smoothly to 0 at the border.

    Args:
        size: ``(width, height)``.
        feather: width of the ramp as a fraction of the shorter side (0 = hard edge).
    """
    w, h = size
    ramp = max(feather * min(w, h), 1e-6)
    x = np.arange(w, dtype=np.float32)
    y = np.arange(h, dtype=np.float32)
    dx = np.minimum(x + 0.5, w - 0.5 - x)
    dy = np.minimum(y + 0.5, h - 0.5 - y)
    d = np.minimum(dy[:, None], dx[None, :])
    t = np.clip(d / ramp, 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)  # smoothstep


def paste_back(
    original: np.ndarray,
    aligned: np.ndarray,
    transform: np.ndarray,
    feather: float = 0.1,
    *,
    mask: np.ndarray | None = None,
    aligned_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Warp an aligned (possibly edited) crop back into the photo, blended with a soft mask.

    Args:
        original: ``uint8 [H, W, 3]`` the photo the crop came from.
        aligned: ``uint8 [h, w, 3]`` the aligned crop or an edited version of it; it may have
            another resolution than the crop ``transform`` was made for (give
            ``aligned_size``), e.g. a generator's 1024 px output for a 512 px crop.
        transform: ``[3, 3]`` original -> aligned pixel map (``AlignedFace.transform``).
        feather: width of the blend ramp at the crop's border, as a fraction of its side.
        mask: optional ``[h, w]`` float weights in [0, 1] (e.g. a face segmentation) in aligned
            coordinates; multiplied with the border ramp.
        aligned_size: ``(width, height)`` of the crop ``transform`` maps to, when it differs
            from ``aligned``'s size.

    Returns:
        ``uint8 [H, W, 3]``: the photo with the crop pasted in.
    """
    original = _check_image(original)
    aligned = _check_image(aligned)
    h, w = aligned.shape[:2]
    t = np.asarray(transform, dtype=np.float64)
    if t.shape == (2, 3):
        t = np.vstack([t, [0.0, 0.0, 1.0]])
    if aligned_size is not None and tuple(aligned_size) != (w, h):
        t = _resize_matrix(tuple(aligned_size), (w, h)) @ t
    weights = feather_mask((w, h), feather)
    if mask is not None:
        mask = np.asarray(mask, dtype=np.float32)
        if mask.shape[:2] != (h, w):
            raise UsageError(f"mask must be [{h}, {w}], got {mask.shape}")
        weights = weights * np.clip(mask.reshape(h, w), 0.0, 1.0)

    # Only the photo's region under the crop is touched.
    H, W = original.shape[:2]
    corners = apply_transform(np.linalg.inv(t), np.array(
        [[-0.5, -0.5], [w - 0.5, -0.5], [-0.5, h - 0.5], [w - 0.5, h - 0.5]]))
    x0 = max(int(math.floor(corners[:, 0].min())) - 1, 0)
    y0 = max(int(math.floor(corners[:, 1].min())) - 1, 0)
    x1 = min(int(math.ceil(corners[:, 0].max())) + 2, W)
    y1 = min(int(math.ceil(corners[:, 1].max())) + 2, H)
    out = original.copy()
    if x1 <= x0 or y1 <= y0:
        return out
    # aligned pixel -> region pixel = (original pixel - (x0, y0))
    back = _scale_matrix(1.0, 1.0, -x0, -y0) @ np.linalg.inv(t)
    size = (x1 - x0, y1 - y0)
    warped = warp_image(aligned, back, size, border="replicate").astype(np.float32)
    alpha = warp_image(weights, back, size, border="constant", interpolation="linear")
    alpha = np.clip(alpha, 0.0, 1.0)[..., None]
    region = out[y0:y1, x0:x1].astype(np.float32)
    out[y0:y1, x0:x1] = np.clip(np.rint(region + (warped - region) * alpha), 0, 255).astype(np.uint8)
    return out

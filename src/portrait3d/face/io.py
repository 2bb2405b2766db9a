"""Robust image reading and atomic image writing for the face pipeline.

:func:`load_image` turns any photo a user may hand us into one well-defined array:
``uint8`` RGB of shape ``[H, W, 3]``, EXIF orientation applied, or raises one of the
one-line errors of :mod:`portrait3d.face.errors`:

* :class:`~portrait3d.face.errors.ImageReadError`: missing file, a folder, not an image,
  truncated or corrupt data (a truncated JPEG is refused, never returned half grey);
* :class:`~portrait3d.face.errors.ImageSizeError`: smaller than ``min_side`` pixels on its
  short side, or more than ``max_pixels`` pixels. The size is read from the file header and
  checked *before* any pixel is decoded, so a 12000x12000 image (or a decompression bomb) is
  refused in milliseconds and without allocating its pixels.

Mode handling (Pillow mode -> RGB):

* ``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's conversion;
* ``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour, ``RGBa``/``La``: alpha is
  composited on a white background;
* 16-bit / 32-bit integer greyscale (``I;16*``, ``I``) are rescaled 0..65535 -> 0..255
  (values of an ``I`` image that all fit in 0..255 are kept as they are), float greyscale
  (``F``) is read as 0..1 when its maximum is at most 1, else as 0..255;
* multi-frame files (GIF, TIFF, ...) give their first frame.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from portrait3d.face.errors import ImageReadError, ImageSizeError
from portrait3d.utils.io import save_image  # re-exported: photos are read here, written by utils.io

__all__ = ["MIN_SIDE", "MAX_PIXELS", "load_image", "save_image"]

MIN_SIDE = 32
"""Smallest accepted short side, in pixels: below it no face can be aligned usefully."""

MAX_PIXELS = 64_000_000
"""Largest accepted image, in pixels (64 megapixels: about 8000x8000, 192 MB as RGB)."""

_BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Convert a decoded Pillow image of any mode to ``uint8 [H, W, 3]`` RGB (alpha on white)."""
    mode = im.mode
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    elif mode == "PA":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBa", "La"):  # premultiplied alpha
        im = im.convert("RGBA" if mode == "RGBa" else "LA")
        mode = im.mode

    if mode in ("RGBA", "LA"):
        arr = np.asarray(im, dtype=np.float32)
        color = arr[..., :-1]
        alpha = arr[..., -1:] / 255.0
        rgb = color * alpha + 255.0 * (1.0 - alpha)
        if rgb.shape[-1] == 1:
            rgb = np.repeat(rgb, 3, axis=-1)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)

    if mode.startswith("I;16") or mode == "I" or mode == "F":
        arr = np.asarray(im)
        if mode == "F":
            arr = arr.astype(np.float64)
            arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
            scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
            grey = arr * scale
        elif mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 255:
            grey = arr.astype(np.float64)
        else:
            grey = arr.astype(np.float64) / 257.0  # 65535 -> 255 exactly
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)

    if mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def load_image(
    path: str | os.PathLike[str],
    *,
    min_side: int = MIN_SIDE,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Read a photo as RGB, applying its EXIF orientation.

    Args:
        path: image file (any format Pillow reads: JPEG, PNG, WebP, TIFF, BMP, GIF, ...).
        min_side: smallest accepted short side in pixels (after EXIF rotation).
        max_pixels: largest accepted ``width * height``, checked from the header before decoding.

    Returns:
        ``uint8`` array ``[H, W, 3]``, RGB, C-contiguous, writable.

    Raises:
        ImageReadError: missing, unreadable, not an image, truncated or corrupt.
        ImageSizeError: too small or too large.
    """
    path = Path(path)
    name = path.name or str(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a folder, not an image file")

    with warnings.catch_warnings():
        # Pillow warns above Image.MAX_IMAGE_PIXELS and raises above twice that; both mean "huge".
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except _BOMB:
            raise ImageSizeError(
                f"{name}: image too large (over Pillow's decompression-bomb limit; "
                f"at most {max_pixels / 1e6:g} megapixels are accepted)") from None
        except UnidentifiedImageError:
            raise ImageReadError(f"{name}: not an image file (or an unsupported format)") from None
        except PermissionError:
            raise ImageReadError(f"{name}: permission denied") from None
        except Exception as e:  # noqa: BLE001 - Pillow's parsers raise many types on malformed files (struct.error,
            # SyntaxError, ...): at this boundary every one of them means an unreadable file (found by the fuzzer)
            raise ImageReadError(f"{name}: cannot read image header ({_short(e)})") from None

        with im:
            width, height = im.size  # from the header: nothing decoded yet
            if width * height > max_pixels:
                raise ImageSizeError(
                    f"{name}: image too large ({width}x{height} = {width * height / 1e6:.1f} "
                    f"megapixels; at most {max_pixels / 1e6:g} are accepted)")
            if min(width, height) < min_side:
                raise ImageSizeError(
                    f"{name}: image too small ({width}x{height}; the short side must be at "
                    f"least {min_side} pixels)")
            # A global LOAD_TRUNCATED_IMAGES=True (set by some other library) would make Pillow
            # silently return a partly grey image; we refuse truncated files whatever it says.
            load_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
            try:
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)
                if load_truncated:
                    ImageFile.LOAD_TRUNCATED_IMAGES = False
                im.load()
            except _BOMB:
                raise ImageSizeError(f"{name}: image too large (decompression-bomb guard)") from None
            except Exception as e:  # noqa: BLE001 - as above: any decoder failure is a corrupt file
                raise ImageReadError(f"{name}: corrupt or truncated image ({_short(e)})") from None
            finally:
                if load_truncated:
                    ImageFile.LOAD_TRUNCATED_IMAGES = True
            try:
                im2 = ImageOps.exif_transpose(im)
            except Exception:  # a broken EXIF block must not make the photo unreadable
                im2 = im
            arr = _to_rgb(im2 if im2 is not None else im)
    # np.asarray of a Pillow image is read-only; hand out a normal, writable array.
    return arr if arr.flags.writeable and arr.flags.c_contiguous else np.array(arr, order="C")


def _short(e: BaseException) -> str:
    """First line of an exception message, for a one-line error."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__

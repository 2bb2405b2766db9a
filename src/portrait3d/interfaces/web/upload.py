"""Checks on a photo uploaded to the web editor: size in bytes, image type, pixel count, decodability.

Only the uploaded *bytes* are handled here; no name or path chosen by the user is ever opened.
:func:`decode_upload` sniffs the type from the bytes themselves (Pillow reads the header, never the file
name), accepts JPEG, PNG and WebP, and hands the pixels to :func:`portrait3d.face.io.load_image`, so the
web editor applies the same pixel-count limit (checked from the header, before decoding: a decompression
bomb costs nothing), truncation check, EXIF rotation and colour-mode handling as every other command.
Every refusal is one :class:`~portrait3d.face.errors.FaceError` with a one-line message.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from portrait3d.face.errors import ImageReadError, ImageSizeError
from portrait3d.face.io import MIN_SIDE, load_image

__all__ = ["ACCEPTED_FORMATS", "UploadLimits", "decode_upload"]

ACCEPTED_FORMATS: dict[str, str] = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}
"""Pillow format name -> file suffix of the image types the editor accepts."""


@dataclass(frozen=True)
class UploadLimits:
    """What an upload may be.

    Attributes:
        max_bytes: largest file accepted (a phone photo is 2-8 MB).
        max_pixels: largest ``width * height`` (25 MP: a large phone photo; more only costs memory, the
            face is aligned down to the generator's resolution anyway).
        min_side: smallest short side in pixels (below it no face can be aligned).
    """

    max_bytes: int = 10 * 2**20
    max_pixels: int = 25_000_000
    min_side: int = MIN_SIDE

    def validate(self) -> None:
        """Raise ``ValueError`` for limits that cannot work (a programming error, not a user's)."""
        if self.max_bytes < 1 or self.max_pixels < 1 or self.min_side < 1:
            raise ValueError(f"upload limits must be positive, got {self}")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def decode_upload(data: bytes | None, limits: UploadLimits = UploadLimits()) -> np.ndarray:
    """The uploaded photo as ``uint8 [H, W, 3]`` RGB, or a one-line error.

    Args:
        data: the uploaded file's bytes (``None`` or empty when nothing was received).
        limits: :class:`UploadLimits`.
    Returns:
        The pixels, EXIF orientation applied (:func:`portrait3d.face.io.load_image`).
    Raises:
        ImageReadError: nothing received, not an image, a type other than JPEG / PNG / WebP, corrupt or
            truncated data.
        ImageSizeError: too many bytes, too many pixels, or too small.
    """
    if not data:
        raise ImageReadError("no file was received: upload a JPEG, PNG or WebP photo")
    if len(data) > limits.max_bytes:
        raise ImageSizeError(f"file too large ({_mb(len(data))}; at most {_mb(limits.max_bytes)} accepted)")
    with warnings.catch_warnings():
        # Opening reads only the header; a bomb is refused below (pixel count) or by load_image.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
        except Image.DecompressionBombError:
            raise ImageSizeError(f"image too large (at most {limits.max_pixels / 1e6:g} megapixels accepted)") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
            raise ImageReadError("not an image file: upload a JPEG, PNG or WebP photo") from None
    if fmt not in ACCEPTED_FORMATS:
        raise ImageReadError(f"{fmt} images are not accepted: upload a JPEG, PNG or WebP photo")
    # load_image reads a path: the bytes go to a private temporary folder under a fixed name, so its
    # messages read "upload.jpg: ..." and nothing the user named touches the file system.
    with tempfile.TemporaryDirectory(prefix="portrait3d-upload-") as tmp:
        path = Path(tmp) / f"upload{ACCEPTED_FORMATS[fmt]}"
        path.write_bytes(data)
        return load_image(path, min_side=limits.min_side, max_pixels=limits.max_pixels)

"""Errors of the face pipeline. Each carries a one-line message meant for the user."""

from __future__ import annotations

from portrait3d.errors import UsageError

__all__ = ["FaceError", "ImageReadError", "NoFaceError", "ImageSizeError"]


class FaceError(UsageError):
    """Base class: the photo cannot be processed as asked."""


class ImageReadError(FaceError):
    """The file is missing, not an image, or corrupt/truncated."""


class ImageSizeError(FaceError):
    """The image is too small to hold a usable face, or too large to process safely."""


class NoFaceError(FaceError):
    """No face was detected (or the requested --face-index does not exist)."""

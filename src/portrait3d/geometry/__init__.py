"""Geometry shared by every layer: rotations and their named conventions (:mod:`.rotations`)."""

from portrait3d.geometry.rotations import *  # noqa: F401,F403
from portrait3d.geometry.rotations import __all__  # noqa: F401

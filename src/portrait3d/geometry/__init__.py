"""Geometry shared by every layer: rotations and their named conventions (:mod:`.rotations`), the differentiable
mesh renderer (:mod:`.render`, imported by name: it is not re-exported here)."""

from portrait3d.geometry.rotations import *  # noqa: F401,F403
from portrait3d.geometry.rotations import __all__  # noqa: F401

"""The ``portrait3d`` command line (click): one group owning every command.

Each submodule registers its commands on :data:`main`; importing this package imports them all.
"""

from __future__ import annotations

from portrait3d.interfaces.cli import dataset, demo, edit, inversion, lift, models, photos, pie, train, web  # noqa: F401  (importing registers the commands)
from portrait3d.interfaces.cli.base import fail_cleanly, main

__all__ = ["main", "fail_cleanly"]


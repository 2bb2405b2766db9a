"""The root click group and the error policy shared by every command."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import click

from portrait3d.checkpoints.safe_pickle import CheckpointError
from portrait3d.face.errors import FaceError


def fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into ``error: ...`` on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (CheckpointError, FaceError, FileExistsError, FileNotFoundError, IsADirectoryError,
                PermissionError, ValueError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="portrait3d")
def main() -> None:
    """3D-aware portrait synthesis, GAN inversion and editing."""

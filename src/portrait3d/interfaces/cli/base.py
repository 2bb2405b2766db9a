"""The root click group and the error policy shared by every command.

Error policy: a :class:`~portrait3d.errors.UsageError` (``FaceError``, ``CheckpointError``, ... derive from it) or an
``OSError`` about a file becomes one ``error: ...`` line on stderr and exit code 2. Anything else is a bug and keeps
its traceback. ``portrait3d --debug CMD`` shows the traceback for every error.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any, Callable

import click

from portrait3d.errors import UsageError

__all__ = ["main", "fail_cleanly", "EXPECTED_ERRORS", "CONTEXT_SETTINGS", "FiniteFloat"]

CONTEXT_SETTINGS: dict = {"help_option_names": ["-h", "--help"], "show_default": True}
"""Every group and command: ``-h`` for help, and defaults shown in help."""

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (UsageError, OSError)
"""Errors that are the user's to fix: printed as one line, exit code 2."""


class FiniteFloat(click.FloatRange):
    """A float option that must be finite (click's FLOAT and FloatRange let NaN and Inf through: NaN compares false
    with any bound), optionally within ``min``/``max``. Every float option of the command line uses it."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        v = super().convert(value, param, ctx)
        if v is not None and not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v

    def _describe_range(self) -> str:
        # click would print an unbounded range as "x<=None" in the help; an empty string shows none
        return "" if self.min is None and self.max is None else super()._describe_range()


def _debug_requested() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and (ctx.find_root().obj or {}).get("debug"))


def _message(e: BaseException) -> str:
    """The user's one line: an operating-system error as ``PATH: what went wrong`` (a full disk, a read-only file
    system, a path through a file ...), without Python's ``[Errno N]``; anything else as its own message."""
    if isinstance(e, OSError) and e.errno is not None and e.strerror:
        where = e.filename if e.filename is not None else ""
        if e.filename2 is not None:
            where = f"{where} -> {e.filename2}"
        return f"{where}: {e.strerror.lower()}" if where != "" else e.strerror.lower()
    return str(e)


def fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the user's errors (:data:`EXPECTED_ERRORS`) into ``error: ...`` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EXPECTED_ERRORS as e:
            if _debug_requested():
                raise
            msg = _message(e)
            click.echo(f"error: {msg.splitlines()[0] if msg else type(e).__name__}", err=True)
            sys.exit(2)

    return wrapper


class Portrait3dGroup(click.Group):
    """The root group: click's own usage errors (a bad option value, a missing argument) are printed as one
    ``error: ...`` line with exit code 2, like every other mistake of the user's, instead of click's usage block."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        if sys.stdout is None:  # started with its standard output closed: every answer printed would be lost
            if sys.stderr is not None:
                sys.stderr.write("error: standard output is closed; nothing could be reported\n")
            sys.exit(2)
        try:
            super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(2)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        sys.exit(0)


@click.group(cls=Portrait3dGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="portrait3d")
@click.option("--debug", is_flag=True, help="Show the traceback of every error, not only of bugs.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """3D-aware portrait synthesis, GAN inversion and editing.

    \b
    Start here:
      portrait3d demo --out demo           sample, rotate and render the built-in models
      portrait3d invert3d photo.jpg --out inv   put a photo into the 3D generator
      portrait3d web                       the browser editor
    Every command has --help with examples; options mean the same everywhere (README "Conventions").
    """
    ctx.obj = {"debug": debug}

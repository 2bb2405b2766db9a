"""The one base class of errors that are the user's to fix.

Every layer may import this module (it imports nothing). The command line turns a :class:`UsageError`, or an
``OSError`` about a user's file, into a one-line ``error: ...`` and exit code 2; any other exception is a bug and
keeps its traceback. Library code raises a subclass (``FaceError``, ``CheckpointError``, ...) or ``UsageError``
itself for input it cannot accept, and plain ``ValueError`` / ``RuntimeError`` only for programming errors.

``UsageError`` derives from ``ValueError`` so that callers written against the older behaviour
(``except ValueError``) keep working.
"""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """The input or options cannot be used as given; the message says why in one line."""

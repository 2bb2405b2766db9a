"""Click options shared by the photo commands, and the batch mode they share.

A command that takes a photo switches to batch mode when the argument is a folder or a glob pattern (see
:func:`portrait3d.utils.batch.is_batch_argument`): each input gets its own folder ``OUT/<key>/`` holding what the
single-photo command writes to ``OUT``, and ``OUT/manifest.json`` records every input. A rerun skips what is
done and retries what failed. Exit status of a batch: 0 every input done, 1 some inputs failed (bad photo, no face:
listed on stderr), 2 the command itself cannot run (bad option, no input matched), 3 some input hit a bug (its
traceback is printed at the end and kept in the manifest; the other inputs still ran).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from portrait3d.interfaces.cli.base import EXPECTED_ERRORS
from portrait3d.utils.batch import (
    IMAGE_SUFFIXES,
    BatchOptions,
    BatchSummary,
    ItemTask,
    expand_inputs,
    is_batch_argument,
    run_batch,
)

__all__ = ["MAX_LISTED_FAILURES", "compute_options", "threads_option", "echo_notes", "check_batch_files",
           "report_batch", "run_batch_command", "wants_batch",
           "workers_option"]

MAX_LISTED_FAILURES = 20
"""Failed inputs listed one per line on stderr at the end of a batch (all of them are in the manifest)."""


def compute_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--device`` and ``--threads``, the same on every command that computes (resolve them with
    :func:`portrait3d.utils.compute.setup_compute`)."""
    fn = threads_option(fn)
    return click.option("--device", type=str, default="auto",
                        help="Where to compute: auto (a CUDA GPU when one is visible, else the CPU), cpu, cuda, "
                             "cuda:N or mps.")(fn)


def threads_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--threads`` alone, for commands whose work runs on the CPU only (face detection and landmarks)."""
    return click.option("--threads", type=click.IntRange(1, 1024), default=None,
                        help="CPU threads for PyTorch [default: the cores not busy with other processes].")(fn)


def echo_notes(notes: Iterable[str], kind: str = "note") -> None:
    """Print what the user should know about a result (``note: ...`` / ``warning: ...``) on stderr, one per line."""
    for n in notes:
        click.echo(f"{kind}: {n}", err=True)


def workers_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--workers N``: inputs processed at once in batch mode (one process each)."""
    return click.option(
        "--workers", type=click.IntRange(1, 512), default=1,
        help="Batch mode (a folder or glob of photos): process N inputs at once, each in its own process with "
             "cores/N torch threads. Under torchrun each rank takes its share of the inputs.")(fn)


def wants_batch(args: Iterable[str | Path], seeds: bool = False) -> bool:
    """Batch mode: several inputs, or one that is a folder or a glob pattern (with ``seeds``, an integer is a seed
    even where a folder has that name)."""
    args = [a for a in args if not (seeds and str(a).lstrip("-").isdigit())]
    return len(args) > 1 or any(is_batch_argument(a) for a in args)


def check_batch_files(network: str | None = None, **files: Path | None) -> None:
    """Stop a batch before it starts on a mistake every input would repeat: a checkpoint (``network``: a built-in
    name or a file) or another model file (``files``: option name -> path or ``None``) that does not exist."""
    from portrait3d.checkpoints.load import BUILTIN_NETWORKS

    if network is not None and network not in BUILTIN_NETWORKS and not Path(network).expanduser().is_file():
        raise FileNotFoundError(f"no such checkpoint: {network}")
    for option, path in files.items():
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file (--{option.replace('_', '-')})")


def run_batch_command(inputs: Sequence[str | Path], out: Path, task: ItemTask, *, desc: str,
                      config: Mapping[str, Any], workers: int, force: bool,
                      suffixes: Iterable[str] = IMAGE_SUFFIXES, reserved: Sequence[str] = (),
                      after: Callable[[BatchSummary], None] | None = None) -> None:
    """Expand ``inputs``, run ``task`` on each into ``OUT/<key>/``, call ``after`` (e.g. to aggregate results into
    ``OUT``), print the report and exit with the batch's status (see the module docstring)."""
    paths = expand_inputs(inputs, suffixes)
    options = BatchOptions(workers=workers, force=force, desc=desc, config=config, expected_errors=EXPECTED_ERRORS,
                           reserved_keys=tuple(reserved))
    summary = run_batch(paths, out, task, options)
    if after is not None:
        after(summary)
    report_batch(summary)


def report_batch(summary: BatchSummary) -> None:
    """List failures and bug tracebacks on stderr, print ``N done, M failed (see OUT/manifest.json)`` and exit
    with :attr:`BatchSummary.exit_code` when it is not 0."""
    if summary.skipped:
        click.echo(f"{summary.skipped} input(s) were already done in {summary.out}: skipped", err=True)
    failures = summary.failures
    for rec in failures[:MAX_LISTED_FAILURES]:
        error = rec.error or ""
        click.echo(f"failed: {error}" if error.startswith(rec.path) else f"failed: {rec.path}: {error}", err=True)
    if len(failures) > MAX_LISTED_FAILURES:
        click.echo(f"... and {len(failures) - MAX_LISTED_FAILURES} more failed input(s)", err=True)
    for rec in summary.bugs:  # not the user's fault: show where it happened
        click.echo(f"\nbug while processing {rec.path}:\n{(rec.traceback or rec.error or '').rstrip()}", err=True)
    prefix = "" if summary.shard.world_size == 1 else f"rank {summary.shard.rank}/{summary.shard.world_size}: "
    click.echo(prefix + summary.summary_line())
    if summary.exit_code:
        sys.exit(summary.exit_code)

"""Resumable batch processing: many inputs, one output folder each, a manifest, never a partial file.

    from portrait3d.utils.batch import BatchOptions, expand_inputs, run_batch

    def shrink(photo: Path, out_dir: Path) -> dict:          # writes the item's files into out_dir
        Image.open(photo).resize((64, 64)).save(out_dir / "small.png")
        return {"mode": "RGB"}                                # small JSON-able summary for the manifest

    summary = run_batch(expand_inputs(["photos/", "more/*.jpg"]), Path("out"), shrink,
                        BatchOptions(workers=2, desc="shrinking"))
    print(summary.summary_line())                             # "28 done, 2 failed (see out/manifest.json)"

Layout of the output folder ``OUT``:

* ``OUT/<key>/``: the outputs of one input. ``<key>`` is the input's file stem, with ``-<8 hex digits>`` (a hash
  of its absolute path) appended when two inputs share a stem. A path keeps the key the manifests already give it,
  so adding inputs later never renames an existing result folder.
* ``OUT/<key>/.batch-item.json``: the item's record, written just before the folder is renamed into place. The
  rename is the commit point, so a run killed between the rename and the next manifest write loses nothing: the
  next run adopts the folder instead of redoing it.
* ``OUT/.<key>.partial-<pid>/``: an item being written. It is renamed to ``OUT/<key>`` only when the item is
  complete; leftovers of a killed run are deleted by the next run.
* ``OUT/manifest.json`` (``OUT/manifest.rank<R>.json`` for rank ``R`` of a ``torchrun`` job), written atomically::

      {"format": "portrait3d-batch-manifest", "version": 1, "rank": 0, "world_size": 1,
       "config": {...options that shape the outputs...}, "updated": "2025-01-01T12:00:00Z",
       "items": [{"path": "/abs/photo.jpg", "key": "photo", "status": "done" | "failed",
                  "error": null | "one line", "result": {...}, "seconds": 0.21, "attempts": 1,
                  "outputs": ["aligned.png"], "bug": false, "traceback": null,
                  "finished": "2025-01-01T12:00:00Z", "rank": 0}, ...]}

A run reads every manifest in ``OUT``. It skips an input whose record says ``done`` and whose folder still holds
the recorded outputs; it retries ``failed`` ones. An expected error of one input (``options.expected_errors``:
:class:`~portrait3d.errors.UsageError` such as a ``FaceError`` for a photo without a face, or ``OSError`` for a
corrupt file) is recorded as ``failed`` and the batch goes on. Any other exception is a bug: it is recorded with
``"bug": true`` and its traceback, the batch goes on, and :attr:`BatchSummary.exit_code` is
:data:`EXIT_BUG`.

Parallelism: ``options.workers = N`` runs items in N ``spawn``-ed processes (each with
``torch.set_num_threads(max(1, cores // N))``); only the parent writes the manifest. When ``WORLD_SIZE`` and ``RANK``
are set (``torchrun``), rank ``R`` takes the items ``i`` with ``i % WORLD_SIZE == R`` and writes
``manifest.rank<R>.json``. One run (or one ``torchrun`` job) per output folder at a time.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import glob
import hashlib
import json
import multiprocessing
import multiprocessing.util
import os
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from portrait3d.errors import UsageError

__all__ = [
    "EXIT_BUG",
    "EXIT_FAILED",
    "EXIT_OK",
    "IMAGE_SUFFIXES",
    "ITEM_RECORD",
    "MANIFEST_FORMAT",
    "BatchInputError",
    "BatchItem",
    "BatchOptions",
    "BatchSummary",
    "FunctionTask",
    "ItemRecord",
    "ItemTask",
    "Shard",
    "WorkerInfo",
    "assign_keys",
    "done_records",
    "expand_inputs",
    "is_batch_argument",
    "merge_records",
    "pick_device",
    "read_manifests",
    "run_batch",
]

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
"""Suffixes (lower case) that a folder or a glob pattern contributes by default."""

EXIT_OK = 0
"""Every input is done."""
EXIT_FAILED = 1
"""Some inputs failed with an expected error (bad photo, no face, ...); the others are done."""
EXIT_BUG = 3
"""At least one input raised an unexpected exception (a bug); its traceback is in the manifest."""

MANIFEST_FORMAT = "portrait3d-batch-manifest"
MANIFEST_VERSION = 1
ITEM_RECORD = ".batch-item.json"
"""Name of the record each item's folder carries (its presence after the rename marks the item complete)."""

_MANIFEST_NAME = re.compile(r"manifest(\.rank\d+)?\.json")
_GLOB_CHARS = re.compile(r"[*?\[]")
_LEFTOVER = re.compile(r"\.(?P<key>.+)\.(partial|old)-\d+")


class BatchInputError(UsageError):
    """The inputs or the output folder of a batch cannot be used as given."""


# ----------------------------------------------------------------------------- inputs and keys


def is_batch_argument(arg: str | os.PathLike[str]) -> bool:
    """Whether a command-line argument asks for batch mode: an existing folder, or a glob pattern that is not
    itself the name of an existing file."""
    p = Path(os.path.expanduser(os.fspath(arg)))
    return p.is_dir() or (not p.exists() and bool(_GLOB_CHARS.search(os.fspath(arg))))


def expand_inputs(specs: Iterable[str | os.PathLike[str]], suffixes: Iterable[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Files named by ``specs``, in order, each once.

    A file is taken as is (whatever its suffix). A folder contributes its files (not sub-folders, not hidden files)
    whose suffix is in ``suffixes``, sorted by name. A glob pattern (``*``, ``?``, ``[...]``; ``**`` recurses)
    contributes the matching files with such a suffix, sorted.

    Raises:
        BatchInputError: a folder or pattern yields no file, or nothing at all was given.
        FileNotFoundError: an argument is neither a file, a folder nor a pattern.
    """
    wanted = {s.lower() for s in suffixes}
    kinds = "/".join(sorted(wanted))
    out: list[Path] = []
    seen: set[str] = set()

    def add(p: Path) -> None:
        real = os.path.realpath(p)
        if real not in seen:  # the same file through two arguments (or a link) is one input
            seen.add(real)
            out.append(p)

    for spec in specs:
        text = os.path.expanduser(os.fspath(spec))
        p = Path(text)
        if p.is_file():
            add(p)
        elif p.is_dir():
            found = sorted(c for c in p.iterdir()
                           if c.is_file() and not c.name.startswith(".") and c.suffix.lower() in wanted)
            if not found:
                raise BatchInputError(f"{p}: no {kinds} file in this folder")
            for c in found:
                add(c)
        elif _GLOB_CHARS.search(text):
            found = sorted(Path(m) for m in glob.glob(text, recursive=True)
                           if os.path.isfile(m) and Path(m).suffix.lower() in wanted)
            if not found:
                raise BatchInputError(f"{text}: no {kinds} file matches this pattern")
            for c in found:
                add(c)
        else:
            raise FileNotFoundError(f"{text}: no such file or folder")
    if not out:
        raise BatchInputError("no input given")
    return out


def _abspath(p: str | os.PathLike[str]) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(p)))


def _clean_stem(stem: str) -> str:
    """A file stem made safe as a folder name: no separators or control characters, no leading dot (the engine's
    own temporary folders start with one)."""
    s = "".join("_" if c in "/\\" or ord(c) < 32 else c for c in stem).lstrip(". ")
    return s[:120] or "item"


@dataclass(frozen=True)
class BatchItem:
    """One input of a batch.

    Attributes:
        index: position in the expanded input list (sharding across ranks uses it).
        path: the input file.
        key: the name of its output folder ``OUT/<key>``.
    """

    index: int
    path: Path
    key: str


def assign_keys(paths: Sequence[Path], known: Mapping[str, str] | None = None,
                reserved: Iterable[str] = ()) -> list[BatchItem]:
    """Give each path a stable key: the key ``known`` (absolute path -> key, from the manifests) gives it, else its
    cleaned stem, else (stem shared with another input, taken by another path, or ``reserved``) the stem plus
    ``-`` and 8 hex digits of a hash of its absolute path.

    Keys compare case-insensitively, so results do not collide on macOS or Windows file systems.
    """
    known = dict(known or {})
    abs_paths = [_abspath(p) for p in paths]
    keys: list[str | None] = [known.get(a) for a in abs_paths]
    used = {k.casefold() for k in known.values()} | {r.casefold() for r in reserved}
    stems = [_clean_stem(Path(p).stem) for p in paths]
    counts: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k is None:
            counts[stems[i].casefold()] = counts.get(stems[i].casefold(), 0) + 1
    for i, k in enumerate(keys):
        if k is not None:
            continue
        key = stems[i]
        if counts[key.casefold()] > 1 or key.casefold() in used or _MANIFEST_NAME.fullmatch(key):
            digest = hashlib.sha1(abs_paths[i].encode()).hexdigest()
            key = f"{key}-{digest[:8]}"
            n = 8
            while key.casefold() in used:  # practically never: another 8-digit prefix already taken
                n += 1
                key = f"{stems[i]}-{digest[:n]}"
        keys[i] = key
        used.add(key.casefold())
    return [BatchItem(i, Path(p), k) for i, (p, k) in enumerate(zip(paths, keys))]  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- records and manifests


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class ItemRecord:
    """What the manifest says about one input.

    Attributes:
        path: absolute path of the input.
        key: its output folder ``OUT/<key>``.
        status: ``"done"`` or ``"failed"``.
        error: one-line message of a failure (``None`` when done).
        result: the small JSON-able summary the task returned.
        seconds: wall time of the last attempt.
        attempts: how many times the input was started, over every run that recorded it.
        outputs: files (relative to ``OUT/<key>``) the last successful attempt wrote.
        bug: the failure was an unexpected exception (see ``traceback``).
        traceback: the formatted traceback of a bug.
        finished: when the last attempt ended (UTC, ISO 8601).
        rank: the rank that ran it.
    """

    path: str
    key: str
    status: str
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    attempts: int = 0
    outputs: list[str] = field(default_factory=list)
    bug: bool = False
    traceback: str | None = None
    finished: str = ""
    rank: int = 0

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ItemRecord:
        """Read a record, ignoring fields this version does not know (written by a newer one)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in names})


@dataclass(frozen=True)
class Shard:
    """Which part of the inputs this process owns: rank ``rank`` of ``world_size`` (``torchrun`` sets them)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise BatchInputError(f"RANK={self.rank} is not within WORLD_SIZE={self.world_size}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Shard:
        """``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` from the environment (one process when unset)."""
        env = os.environ if environ is None else environ
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise BatchInputError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
        return cls(rank=rank, world_size=world, local_rank=local)

    @property
    def manifest_name(self) -> str:
        """``manifest.json``, or ``manifest.rank<R>.json`` when several ranks share the output folder."""
        return "manifest.json" if self.world_size == 1 else f"manifest.rank{self.rank}.json"

    def owns(self, index: int) -> bool:
        """Whether input number ``index`` belongs to this shard."""
        return index % self.world_size == self.rank


@dataclass
class Manifest:
    """One manifest file: its header and records (by key)."""

    path: Path
    config: dict[str, Any] | None
    records: dict[str, ItemRecord]


def _write_text_atomic(path: Path, text: str) -> None:
    """:func:`portrait3d.utils.io.write_text` (temporary sibling, then ``os.replace``: readers never see half a
    file), imported when first needed so that this engine's import stays free of torch."""
    from portrait3d.utils.io import write_text

    write_text(path, text, overwrite=True)


def read_manifests(out: Path) -> list[Manifest]:
    """Every manifest in ``out`` (``manifest.json`` and ``manifest.rank<R>.json``), sorted by name.

    Raises:
        BatchInputError: a manifest is not valid JSON of this format (never written by this engine: it writes
            atomically).
    """
    found = []
    if not out.is_dir():
        return found
    for p in sorted(out.iterdir()):
        if not _MANIFEST_NAME.fullmatch(p.name):
            continue
        try:
            obj = json.loads(p.read_text())
            if obj.get("format") != MANIFEST_FORMAT:
                raise ValueError("not a portrait3d batch manifest")
            records = {r["key"]: ItemRecord.from_json(r) for r in obj.get("items", [])}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise BatchInputError(f"{p}: unreadable batch manifest ({e}); move it away to start afresh") from None
        found.append(Manifest(p, obj.get("config"), records))
    return found


def merge_records(manifests: Sequence[Manifest]) -> dict[str, ItemRecord]:
    """One record per input path over all manifests: a ``done`` record wins over a ``failed`` one, then the latest.
    ``attempts`` is the largest count any manifest holds for the path."""
    best: dict[str, ItemRecord] = {}
    for m in manifests:
        for rec in m.records.values():
            old = best.get(rec.path)
            if old is None:
                best[rec.path] = rec
                continue
            attempts = max(old.attempts, rec.attempts)
            if (rec.status == "done", rec.finished) > (old.status == "done", old.finished):
                best[rec.path] = rec
            best[rec.path] = dataclasses.replace(best[rec.path], attempts=attempts)
    return best


def _read_item_record(folder: Path) -> ItemRecord | None:
    try:
        return ItemRecord.from_json(json.loads((folder / ITEM_RECORD).read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _is_complete(out: Path, rec: ItemRecord) -> bool:
    """``rec`` is done and ``OUT/<key>`` still holds its outputs and belongs to the same input."""
    folder = out / rec.key
    if rec.status != "done" or not folder.is_dir():
        return False
    own = _read_item_record(folder)
    if own is None or own.path != rec.path:  # the folder was redone for another input since
        return False
    return all((folder / name).is_file() for name in rec.outputs)


def done_records(out: Path) -> list[ItemRecord]:
    """Every input recorded as done in any manifest of ``out`` whose outputs are present, sorted by key (used to
    aggregate per-item results into one file at the end of a batch)."""
    merged = merge_records(read_manifests(out))
    return sorted((r for r in merged.values() if _is_complete(out, r)), key=lambda r: r.key)


# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class WorkerInfo:
    """Where a task runs: the shard, and the worker process among ``workers`` of this rank."""

    shard: Shard
    worker: int = 0
    workers: int = 1


class ItemTask:
    """The per-item work of a batch. Subclass it (or pass a plain function to :func:`run_batch`).

    The task object is pickled to each worker process, so keep heavy state (models) out of ``__init__``: build it in
    :meth:`setup`, which runs once per process before its first item, and drop it in ``__getstate__``.
    """

    def setup(self, worker: WorkerInfo) -> None:
        """Prepare this process (load models); an exception here stops the batch."""

    def run(self, item: BatchItem, out_dir: Path) -> Mapping[str, Any] | None:
        """Process ``item``, writing its files into the empty folder ``out_dir``; return a small JSON-able
        summary for the manifest."""
        raise NotImplementedError

    def teardown(self) -> None:
        """Release what :meth:`setup` built."""


class FunctionTask(ItemTask):
    """An :class:`ItemTask` calling ``fn(input_path, out_dir)`` (a module-level function, for worker processes)."""

    def __init__(self, fn: Callable[[Path, Path], Mapping[str, Any] | None]) -> None:
        self.fn = fn

    def run(self, item: BatchItem, out_dir: Path) -> Mapping[str, Any] | None:
        return self.fn(item.path, out_dir)


def pick_device(device: str, worker: WorkerInfo) -> str:
    """``device`` for this worker: a bare ``'cuda'`` becomes ``'cuda:<i>'`` spreading ranks on a machine
    (``LOCAL_RANK``) and worker processes over the visible GPUs; anything else is returned unchanged."""
    if device != "cuda":
        return device
    import torch

    n = torch.cuda.device_count()
    if n <= 1:
        return device
    return f"cuda:{(worker.shard.local_rank * worker.workers + worker.worker) % n}"


# ----------------------------------------------------------------------------- running one item


@dataclass(frozen=True)
class _Job:
    """What a worker needs to run one item."""

    item: BatchItem
    attempt: int
    replace_ok: bool  # OUT/<key> may exist and belongs to this input (or --force): replace it on commit
    rank: int


def _one_line(e: BaseException) -> str:
    msg = str(e).strip()
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in msg:
        msg = f"{e.filename}: {e.strerror or msg}"
    return msg.splitlines()[0] if msg else type(e).__name__


def _files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != ITEM_RECORD)


def _execute(task: ItemTask, job: _Job, out: Path, expected: tuple[type[BaseException], ...],
             orphaned: Callable[[], bool] = lambda: False) -> ItemRecord:
    """Run one item into ``OUT/.<key>.partial-<pid>/`` and rename that into place when it is complete (unless
    ``orphaned()``: a worker whose parent was killed must not commit behind the back of the next run)."""
    item = job.item
    final = out / item.key
    partial = out / f".{item.key}.partial-{os.getpid()}"
    rec = ItemRecord(path=_abspath(item.path), key=item.key, status="failed", attempts=job.attempt, rank=job.rank)
    t0 = time.perf_counter()
    try:
        if final.exists() and not job.replace_ok:
            raise FileExistsError(f"{final} already exists and is not a result of this input "
                                  f"(pass --force to overwrite, or choose another output folder)")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        result = task.run(item, partial)
        # Round-trip now so that a non-JSON result is this item's bug, not a crash of the manifest writer.
        rec.result = json.loads(json.dumps(dict(result or {})))
        rec.outputs = _files_under(partial)
        rec.status, rec.seconds, rec.finished = "done", time.perf_counter() - t0, _now()
        _write_text_atomic(partial / ITEM_RECORD, json.dumps(rec.to_json(), indent=1) + "\n")
        if orphaned():
            raise SystemExit(1)  # not an item failure: the finally below removes the partial folder
        if final.exists():  # a directory cannot be replaced in one step: move the old one aside first
            old = out / f".{item.key}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(partial, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, final)
        return rec
    except expected as e:
        rec.error = _one_line(e)
    except Exception as e:  # noqa: BLE001 - a bug of this item: recorded, reported at the end, the batch goes on
        rec.error = f"{type(e).__name__}: {_one_line(e)}"
        rec.bug, rec.traceback = True, traceback.format_exc()
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # after a success it was renamed away: nothing to remove
    rec.status, rec.result, rec.outputs = "failed", {}, []
    rec.seconds, rec.finished = time.perf_counter() - t0, _now()
    return rec


class _WorkerProcess:
    """The state of one spawned worker: its task, set up once."""

    def __init__(self, task: ItemTask, info: WorkerInfo, out: Path,
                 expected: tuple[type[BaseException], ...]) -> None:
        self.task, self.out, self.expected = task, out, expected
        self.parent = os.getppid()  # the batch's process; when it is killed, this worker is re-parented
        self.setup_error: BaseException | None = None
        try:
            task.setup(info)
        except Exception as e:  # noqa: BLE001 - raised again for each job, so the parent sees it (not a dead pool)
            self.setup_error = e
            return
        multiprocessing.util.Finalize(self, task.teardown, exitpriority=10)

    def __call__(self, job: _Job) -> ItemRecord:
        if self.setup_error is not None:
            raise self.setup_error
        return _execute(self.task, job, self.out, self.expected, orphaned=lambda: os.getppid() != self.parent)


# The worker process's task (set by _init_worker in spawned workers only; the parent never touches it). A pool
# initializer has nowhere else to keep per-process state.
_WORKER: list[_WorkerProcess] = []


def _init_worker(task: ItemTask, shard: Shard, slots: Any, workers: int, threads: int, out: Path,
                 expected: tuple[type[BaseException], ...]) -> None:
    import torch

    torch.set_num_threads(threads)  # N workers share the cores instead of each taking all of them
    _WORKER.append(_WorkerProcess(task, WorkerInfo(shard, slots.get(), workers), out, expected))


def _run_in_worker(job: _Job) -> ItemRecord:
    return _WORKER[0](job)


# ----------------------------------------------------------------------------- the batch


@dataclass(frozen=True)
class BatchOptions:
    """How :func:`run_batch` runs.

    Attributes:
        workers: items processed at once, each in its own ``spawn``-ed process (1: in this process).
        force: redo every input, replacing its folder, and ignore what the manifests say.
        progress: show a tqdm bar (with ETA) on stderr.
        desc: the bar's label.
        config: the options that shape the outputs, stored in the manifest; a later run with other values is
            refused unless ``force`` (so one output folder never mixes two settings).
        expected_errors: an input failing with one of these is ``failed``; anything else is a bug.
        reserved_keys: names an item folder must not take (files the command writes in ``OUT`` itself).
        shard: this process's share of the inputs (default: from ``RANK`` / ``WORLD_SIZE``).
    """

    workers: int = 1
    force: bool = False
    progress: bool = True
    desc: str = "batch"
    config: Mapping[str, Any] | None = None
    expected_errors: tuple[type[BaseException], ...] = (UsageError, OSError)
    reserved_keys: tuple[str, ...] = ()
    shard: Shard | None = None


@dataclass
class BatchSummary:
    """The outcome of :func:`run_batch` for this shard.

    Attributes:
        out: the output folder.
        manifest: the manifest this process wrote.
        shard: the shard it ran.
        records: one record per input of the shard, in input order.
        skipped: inputs that were already done before this run.
    """

    out: Path
    manifest: Path
    shard: Shard
    records: list[ItemRecord]
    skipped: int = 0

    @property
    def done(self) -> int:
        """How many inputs of the shard are done (this run or before)."""
        return sum(r.status == "done" for r in self.records)

    @property
    def failures(self) -> list[ItemRecord]:
        """Records of the inputs that failed (expected errors and bugs)."""
        return [r for r in self.records if r.status != "done"]

    @property
    def bugs(self) -> list[ItemRecord]:
        """Records of the inputs that failed with an unexpected exception."""
        return [r for r in self.records if r.status != "done" and r.bug]

    @property
    def exit_code(self) -> int:
        """:data:`EXIT_OK`, :data:`EXIT_FAILED` (expected failures only) or :data:`EXIT_BUG`."""
        return EXIT_BUG if self.bugs else EXIT_FAILED if self.failures else EXIT_OK

    def summary_line(self) -> str:
        """``N done, M failed (see OUT/manifest.json)``."""
        return f"{self.done} done, {len(self.failures)} failed (see {self.manifest})"


class _ManifestWriter:
    """This process's manifest: rewritten after each item, but never more than ~5% of the time (a manifest of
    20,000 items takes ~0.1 s to write), and always at the end. Items committed since the last write are not lost
    if the run is killed: their folders carry their records (:data:`ITEM_RECORD`)."""

    def __init__(self, path: Path, shard: Shard, config: Mapping[str, Any] | None,
                 records: dict[str, ItemRecord]) -> None:
        self.path, self.shard, self.config, self.records = path, shard, config, records
        self.dirty, self.last, self.interval = True, 0.0, 0.0

    def update(self, rec: ItemRecord) -> None:
        self.records[rec.key] = rec
        self.dirty = True
        if time.monotonic() - self.last >= self.interval:
            self.flush()

    def flush(self) -> None:
        if not self.dirty:
            return
        t0 = time.monotonic()
        head = json.dumps({"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "rank": self.shard.rank,
                           "world_size": self.shard.world_size, "config": self.config, "updated": _now()}, indent=1)
        # One line per item: readable, and a tenth of the size of an indented list for 20,000 items.
        items = ",\n  ".join(json.dumps(self.records[k].to_json()) for k in sorted(self.records))
        _write_text_atomic(self.path, f'{head[:-2]},\n "items": [\n  {items}\n ]\n}}\n')
        self.last = time.monotonic()
        self.interval = 20 * (self.last - t0)
        self.dirty = False


def _cleanup_leftovers(out: Path, shard: Shard, my_keys: set[str]) -> None:
    """Delete partial item folders and temporary manifests left by a killed run. Under ``torchrun`` a rank
    deletes only those of its own keys (another rank may be writing its own right now)."""
    for p in out.iterdir():
        m = _LEFTOVER.fullmatch(p.name)
        if m and p.is_dir() and (shard.world_size == 1 or m["key"] in my_keys):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(f".{shard.manifest_name}.") and p.name.endswith(".tmp") or (
                shard.world_size == 1 and p.name.startswith(".manifest") and p.name.endswith(".tmp")):
            p.unlink(missing_ok=True)


def _check_config(manifests: Sequence[Manifest], config: Mapping[str, Any] | None) -> None:
    for m in manifests:
        if m.records and m.config != config:
            old, new = m.config or {}, config or {}
            diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k)]
            raise BatchInputError(f"{m.path} was made with other options ({'; '.join(diff[:3])}): pass --force to "
                                  f"redo every input with these, or choose another output folder")


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_batch(inputs: Sequence[Path], out: Path, task: ItemTask | Callable[[Path, Path], Mapping[str, Any] | None],
              options: BatchOptions = BatchOptions()) -> BatchSummary:
    """Run ``task`` on each input this shard owns, one output folder each, skipping what is already done.

    Args:
        inputs: the input files (e.g. from :func:`expand_inputs`), in the order that defines sharding.
        out: the output folder (created).
        task: an :class:`ItemTask`, or ``fn(input_path, out_dir) -> dict | None`` (module-level for ``workers > 1``).
        options: see :class:`BatchOptions`.

    Returns:
        The :class:`BatchSummary`; nothing is raised for a failing input.

    Raises:
        BatchInputError: the manifests in ``out`` were made with another ``config`` (and not ``force``), or are
            unreadable.
        Exception: from ``task.setup`` (every item would fail the same way), or from writing the manifest.
    """
    if not isinstance(task, ItemTask):
        task = FunctionTask(task)
    shard = options.shard or Shard.from_env()
    # Normalised as the manifest will hold it (tuples -> lists, paths -> str), so a rerun compares equal.
    config = json.loads(json.dumps(dict(options.config), default=str)) if options.config is not None else None
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / shard.manifest_name

    manifests = read_manifests(out)
    merged = merge_records(manifests)  # what was done before (with --force: only to keep counting attempts)
    if options.force:
        if shard.rank == 0:  # stale manifests of another layout would otherwise linger beside the new ones
            for m in manifests:
                r = re.fullmatch(r"manifest\.rank(\d+)\.json", m.path.name)
                if m.path != manifest_path and (r is None or int(r[1]) >= shard.world_size):
                    m.path.unlink(missing_ok=True)
        own: dict[str, ItemRecord] = {}
        # Keys must not depend on manifests that rank 0 may be deleting right now: every rank computes the same.
        items = assign_keys(inputs, reserved=options.reserved_keys)
    else:
        _check_config(manifests, config)
        own = next((dict(m.records) for m in manifests if m.path == manifest_path), {})
        items = assign_keys(inputs, {p: r.key for p, r in merged.items()}, options.reserved_keys)
    mine = [it for it in items if shard.owns(it.index)]
    _cleanup_leftovers(out, shard, {it.key for it in mine})

    writer = _ManifestWriter(manifest_path, shard, config, own)
    results: dict[str, ItemRecord] = {}
    jobs: list[_Job] = []
    for it in mine:
        path = _abspath(it.path)
        prev = merged.get(path)
        if not options.force:
            if prev is not None and _is_complete(out, prev):
                results[it.key] = prev
                continue
            adopted = _read_item_record(out / it.key)  # committed, but killed before the manifest said so
            if adopted is not None and adopted.path == path and adopted.key == it.key and _is_complete(out, adopted):
                results[it.key] = adopted
                writer.update(adopted)
                continue
        marker = _read_item_record(out / it.key)
        replace_ok = options.force or (prev is not None and prev.key == it.key) or (
            marker is not None and marker.path == path)
        jobs.append(_Job(it, (prev.attempts if prev else 0) + 1, replace_ok, shard.rank))
    skipped = len(results)

    from tqdm import tqdm

    label = options.desc if shard.world_size == 1 else f"{options.desc} [rank {shard.rank}/{shard.world_size}]"
    bar = tqdm(total=len(jobs), desc=label, unit="item", disable=not options.progress or not jobs,
               file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
    n_failed = 0

    def record(rec: ItemRecord) -> None:
        nonlocal n_failed
        results[rec.key] = rec
        writer.update(rec)
        n_failed += rec.status != "done"
        if n_failed:
            bar.set_postfix(failed=n_failed, refresh=False)
        bar.update(1)

    try:
        if options.workers <= 1 or len(jobs) <= 1:
            _run_here(task, jobs, shard, out, options.expected_errors, record)
        else:
            _run_in_pool(task, jobs, shard, out, options, record)
    finally:
        bar.close()
        writer.flush()
    records = [results[it.key] for it in mine if it.key in results]
    return BatchSummary(out=out, manifest=manifest_path, shard=shard, records=records, skipped=skipped)


def _run_here(task: ItemTask, jobs: Sequence[_Job], shard: Shard, out: Path,
              expected: tuple[type[BaseException], ...], record: Callable[[ItemRecord], None]) -> None:
    """Run the jobs one after the other in this process (no start-up cost; today's thread settings)."""
    if not jobs:
        return
    task.setup(WorkerInfo(shard))
    try:
        for job in jobs:
            record(_execute(task, job, out, expected))
    finally:
        task.teardown()


def _run_in_pool(task: ItemTask, jobs: Sequence[_Job], shard: Shard, out: Path, options: BatchOptions,
                 record: Callable[[ItemRecord], None]) -> None:
    """Run the jobs in ``options.workers`` spawned processes; results come back here, the only manifest writer.

    At most two jobs per worker are in flight, so a worker that dies (out of memory, killed) costs those jobs only:
    they are recorded as bugs and the others stay pending for the next run.
    """
    ctx = multiprocessing.get_context("spawn")  # fork is unsafe with threads (torch, mediapipe) already running
    n = min(options.workers, len(jobs))
    slots = ctx.Queue()
    for i in range(n):
        slots.put(i)
    threads = max(1, _cpu_count() // n)
    pool = cf.ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker,
                                  initargs=(task, shard, slots, n, threads, out, options.expected_errors))
    pending = list(reversed(jobs))
    running: dict[cf.Future[ItemRecord], _Job] = {}
    try:
        while pending or running:
            while pending and len(running) < 2 * n:
                job = pending.pop()
                running[pool.submit(_run_in_worker, job)] = job
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                try:
                    rec = fut.result()  # raises only for a failed task.setup (items never raise): stop the batch
                except cf.process.BrokenProcessPool as e:
                    pending.clear()  # the pool is gone: record what was in flight, leave the rest for the next run
                    record(ItemRecord(path=_abspath(job.item.path), key=job.item.key, status="failed",
                                      error=f"a worker process died: {e}", attempts=job.attempt, bug=True,
                                      traceback=traceback.format_exc(), finished=_now(), rank=shard.rank))
                else:
                    record(rec)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

"""portrait3d.utils.batch: inputs and keys, the manifest, resuming, failures, no partial files, shards, workers.

Toy tasks only (no models): each writes a small file per input and logs every start to a file, so the tests can
count how often each input was processed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from portrait3d.errors import UsageError
from portrait3d.utils.batch import (
    EXIT_BUG,
    EXIT_FAILED,
    EXIT_OK,
    ITEM_RECORD,
    BatchInputError,
    BatchItem,
    BatchOptions,
    ItemTask,
    Shard,
    WorkerInfo,
    assign_keys,
    done_records,
    expand_inputs,
    is_batch_argument,
    pick_device,
    read_manifests,
    run_batch,
)


class ToyTask(ItemTask):
    """Writes OUT/<key>/copy.txt (the input's text, upper case) and OUT/<key>/sub/len.txt; logs each start.

    An input whose text starts with ``bad`` raises a UsageError (an expected failure), ``bug`` a RuntimeError,
    ``half`` writes one file and then raises (to check that no partial output survives).
    """

    def __init__(self, log: Path) -> None:
        self.log = log
        self.worker: WorkerInfo | None = None

    def setup(self, worker: WorkerInfo) -> None:
        self.worker = worker

    def run(self, item: BatchItem, out_dir: Path) -> dict:
        with open(self.log, "a") as f:
            f.write(f"{item.key} {os.getpid()} {self.worker.worker if self.worker else -1}\n")
        text = item.path.read_text()
        if text.startswith("bad"):
            raise UsageError(f"{item.path.name}: this input is bad")
        if text.startswith("bug"):
            raise RuntimeError("a bug in the task")
        (out_dir / "copy.txt").write_text(text.upper())
        if text.startswith("half"):
            raise OSError("disk full, say")
        (out_dir / "sub").mkdir()
        (out_dir / "sub" / "len.txt").write_text(str(len(text)))
        return {"length": len(text)}


def starts(log: Path) -> list[str]:
    """Keys in the order the task started them."""
    return [line.split()[0] for line in log.read_text().splitlines()] if log.exists() else []


def make_inputs(root: Path, texts: dict[str, str]) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in texts.items():
        (root / name).write_text(text)
        paths.append(root / name)
    return paths


def quiet(**kw) -> BatchOptions:
    return BatchOptions(progress=False, **kw)


def leftovers(out: Path) -> list[str]:
    """Temporary files or folders anywhere under OUT (there must be none after a run)."""
    return [str(p) for p in out.rglob("*") if ".partial-" in p.name or ".old-" in p.name or p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- inputs and keys


def test_expand_inputs_files_folders_globs(tmp_path):
    d = tmp_path / "photos"
    make_inputs(d, {"b.jpg": "", "a.PNG": "", "notes.txt": "", ".hidden.jpg": ""})
    (d / "sub").mkdir()
    (d / "sub" / "c.jpg").write_text("")
    other = make_inputs(tmp_path, {"x.txt": ""})[0]
    assert expand_inputs([d]) == [d / "a.PNG", d / "b.jpg"]  # sorted, image suffixes only, no hidden, no sub-folder
    assert expand_inputs([str(d / "*.jpg"), d / "b.jpg", other]) == [d / "b.jpg", other]  # each once; files as is
    assert expand_inputs([str(d / "**" / "*.jpg")]) == [d / "b.jpg", d / "sub" / "c.jpg"]
    assert expand_inputs([d], suffixes={".txt"}) == [d / "notes.txt"]
    with pytest.raises(BatchInputError, match="no .* file matches"):
        expand_inputs([str(d / "*.gif")])
    with pytest.raises(BatchInputError, match="no .* file in this folder"):
        expand_inputs([d / "sub"], suffixes={".png"})
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        expand_inputs([tmp_path / "missing.jpg"])
    assert is_batch_argument(d) and is_batch_argument(str(d / "*.jpg"))
    assert not is_batch_argument(d / "b.jpg") and not is_batch_argument(tmp_path / "missing.jpg")
    weird = make_inputs(tmp_path, {"[1].jpg": ""})[0]
    assert not is_batch_argument(weird)  # an existing file whose name looks like a pattern is a file


def test_keys_are_stems_disambiguated_and_stable(tmp_path):
    a, b, c = tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg", tmp_path / "b" / "X.png"
    d, m = tmp_path / ".y.jpg", tmp_path / "manifest.json.jpg"
    items = assign_keys([a, tmp_path / "z.jpg", d, m])
    assert [it.key for it in items] == ["x", "z", "y", items[3].key]
    assert items[3].key.startswith("manifest.json-")  # never the manifest's own name
    assert [it.index for it in items] == [0, 1, 2, 3]
    clash = assign_keys([a, b, c])  # same stem (also up to case): each gets a hash of its path
    keys = [it.key for it in clash]
    assert len({k.casefold() for k in keys}) == 3 and all(k[:2].casefold() == "x-" for k in keys)
    assert assign_keys([a, b, c])[1].key == keys[1]  # deterministic
    # A path the manifests already know keeps its key; a new path with that stem gets another one.
    again = assign_keys([b, a], known={os.path.abspath(a): "x"})
    assert again[1].key == "x" and again[0].key != "x"
    assert assign_keys([a], reserved=["X"])[0].key != "x"


# ----------------------------------------------------------------------------- running, failures, resuming


def test_run_writes_folders_and_manifest_and_reports_failures(tmp_path):
    paths = make_inputs(tmp_path / "in", {"a.txt": "hello", "b.txt": "bad input", "c.txt": "bug!", "d.txt": "hi"})
    out, log = tmp_path / "out", tmp_path / "log"
    s = run_batch(paths, out, ToyTask(log), quiet(config={"size": 3}))
    assert [r.key for r in s.records] == ["a", "b", "c", "d"]
    assert [r.status for r in s.records] == ["done", "failed", "failed", "done"]
    assert s.done == 2 and len(s.failures) == 2 and [r.key for r in s.bugs] == ["c"]
    assert s.exit_code == EXIT_BUG
    assert s.summary_line() == f"2 done, 2 failed (see {out / 'manifest.json'})"
    assert (out / "a" / "copy.txt").read_text() == "HELLO" and (out / "a" / "sub" / "len.txt").read_text() == "5"
    assert not (out / "b").exists() and not (out / "c").exists() and leftovers(out) == []

    (m,) = read_manifests(out)
    head = json.loads((out / "manifest.json").read_text())
    assert head["format"] == "portrait3d-batch-manifest" and head["config"] == {"size": 3}
    a, b, c = m.records["a"], m.records["b"], m.records["c"]
    assert a.path == os.path.abspath(paths[0]) and a.result == {"length": 5} and a.attempts == 1
    assert a.outputs == ["copy.txt", "sub/len.txt"] and a.seconds >= 0 and a.error is None
    assert b.error == "b.txt: this input is bad" and not b.bug and b.traceback is None
    assert c.bug and c.error == "RuntimeError: a bug in the task" and "Traceback" in c.traceback
    # The item folder carries its own record (the commit marker).
    assert json.loads((out / "a" / ITEM_RECORD).read_text())["path"] == a.path


def test_rerun_skips_done_and_retries_failed(tmp_path):
    paths = make_inputs(tmp_path / "in", {"a.txt": "one", "b.txt": "bad", "c.txt": "three"})
    out, log = tmp_path / "out", tmp_path / "log"
    assert run_batch(paths, out, ToyTask(log), quiet()).exit_code == EXIT_FAILED
    again = run_batch(paths, out, ToyTask(log), quiet())
    assert again.skipped == 2 and again.exit_code == EXIT_FAILED
    assert starts(log) == ["a", "b", "c", "b"]  # only the failed input ran again
    paths[1].write_text("fixed")
    fixed = run_batch(paths, out, ToyTask(log), quiet())
    assert fixed.exit_code == EXIT_OK and fixed.skipped == 2 and starts(log)[-1] == "b"
    assert read_manifests(out)[0].records["b"].attempts == 3
    before = len(starts(log))
    assert run_batch(paths, out, ToyTask(log), quiet()).skipped == 3 and len(starts(log)) == before  # nothing to do
    assert [r.key for r in done_records(out)] == ["a", "b", "c"]

    (out / "c" / "sub" / "len.txt").unlink()  # an output went missing: the input is redone, the folder replaced
    run_batch(paths, out, ToyTask(log), quiet())
    assert starts(log)[-1] == "c" and (out / "c" / "sub" / "len.txt").exists() and leftovers(out) == []
    forced = run_batch(paths, out, ToyTask(log), quiet(force=True))
    assert forced.skipped == 0 and starts(log)[-3:] == ["a", "b", "c"]


def test_no_partial_outputs_and_leftovers_of_a_killed_run_are_removed(tmp_path):
    paths = make_inputs(tmp_path / "in", {"a.txt": "half-written", "b.txt": "ok"})
    out, log = tmp_path / "out", tmp_path / "log"
    s = run_batch(paths, out, ToyTask(log), quiet())
    assert s.records[0].status == "failed" and s.records[0].error == "disk full, say" and s.exit_code == EXIT_FAILED
    assert not (out / "a").exists() and leftovers(out) == []
    # What a `kill -9` leaves: a partial folder, an old folder moved aside, a manifest being written.
    (out / ".a.partial-4242").mkdir()
    (out / ".a.partial-4242" / "copy.txt").write_text("HALF")
    (out / ".b.old-4242").mkdir()
    (out / ".manifest.json.abc123.tmp").write_text("{")
    paths[0].write_text("whole")
    assert run_batch(paths, out, ToyTask(log), quiet()).exit_code == EXIT_OK
    assert leftovers(out) == [] and (out / "a" / "copy.txt").read_text() == "WHOLE"


def test_committed_item_missing_from_the_manifest_is_adopted_not_redone(tmp_path):
    # A run killed after renaming an item into place but before writing the manifest: the folder's own record
    # says it is complete, so the next run takes it as done.
    paths = make_inputs(tmp_path / "in", {"a.txt": "one", "b.txt": "two"})
    out, log = tmp_path / "out", tmp_path / "log"
    run_batch(paths, out, ToyTask(log), quiet())
    (out / "manifest.json").unlink()
    s = run_batch(paths, out, ToyTask(log), quiet())
    assert s.skipped == 2 and starts(log) == ["a", "b"] and s.exit_code == EXIT_OK
    assert set(read_manifests(out)[0].records) == {"a", "b"}


def test_foreign_folder_is_not_overwritten(tmp_path):
    paths = make_inputs(tmp_path / "in", {"a.txt": "one"})
    out, log = tmp_path / "out", tmp_path / "log"
    (out / "a").mkdir(parents=True)
    (out / "a" / "mine.txt").write_text("keep me")
    s = run_batch(paths, out, ToyTask(log), quiet())
    assert s.exit_code == EXIT_FAILED and "already exists" in s.records[0].error
    assert (out / "a" / "mine.txt").read_text() == "keep me" and starts(log) == []


def test_other_options_are_refused_without_force(tmp_path):
    paths = make_inputs(tmp_path / "in", {"a.txt": "one"})
    out, log = tmp_path / "out", tmp_path / "log"
    run_batch(paths, out, ToyTask(log), quiet(config={"size": 128, "style": "eg3d"}))
    with pytest.raises(BatchInputError, match=r"other options \(size: 128 -> 256\)"):
        run_batch(paths, out, ToyTask(log), quiet(config={"size": 256, "style": "eg3d"}))
    assert run_batch(paths, out, ToyTask(log), quiet(config={"size": 256, "style": "eg3d"}, force=True)).done == 1
    assert read_manifests(out)[0].config == {"size": 256, "style": "eg3d"}


def test_setup_errors_stop_the_batch(tmp_path):
    class Broken(ToyTask):
        def setup(self, worker: WorkerInfo) -> None:
            raise UsageError("no such model")

    paths = make_inputs(tmp_path / "in", {"a.txt": "one"})
    with pytest.raises(UsageError, match="no such model"):
        run_batch(paths, tmp_path / "out", Broken(tmp_path / "log"), quiet())


def test_plain_function_task(tmp_path):
    paths = make_inputs(tmp_path / "in", {"a.txt": "one"})

    def fn(src: Path, out_dir: Path) -> None:
        (out_dir / "x").write_text(src.read_text())

    s = run_batch(paths, tmp_path / "out", fn, quiet())
    assert s.exit_code == EXIT_OK and s.records[0].result == {} and s.records[0].outputs == ["x"]


# ----------------------------------------------------------------------------- shards and workers


def test_shards_split_the_inputs_and_share_the_manifests(tmp_path):
    paths = make_inputs(tmp_path / "in", {f"{c}.txt": c for c in "abcde"})
    out, log = tmp_path / "out", tmp_path / "log"
    assert Shard.from_env({"WORLD_SIZE": "2", "RANK": "1"}) == Shard(rank=1, world_size=2, local_rank=1)
    assert Shard.from_env({}) == Shard()
    with pytest.raises(BatchInputError):
        Shard.from_env({"WORLD_SIZE": "2", "RANK": "2"})
    r1 = run_batch(paths, out, ToyTask(log), quiet(shard=Shard(rank=1, world_size=2)))
    assert [r.key for r in r1.records] == ["b", "d"] and r1.manifest == out / "manifest.rank1.json"
    r0 = run_batch(paths, out, ToyTask(log), quiet(shard=Shard(rank=0, world_size=2)))
    assert [r.key for r in r0.records] == ["a", "c", "e"]
    assert sorted(p.name for p in out.glob("manifest*")) == ["manifest.rank0.json", "manifest.rank1.json"]
    # A single-process run reads both manifests: nothing left to do.
    alone = run_batch(paths, out, ToyTask(log), quiet())
    assert alone.skipped == 5 and sorted(starts(log)) == list("abcde")
    assert pick_device("cpu", WorkerInfo(Shard())) == "cpu"


def test_workers_give_the_same_results_as_one_process(tmp_path):
    paths = make_inputs(tmp_path / "in", {f"{c}.txt": c * 3 for c in "abcd"} | {"e.txt": "bad"})
    log1, log2 = tmp_path / "log1", tmp_path / "log2"
    one = run_batch(paths, tmp_path / "one", ToyTask(log1), quiet())
    two = run_batch(paths, tmp_path / "two", ToyTask(log2), quiet(workers=2))
    assert [(r.key, r.status, r.result, r.outputs, r.error) for r in one.records] == \
        [(r.key, r.status, r.result, r.outputs, r.error) for r in two.records]
    lines = [line.split() for line in log2.read_text().splitlines()]
    assert sorted(k for k, _, _ in lines) == list("abcde")  # each input once
    assert {pid for _, pid, _ in lines} - {str(os.getpid())} == {pid for _, pid, _ in lines}  # in worker processes
    assert {w for _, _, w in lines} <= {"0", "1"}
    assert (tmp_path / "two" / "c" / "copy.txt").read_text() == "CCC" and leftovers(tmp_path / "two") == []

"""Run folders: a fresh run never writes over another run's snapshots unless asked (``--force``), and a resume
continues in place."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from tests.conftest import make_dataset

from portrait3d.training.snapshots import claim_run_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def _occupied(root):
    run = root / "run"
    (run / "snapshot-00000004").mkdir(parents=True)
    (run / "snapshot-00000004" / "state.json").write_text("{}")
    (run / "samples").mkdir()
    (run / "log.jsonl").write_text("{}\n")
    (run / "notes.txt").write_text("mine")
    return run


def test_a_fresh_or_missing_folder_is_free(tmp_path):
    claim_run_folder(tmp_path / "new", None, False)
    (tmp_path / "empty").mkdir()
    claim_run_folder(tmp_path / "empty", None, False)


def test_an_occupied_folder_is_refused_with_what_to_do(tmp_path):
    run = _occupied(tmp_path)
    with pytest.raises(FileExistsError, match=r"log\.jsonl already exists: pass --resume .* or --force"):
        claim_run_folder(run, None, False, exports=("G_ema.safetensors",))
    other = _occupied(tmp_path / "other")
    with pytest.raises(FileExistsError):  # resuming another run into this one would mix two runs
        claim_run_folder(run, other / "snapshot-00000004", False)


def test_resume_continues_in_place(tmp_path):
    run = _occupied(tmp_path)
    claim_run_folder(run, run, False)
    claim_run_folder(run, run / "snapshot-00000004", False)
    assert (run / "snapshot-00000004").is_dir()


def test_force_clears_the_run_but_not_other_files(tmp_path):
    run = _occupied(tmp_path)
    claim_run_folder(run, None, True)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_cli_second_run_is_refused_then_forced(tmp_path):
    from portrait3d.interfaces.cli import main

    data = make_dataset(tmp_path / "data", 8, 32)
    args = ["train", "stylegan2", "--data", str(data), "--out", str(tmp_path / "run"), "--config", "tiny",
            "--kimg", "0.008", "--snap", "0.004", "--threads", "1", "--no-progress"]
    runner = CliRunner()
    assert runner.invoke(main, args).exit_code == 0
    first = (tmp_path / "run" / "log.jsonl").read_text()
    again = runner.invoke(main, args)
    assert again.exit_code == 2 and "--resume" in again.output and "Traceback" not in again.output
    assert (tmp_path / "run" / "log.jsonl").read_text() == first  # untouched
    forced = runner.invoke(main, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert (tmp_path / "run" / "log.jsonl").read_text().count("\n") == first.count("\n")  # a new log, not appended


def test_snapshot_temporaries_of_a_killed_writer_are_swept(tmp_path):
    """A trainer killed while writing a snapshot leaves ``.snapshot-N.tmp-PID`` (with a half-written export inside);
    the next snapshot written into that run deletes it, but never the folders of a live writer."""
    import os
    import subprocess
    import sys

    import torch

    from portrait3d.training.snapshots import write_snapshot_folder

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = dead.stdout.strip()
    stale = tmp_path / f".snapshot-00000004.tmp-{pid}"
    stale.mkdir()
    (stale / f".G_ema.safetensors.{pid}.abcd.tmp").write_bytes(b"half")
    replaced = tmp_path / f".snapshot-00000002.old-{pid}"
    replaced.mkdir()
    live = tmp_path / ".snapshot-00000004.tmp-1"  # PID 1 always runs
    live.mkdir()
    mine = tmp_path / f".snapshot-00000003.tmp-{os.getpid()}-x"  # not a PID suffix: left alone
    mine.mkdir()
    write_snapshot_folder(tmp_path / "snapshot-00000008", {"x": torch.zeros(2)}, {"step": 8})
    assert not stale.exists() and not replaced.exists()
    assert live.exists() and mine.exists()
    assert (tmp_path / "snapshot-00000008" / "state.json").is_file()

"""The command line's shared conventions: every command listed, one error line for the user's mistakes (click's
own included), finite numbers only, a checked --device, and --debug for tracebacks."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from tests.conftest import assert_clean_failure, run_cli

from portrait3d.interfaces.cli import main

COMMANDS = ("align", "convert", "dataset", "demo", "edit", "encode3d", "identity", "info", "invert3d", "lift", "nrsfm",
            "pie", "render", "train", "transfer", "web")


def test_help_lists_every_command():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0
    listed = {line.split()[0] for line in res.output.split("Commands:")[1].splitlines() if line.strip()}
    assert set(COMMANDS) <= listed
    train = CliRunner().invoke(main, ["train", "--help"]).output
    assert all(t in train for t in ("stylegan2", "eg3d", "lift", "encoder", "pose", "teacher-set", "wtri", "rignet"))
    eg3d = CliRunner().invoke(main, ["train", "eg3d", "--help"]).output
    assert "None" not in eg3d  # unbounded float options print no "x<=None" range


@pytest.mark.parametrize("args, pattern", [
    (["render", "folder", "--yaw", "nan"], "not a finite number"),
    (["render", "folder", "--yaw", "inf"], "not in the range"),
    (["edit", "1", "--yaw", "5", "--lambda-id", "inf", "--out", "o"], "not a finite number"),
    (["render", "folder", "--yaw", "120"], "not in the range"),
    (["edit", "1", "--yaw", "5", "--lambda-id", "nan", "--out", "o"], "not a finite number"),
    (["render", "folder", "--yaw", "10", "--device", "banana"], "--device must be"),
    (["render"], "Missing argument"),
    (["no-such-command"], "No such command"),
])
def test_the_users_mistakes_are_one_error_line(tmp_path, args, pattern):
    assert_clean_failure(run_cli(*[str(tmp_path / a) if a in ("folder", "o") else a for a in args]), pattern)


def test_debug_shows_the_traceback(tmp_path):
    res = CliRunner().invoke(main, ["--debug", "render", str(tmp_path / "missing"), "--yaw", "10"])
    assert res.exit_code != 0 and isinstance(res.exception, FileNotFoundError)

"""``portrait3d train teacher-set`` and ``train eg3d --distill``: end to end on default-2d, and bad input."""

from __future__ import annotations

import pytest
from tests.conftest import assert_clean_failure, make_dataset, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def test_teacher_set_then_distil_eg3d_from_it(tmp_path):
    teacher = tmp_path / "teacher"
    res = run_cli("train", "teacher-set", "--out", str(teacher), "--count", "6", "--turn", "15", "--threads", "1")
    assert res.exit_code == 0, res.output
    assert "6 faces" in res.output and "turned views measured" in res.output
    again = run_cli("train", "teacher-set", "--out", str(teacher), "--count", "6", "--turn", "0")
    assert_clean_failure(again, "already holds")
    data = make_dataset(tmp_path / "data", 4, 128)
    res = run_cli("train", "eg3d", "--data", str(data), "--out", str(tmp_path / "run"), "--config", "cpu-proj",
                  "--init-2d", "default-2d", "--distill", str(teacher), "--no-adversarial", "--kimg", "0.002",
                  "--batch", "2", "--snap", "0", "--sample-every", "0", "--threads", "1", "--no-progress")
    assert res.exit_code == 0, res.output
    assert "distilling from 6 samples" in res.output and (tmp_path / "run" / "G_ema.safetensors").is_file()


def test_distillation_needs_a_teacher_that_fits(tmp_path):
    data = make_dataset(tmp_path / "data", 4, 128)
    res = run_cli("train", "eg3d", "--data", str(data), "--out", str(tmp_path / "run"), "--config", "cpu-proj",
                  "--no-adversarial", "--kimg", "0.002", "--batch", "2")
    assert_clean_failure(res, "teacher")
    res = run_cli("train", "eg3d", "--data", str(data), "--out", str(tmp_path / "run"), "--config", "cpu-proj",
                  "--distill", str(tmp_path), "--kimg", "0.002", "--batch", "2")
    assert_clean_failure(res, "not a teacher set")
    res = run_cli("train", "teacher-set", "--out", str(tmp_path / "t"), "--network", "default-3d", "--count", "2")
    assert_clean_failure(res, "unconditional 2D")
    res = run_cli("train", "teacher-set", "--out", str(tmp_path / "t"), "--add-views", "--turn", "0")
    assert_clean_failure(res, "--turn")


def test_eg3d_plane_width_and_resolution_options(tmp_path):
    """`--plane-channels` / `--plane-resolution` (issue 13's thinner and smaller planes) reach the exported
    generator; a resume without them is refused in one line, with them it continues."""
    import json

    from portrait3d.checkpoints.native import load_native

    data = make_dataset(tmp_path / "data", 4, 128)
    run = tmp_path / "run"
    args = ["train", "eg3d", "--data", str(data), "--out", str(run), "--config", "tiny", "--batch", "2",
            "--snap", "0.002", "--sample-every", "0", "--threads", "1", "--no-progress"]
    res = run_cli(*args, "--kimg", "0.002", "--plane-channels", "8", "--plane-resolution", "64")
    assert res.exit_code == 0, res.output
    G = load_native(run / "G_ema.safetensors")
    assert (G.config.plane_channels, G.config.plane_resolution) == (8, 64)
    assert json.loads((run / "config.json").read_text())["config"]["G"]["plane_channels"] == 8
    assert_clean_failure(run_cli(*args, "--kimg", "0.004", "--resume", str(run)), "other network settings")
    res = run_cli(*args, "--kimg", "0.004", "--resume", str(run), "--plane-channels", "8", "--plane-resolution", "64")
    assert res.exit_code == 0, res.output

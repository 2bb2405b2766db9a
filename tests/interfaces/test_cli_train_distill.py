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

"""Crash safety (issue 18): commands that write are killed (SIGKILL) at random points; every output file that
exists afterwards must be complete (it decodes), and a rerun must succeed and leave no temporary file behind.
(Batch mode has its own kill test in tests/interfaces/test_cli_batch.py.)"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import shared_path

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PHOTO = "data/portraits/deepface/img1.jpg"


def _command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "portrait3d.interfaces.cli", *args, "--threads", "1"]


def _check_complete(folder: Path) -> list[str]:
    """Names of the visible files, each checked to decode completely."""
    names = []
    for p in sorted(folder.rglob("*")):
        # hidden names are temporaries, and so is everything inside a hidden (temporary) folder
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        names.append(str(p.relative_to(folder)))
        if p.suffix == ".png":
            with Image.open(p) as im:
                im.load()
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".npy":
            np.load(p, allow_pickle=False)
        elif p.suffix == ".mp4":
            head = p.read_bytes()[:12]
            assert head[4:8] == b"ftyp", p
        elif p.suffix == ".txt":
            p.read_text(encoding="utf-8")
        elif p.suffix == ".safetensors":
            from safetensors.numpy import load_file

            load_file(str(p))
        elif p.suffix == ".ply":
            assert p.read_bytes().startswith(b"ply"), p
    return names


def _setup(command: str, tmp_path: Path, out: Path) -> list[str]:
    """The arguments of a command that writes into ``out`` (and what it needs first)."""
    photo = str(shared_path(PHOTO))
    invert = ["invert3d", photo, "--out", str(out), "--steps", "4", "--orbit-frames", "8", "--mesh-resolution", "32",
              "--force"]
    if command == "dataset":
        photos = tmp_path / "photos"
        photos.mkdir()
        for name in ("img1.jpg", "img2.jpg", "img3.jpg"):
            (photos / name).write_bytes(shared_path(f"data/portraits/deepface/{name}").read_bytes())
        return ["dataset", "build", str(photos), str(out), "--resolution", "64", "--force"]
    if command == "render":  # re-renders a folder that invert3d wrote
        done = subprocess.run(_command(invert), env=ENV, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return ["render", str(out), "--yaw", "-20", "--yaw", "20", "--orbit", "--orbit-frames", "8", "--force"]
    if command == "encode3d":  # an encoder of the shipped architecture; its weights do not matter here
        from portrait3d.checkpoints import load_network
        from portrait3d.methods.wtri.encoder import WTriEncoder, WTriEncoderConfig

        encoder = WTriEncoder(WTriEncoderConfig.for_generator(load_network("default-3d"), iterations=2))
        encoder.save(tmp_path / "encoder.safetensors")
        return ["encode3d", photo, "--out", str(out), "--encoder", str(tmp_path / "encoder.safetensors"),
                "--orbit-frames", "8", "--mesh-resolution", "32", "--force"]
    return {"demo": ["demo", "--out", str(out), "--samples", "2", "--orbit-frames", "8", "--force"],
            "align": ["align", photo, "--out", str(out), "--force"], "invert3d": invert}[command]


@pytest.mark.parametrize("command", ["demo", "align", "invert3d", "render", "encode3d", "dataset"])
def test_killed_command_leaves_only_complete_files(tmp_path, command):
    out = tmp_path / "out"
    args = _setup(command, tmp_path, out)
    t0 = time.monotonic()
    full = subprocess.run(_command(args), env=ENV, capture_output=True, text=True, timeout=600)
    duration = time.monotonic() - t0
    assert full.returncode == 0, full.stderr
    expected = _check_complete(out)
    rng = random.Random(0)
    for _ in range(3):
        proc = subprocess.Popen(_command(args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 0.95) * duration)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert set(_check_complete(out)) <= set(expected)  # whatever is there is whole
    again = subprocess.run(_command(args), env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert _check_complete(out) == expected
    assert not [p.name for p in out.rglob(".*.tmp")]  # the killed runs' temporaries are gone


def test_killed_training_resumes_from_its_last_complete_snapshot(tmp_path):
    """A trainer killed at random points leaves only whole snapshots; ``--resume`` then finishes the run."""
    from tests.conftest import make_dataset

    data = make_dataset(tmp_path / "data", 8, 32)
    out = tmp_path / "run"
    base = ["train", "stylegan2", "--data", str(data), "--out", str(out), "--config", "tiny", "--kimg", "0.064",
            "--snap", "0.008", "--no-progress"]
    t0 = time.monotonic()
    first = subprocess.run(_command([*base, "--force"]), env=ENV, capture_output=True, text=True, timeout=600)
    duration = time.monotonic() - t0
    assert first.returncode == 0, first.stderr
    rng = random.Random(1)
    for _ in range(3):
        proc = subprocess.Popen(_command([*base, "--force"]), env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 0.95) * duration)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        _check_complete(out)  # every file there decodes
        for snap in out.glob("snapshot-*"):
            json.loads((snap / "state.json").read_text())
    resumed = subprocess.run(_command([*base, "--resume", str(out)]), env=ENV, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    _check_complete(out)
    assert (out / "G_ema.safetensors").is_file()
    assert not [p.name for p in out.rglob(".*.tmp")]

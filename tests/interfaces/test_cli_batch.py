"""Batch mode of the photo commands: a folder or glob in, OUT/<key>/ per input, a manifest, resumable.

The acceptance test aligns 30 photos (28 UTKFace faces, a truncated JPEG, a photo without a face), kills the run
with SIGKILL about halfway, and checks that the rerun finishes with no input processed twice and no partial file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.conftest import assert_clean_failure, make_tiny_eg3d, run_cli, shared_path

from portrait3d import save_network

N_FACES = 28


def _faces(n: int) -> list[Path]:
    """``n`` UTKFace photos spread over the folder (ages, genders and ethnicities vary with the name)."""
    folder = shared_path("data/utkface")
    photos = sorted(folder.glob("*.jpg"))
    return photos[:: max(1, len(photos) // n)][:n]


def _manifest_items(out: Path) -> dict[str, dict]:
    return {r["key"]: r for r in json.loads((out / "manifest.json").read_text())["items"]}


def _leftovers(out: Path) -> list[str]:
    return [str(p) for p in out.rglob("*") if ".partial-" in p.name or ".old-" in p.name or p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """30 photos: 28 faces, ``corrupt.jpg`` (a JPEG cut to a third) and ``noface.png`` (flat grey)."""
    faces = _faces(N_FACES)
    root = tmp_path_factory.mktemp("photos")
    for p in faces:
        shutil.copy(p, root / p.name)
    data = faces[0].read_bytes()
    (root / "corrupt.jpg").write_bytes(data[: len(data) // 3])
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(root / "noface.png")
    return root


def _committed(out: Path) -> dict[str, tuple[int, int]]:
    """Inode and mtime of each committed ``OUT/<key>/aligned.png``. Not the killed run's partial folder
    (``.<key>.partial-<pid>/``): pathlib's ``*`` matches dot names, and the kill may land between its PNG and the
    rename that commits it."""
    return {p.parent.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*/aligned.png")
            if not p.parent.name.startswith(".")}


def _align_subprocess(photos: Path, out: Path, *extra: str) -> subprocess.Popen:
    """``python -m portrait3d.interfaces.cli align PHOTOS --out OUT`` in a process of its own, niced so that the
    test polling its manifest gets the CPU as soon as it wakes (the kill lands halfway on a busy machine)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "portrait3d.interfaces.cli", "align", str(photos), "--out", str(out),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: os.nice(5))


def _kill_when_done(proc: subprocess.Popen, manifest: Path, at_least: int, timeout: float = 300,
                    slice_s: float = 0.05) -> int:
    """SIGKILL ``proc`` once ``manifest`` records ``at_least`` done inputs; returns how many it recorded then.

    The child runs only in slices of ``slice_s`` seconds (SIGCONT ... SIGSTOP) and the manifest is read while it is
    stopped: on a crowded machine a plain poller can wake too late and find the whole batch done."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        proc.send_signal(signal.SIGCONT)
        time.sleep(slice_s)
        proc.send_signal(signal.SIGSTOP)
        try:
            n = sum(r["status"] == "done" for r in json.loads(manifest.read_text())["items"])
        except (OSError, ValueError, KeyError):  # not written yet (it is replaced atomically: never half-written)
            n = 0
        if n >= at_least:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return n
    proc.kill()  # SIGKILL ends a stopped process too
    out, err = proc.communicate()
    pytest.fail(f"the run ended (rc {proc.returncode}) before {at_least} inputs were done:\n{out}\n{err}")


def test_align_batch_killed_halfway_resumes_without_repeating_work(photos, tmp_path):
    out = tmp_path / "out"
    first = _align_subprocess(photos, out)
    done_at_kill = _kill_when_done(first, out / "manifest.json", at_least=10)
    assert first.returncode == -signal.SIGKILL and done_at_kill < N_FACES
    # Everything committed before the kill (some perhaps after the last manifest write): left alone by the rerun.
    committed = _committed(out)
    assert len(committed) >= done_at_kill

    t0 = time.monotonic()
    second = _align_subprocess(photos, out)
    stdout, stderr = second.communicate(timeout=300)
    seconds = time.monotonic() - t0
    assert second.returncode == 1, (stdout, stderr)  # 1: some inputs failed
    assert f"{N_FACES} done, 2 failed (see {out / 'manifest.json'})" in stdout
    assert f"{len(committed)} input(s) were already done" in stderr
    assert f"failed: {photos / 'corrupt.jpg'}" in stderr and f"failed: {photos / 'noface.png'}" in stderr
    assert "Traceback" not in stderr

    items = _manifest_items(out)
    assert len(items) == N_FACES + 2
    failed = {k: r for k, r in items.items() if r["status"] == "failed"}
    assert sorted(failed) == ["corrupt", "noface"] and not any(r["bug"] for r in failed.values())
    assert "face" in failed["noface"]["error"].lower()
    # No input was processed twice over the two runs, and nothing done before the kill was rewritten.
    assert all(r["attempts"] == 1 for r in items.values()), {k: r["attempts"] for k, r in items.items()}
    now = _committed(out)
    assert {k: now[k] for k in committed} == committed
    # No partial file, every done input complete.
    assert _leftovers(out) == []
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [k for k, r in items.items() if r["status"] == "done"] + ["cameras.json", "manifest.json", "poses.json"])
    for key, r in items.items():
        if r["status"] == "done":
            assert r["outputs"] == ["aligned.png"] and Image.open(out / key / "aligned.png").size == (128, 128)
    labels = json.loads((out / "cameras.json").read_text())["labels"]
    assert len(labels) == N_FACES and all(len(cam) == 25 for _, cam in labels)
    assert labels[0][0] == f"{sorted(committed)[0]}/aligned.png"
    assert set(json.loads((out / "poses.json").read_text())) == {name for name, _ in labels}
    print(f"killed with {done_at_kill} done ({len(committed)} committed); rerun took {seconds:.1f} s")

    # A rerun after completion redoes nothing done, and retries the failures.
    res = run_cli("align", photos, "--out", out)
    assert res.exit_code == 1 and f"{N_FACES} input(s) were already done" in res.stderr
    items = _manifest_items(out)
    assert [items[k]["attempts"] for k in ("corrupt", "noface")] == [2, 2]
    assert all(r["attempts"] == 1 for k, r in items.items() if r["status"] == "done")
    shutil.copy(_faces(N_FACES + 1)[-1], photos / "noface.png")  # the photo was replaced by a good one
    try:
        res = run_cli("align", photos, "--out", out)
        assert res.exit_code == 1 and f"{N_FACES + 1} done, 1 failed" in res.output
        assert _manifest_items(out)["noface"]["attempts"] == 3
        assert len(json.loads((out / "cameras.json").read_text())["labels"]) == N_FACES + 1
    finally:
        Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(photos / "noface.png")


def test_align_workers_give_the_same_results(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    for p in _faces(6):
        shutil.copy(p, root / p.name)
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run_cli("align", str(root / "*.jpg"), "--out", one)
    r2 = run_cli("align", root, "--out", two, "--workers", "2")
    assert r1.exit_code == 0 and r2.exit_code == 0, (r1.output, r2.output)
    assert "6 done, 0 failed" in r1.output and "6 done, 0 failed" in r2.output
    i1, i2 = _manifest_items(one), _manifest_items(two)
    assert sorted(i1) == sorted(i2) and len(i1) == 6
    for key in i1:
        assert i1[key]["result"] == i2[key]["result"]
        assert (one / key / "aligned.png").read_bytes() == (two / key / "aligned.png").read_bytes()
    assert (one / "cameras.json").read_text() == (two / "cameras.json").read_text()


def test_single_photo_mode_is_unchanged(tmp_path):
    photo = _faces(1)[0]
    res = run_cli("align", photo, "--out", tmp_path / "o")
    assert res.exit_code == 0 and "wrote 1 aligned image(s), cameras.json and poses.json" in res.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == sorted(
        [photo.stem + ".png", "cameras.json", "poses.json"])


def test_batch_usage_errors(tmp_path):
    net = save_network(make_tiny_eg3d(), tmp_path / "g.safetensors")
    assert_clean_failure(run_cli("align", str(tmp_path / "*.jpg"), "--out", tmp_path / "o"), "no ")
    (tmp_path / "photos").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "photos" / "a.png")
    assert_clean_failure(run_cli("identity", tmp_path / "photos", tmp_path / "photos" / "a.png"), "--out")
    assert_clean_failure(run_cli("invert3d", tmp_path / "photos", "--out", tmp_path / "o", "--network",
                                 tmp_path / "missing.safetensors"), "no such checkpoint")
    assert_clean_failure(run_cli("lift", tmp_path / "photos", "--out", tmp_path / "o", "--network", net,
                                 "--lifted", tmp_path / "none.safetensors"), "--lifted")
    assert_clean_failure(run_cli("edit", tmp_path / "photos", "--yaw", "10", "--out", tmp_path / "o",
                                 "--nrsfm", tmp_path / "none.safetensors"), "--nrsfm")
    # A manifest made with other options is refused (without --force) before any work.
    run_cli("align", tmp_path / "photos", "--out", tmp_path / "al")
    assert_clean_failure(run_cli("align", tmp_path / "photos", "--out", tmp_path / "al", "--size", "64"),
                         "other options")


def test_invert3d_batch(tmp_path, one_thread):
    pytest.importorskip("portrait3d.methods.inversion3d.optimize")
    net = save_network(make_tiny_eg3d(), tmp_path / "g.safetensors")
    root = tmp_path / "in"
    root.mkdir()
    shutil.copy(shared_path("data/portraits/face_recognition/examples/knn_examples/train/obama/obama.jpg"),
                root / "obama.jpg")
    Image.fromarray(np.full((256, 256, 3), 200, np.uint8)).save(root / "blank.png")
    out = tmp_path / "out"
    res = run_cli("invert3d", root, "--out", out, "--network", net, "--steps", "1", "--orbit-frames", "3",
                  "--mesh-resolution", "16")
    assert res.exit_code == 1 and "1 done, 1 failed" in res.output, (res.output, res.exception)
    items = _manifest_items(out)
    assert items["obama"]["status"] == "done" and "no face" in items["blank"]["error"]
    assert {"result.json", "mesh.ply", "orbit.mp4", "latent.npy"} <= set(items["obama"]["outputs"])
    assert (out / "obama" / "result.json").is_file() and not (out / "blank").exists()
    assert set(items["obama"]["result"]) >= {"psnr_db", "yaw_deg"}


def test_lift_batch_of_latents(tmp_path, one_thread):
    from click.testing import CliRunner
    from tests.conftest import make_cli_stylegan2

    from portrait3d.interfaces.cli.train import lift_cmd

    net = save_network(make_cli_stylegan2(), tmp_path / "g.safetensors")
    res = CliRunner().invoke(lift_cmd, ["--network", str(net), "--out", str(tmp_path / "run"), "--kimg", "0.004",
                                        "--batch", "2", "--size", "16", "--no-progress", "--threads", "1"])
    assert res.exit_code == 0, res.output
    latents = tmp_path / "latents"
    latents.mkdir()
    rng = np.random.default_rng(0)
    for name, shape in (("a", (16,)), ("b", (8, 16)), ("wrong", (7,))):
        np.save(latents / f"{name}.npy", rng.standard_normal(shape).astype(np.float32))
    out = tmp_path / "out"
    res = run_cli("lift", str(latents / "*.npy"), "--network", net, "--lifted", tmp_path / "run" / "lifted.safetensors",
                  "--yaw", "0", "--out", out)
    assert res.exit_code == 1 and "2 done, 1 failed" in res.output, (res.output, res.exception)
    items = _manifest_items(out)
    assert items["a"]["status"] == items["b"]["status"] == "done" and "does not fit" in items["wrong"]["error"]
    assert {"image.png", "mesh.obj", "result.json"} <= set(items["a"]["outputs"]) and "view" in items["b"]["result"]


def test_identity_batch_compares_each_photo_with_photo_b(tmp_path):
    a, b = _faces(2)
    root = tmp_path / "in"
    root.mkdir()
    shutil.copy(a, root / "a.jpg")
    shutil.copy(b, root / "b.jpg")
    res = run_cli("identity", root, a, "--out", tmp_path / "out")
    assert res.exit_code == 0 and "2 done, 0 failed" in res.output, (res.output, res.exception)
    assert f"{root / 'a.jpg'}: same person: distance 0.0000" in res.output and "cosine similarity 1.0000" in res.output
    rec = json.loads((tmp_path / "out" / "b" / "identity.json").read_text())
    assert rec["photo_b"] == str(a.resolve()) and isinstance(rec["same_person"], bool)

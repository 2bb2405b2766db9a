"""``portrait3d nrsfm build``, ``edit`` and ``transfer`` end to end on a tiny random generator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tests.conftest import assert_clean_failure, make_cli_stylegan2, run_cli

from portrait3d import save_network


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("nrsfm")
    G = make_cli_stylegan2()
    net = save_network(G, root / "g.safetensors")
    editor = root / "editor.safetensors"
    res = run_cli("nrsfm", "build", "--network", str(net), "--out", str(editor), "--samples", "80", "--basis", "2",
                  "--sample-detector", "template", "--epochs", "3", "--cache", str(root / "cache"))
    assert res.exit_code == 0, res.output
    return root, net, editor


def test_build_writes_editor_report_and_figure(built):
    root, _, editor = built
    assert editor.is_file()
    report = json.loads((root / "editor_report.json").read_text())
    assert report["with_landmarks"] == 80 and report["num_basis"] == 2
    assert np.isfinite(report["factorization_rmse_px"])
    assert report["depth_prior_factor"] > 0 and report["config"]["depth_prior"]
    cal = report["pose_calibration"]  # random faces: calibrated to the PnP yaw, or left alone with the reason
    assert "skipped" in cal or abs(cal["slope_after"] - 1) <= 0.1
    from portrait3d.methods.nrsfm.editor import NRSfMEditor

    loaded = NRSfMEditor.load(editor)
    assert loaded.latent_factor is not None and loaded.latent_factor.shape[0] == loaded.phi.in_dim
    half = loaded.save(root / "half.safetensors", half=True)  # shipped editors: float16 weights, float32 on load
    assert half.stat().st_size < 0.7 * editor.stat().st_size
    again = NRSfMEditor.load(half)
    assert again.latent_factor.dtype == torch.float32
    w = torch.randn(3, loaded.phi.in_dim)
    assert torch.allclose(again.params(w), loaded.params(w), rtol=1e-2, atol=1e-2 * float(loaded.phi.q_std.max()))
    assert (root / "editor_basis.png").is_file()
    again = run_cli("nrsfm", "build", "--network", str(built[1]), "--out", str(editor), "--samples", "80")
    assert_clean_failure(again, "already exists")


@pytest.mark.parametrize("mode", ["linear", "gradient"])
def test_edit_seed(built, tmp_path, mode):
    _, net, editor = built
    out = tmp_path / mode
    res = run_cli("edit", "7", "--network", str(net), "--nrsfm", str(editor), "--yaw", "10", "--expr", "1=1",
                  "--mode", mode, "--steps", "3", "--out", str(out))
    assert res.exit_code == 0, res.output
    for name in ("original.png", "edited.png", "grid.png", "result.json", "latent.npy", "original_latent.npy"):
        assert (out / name).is_file(), name
    rec = json.loads((out / "result.json").read_text())
    names = rec["parameter_names"]
    yaw = names.index("yaw")
    assert rec["target"][yaw] == pytest.approx(10, abs=1e-4)  # --yaw is the head yaw to reach
    assert rec["edit"]["angles"] == "absolute" and isinstance(rec["warnings"], list)
    assert rec["seed"] == 7 and rec["mode"] == mode
    rel = tmp_path / f"{mode}-relative"
    res = run_cli("edit", "7", "--network", str(net), "--nrsfm", str(editor), "--yaw", "10", "--relative",
                  "--mode", mode, "--steps", "3", "--out", str(rel))
    assert res.exit_code == 0, res.output
    rec = json.loads((rel / "result.json").read_text())
    assert rec["target"][yaw] == pytest.approx(rec["phi_before"][yaw] + 10, abs=1e-4)
    # Never clobbers without --force.
    assert_clean_failure(run_cli("edit", "7", "--network", str(net), "--nrsfm", str(editor), "--yaw", "10",
                                 "--out", str(out)), "already exists")


def test_transfer_seeds(built, tmp_path):
    _, net, editor = built
    out = tmp_path / "t"
    res = run_cli("transfer", "1", "2", "--network", str(net), "--nrsfm", str(editor), "--mode", "linear",
                  "--out", str(out))
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "result.json").read_text())
    assert rec["part"] == "pose" and (out / "source.png").is_file()


@pytest.mark.parametrize("args, pattern", [
    (["--yaw", "61", "--relative"], "out of range"),
    (["--yaw", "95"], "not in the range"),
    (["--expr", "7=1"], "does not exist"),
    (["--expr", "x"], "COMPONENT=VALUE"),
    ([], "nothing to edit"),
])
def test_edit_rejects_bad_values(built, tmp_path, args, pattern):
    _, net, editor = built
    assert_clean_failure(run_cli("edit", "1", "--network", str(net), "--nrsfm", str(editor), *args,
                                 "--out", str(tmp_path / "o")), pattern)


def test_edit_bad_inputs(built, tmp_path):
    _, net, editor = built
    assert_clean_failure(run_cli("edit", "no_such.png", "--network", str(net), "--nrsfm", str(editor), "--yaw", "5",
                                 "--out", str(tmp_path / "a")), "neither a seed")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    assert_clean_failure(run_cli("edit", "1", "--network", str(net), "--nrsfm", str(bad), "--yaw", "5",
                                 "--out", str(tmp_path / "b")), "bad.safetensors")
    assert_clean_failure(run_cli("edit", "1", "--network", str(net), "--yaw", "5", "--out", str(tmp_path / "c")),
                         "no NRSfM editor")


def test_edit_photo_inverts_then_edits(built, tmp_path):
    from tests.conftest import shared_path

    photo = shared_path("data/portraits/face_recognition/examples/knn_examples/train/obama/obama.jpg")
    _, net, editor = built
    out = tmp_path / "photo"
    res = run_cli("edit", str(photo), "--network", str(net), "--nrsfm", str(editor), "--pitch", "5", "--mode", "linear",
                  "--project-steps", "3", "--out", str(out))
    assert res.exit_code == 0, res.output
    for name in ("aligned.png", "projection.png", "original.png", "edited.png", "grid.png"):
        assert (out / name).is_file(), name
    rec = json.loads((out / "result.json").read_text())
    assert rec["photo"] == str(photo) and rec["num_faces"] == 1 and rec["projection_steps"] == 3
    assert rec["identity_reference"] == "none (linear edit)"
    # A photo is projected with the photo-edit settings (latent prior, stronger identity), and eq. 15's identity
    # term of a gradient edit compares with the photo, at the photo's lambda_ID.
    from portrait3d.methods.nrsfm.pipeline import PhotoEditConfig

    cfg = PhotoEditConfig()
    assert rec["projection"] == {"identity_weight": cfg.identity_weight, "latent_prior_weight": cfg.latent_prior_weight,
                                 "pti_steps": cfg.pti_steps}
    grad = tmp_path / "photo-gradient"
    res = run_cli("edit", str(photo), "--network", str(net), "--nrsfm", str(editor), "--yaw", "10", "--relative",
                  "--steps", "2", "--project-steps", "3", "--out", str(grad))
    assert res.exit_code == 0, res.output
    rec = json.loads((grad / "result.json").read_text())
    assert rec["identity_reference"] == "photo" and rec["lambda_id"] == cfg.lambda_id and rec["feedback"] == 1
    assert len(rec["feedback_edits"]) in (1, 2)  # a random generator's faces are rarely measurable
    seed = tmp_path / "seed-gradient"
    res = run_cli("edit", "7", "--network", str(net), "--nrsfm", str(editor), "--yaw", "10", "--relative",
                  "--steps", "2", "--out", str(seed))
    assert res.exit_code == 0, res.output
    rec = json.loads((seed / "result.json").read_text())
    assert rec["identity_reference"] == "original render" and rec["lambda_id"] == 0.01


def test_edit_photo_with_pivotal_tuning_renders_with_the_tuned_generator(built, tmp_path):
    """--pti-steps tunes a copy of the generator to the photo: the projection and the edit's original are its renders
    (not the shipped generator's), and the record says how many steps ran; the CLI shows the configured default."""
    from PIL import Image
    from tests.conftest import shared_path

    from portrait3d.checkpoints import load_network
    from portrait3d.methods.nrsfm.data import synthesize
    from portrait3d.methods.nrsfm.pipeline import PhotoEditConfig
    from portrait3d.utils.visualize import to_uint8

    photo = shared_path("data/portraits/face_recognition/examples/knn_examples/train/obama/obama.jpg")
    _, net, editor = built
    G = load_network(str(net)).eval()
    out = tmp_path / "pti"
    res = run_cli("edit", str(photo), "--network", str(net), "--nrsfm", str(editor), "--pitch", "5", "--mode", "linear",
                  "--project-steps", "3", "--pti-steps", "4", "--feedback", "0", "--out", str(out))
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "result.json").read_text())
    assert rec["pti_steps"] == 4 and rec["projection"]["pti_steps"] == 4 and "mse" in rec["pti_last"]
    latent = torch.as_tensor(np.load(out / "original_latent.npy"))
    with torch.no_grad():
        untuned = to_uint8(synthesize(G, latent, "w"))[0].astype(np.int16)
    original = np.asarray(Image.open(out / "original.png").convert("RGB")).astype(np.int16)
    projection = np.asarray(Image.open(out / "projection.png").convert("RGB")).astype(np.int16)
    assert np.abs(original - projection).max() <= 1  # the same tuned render, saved twice
    assert np.abs(original - untuned).mean() > 0.5   # ... which the shipped generator does not make
    help_text = run_cli("edit", "--help").output
    assert f"{PhotoEditConfig.pti_steps} (PhotoEditConfig.pti_steps)" in " ".join(help_text.split())


def test_edit_photo_without_face(built, tmp_path):
    from PIL import Image

    _, net, editor = built
    blank = tmp_path / "blank.png"
    Image.new("RGB", (256, 256), (120, 120, 120)).save(blank)
    assert_clean_failure(run_cli("edit", str(blank), "--network", str(net), "--nrsfm", str(editor), "--yaw", "5",
                                 "--out", str(tmp_path / "o")), "face")


def test_edit_photo_with_several_faces_uses_the_largest_and_says_so(built, tmp_path):
    from tests.conftest import shared_path

    photo = shared_path("data/portraits/face_recognition/examples/knn_examples/test/obama_and_biden.jpg")
    _, net, editor = built
    res = run_cli("edit", str(photo), "--network", str(net), "--nrsfm", str(editor), "--yaw", "5", "--mode", "linear",
                  "--sample-detector", "template", "--project-steps", "1", "--out", str(tmp_path / "o"))
    assert res.exit_code == 0, res.output
    assert "2 faces found" in res.stderr and "the largest was used" in res.stderr

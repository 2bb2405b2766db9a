"""``portrait3d invert3d`` and ``portrait3d render`` end to end on a tiny random EG3D and a real photo."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tests.conftest import assert_clean_failure, make_tiny_eg3d, run_cli, shared_path

from portrait3d import save_network
from portrait3d.interfaces.invert3d import OUTPUTS, render_filename
from portrait3d.methods.inversion3d.pipeline import NOVEL_YAWS, view_camera
from portrait3d.metrics.psnr import psnr
from portrait3d.networks.eg3d.camera import camera_from_angles, pose_angles_from_camera

PHOTO = "data/portraits/face_recognition/examples/knn_examples/train/obama/obama.jpg"
TWO_FACES = "data/portraits/face_recognition/examples/knn_examples/test/obama_and_biden.jpg"
FAST = ["--orbit-frames", "3", "--mesh-resolution", "24"]


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    return save_network(make_tiny_eg3d(), tmp_path_factory.mktemp("net") / "g.safetensors")


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    """Tiny random encoder and pose estimator files: ``(encoder, pose)``."""
    nets = pytest.importorskip("portrait3d.methods.inversion3d.networks")
    root = tmp_path_factory.mktemp("modules")
    torch.manual_seed(0)
    small = {"input_size": 32, "width": 8, "layers": (1, 1, 1, 1), "head_channels": 16}
    enc = nets.LatentEncoder(nets.EncoderConfig(**small), generator=make_tiny_eg3d())
    pose = nets.PoseEstimator(nets.PoseConfig(**small))
    return nets.save_module(enc, root / "encoder.safetensors"), nets.save_module(pose, root / "pose.safetensors")


@pytest.fixture(scope="module")
def inverted(network, modules, tmp_path_factory):
    """One run without PTI (face-pipeline camera, w_avg start) and one with PTI, encoder and pose estimator:
    ``{False: folder, True: folder}``."""
    pytest.importorskip("portrait3d.methods.inversion3d.optimize")
    photo = shared_path(PHOTO)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("invert3d")
        folders = {}
        encoder, pose = modules
        for pti, extra in ((False, ["--steps", "2", "--no-pti"]),
                           (True, ["--steps", "1", "--pti", "--pti-steps", "1", "--encoder", encoder,
                                   "--pose", pose])):
            out = root / ("pti" if pti else "plain")
            res = run_cli("invert3d", photo, "--out", out, "--network", network, *extra, *FAST)
            assert res.exit_code == 0, (res.output, res.exception)
            assert f"wrote {out}" in res.output
            folders[pti] = out
        yield folders
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- helpers


def test_view_camera_keeps_pitch_roll_distance_and_intrinsics():
    base = camera_from_angles(7.0, -4.0, radius=2.9, roll_deg=3.0)
    base[16] = base[20] = 5.0  # a different focal length
    c = view_camera(base, -30.0)
    yaw, pitch, roll, radius = pose_angles_from_camera(c[0])
    assert (yaw, pitch, roll, radius) == pytest.approx((-30.0, -4.0, 3.0, 2.9), abs=1e-4)
    assert torch.equal(c[0, 16:], base[16:])
    assert pose_angles_from_camera(view_camera(base, 10.0, 12.0)[0])[1] == pytest.approx(12.0, abs=1e-4)
    with pytest.raises(ValueError, match="pitch"):
        view_camera(base, 0.0, 95.0)


def test_render_filenames_and_psnr():
    assert render_filename(30, -5) == "render_yaw+30_pitch-05.png"
    assert render_filename(-7.5, 0) == "render_yaw-07.5_pitch+00.png"
    assert render_filename(12.5, 4.9) == "render_yaw+12.5_pitch+04.9.png"
    a = np.zeros((4, 4, 3), np.uint8)
    assert math.isinf(psnr(a, a))
    assert psnr(a, a + 255) == pytest.approx(0.0)


def test_identity_of_the_input_with_itself():
    from portrait3d.face.pipeline import FacePipeline
    from portrait3d.methods.inversion3d.pipeline import IdentityMeter as _IdentityMeter

    with FacePipeline(style="eg3d", output_size=128) as pipe:
        face = pipe(shared_path(PHOTO))
        meter = _IdentityMeter(pipe, face.aligned.image, face.aligned.landmarks)
        assert meter(face.aligned.image) == pytest.approx(1.0, abs=0.02)
        assert meter(np.full((128, 128, 3), 128, np.uint8)) is None  # no face: no similarity
        same = meter.measure(face.aligned.image)
        assert same["cosine"] == pytest.approx(meter(face.aligned.image)) and same["distance"] < 0.2
        assert meter.measure(np.full((128, 128, 3), 128, np.uint8)) is None


# ----------------------------------------------------------------------------- invert3d


@pytest.mark.parametrize("pti", [False, True])
def test_invert3d_writes_every_output(inverted, pti):
    import trimesh

    out = inverted[pti]
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "generator.safetensors").is_file() == pti
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    for name in ("input_aligned.png", "reconstruction.png", "view_yaw-30.png", "view_yaw+30.png", "depth.png"):
        with Image.open(out / name) as im:
            assert im.size == (128, 128) and im.mode == "RGB", name
    assert (out / "orbit.mp4").stat().st_size > 1000
    mesh = trimesh.load(out / "mesh.ply", process=False)
    assert len(mesh.faces) > 0 and mesh.is_watertight
    assert np.asarray(mesh.visual.vertex_colors).shape == (len(mesh.vertices), 4)
    ws = np.load(out / "latent.npy")
    assert ws.dtype == np.float32 and ws.ndim == 3 and ws.shape[0] == 1 and ws.shape[2] == 512

    rec = json.loads((out / "result.json").read_text())
    assert rec["algorithm"] == 1 and rec["pti"] is pti and rec["config"]["pti"] is pti
    if pti:
        assert rec["generator"] == "generator.safetensors" and rec["config"]["pti_config"]["steps"] == 1
    else:
        assert rec["generator"] is None and rec["config"]["steps"] == 2
    assert rec["network"].endswith("g.safetensors")
    cam = rec["camera"]
    assert len(cam["label"]) == 25
    assert pose_angles_from_camera(torch.tensor(cam["label"]))[0] == pytest.approx(cam["yaw_deg"], abs=1e-3)
    assert abs(rec["face_pipeline_pose"]["yaw_deg"]) < 30  # obama.jpg is nearly frontal
    assert rec["faces_found"] == 1
    if pti:
        assert rec["initialisation"]["camera"].startswith("pose estimator")
        assert rec["initialisation"]["latent"].startswith("encoder")
    else:
        assert rec["initialisation"] == {"latent": "optimiser default", "camera": "face pipeline (PnP head pose)"}
    assert np.isfinite(rec["psnr_db"]) and rec["psnr_db"] > 0
    assert set(rec["identity_cosine_dlib"]) == {"reconstruction.png", "view_yaw-30.png", "view_yaw+30.png"}
    assert [v["yaw_deg"] for v in rec["novel_views"].values()] == list(NOVEL_YAWS)
    assert 0 < len(rec["loss_history_tail"]) <= 10 and "loss" in rec["loss_history_tail"][-1]
    assert rec["mesh"]["faces"] == len(mesh.faces)
    assert {"invert", "mesh", "total"} <= set(rec["timings_s"]) and "total" in rec["optimiser_timings_s"]


@pytest.mark.parametrize("pti", [False, True])
def test_render_reproduces_and_extends_the_folder(inverted, pti):
    out = inverted[pti]
    res = run_cli("render", out, "--yaw", "-30", "--yaw", "15", "--orbit", "--orbit-frames", "2")
    assert res.exit_code == 0, (res.output, res.exception)
    pitch = round(json.loads((out / "result.json").read_text())["camera"]["pitch_deg"], 1)
    again = out / render_filename(-30, pitch)
    assert again.is_file() and (out / render_filename(15, pitch)).is_file()
    assert (out / "render_orbit.mp4").stat().st_size > 1000
    # The folder's generator (tuned or referenced) and latent re-render view_yaw-30.png exactly.
    a, b = (np.asarray(Image.open(p)).astype(int) for p in (out / "view_yaw-30.png", again))
    assert np.abs(a - b).max() <= 1

    assert_clean_failure(run_cli("render", out, "--yaw", "-30"), "pass --force to overwrite")
    assert run_cli("render", out, "--yaw", "-30", "--force").exit_code == 0
    res = run_cli("render", out, "--pitch", "10")
    assert res.exit_code == 0 and (out / "render_yaw+00_pitch+10.png").is_file()


def test_invert3d_refuses_to_overwrite_without_force(inverted, network):
    out = inverted[False]
    before = (out / "result.json").read_bytes()
    res = run_cli("invert3d", shared_path(PHOTO), "--out", out, "--network", network, "--steps", "1", *FAST)
    assert_clean_failure(res, "pass --force to overwrite")
    assert (out / "result.json").read_bytes() == before


# ----------------------------------------------------------------------------- failures (no optimisation needed)


def test_existing_output_is_refused_before_any_work(tmp_path, network):
    (tmp_path / "mesh.ply").write_text("mine")
    res = run_cli("invert3d", tmp_path / "no-such-photo.jpg", "--out", tmp_path, "--network", network)
    assert_clean_failure(res, "mesh.ply")
    assert (tmp_path / "mesh.ply").read_text() == "mine"


def test_blank_image_has_no_face(tmp_path, network):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((256, 256, 3), 200, np.uint8)).save(blank)
    assert_clean_failure(run_cli("invert3d", blank, "--out", tmp_path / "o", "--network", network), "no face")
    assert not (tmp_path / "o").exists()


def test_several_faces_use_the_largest_and_say_so(tmp_path, network):
    res = run_cli("invert3d", shared_path(TWO_FACES), "--out", tmp_path / "ok", "--network", network,
                  "--steps", "1", *FAST)
    assert res.exit_code == 0, res.output
    assert "2 faces found" in res.stderr and "the largest was used" in res.stderr
    assert any("2 faces found" in n for n in json.loads((tmp_path / "ok" / "result.json").read_text())["notes"])
    res = run_cli("invert3d", shared_path(TWO_FACES), "--out", tmp_path / "o", "--network", network,
                  "--face-index", "5")
    assert_clean_failure(res, "out of range")
    assert not (tmp_path / "o").exists()


def test_unreadable_or_missing_photo(tmp_path, network):
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"not a jpeg at all" * 10)
    assert_clean_failure(run_cli("invert3d", bad, "--out", tmp_path / "o", "--network", network), "not an image")
    assert_clean_failure(run_cli("invert3d", tmp_path / "missing.jpg", "--out", tmp_path / "o", "--network", network),
                         "no such file")


def test_bad_network_and_modules(tmp_path, network, tiny_stylegan2):
    photo = tmp_path / "blank.png"
    Image.fromarray(np.full((256, 256, 3), 0, np.uint8)).save(photo)
    g2 = save_network(tiny_stylegan2, tmp_path / "g2.safetensors")
    assert_clean_failure(run_cli("invert3d", photo, "--out", tmp_path / "o", "--network", g2), "not an EG3D")
    assert_clean_failure(run_cli("invert3d", photo, "--out", tmp_path / "o", "--network", tmp_path / "nope.pkl"),
                         "no such checkpoint")
    assert_clean_failure(run_cli("invert3d", photo, "--out", tmp_path / "o", "--network", network,
                                 "--pose", tmp_path / "nope.safetensors"), "no such pose estimator file")


def test_render_failures(tmp_path):
    assert_clean_failure(run_cli("render", tmp_path, "--yaw", "10"), "no result.json")
    assert_clean_failure(run_cli("render", tmp_path / "missing", "--yaw", "10"), "no such folder")
    assert_clean_failure(run_cli("render", tmp_path), "nothing to render")
    (tmp_path / "result.json").write_text("{not json")
    assert_clean_failure(run_cli("render", tmp_path, "--yaw", "10"), "not a result.json")


def test_encoder_and_pose_files_must_be_the_right_network(tmp_path, network, modules):
    encoder, pose = modules
    photo = shared_path(PHOTO)
    assert_clean_failure(run_cli("invert3d", photo, "--out", tmp_path / "o", "--network", network, "--pose", encoder),
                         "not a pose estimator")
    assert_clean_failure(run_cli("invert3d", photo, "--out", tmp_path / "o", "--network", network,
                                 "--encoder", network), "not a portrait3d encoder")
    assert not (tmp_path / "o").exists()


def test_builtin_init_paths_name_the_shipped_files(network):
    from portrait3d.methods.inversion3d.pipeline import builtin_init_paths

    assert builtin_init_paths(network) == (None, None)  # not a built-in network
    assert builtin_init_paths("default-2d") == (None, None)
    encoder, pose = builtin_init_paths("default-3d")
    for p, name in ((encoder, "encoder.safetensors"), (pose, "pose.safetensors")):
        assert p is None or (p.name == name and p.parent.name == "default-3d" and p.is_file())


def test_shipped_pose_estimator_starts_default_3d_unless_told_not_to(tmp_path):
    """invert3d on default-3d starts from the shipped pose estimator and encoder (result.json says so);
    --no-learned-init starts from the face pipeline's camera and the mean latent."""
    from portrait3d.methods.inversion3d.pipeline import builtin_init_paths

    if builtin_init_paths("default-3d")[1] is None:
        pytest.skip("default-3d ships no pose estimator")
    photo = shared_path(PHOTO)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hows = {}
        for flag in ("--learned-init", "--no-learned-init"):
            out = tmp_path / flag
            res = run_cli("invert3d", photo, "--out", out, "--steps", "1", flag, *FAST)
            assert res.exit_code == 0, (res.output, res.exception)
            hows[flag] = json.loads((out / "result.json").read_text())["initialisation"]
    finally:
        torch.set_num_threads(before)
    assert hows["--learned-init"]["camera"].startswith("pose estimator")
    assert "default-3d" in hows["--learned-init"]["camera"]
    if builtin_init_paths("default-3d")[0] is not None:  # the shipped encoder gives the start latent
        latent = hows["--learned-init"]["latent"]
        assert latent.startswith("encoder") and "default-3d" in latent
    assert hows["--no-learned-init"]["camera"] == "face pipeline (PnP head pose)"
    assert hows["--no-learned-init"]["latent"] == "optimiser default"

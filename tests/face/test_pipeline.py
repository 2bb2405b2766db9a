"""The whole face pipeline on real photos, and the align / identity commands end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tests.conftest import shared_path

from portrait3d.face.errors import FaceError, NoFaceError
from portrait3d.face.pipeline import FacePipeline, compare_photos
from portrait3d.interfaces.cli import main
from portrait3d.networks.eg3d.camera import pose_angles_from_camera

EXAMPLES = "data/portraits/face_recognition/examples"


@pytest.fixture(scope="module")
def pipe_eg3d():
    with FacePipeline(style="eg3d") as p:
        yield p


def test_eg3d_alignment_and_camera(pipe_eg3d):
    r = pipe_eg3d(shared_path(f"{EXAMPLES}/obama.jpg"))
    assert r.aligned.image.shape == (512, 512, 3) and r.num_faces == 1
    assert abs(r.pose.yaw_deg) < 15 and abs(r.pose.roll_deg) < 10
    yaw, pitch, roll, radius = pose_angles_from_camera(r.camera)
    assert radius == pytest.approx(2.7, abs=1e-4)
    assert r.camera.shape == (25,) and torch.isfinite(r.camera).all()


def test_several_faces_policy(pipe_eg3d):
    path = shared_path(f"{EXAMPLES}/two_people.jpg")
    first, second = pipe_eg3d(path), pipe_eg3d(path, face_index=1)
    assert first.num_faces == 2
    assert first.detection.area >= second.detection.area
    with pytest.raises(NoFaceError, match="2 face"):
        pipe_eg3d(path, face_index=2)


def test_find_landmarks68_is_the_largest_face_or_none(pipe_eg3d):
    """The measuring form for renders: the largest face's 68 landmarks, as the pipeline finds them, or None."""
    from portrait3d.face.io import load_image

    path = shared_path(f"{EXAMPLES}/two_people.jpg")
    lm = pipe_eg3d.find_landmarks68(load_image(path))
    assert lm.shape == (68, 2)
    np.testing.assert_array_equal(lm, pipe_eg3d(path).landmarks)
    assert pipe_eg3d.find_landmarks68(np.full((200, 200, 3), 127, np.uint8)) is None


def test_no_face_is_an_error(pipe_eg3d, tmp_path):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((200, 200, 3), 127, np.uint8)).save(blank)
    with pytest.raises(NoFaceError):
        pipe_eg3d(blank)


def test_identity_same_and_different():
    a, b, c = (shared_path(f"{EXAMPLES}/{n}") for n in ("obama.jpg", "obama2.jpg", "biden.jpg"))
    same, diff = compare_photos(a, b), compare_photos(a, c)
    assert same["same_person"] and not diff["same_person"]
    assert same["cosine"] > diff["cosine"]
    ref = compare_photos(a, b, backend="dlib")
    assert ref["distance"] == pytest.approx(same["distance"], abs=1e-3)


def _bad_inputs(tmp_path):
    files = {}
    p = tmp_path / "notes.jpg"
    p.write_text("not an image")
    files["not_image"] = p
    good = shared_path(f"{EXAMPLES}/obama.jpg").read_bytes()
    p = tmp_path / "truncated.jpg"
    p.write_bytes(good[: len(good) // 3])
    files["truncated"] = p
    p = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(p)
    files["tiny"] = p
    p = tmp_path / "huge.png"
    Image.new("1", (12000, 12000)).save(p)
    files["huge"] = p
    p = tmp_path / "blank.png"
    Image.fromarray(np.full((300, 300, 3), 200, np.uint8)).save(p)
    files["no_face"] = p
    return files


@pytest.mark.parametrize("kind", ["not_image", "truncated", "tiny", "huge", "no_face"])
def test_align_cli_bad_inputs(tmp_path, kind):
    photo = _bad_inputs(tmp_path)[kind]
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["align", str(photo), "--out", str(out)])
    assert result.exit_code == 2, result.output
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith("error: ") and str(photo.name) in err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("kind", ["grayscale", "rgba", "cmyk", "exif_rotated"])
def test_align_cli_handles_unusual_photos(tmp_path, kind):
    img = Image.open(shared_path(f"{EXAMPLES}/obama.jpg"))
    photo = tmp_path / f"{kind}.jpg"
    if kind == "grayscale":
        img.convert("L").save(photo)
    elif kind == "rgba":
        photo = photo.with_suffix(".png")
        img.convert("RGBA").save(photo)
    elif kind == "cmyk":
        img.convert("CMYK").save(photo)
    else:
        exif = Image.Exif()
        exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
        img.rotate(90, expand=True).save(photo, exif=exif)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["align", str(photo), "--style", "default", "--out", str(out)])
    assert result.exit_code == 0, result.output
    labels = json.loads((out / "cameras.json").read_text())["labels"]
    assert labels[0][0] == photo.stem + ".png" and len(labels[0][1]) == 25
    poses = json.loads((out / "poses.json").read_text())
    assert abs(poses[photo.stem + ".png"]["roll_deg"]) < 15  # upright after EXIF rotation
    assert Image.open(out / (photo.stem + ".png")).size == (128, 128)


def test_identity_cli(tmp_path):
    a, b = shared_path(f"{EXAMPLES}/obama.jpg"), shared_path(f"{EXAMPLES}/biden.jpg")
    result = CliRunner().invoke(main, ["identity", str(a), str(b)])
    assert result.exit_code == 0 and "different people" in result.output
    bad = tmp_path / "x.jpg"
    bad.write_text("nope")
    result = CliRunner().invoke(main, ["identity", str(a), str(bad)])
    assert result.exit_code == 2 and result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_face_errors_are_value_errors():
    assert issubclass(FaceError, ValueError)


def test_pose_notes_flag_a_turned_face_the_68_point_fit_misses():
    """selfie-many-people.jpg's largest face is turned about 30 deg (looked at); the 68-point fit says about 0:
    the mesh check warns. A frontal portrait gets no note."""
    with FacePipeline(style="default", output_size=128) as pipe:
        turned = pipe(shared_path("data/portraits/deepface/selfie-many-people.jpg"))
        notes = pipe.pose_notes(turned, "selfie")
        assert any("disagree" in n for n in notes), notes
        frontal = pipe(shared_path("data/portraits/deepface/img1.jpg"))
        assert pipe.pose_notes(frontal, "img1") == []

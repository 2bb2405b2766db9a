"""``portrait3d pie``: option parsing and clean failures, and a short end-to-end run on a real photo with
untrained stand-in estimator and RigNet files (the plumbing, not the quality)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from tests.conftest import shared_path

from portrait3d.errors import UsageError
from portrait3d.interfaces.cli import main
from portrait3d.interfaces.pie import EditSpec


def test_edit_spec_checks_and_targets():
    with pytest.raises(UsageError, match="-60..60"):
        EditSpec(yaw=80)
    with pytest.raises(UsageError, match="non-zero"):
        EditSpec(light=(0.0, 0.0, 0.0))
    assert EditSpec().empty and not EditSpec(pitch=5).empty
    from portrait3d.methods.pie.face_model import FaceModel

    rig = FaceModel.load("face-rig")
    cur = rig.neutral(1)
    t = EditSpec(yaw=20, expression={"smile": 1.5}, light=(1, 0, 0)).targets(cur, rig.config.expression_names)
    assert set(t) == {"pose", "expression", "light"}
    assert float(t["pose"].angles[0, 0]) == 20 and float(t["pose"].angles[0, 1]) == 0
    assert float(t["expression"].expression[0, rig.config.expression_names.index("smile")]) == 1.5
    with pytest.raises(UsageError, match="unknown expression"):
        EditSpec(expression={"frown": 1}).targets(cur, rig.config.expression_names)


@pytest.mark.parametrize("args, message", [
    (["pie", "edit", "."], "nothing to edit"),
    (["pie", "edit", ".", "--yaw", "10"], "no PIE embedding"),
    (["pie", "x.jpg", "--out", "o", "--expr", "smile"], "NAME=VALUE"),
    (["pie", "x.jpg", "--out", "o", "--light", "1,2"], "x,y,z"),
    (["pie", "x.jpg", "--out", "o", "--yaw", "90"], "-60..60"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and message in res.output, res.output
    assert "Traceback" not in res.output


def _stand_in_models(folder):
    """An untrained estimator and pose RigNet for default-2d in ``folder``."""
    import torch

    from portrait3d.checkpoints import load_network
    from portrait3d.methods.pie.estimator import EstimatorConfig, ParamEstimator
    from portrait3d.methods.pie.face_model import FaceModel
    from portrait3d.methods.pie.rignet import RigNet, RigNetConfig

    folder.mkdir()
    rig = FaceModel.load("face-rig")
    G = load_network("default-2d")
    torch.manual_seed(0)
    ParamEstimator(EstimatorConfig.for_rig(rig, width=8, layers=(1, 1, 1, 1))).save(folder / "estimator.safetensors")
    RigNet(RigNetConfig(num_ws=G.num_ws, w_dim=G.w_dim, mode="pose", param_dim=3)).save(
        folder / "rignet-pose.safetensors")
    return folder


def test_pie_photo_and_edit_end_to_end(tmp_path, one_thread):
    photo = sorted(shared_path("data/utkface").iterdir())[5]
    models = _stand_in_models(tmp_path / "models")
    out = tmp_path / "out"
    args = ["pie", str(photo), "--out", str(out), "--models", str(models), "--yaw", "15", "--steps-w", "2",
            "--steps-wplus", "1", "--threads", "1"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    for name in ("input_aligned.png", "reconstruction.png", "edited.png", "grid.png", "embedding.npz",
                 "result.json"):
        assert (out / name).is_file(), name
    result = json.loads((out / "result.json").read_text())
    assert result["edits"]["pose"]["target"][0] == 15 and result["measured"]["input"]["face"]
    assert CliRunner().invoke(main, args).exit_code == 2  # no clobbering without --force
    res = CliRunner().invoke(main, ["pie", "edit", str(out), "--yaw", "-10", "--threads", "1"])
    assert res.exit_code == 0, res.output
    edit = json.loads((out / "edit.json").read_text())
    assert edit["edits"]["pose"]["target"][0] == -10
    res = CliRunner().invoke(main, ["pie", "edit", str(out), "--expr", "smile=1"])
    assert res.exit_code == 2 and "no RigNet for expression edits" in res.output


def test_pie_batch_over_a_folder(tmp_path, one_thread):
    import shutil

    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted(shared_path("data/utkface").iterdir())[5:7]:
        shutil.copy(p, photos / p.name)
    (photos / "not_a_face.jpg").write_bytes(b"not an image")
    models = _stand_in_models(tmp_path / "models")
    out = tmp_path / "batch"
    args = ["pie", str(photos), "--out", str(out), "--models", str(models), "--yaw", "10", "--steps-w", "1",
            "--steps-wplus", "1", "--threads", "1"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0 and "not_a_face.jpg" in res.output and "Traceback" not in res.output  # one bad input
    items = {r["key"]: r for r in json.loads((out / "manifest.json").read_text())["items"]}
    done = [r for r in items.values() if r["status"] == "done"]
    assert len(done) == 2 and all("identity_distance" in r["result"] for r in done)
    for r in done:
        assert (out / r["key"] / "edited.png").is_file() and (out / r["key"] / "result.json").is_file()

"""``portrait3d demo``: every output on tiny networks, refusal to overwrite, the random fallback."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tests.conftest import run_cli

from portrait3d import save_network
from portrait3d.interfaces.demo import EDIT_YAWS, EDITS_OUTPUT, LIFT_YAWS, LIFTED_OUTPUT, OUTPUTS, YAWS


def test_demo_on_given_networks(tmp_path, tiny_stylegan2, tiny_eg3d):
    p2 = save_network(tiny_stylegan2, tmp_path / "g2.safetensors")
    p3 = save_network(tiny_eg3d, tmp_path / "g3.safetensors")
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--network-2d", str(p2), "--network-3d", str(p3), "--samples", "3",
            "--orbit-faces", "2", "--orbit-frames", "4", "--seed", "5"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    res2, res3 = tiny_stylegan2.img_resolution, tiny_eg3d.img_resolution
    views = np.asarray(Image.open(out / "views_3d.png"))
    assert views.shape == (2 + 3 * (res3 + 2), 2 + len(YAWS) * (res3 + 2), 3)
    assert np.asarray(Image.open(out / "depth_3d.png")).shape == views.shape
    assert np.asarray(Image.open(out / "samples_3d.png")).shape[1] == 2 + 3 * (res3 + 2)
    assert np.asarray(Image.open(out / "samples_2d.png")).shape[1] == 2 + 3 * (res2 + 2)
    import imageio.v2 as imageio

    with imageio.get_reader(out / "orbit.mp4", format="FFMPEG") as r:
        assert r.count_frames() == 4
    readme = (out / "README.txt").read_text()
    assert str(p2) in readme and str(p3) in readme and "RANDOM" not in readme
    assert "seed(5)" in readme and "seed(6)" in readme and "ITS left" in readme
    assert f"{LIFTED_OUTPUT}   not written: no shipped lifted model" in readme
    assert f"{EDITS_OUTPUT}    not written: no shipped NRSfM editor" in readme

    before = (out / "README.txt").read_bytes()
    again = run_cli(*args)
    assert again.exit_code == 2
    err = again.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "--force" in err
    assert (out / "README.txt").read_bytes() == before
    assert run_cli(*args, "--force").exit_code == 0


@pytest.mark.parametrize("builtins", [{}, {"default-2d": "models/__missing__/2d.safetensors",
                                          "default-3d": "models/__missing__/3d.safetensors"}],
                         ids=["unregistered", "registered-but-not-installed"])
def test_demo_default_models_fall_back_to_random_and_say_so(tmp_path, monkeypatch, builtins):
    monkeypatch.setattr("portrait3d.interfaces.demo.BUILTIN_NETWORKS", builtins)
    out = tmp_path / "d"
    result = run_cli("demo", "--out", str(out), "--samples", "1", "--orbit-frames", "2")
    assert result.exit_code == 0, result.output
    assert "random" in result.output.lower()
    readme = (out / "README.txt").read_text()
    assert "RANDOM-WEIGHT" in readme and "default-2d" in readme and "default-3d" in readme
    assert all((out / n).is_file() for n in OUTPUTS)


def test_demo_rejects_wrong_network_kind(tmp_path, tiny_stylegan2):
    p2 = save_network(tiny_stylegan2, tmp_path / "g2.safetensors")
    result = run_cli("demo", "--out", str(tmp_path / "o"), "--network-3d", str(p2), "--samples", "1")
    assert result.exit_code == 2 and "expected a TriPlaneGenerator" in result.stderr


def test_demo_lifts_the_2d_faces_when_a_lifted_model_ships(tmp_path, monkeypatch, tiny_stylegan2, tiny_eg3d):
    from tests.methods.lifting.test_evaluate import tiny_model

    p2 = save_network(tiny_stylegan2, tmp_path / "g2.safetensors")
    p3 = save_network(tiny_eg3d, tmp_path / "g3.safetensors")
    model = tiny_model(tiny_stylegan2)
    lifted = model.save(tmp_path / "lifted.safetensors")
    monkeypatch.setattr("portrait3d.methods.lifting.pipeline.builtin_lifted_path",
                        lambda network: lifted if network == str(p2) else None)
    out = tmp_path / "demo"
    result = run_cli("demo", "--out", str(out), "--network-2d", str(p2), "--network-3d", str(p3), "--samples", "3",
                     "--orbit-frames", "2")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted((*OUTPUTS, LIFTED_OUTPUT))
    s = model.cfg.image_size
    cols = len(LIFT_YAWS) + 4 + 1                 # rotations, four relit views, depth
    grid = np.asarray(Image.open(out / LIFTED_OUTPUT))
    assert grid.shape == (2 + 3 * (s + 2), 2 + cols * (s + 2), 3)
    assert str(lifted) in (out / "README.txt").read_text()
    # an existing lifted_2d.png also counts as an output that --force must allow to overwrite
    (out / "README.txt").unlink()
    again = run_cli("demo", "--out", str(out), "--network-2d", str(p2), "--network-3d", str(p3), "--samples", "1")
    assert again.exit_code == 2 and LIFTED_OUTPUT in again.stderr


def test_demo_turns_the_2d_faces_when_an_nrsfm_editor_ships(tmp_path, monkeypatch, tiny_stylegan2, tiny_eg3d):
    import torch

    from portrait3d.face.pose import mean_face_68
    from portrait3d.methods.nrsfm.edit import prior_factor
    from portrait3d.methods.nrsfm.editor import NRSfMEditor
    from portrait3d.methods.nrsfm.model import RankOneModel
    from portrait3d.methods.nrsfm.regressor import ParamRegressor

    G = tiny_stylegan2
    mf = torch.tensor(mean_face_68(), dtype=torch.float32)
    model = RankOneModel((mf - mf.mean(0)).T.contiguous(), torch.randn(2, 3, 68) * 0.01)
    torch.manual_seed(0)
    phi = ParamRegressor(G.w_dim, model.layout.size, hidden=16, layers=2)
    with torch.no_grad():
        w = G.mapping(torch.randn(200, G.z_dim), None)[:, 0]
    editor = NRSfMEditor(model, phi, "w", torch.ones(2), latent_factor=prior_factor(w))
    path = editor.save(tmp_path / "editor.safetensors")
    p2 = save_network(G, tmp_path / "g2.safetensors")
    p3 = save_network(tiny_eg3d, tmp_path / "g3.safetensors")
    monkeypatch.setattr("portrait3d.methods.nrsfm.pipeline.builtin_editor_path",
                        lambda network, space="w": path if network == str(p2) else None)
    out = tmp_path / "demo"
    result = run_cli("demo", "--out", str(out), "--network-2d", str(p2), "--network-3d", str(p3), "--samples", "3",
                     "--orbit-frames", "2")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted((*OUTPUTS, EDITS_OUTPUT))
    r = G.img_resolution
    grid = np.asarray(Image.open(out / EDITS_OUTPUT))
    assert grid.shape == (2 + 3 * (r + 2), 2 + len(EDIT_YAWS) * (r + 2), 3)
    middle = grid[2:2 + r, 2 + (r + 2):2 + (r + 2) + r]      # yaw change 0: the sample itself
    samples = np.asarray(Image.open(out / "samples_2d.png"))
    assert np.array_equal(middle, samples[2:2 + r, 2:2 + r])
    assert not np.array_equal(grid[2:2 + r, 2:2 + r], middle)  # the edits moved the latent
    assert str(path) in (out / "README.txt").read_text()

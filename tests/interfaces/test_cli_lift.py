"""``portrait3d train lift`` and ``portrait3d lift`` end to end on a tiny random
StyleGAN2 (32 px, lifted at 16 px): every output file, seed / .npy / photo sources, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tests.conftest import assert_clean_failure, make_cli_stylegan2, run_cli

from portrait3d import save_network
from portrait3d.interfaces.cli.train import lift_cmd as train_main

pytestmark = pytest.mark.usefixtures("one_thread")

OUTPUTS = ("image.png", "rotated.png", "relit.png", "depth.png", "normal.png", "albedo.png", "shading.png",
           "mesh.obj", "latent.npy", "result.json")
S = 16  # lifting resolution of the test model
OBAMA = "data/portraits/face_recognition/examples/knn_examples/train/obama/obama.jpg"
TWO_FACES = "data/portraits/face_recognition/examples/knn_examples/test/obama_and_biden.jpg"


def _tiles(path, size: int = S, pad: int = 2) -> int:
    with Image.open(path) as im:
        w, h = im.size
    assert h == size + 2 * pad
    return (w - pad) // (size + pad)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lift")
    G = make_cli_stylegan2()
    net = save_network(G, root / "g.safetensors")
    run = root / "run"
    res = CliRunner().invoke(train_main, ["--network", str(net), "--out", str(run), "--kimg", "0.004", "--batch", "2",
                                          "--size", str(S), "--no-progress", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert (run / "lifted.safetensors").is_file()
    return root, net, run / "lifted.safetensors"


def test_train_cli_refuses_existing_run_and_resumes(trained, tmp_path):
    root, net, _ = trained
    again = CliRunner().invoke(train_main, ["--network", str(net), "--out", str(root / "run"), "--size", str(S)])
    assert_clean_failure(again, "--resume")
    bad = CliRunner().invoke(train_main, ["--network", str(root / "nope.safetensors"), "--out", str(tmp_path / "r")])
    assert_clean_failure(bad, "no such checkpoint")
    # resume with only a longer schedule: the rest comes from the snapshot
    import shutil

    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    res = CliRunner().invoke(train_main, ["--out", str(run), "--resume", str(run), "--kimg", "0.006", "--network",
                                          str(net), "--no-progress"])
    assert res.exit_code == 0, res.output
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    changed = CliRunner().invoke(train_main, ["--out", str(run), "--resume", str(run), "--size", "32",
                                              "--network", str(net)])
    assert_clean_failure(changed, "--size cannot change it")
    changed = CliRunner().invoke(train_main, ["--out", str(run), "--resume", str(run), "--decoder-channels", "8",
                                              "--network", str(net)])
    assert_clean_failure(changed, "--decoder-channels cannot change it")


def test_train_cli_decoder_channels_sets_the_decoder_width(trained, tmp_path):
    _, net, _ = trained
    run = tmp_path / "narrow"
    res = CliRunner().invoke(train_main, ["--network", str(net), "--out", str(run), "--kimg", "0.002", "--batch", "2",
                                          "--size", str(S), "--decoder-channels", "8", "--no-progress",
                                          "--threads", "1"])
    assert res.exit_code == 0, res.output
    lift = json.loads((run / "config.json").read_text())
    lift = lift.get("config", lift)["lift"]
    assert lift["decoder_channel_max"] == 8 and lift["decoder_channel_min"] <= 8
    from safetensors import safe_open

    with safe_open(str(run / "lifted.safetensors"), framework="pt") as f:
        # the GroupNorm scales give each decoder layer's width
        widths = {f.get_slice(k).get_shape()[0] for k in f.keys() if k.startswith("depth.decoder.body")
                  and len(f.get_slice(k).get_shape()) == 1}
    assert widths and max(widths) <= 8


def test_lift_seed_writes_every_file(trained, tmp_path):
    _, net, lifted = trained
    out = tmp_path / "o"
    res = run_cli("lift", "3", "--network", str(net), "--lifted", str(lifted), "--light", "0.5,-0.5", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "view yaw" in res.output
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    assert not (out / "aligned.png").exists()
    rec = json.loads((out / "result.json").read_text())
    assert rec["seed"] == 3 and rec["network"] == str(net) and rec["generator_ref_verified"] is True
    assert set(rec["view"]) == {"pitch_deg", "yaw_deg", "roll_deg", "tx", "ty", "tz"}
    assert abs(rec["view"]["yaw_deg"]) <= 60 and 0 <= rec["light"]["ambient"] <= 1
    assert rec["yaws_deg"] == [-60, -30, 0, 30, 60] and rec["relight_directions"][-1] == [0.5, -0.5]
    assert {"load_s", "lift_s", "render_s", "total_s"} <= set(rec["timings"])
    assert _tiles(out / "rotated.png") == 5 and _tiles(out / "relit.png") == 5
    for name in ("image.png", "depth.png", "normal.png", "albedo.png", "shading.png"):
        with Image.open(out / name) as im:
            assert im.size == (S, S), name
    lines = (out / "mesh.obj").read_text().splitlines()
    assert sum(line.startswith("v ") for line in lines) == S * S
    assert sum(line.startswith("f ") for line in lines) == 2 * (S - 1) ** 2
    assert np.load(out / "latent.npy").shape == (1, 16)
    # never clobbers without --force; --force overwrites, here with other yaws
    assert_clean_failure(run_cli("lift", "3", "--network", str(net), "--lifted", str(lifted), "--out", str(out)),
                         "already exists")
    res = run_cli("lift", "3", "--network", str(net), "--lifted", str(lifted), "--yaw", "-90", "--yaw", "45",
                  "--out", str(out), "--force")
    assert res.exit_code == 0, res.output
    assert _tiles(out / "rotated.png") == 2 and _tiles(out / "relit.png") == 4


def test_lift_npy_latents(trained, tmp_path):
    _, net, lifted = trained
    seed_out = tmp_path / "seed"
    assert run_cli("lift", "5", "--network", str(net), "--lifted", str(lifted), "--out", str(seed_out)).exit_code == 0
    # the seed's latent.npy lifts to the same face
    out = tmp_path / "w"
    res = run_cli("lift", str(seed_out / "latent.npy"), "--network", str(net), "--lifted", str(lifted),
                  "--out", str(out))
    assert res.exit_code == 0, res.output
    a, b = (json.loads((d / "result.json").read_text()) for d in (seed_out, out))
    assert b["latent_file"] == str(seed_out / "latent.npy")
    assert a["view"] == pytest.approx(b["view"]) and a["light"] == pytest.approx(b["light"])
    # a W+ code [num_ws, w_dim]
    wplus = tmp_path / "wplus.npy"
    np.save(wplus, np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32))
    res = run_cli("lift", str(wplus), "--network", str(net), "--lifted", str(lifted), "--out", str(tmp_path / "wp"))
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "wp" / "latent.npy").shape == (1, 8, 16)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 7), np.float32))
    assert_clean_failure(run_cli("lift", str(bad), "--network", str(net), "--lifted", str(lifted),
                                 "--out", str(tmp_path / "b")), "does not fit")


@pytest.mark.parametrize("args, pattern", [
    (["--light", "2,0"], "[-1, 1]"),
    (["--light", "left"], "X,Y"),
    (["--light", "0.1,0.2,0.3"], "X,Y"),
    (["--yaw", "100"], "not in the range -90<=x<=90"),
    (["--yaw", "10", "--yaw", "-91"], "not in the range -90<=x<=90"),
])
def test_lift_rejects_bad_values(trained, tmp_path, args, pattern):
    _, net, lifted = trained
    assert_clean_failure(run_cli("lift", "1", "--network", str(net), "--lifted", str(lifted), *args,
                                 "--out", str(tmp_path / "o")), pattern)
    assert not (tmp_path / "o").exists()


def test_lift_missing_model_and_bad_sources(trained, tmp_path):
    root, net, lifted = trained
    assert_clean_failure(run_cli("lift", "1", "--network", str(net), "--lifted", str(root / "none.safetensors"),
                                 "--out", str(tmp_path / "a")), "portrait3d train lift")
    assert_clean_failure(run_cli("lift", "1", "--network", str(net), "--out", str(tmp_path / "b")),
                         "no lifted model for network")
    assert_clean_failure(run_cli("lift", "1", "--lifted", str(lifted), "--out", str(tmp_path / "c")),
                         "trained on the 2D generator")
    assert_clean_failure(run_cli("lift", "no_such.png", "--network", str(net), "--lifted", str(lifted),
                                 "--out", str(tmp_path / "d")), "neither a seed")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    assert_clean_failure(run_cli("lift", "1", "--network", str(net), "--lifted", str(garbage),
                                 "--out", str(tmp_path / "e")), "garbage.safetensors")


def test_lift_photo_projects_then_lifts(trained, tmp_path):
    from tests.conftest import shared_path

    photo = shared_path(OBAMA)
    _, net, lifted = trained
    out = tmp_path / "photo"
    res = run_cli("lift", str(photo), "--network", str(net), "--lifted", str(lifted), "--project-steps", "2",
                  "--out", str(out))
    assert res.exit_code == 0, res.output
    for name in OUTPUTS + ("aligned.png", "projection.png"):
        assert (out / name).is_file(), name
    rec = json.loads((out / "result.json").read_text())
    assert rec["photo"] == str(photo) and rec["num_faces"] == 1 and rec["projection_steps"] == 2
    assert "projection_s" in rec["timings"]


def test_lift_photo_with_two_faces_uses_the_largest_and_says_so(trained, tmp_path):
    from tests.conftest import shared_path

    photo = shared_path(TWO_FACES)
    _, net, lifted = trained
    res = run_cli("lift", str(photo), "--network", str(net), "--lifted", str(lifted), "--project-steps", "1",
                  "--out", str(tmp_path / "o"))
    assert res.exit_code == 0, res.output
    assert "2 faces found" in res.stderr and "--face-index" in res.stderr
    assert_clean_failure(run_cli("lift", str(photo), "--network", str(net), "--lifted", str(lifted),
                                 "--face-index", "4", "--out", str(tmp_path / "p")), "out of range")


# ------------------------------------------------------------------ the shipped lifting of default-2d


def test_lift_uses_the_shipped_default_2d_lifting(tmp_path):
    """``portrait3d lift SEED`` needs no model option: default-2d ships its LiftedGAN lifting."""
    from portrait3d.methods.lifting.pipeline import builtin_lifted_path

    shipped = builtin_lifted_path("default-2d")
    if not shipped.is_file():
        pytest.skip("no lifted default-2d ships")
    res = run_cli("lift", "11", "--out", str(tmp_path / "o"))
    assert res.exit_code == 0, res.output
    assert all((tmp_path / "o" / name).is_file() for name in OUTPUTS)
    rec = json.loads((tmp_path / "o" / "result.json").read_text())
    assert rec["lifted"] == str(shipped) and rec["lifted_generator_ref"] == "default-2d"

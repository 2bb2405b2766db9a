"""``portrait3d encode3d`` end to end on a tiny random EG3D, a random W_tri encoder and a real photo: the files of
invert3d plus the code, stage timings, --refine, batches, and clean failures."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from tests.conftest import assert_clean_failure, make_tiny_eg3d, make_tiny_wtri_encoder, run_cli, shared_path

from portrait3d import save_network
from portrait3d.interfaces.encode3d import OUTPUTS, code_to_ws
from portrait3d.methods.wtri.encoder import WTriEncoder, WTriEncoderConfig

pytestmark = pytest.mark.usefixtures("one_thread")

PHOTO = "data/portraits/face_recognition/examples/knn_examples/train/obama/obama.jpg"
FAST = ["--orbit-frames", "3", "--mesh-resolution", "24"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``(network, encoder)``: a tiny EG3D and a W_tri encoder for it whose heads are not zero (it moves)."""
    root = tmp_path_factory.mktemp("enc3d")
    G = make_tiny_eg3d()
    enc = make_tiny_wtri_encoder(G)
    return save_network(G, root / "g.safetensors"), enc.save(root / "enc.safetensors")


def test_encode3d_writes_invert3d_files_code_and_timings(files, tmp_path):
    network, encoder = files
    out = tmp_path / "out"
    res = run_cli("encode3d", shared_path(PHOTO), "--out", out, "--network", network, "--encoder", encoder, *FAST)
    assert res.exit_code == 0, (res.output, res.exception)
    assert "seconds: " in res.output and "encode " in res.output
    for name in OUTPUTS + ("code.npz",):
        assert (out / name).is_file(), name
    rec = json.loads((out / "result.json").read_text())
    assert rec["space"] == "wtri" and rec["iterations"] == 2 and rec["refined"] is None
    assert set(rec["timings_s"]) >= {"face", "encode", "views", "orbit", "mesh", "total"}
    with np.load(out / "code.npz") as d:
        assert d["planes"].shape[1:3] == (3, 3) and not np.allclose(d["planes"][:, 0], d["planes"][:, 1])
    assert_clean_failure(run_cli("encode3d", shared_path(PHOTO), "--out", out, "--network", network,
                                 "--encoder", encoder, *FAST), "--force")  # no clobbering
    res = run_cli("render", out, "--yaw", "-30")  # `render` re-renders the code: the same view
    assert res.exit_code == 0, (res.output, res.exception)
    again = [p for p in out.glob("render_yaw-30*.png")]
    assert len(again) == 1
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(again[0])), np.asarray(Image.open(out / "view_yaw-30.png")))


def test_encode3d_refine_writes_a_latent(files, tmp_path):
    network, encoder = files
    out = tmp_path / "out"
    res = run_cli("encode3d", shared_path(PHOTO), "--out", out, "--network", network, "--encoder", encoder,
                  "--refine", "--refine-steps", "1", *FAST)
    assert res.exit_code == 0, (res.output, res.exception)
    assert (out / "latent.npy").is_file() and not (out / "code.npz").exists()
    assert json.loads((out / "result.json").read_text())["refined"]["steps"] == 1


def test_encode3d_batch(files, tmp_path):
    network, encoder = files
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted(shared_path("data/utkface").iterdir())[:2]:
        shutil.copy(p, photos / p.name)
    out = tmp_path / "batch"
    res = run_cli("encode3d", photos, "--out", out, "--network", network, "--encoder", encoder, *FAST)
    assert res.exit_code == 0, (res.output, res.exception)
    items = json.loads((out / "manifest.json").read_text())["items"]
    assert len(items) == 2 and all(r["status"] == "done" and r["result"]["encode_seconds"] > 0 for r in items)


def test_code_to_ws_is_exact_for_tied_planes():
    G = make_tiny_eg3d()
    ws = G.mapping(torch.randn(2, G.z_dim), torch.zeros(2, 25))
    torch.testing.assert_close(code_to_ws(G.wtri_from_ws(ws)), ws)


@pytest.mark.parametrize("extra, message", [
    ([], "no W_tri encoder ships for"),
    (["--encoder", "missing.safetensors"], "no such encoder file"),
    (["--pti"], "needs --refine"),
])
def test_encode3d_bad_input(files, tmp_path, monkeypatch, extra, message):
    network, _ = files
    monkeypatch.chdir(tmp_path)
    res = run_cli("encode3d", shared_path(PHOTO), "--out", tmp_path / "o", "--network", network, *extra)
    assert_clean_failure(res, message)


def test_encoder_for_another_generator_is_refused(files, tmp_path):
    network, _ = files
    other = WTriEncoder(WTriEncoderConfig(w_dim=64, num_ws=8, shared_rows=7, width=8, layers=(1, 1, 1, 1),
                                          head_channels=16, fpn_channels=8, input_size=64))
    path = other.save(tmp_path / "other.safetensors")
    res = run_cli("encode3d", shared_path(PHOTO), "--out", tmp_path / "o", "--network", network, "--encoder", path)
    assert_clean_failure(res, "trained for another generator")


def test_bootstrapped_encoder_loads_with_its_start_encoder(files, tmp_path):
    """An encoder trained with --bootstrap names its start encoder; loading it attaches that encoder (a file, or a
    built-in network's shipped one), and encode3d runs from its code; a missing start encoder is one clean line."""
    from portrait3d.checkpoints import load_network
    from portrait3d.checkpoints.fingerprint import module_fingerprint
    from portrait3d.interfaces.encode3d import load_wtri_encoder
    from portrait3d.methods.inversion3d.networks import EncoderConfig, LatentEncoder, save_module

    network, _ = files
    G = load_network(network)
    torch.manual_seed(0)
    E = LatentEncoder(EncoderConfig(input_size=32, width=8, layers=(1, 1, 1, 1), head_channels=16), generator=G)
    with torch.no_grad():
        E.mlp[-1].weight.normal_(0, 0.05)
    e_path = save_module(E, tmp_path / "E.safetensors")
    enc = WTriEncoder(WTriEncoderConfig.for_generator(G, width=8, layers=(1, 1, 1, 1), head_channels=16,
                                                      fpn_channels=8, input_size=64, iterations=2,
                                                      bootstrap=str(e_path)))
    path = enc.save(tmp_path / "boot.safetensors")
    loaded = load_wtri_encoder(path, G, "tiny")
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    start = loaded.start_code(G, x)
    torch.testing.assert_close(start.sr, E.eval()(x)[:, -1])  # E's code, not the average
    res = run_cli("encode3d", shared_path(PHOTO), "--out", tmp_path / "o", "--network", network, "--encoder", path,
                  *FAST)
    assert res.exit_code == 0, (res.output, res.exception)
    # a recorded fingerprint of the start encoder: the same weights load quietly, changed ones warn
    enc.config.bootstrap_sha256 = module_fingerprint(E)
    path = enc.save(tmp_path / "boot.safetensors", overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_wtri_encoder(path, G, "tiny")
    with torch.no_grad():
        E.mlp[-1].weight.add_(0.01)
    save_module(E, e_path, overwrite=True)
    with pytest.warns(UserWarning, match="other weights of its start encoder"):
        load_wtri_encoder(path, G, "tiny")
    e_path.unlink()
    res = run_cli("encode3d", shared_path(PHOTO), "--out", tmp_path / "o2", "--network", network, "--encoder", path,
                  *FAST)
    assert_clean_failure(res, "start encoder")


def test_shipped_encoder_puts_a_real_photo_into_default_3d(tmp_path):
    """The shipped W_tri encoder of default-3d, by default (no --encoder), with its start encoder: every file, and
    a reconstruction nearer the photo than a flat image of its mean colour (a floor, not a quality figure: those
    are in bench/eval_wtri.py and the model card)."""
    from portrait3d.interfaces.encode3d import default_encoder_path

    if not default_encoder_path("default-3d").is_file():
        pytest.skip("no W_tri encoder ships for default-3d")
    out = tmp_path / "out"
    res = run_cli("encode3d", shared_path(PHOTO), "--out", out, *FAST)
    assert res.exit_code == 0, (res.output, res.exception)
    for name in OUTPUTS + ("code.npz",):
        assert (out / name).is_file(), name
    from PIL import Image

    photo = np.asarray(Image.open(out / "input_aligned.png").convert("RGB"), np.float64)
    recon = np.asarray(Image.open(out / "reconstruction.png").convert("RGB"), np.float64)
    result = json.loads((out / "result.json").read_text())
    assert np.abs(photo - recon).mean() < np.abs(photo - photo.mean((0, 1))).mean(), result

"""``portrait3d web``: upload checks, the method-adapter registry, the handlers, and the page in a real browser.

The browser test starts the editor in-process on a free port and drives Debian's headless chromium with
playwright (never a downloaded browser): upload a real photo, wait for the 3D inversion (4 steps), move the
yaw slider, and check that the displayed image changed. With ``PORTRAIT3D_WRITE_DOCS=1`` it inverts with 40
steps and saves the page after the slider move as ``docs/web_editor.png``.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests.conftest import make_cli_stylegan2, make_tiny_eg3d, make_tiny_wtri_encoder, run_cli, shared_path

from portrait3d.errors import UsageError
from portrait3d.face.errors import ImageReadError, ImageSizeError
from portrait3d.interfaces.web.methods import (
    ADAPTERS,
    Control,
    Embedding,
    Inversion3DAdapter,
    MethodAdapter,
    MethodSettings,
    build_registry,
)
from portrait3d.interfaces.web.upload import UploadLimits, decode_upload

pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM = "/usr/bin/chromium"
PHOTO = "data/portraits/deepface/img1.jpg"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "web_editor.png"


def _encode(fmt: str, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr.squeeze() if mode == "L" else arr, mode).save(buf, format=fmt)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels, with no pixel data (a decompression-bomb stand-in)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _builtin_3d() -> Inversion3DAdapter:
    a = Inversion3DAdapter(MethodSettings(invert_steps=4, orbit_frames=4, mesh_resolution=32))
    if not a.available().ok:
        pytest.skip(f"built-in 3D network unavailable: {a.available().reason}")
    return a


# ----------------------------------------------------------------------------- upload checks
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_upload_accepts_jpeg_png_webp(fmt):
    img = decode_upload(_encode(fmt))
    assert img.shape == (48, 64, 3) and img.dtype == np.uint8


def test_upload_converts_modes_and_applies_exif_like_load_image():
    assert decode_upload(_encode("PNG", mode="L")).shape == (48, 64, 3)
    assert decode_upload(_encode("PNG", mode="RGBA")).shape == (48, 64, 3)


@pytest.mark.parametrize("data, error, pattern", [
    (None, ImageReadError, "no file was received"),
    (b"", ImageReadError, "no file was received"),
    (b"%PDF-1.4 definitely not a photo", ImageReadError, "not an image file"),
    (bytes(range(256)) * 8, ImageReadError, "not an image file"),
])
def test_upload_refuses_missing_and_non_image_bytes(data, error, pattern):
    with pytest.raises(error, match=pattern):
        decode_upload(data)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_upload_refuses_other_image_types(fmt):
    with pytest.raises(ImageReadError, match=f"{fmt} images are not accepted.*JPEG, PNG or WebP"):
        decode_upload(_encode(fmt))


def test_upload_refuses_corrupt_and_truncated_images():
    jpeg = _encode("JPEG", (256, 256))
    with pytest.raises(ImageReadError, match="^upload.jpg: corrupt or truncated"):
        decode_upload(jpeg[: len(jpeg) // 2])
    png = bytearray(_encode("PNG", (256, 256)))
    png[200:260] = b"\0" * 60  # damaged compressed data
    with pytest.raises(ImageReadError, match="corrupt or truncated"):
        decode_upload(bytes(png))


def test_upload_refuses_too_many_bytes_and_pixels():
    with pytest.raises(ImageSizeError, match=r"file too large \(0\.0 MB; at most 0\.0 MB"):
        decode_upload(_encode("PNG"), UploadLimits(max_bytes=100))
    with pytest.raises(ImageSizeError, match="too large"):
        decode_upload(_encode("PNG"), UploadLimits(max_pixels=1000))
    # a header claiming 10 gigapixels is refused from the header alone, before any decoding
    t = time.perf_counter()
    for side in (100_000, 6_000):  # beyond Pillow's own bomb limit, and beyond ours (36 MP) only
        with pytest.raises(ImageSizeError, match="too large"):
            decode_upload(_png_header_only(side, side))
    assert time.perf_counter() - t < 1.0
    with pytest.raises(ImageSizeError, match="too small"):
        decode_upload(_encode("PNG", (16, 16)))


# ----------------------------------------------------------------------------- adapter registry
def test_registry_offers_the_methods_with_sane_controls():
    reg = build_registry(MethodSettings())
    assert list(reg) == ["inversion3d", "nrsfm", "lifted", "pie"]
    assert len({a.title for a in reg.values()}) == len(reg)
    for a in reg.values():
        controls = a.controls()
        assert controls and len({c.key for c in controls}) == len(controls)
        for c in controls:
            assert c.minimum < c.maximum and c.minimum <= c.value <= c.maximum and c.step > 0
    keys = {k: [c.key for c in a.controls()] for k, a in reg.items()}
    assert keys["inversion3d"] == ["yaw", "pitch"]
    assert keys["lifted"] == ["yaw", "pitch", "light_x", "light_y"]
    assert keys["nrsfm"][:2] == ["yaw", "pitch"]
    assert keys["pie"][:2] == ["yaw", "pitch"]  # the shipped models: the pose RigNet at least


def test_nrsfm_and_lifted_say_why_they_are_unavailable(tmp_path, tiny_stylegan2):
    from portrait3d import save_network

    shipped = build_registry(MethodSettings(network_2d="default-2d"))
    assert shipped["nrsfm"].available().ok and shipped["lifted"].available().ok  # default-2d ships both
    net = save_network(tiny_stylegan2, tmp_path / "g2.safetensors")  # a generator without a shipped editor
    reg = build_registry(MethodSettings(network_2d=str(net)))
    nrsfm, lifted = reg["nrsfm"].available(), reg["lifted"].available()
    assert not nrsfm.ok and "--nrsfm" in nrsfm.reason and "\n" not in nrsfm.reason
    assert not lifted.ok and "--lifted" in lifted.reason and "\n" not in lifted.reason
    missing = build_registry(MethodSettings(lifted_path=tmp_path / "nope.safetensors"))["lifted"].available()
    assert not missing.ok and "nope.safetensors" in missing.reason
    from portrait3d.errors import UsageError

    with pytest.raises(UsageError, match="--nrsfm"):
        reg["nrsfm"].embed(0)


def test_registry_refuses_duplicate_keys():
    with pytest.raises(ValueError, match="inversion3d"):
        build_registry(MethodSettings(), ADAPTERS + (Inversion3DAdapter,))


def test_control_clamps_and_snaps():
    c = Control("yaw", "Yaw", -45, 45, 1.0)
    assert c.clamp(100) == 45 and c.snap(0.913747) == 1.0 and c.snap(-44.6) == -45.0
    assert Control("x", "x", -1, 1, 0.05).snap(0.333) == pytest.approx(0.35)


class _ShadeAdapter(MethodAdapter):
    """A stand-in method: a grey image whose level is the slider (what adding a method takes: one class)."""

    key = "shade"
    title = "Shade"
    summary = "A test method."

    def available(self):
        from portrait3d.interfaces.web.methods import Availability

        return Availability(True)

    def controls(self):
        return (Control("level", "Level", 0, 255, 1, 10),)

    def embed(self, source, progress=lambda f, d: None):
        progress(1.0, "done")
        return Embedding(self.key, f"seed {source}", {}, values={"level": 20.0})

    def render(self, state, values):
        return np.full((8, 8, 3), int(self.values(state, values)["level"]), np.uint8)


def test_a_new_adapter_plugs_into_the_app():
    gr = pytest.importorskip("gradio")
    from portrait3d.interfaces.web.app import EditorApp, WebConfig

    app = EditorApp(WebConfig(), adapters=(_ShadeAdapter,))
    try:
        assert app.default_method() == "shade" and app.num_sliders == 1
        out = app.on_seed("shade", 3, progress=lambda *a, **k: None)
        state, source, image, _, status = out[:5]
        assert source == 3 and status.startswith("Ready: Shade, seed 3.") and image[0, 0, 0] == 20
        assert app.on_controls(state, 99.0)[0, 0, 0] == 99
        update = app.on_image(state, 7.0)
        path = Path(update["value"])
        assert update["visible"] and path.is_file() and path.is_relative_to(app.workdir)
        assert np.asarray(Image.open(path))[0, 0, 0] == 7
        with pytest.warns(UserWarning, match="makes no orbit video"):  # a warning, no crash
            assert isinstance(app.on_video(state, progress=lambda *a, **k: None), gr.skip().__class__)
    finally:
        app.close()
    assert not app.workdir.exists()


def test_app_reports_bad_uploads_and_seeds_in_one_line():
    pytest.importorskip("gradio")
    import gradio as gr

    from portrait3d.interfaces.web.app import EditorApp, WebConfig

    app = EditorApp(WebConfig(limits=UploadLimits(max_bytes=10_000)))
    try:
        for data, pattern in ((b"garbage", "not an image file"), (_encode("GIF"), "GIF images are not accepted"),
                              (_encode("PNG", (200, 200)), "file too large")):
            with pytest.warns(UserWarning):  # gr.Warning outside a request
                out = app.on_photo("inversion3d", data, progress=lambda *a, **k: None)
            status = out[4]
            assert status.startswith("Error: ") and pattern in status and "\n" not in status
            assert isinstance(out[0], gr.skip().__class__)  # the previous embedding is kept
        with pytest.warns(UserWarning):
            assert app.on_seed("inversion3d", 1.5, progress=lambda *a, **k: None)[4].startswith("Error: the seed")
        with pytest.warns(UserWarning):
            assert app.on_photo("nrsfm", _encode("PNG"), progress=lambda *a, **k: None)[4].startswith("Error: no ")
        assert app.on_controls(None, 1.0, 2.0).__class__ is gr.skip().__class__
    finally:
        app.close()


def test_app_reports_a_photo_without_a_face():
    pytest.importorskip("gradio")
    _builtin_3d()
    from portrait3d.interfaces.web.app import EditorApp, WebConfig

    yy, xx = np.mgrid[0:160, 0:200]
    buf = io.BytesIO()
    Image.fromarray(np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)).save(buf, "PNG")
    app = EditorApp(WebConfig(methods=MethodSettings(invert_steps=2)))
    try:
        with pytest.warns(UserWarning):
            status = app.on_photo("inversion3d", buf.getvalue(), progress=lambda *a, **k: None)[4]
        assert status.startswith("Error: ") and "no face found" in status and "\n" not in status, status
    finally:
        app.close()


# ----------------------------------------------------------------------------- adapters on real / tiny models
def test_inversion3d_seed_renders_views_video_and_mesh(tmp_path):
    a = _builtin_3d()
    state = a.embed(5)
    assert state.source == "seed 5" and state.values == {"yaw": 0.0, "pitch": 0.0}
    front, turned = a.render(state, {"yaw": 0.0}), a.render(state, {"yaw": 30.0})
    assert front.shape == (128, 128, 3) and front.dtype == np.uint8
    assert np.abs(front.astype(int) - turned).mean() > 1
    assert np.array_equal(front, a.render(state, {}))  # deterministic
    assert a.orbit_frames(state).shape == (4, 128, 128, 3)
    mesh = a.write_mesh(state, tmp_path)
    assert mesh.name == "mesh.ply" and mesh.read_bytes().startswith(b"ply\n")


@pytest.mark.parametrize("learned", [True, False])
def test_inversion3d_photo_starts_from_the_shipped_pose_estimator(learned):
    """As ``portrait3d invert3d``: the shipped P gives the start camera unless ``learned_init`` is off; with it on,
    the shipped W_tri encoder (when one ships) makes the first embedding."""
    a = Inversion3DAdapter(MethodSettings(invert_steps=0, learned_init=learned))
    if not a.available().ok:
        pytest.skip(f"built-in 3D network unavailable: {a.available().reason}")
    from portrait3d.methods.inversion3d.pipeline import builtin_init_paths

    if learned and builtin_init_paths("default-3d")[1] is None:
        pytest.skip("default-3d ships no pose estimator")
    state = a.embed(np.asarray(Image.open(shared_path(PHOTO)).convert("RGB")))
    start = "pose estimator" if learned else "face pipeline (PnP head pose)"
    assert f"start camera: {start}" in state.note, state.note
    from portrait3d.interfaces.encode3d import default_encoder_path

    if learned and default_encoder_path("default-3d").is_file():
        assert "encoded in one pass by the W_tri encoder" in state.note, state.note
    else:
        shipped_encoder = builtin_init_paths("default-3d")[0] is not None
        latent = "encoder" if learned and shipped_encoder else "optimiser default"
        assert f"latent: {latent}" in state.note, state.note
    assert state.data["camera"].shape == (1, 25)


@pytest.mark.parametrize("steps", [0, 2])
def test_inversion3d_photo_is_encoded_first_then_refined_on_request(tmp_path, steps):
    """With a W_tri encoder (Oh & Jo) the photo's embedding is the encoder's code itself (per-plane rows kept, no
    optimiser step); refine() then runs the optimiser from it, once, and only when it has steps to run."""
    from portrait3d import save_network
    from portrait3d.interfaces.web.app import EditorApp, WebConfig
    from portrait3d.networks.eg3d.triplane import WTri

    torch.set_num_threads(1)
    G = make_tiny_eg3d()
    enc = make_tiny_wtri_encoder(G)
    settings = MethodSettings(network_3d=str(save_network(G, tmp_path / "g.safetensors")), invert_steps=steps,
                              wtri_encoder=enc.save(tmp_path / "enc.safetensors"), orbit_frames=3,
                              mesh_resolution=24)
    a = Inversion3DAdapter(settings)
    state = a.embed(np.asarray(Image.open(shared_path(PHOTO)).convert("RGB")))
    assert "encoded in one pass by the W_tri encoder" in state.note, state.note
    assert ("Refine runs 2 optimiser steps" in state.note) == (steps == 2), state.note
    ws = state.data["ws"]
    assert isinstance(ws, WTri) and not torch.equal(ws.planes[:, 0], ws.planes[:, 1])
    turned = a.render(state, {"yaw": 20.0})
    assert turned.shape == (G.img_resolution, G.img_resolution, 3)
    assert not np.array_equal(turned, a.render(state, {"yaw": -20.0}))
    assert len(a.orbit_frames(state)) == 3
    assert a.write_mesh(state, tmp_path).is_file()
    assert a.can_refine(state) == (steps > 0)
    if steps == 0:
        with pytest.raises(UsageError, match="nothing to refine"):
            a.refine(state)
        return
    refined = a.refine(state)
    assert "latent: W_tri encoder; 2 inversion steps" in refined.note, refined.note
    assert isinstance(refined.data["ws"], torch.Tensor) and refined.data["ws"].shape == (1, G.num_ws, G.w_dim)
    assert not a.can_refine(refined)
    assert a.render(refined, {"yaw": 20.0}).shape == turned.shape
    # through the editor: the button's handler swaps the state and says so; with nothing to refine, one line
    app = EditorApp(WebConfig(methods=settings))
    out = app.on_refine(state, progress=lambda *a, **k: None)
    assert out[0].data["ws"].shape == (1, G.num_ws, G.w_dim) and "refined" in out[2], out[2]
    again = app.on_refine(out[0], progress=lambda *a, **k: None)
    assert again[2].startswith("Error: ") and "nothing to refine" in again[2]


def test_a_missing_wtri_encoder_file_is_a_clean_error(tmp_path):
    from portrait3d import save_network

    net = save_network(make_tiny_eg3d(), tmp_path / "g.safetensors")
    a = Inversion3DAdapter(MethodSettings(network_3d=str(net), invert_steps=0,
                                          wtri_encoder=tmp_path / "none.safetensors"))
    with pytest.raises(UsageError, match="no such W_tri encoder file"):
        a.embed(np.asarray(Image.open(shared_path(PHOTO)).convert("RGB")))


@pytest.fixture(scope="module")
def tiny_2d(tmp_path_factory):
    """A tiny random StyleGAN2 with an NRSfM editor (built by the CLI) and a random lifting model."""
    from portrait3d import save_network
    from portrait3d.methods.lifting.networks import LiftConfig, LiftedGenerator

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("web2d")
    G = make_cli_stylegan2()
    net = save_network(G, root / "g.safetensors")
    res = run_cli("nrsfm", "build", "--network", net, "--out", root / "editor.safetensors", "--samples", "80",
                  "--basis", "2", "--sample-detector", "template", "--epochs", "3", "--cache", root / "cache")
    assert res.exit_code == 0, res.output
    cfg = LiftConfig(w_dim=16, image_size=16, mlp_dim=16, mlp_layers=2, decoder_mlp_dim=16, decoder_channel_base=128,
                     decoder_channel_max=16, decoder_channel_min=8)
    LiftedGenerator(G, cfg, generator_ref=str(net)).save(root / "lifted.safetensors")
    return MethodSettings(network_2d=str(net), nrsfm_path=root / "editor.safetensors",
                          lifted_path=root / "lifted.safetensors", project_steps=2, orbit_frames=4)


def test_nrsfm_adapter_edits_pose_and_expression(tiny_2d):
    a = build_registry(tiny_2d)["nrsfm"]
    assert a.available().ok
    assert [c.key for c in a.controls()] == ["yaw", "pitch", "expr1", "expr2"]
    state = a.embed(7)
    base = a.render(state, {})
    assert base.shape == (32, 32, 3)
    for edit in ({"yaw": 15.0}, {"expr1": 2.0}):
        assert not np.array_equal(base, a.render(state, edit)), edit
    assert "video" not in a.exports and "mesh" not in a.exports


def test_nrsfm_adapter_projects_a_photo(tiny_2d):
    a = build_registry(tiny_2d)["nrsfm"]
    seen = []
    state = a.embed(np.asarray(Image.open(shared_path(PHOTO)).convert("RGB")), lambda f, d: seen.append(f))
    assert state.source == "photo" and state.aligned.shape == (32, 32, 3) and seen[-1] == 1.0
    assert a.render(state, {"yaw": 10.0}).shape == (32, 32, 3)


def test_lifted_adapter_rotates_relights_and_exports(tiny_2d, tmp_path):
    a = build_registry(tiny_2d)["lifted"]
    assert a.available().ok
    state = a.embed(3)
    assert set(state.values) == {"yaw", "pitch", "light_x", "light_y"}
    base = a.render(state, {})
    assert base.shape == (16, 16, 3)
    for edit in ({"yaw": 40.0}, {"pitch": 20.0}, {"light_x": -state.values["light_x"] or 0.8}):
        assert not np.array_equal(base, a.render(state, edit)), edit
    assert a.orbit_frames(state).shape == (4, 16, 16, 3)
    assert a.write_mesh(state, tmp_path).read_text().startswith("v ")


@pytest.fixture(scope="module")
def tiny_pie(tiny_2d, tmp_path_factory):
    """tiny_2d with PIE models for its generator: a tiny random estimator and random RigNets for every mode."""
    from dataclasses import replace

    from portrait3d.checkpoints import load_network
    from portrait3d.methods.pie.estimator import EstimatorConfig, ParamEstimator
    from portrait3d.methods.pie.face_model import FaceModel
    from portrait3d.methods.pie.rignet import RigNet, RigNetConfig

    G = load_network(tiny_2d.network_2d)
    rig = FaceModel.load("face-rig")
    models = tmp_path_factory.mktemp("pie")
    torch.manual_seed(0)
    ParamEstimator(EstimatorConfig.for_rig(rig, width=8, layers=(1, 1, 1, 1))).save(models / "estimator.safetensors")
    for mode, dim in (("pose", 3), ("expression", len(rig.config.expression_names)), ("light", 27)):
        net = RigNet(RigNetConfig(num_ws=G.num_ws, w_dim=G.w_dim, mode=mode, param_dim=dim))
        with torch.no_grad():
            net.dec_weight.normal_(0, 0.3)  # an untrained RigNet (zero decoder) would change nothing
        net.save(models / f"rignet-{mode}.safetensors")
    return replace(tiny_2d, pie_models=models, pie_steps_w=2, pie_steps_wplus=1)


def test_pie_adapter_sliders_follow_the_installed_rignets(tiny_pie):
    from portrait3d.methods.pie.face_model import FaceModel

    a = build_registry(tiny_pie)["pie"]
    assert a.available().ok
    names = FaceModel.load("face-rig").config.expression_names
    assert [c.key for c in a.controls()] == ["yaw", "pitch", *(f"expr_{n}" for n in names), "light_x", "light_y"]
    state = a.embed(4)
    assert state.source == "seed 4" and set(state.values) == {c.key for c in a.controls()}
    base = a.render(state, {})
    assert base.shape == (32, 32, 3) and base.dtype == np.uint8
    assert np.array_equal(base, a.render(state, dict(state.values)))  # its own values: no edit at all
    for edit in ({"yaw": state.values["yaw"] + 20}, {f"expr_{names[0]}": 2.0}, {"light_x": 0.8}):
        assert not np.array_equal(base, a.render(state, edit)), edit


def test_pie_adapter_embeds_a_photo(tiny_pie):
    a = build_registry(tiny_pie)["pie"]
    seen = []
    state = a.embed(np.asarray(Image.open(shared_path(PHOTO)).convert("RGB")), lambda f, d: seen.append(f))
    assert state.source == "photo" and state.aligned.shape == (32, 32, 3) and seen[-1] == 1.0
    assert "2 + 1 PIE steps" in state.note
    assert a.render(state, {"yaw": 10.0}).shape == (32, 32, 3)


def test_pie_adapter_without_models_says_why(tiny_2d, tmp_path):
    from dataclasses import replace

    a = build_registry(replace(tiny_2d, pie_models=tmp_path))["pie"]
    ok = a.available()
    assert not ok.ok and "no PIE estimator" in ok.reason


# ----------------------------------------------------------------------------- command line
def test_cli_web_help_and_bad_model_path(tmp_path):
    res = run_cli("web", "--help")
    assert res.exit_code == 0 and "--port" in res.output and "--nrsfm" in res.output
    res = run_cli("web", "--lifted", tmp_path / "missing.safetensors")
    assert res.exit_code == 2 and "missing.safetensors" in res.output


# ----------------------------------------------------------------------------- the page in a browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser_page():
    """``(page, editor url, external requests)``: the editor served in-process, a headless chromium tab on it."""
    if not Path(CHROMIUM).is_file() and not shutil.which("chromium"):
        pytest.skip("chromium is not installed (apt-get install chromium)")
    pytest.importorskip("gradio")
    sync_api = pytest.importorskip("playwright.sync_api")
    photo = shared_path(PHOTO)
    _builtin_3d()
    from portrait3d.interfaces.web.app import WebConfig, launch

    write_docs = os.environ.get("PORTRAIT3D_WRITE_DOCS") == "1"
    port = _free_port()
    settings = MethodSettings(invert_steps=40 if write_docs else 4, orbit_frames=8, mesh_resolution=32)
    app, page_app = launch(WebConfig(port=port, methods=settings), block=False)
    external: list[str] = []
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).is_file()
                                         else shutil.which("chromium"), headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 900})

            def only_local(route):  # the editor must work offline: record and refuse anything else
                from urllib.parse import urlparse

                if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
                    route.continue_()
                else:
                    external.append(route.request.url)
                    route.abort()

            page.route("**/*", only_local)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#photo-upload input[type=file]", state="attached", timeout=60_000)
            page.wait_for_selector("#status textarea", state="attached", timeout=60_000)
            yield page, photo, external, write_docs
            browser.close()
    finally:
        page_app.close()
        app.close()


def _status(page) -> str:
    return page.locator("#status textarea").input_value()


def _stable_src(page, settle: float = 1.0, timeout: float = 15.0) -> str:
    """The result image's ``src`` once it has not changed for ``settle`` seconds."""
    img = page.locator("#result-image img")
    src, since, t0 = img.get_attribute("src"), time.monotonic(), time.monotonic()
    while time.monotonic() - since < settle and time.monotonic() - t0 < timeout:
        time.sleep(0.1)
        now = img.get_attribute("src")
        if now != src:
            src, since = now, time.monotonic()
    return src


@pytest.mark.slow
def test_browser_upload_embed_and_live_slider(browser_page, tmp_path):
    page, photo, external, write_docs = browser_page

    # A corrupt upload: one clear message, and the page keeps working.
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    page.locator("#photo-upload input[type=file]").set_input_files(str(bad))
    page.wait_for_function("(() => { const e = document.querySelector('#status textarea'); "
                           "return e !== null && e.value.startsWith('Error'); })()", timeout=60_000)
    assert _status(page) == "Error: not an image file: upload a JPEG, PNG or WebP photo"

    # A real photo: align + invert once (progress bar), then show the reconstruction.
    page.locator("#photo-upload input[type=file]").set_input_files(str(photo))
    page.wait_for_function("prev => { const e = document.querySelector('#status textarea'); const s = e ? e.value : ''; "
                           "return s.startsWith('Ready') || (s.startsWith('Error') && s !== prev); }",
                           arg=_status(page), timeout=180_000)
    assert _status(page).startswith("Ready: 3D inversion") and "photo" in _status(page), _status(page)
    assert page.locator("#aligned-image img").count() == 1
    before = _stable_src(page)
    assert before and "/file=" in before

    # Move the yaw slider: the image is re-rendered from the cached latent.
    page.locator("#control-0 input[type=range]").fill("30")
    page.wait_for_function(f"document.querySelector('#result-image img').getAttribute('src') !== {before!r}",
                           timeout=30_000)
    after = page.locator("#result-image img").get_attribute("src")
    old_png, new_png = page.request.get(before).body(), page.request.get(after).body()
    old_img, new_img = (np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in (old_png, new_png))
    assert old_img.shape == new_img.shape == (128, 128, 3)
    assert np.abs(old_img.astype(int) - new_img).mean() > 1, "the yaw slider did not change the image"
    assert page.locator("#control-0 input[type=number]").input_value() == "30"

    # Downloads: the current view, the orbit video, the mesh.
    def download(name: str) -> bytes:
        page.locator(f"#download-{name}").click()
        link = page.locator(f"#{name}-file a[href*='/file=']").first
        link.wait_for(timeout=30_000)
        return page.request.get(link.get_attribute("href")).body()

    png = download("image")
    assert png.startswith(b"\x89PNG") and np.array_equal(
        np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), new_img)
    assert download("video")[4:8] == b"ftyp"  # an MP4
    assert download("mesh").startswith(b"ply\n")

    assert external == [], f"the page tried to reach the network: {external}"
    if write_docs:
        DOCS.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(DOCS), full_page=True)

"""LiftedGAN evaluation (Table 2 / Figure 7 metrics): the D_V -> face-pipeline pose mapping by
construction (through the renderer's own geometry and the face pipeline's PnP), the depth metric,
every metric's keys and its "no face found" path on a tiny lifted generator, the ablation-config
adapter and the report helpers."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from portrait3d.methods.lifting import evaluate as E
from portrait3d.methods.lifting.losses import LiftLossWeights
from portrait3d.methods.lifting.networks import LiftedGenerator
from tests.methods.lifting.test_networks import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

R = pytest.importorskip("portrait3d.geometry.render")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def project_mean_face(size: int, yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0,
                      cfg: "R.RendererConfig | None" = None) -> np.ndarray:
    """The face pipeline's mean face placed frontally in the renderer's camera (centred on the
    rotation centre, 70 % of the half-width), moved by the renderer with the view that
    :func:`E.view_from_head_pose` gives for (yaw, pitch, roll), projected by the renderer: ``[68, 2]`` px."""
    from portrait3d.face.pose import mean_face_68

    cfg = cfg or R.RendererConfig(image_size=size)
    mf = mean_face_68()
    c = mf.mean(0)
    s = 0.7 * math.tan(math.radians(cfg.fov) / 2) / np.abs(mf[:, 0] - c[0]).max()
    cam = torch.tensor(s * (mf - c) @ np.diag([1.0, -1.0, -1.0]) + np.array([0.0, 0.0, cfg.camera_distance]))
    rot, t = R.rotation_from_view(E.view_from_head_pose(yaw, pitch, roll).double())
    uv, _ = R.project_points(R.transform_points(cam[None], rot, t, cfg.center), cfg, size)
    return uv[0].numpy()


class FakeFaces:
    """Face-tools stand-in: every image shows the mean face at ``pose`` (or no face at all); the
    descriptor is the per-quadrant mean colour."""

    def __init__(self, pose: tuple[float, float, float] = (0.0, 0.0, 0.0), found: bool = True) -> None:
        self.pose, self.found, self.calls = pose, found, 0

    def landmarks(self, image: np.ndarray) -> np.ndarray | None:
        self.calls += 1
        return project_mean_face(image.shape[0], *self.pose) if self.found else None

    def descriptor(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        q = [image[:h // 2, :w // 2], image[:h // 2, w // 2:], image[h // 2:, :w // 2], image[h // 2:, w // 2:]]
        return np.concatenate([x.reshape(-1, 3).mean(0) for x in q]) + 1.0


class FakeEditor:
    """NRSfM-editor stand-in in W: yaw = 10 * w[0]; an edit moves w[0] toward the target yaw."""

    space = "w"
    layout = SimpleNamespace(theta=slice(1, 4))

    def __init__(self) -> None:
        self.targets: list[torch.Tensor] = []

    def params(self, latents: torch.Tensor) -> torch.Tensor:
        q = torch.zeros(len(latents), 6)
        q[:, 0] = 1.0
        q[:, 1] = latents[:, 0] * 10
        return q

    def edit(self, G, latents, q_target, mode="linear", *, steps=50, **kw):
        self.targets.append(q_target[:, 1].clone())
        out = latents.clone()
        out[:, 0] = q_target[:, 1] / 10
        return out, []


def tiny_model(g2d, view: torch.Tensor | None = None) -> LiftedGenerator:
    """A tiny lifted generator with the real renderer; ``view`` fixes D_V's output for every w."""
    torch.manual_seed(1)
    model = LiftedGenerator(g2d, tiny_config(), generator_ref="tiny-test-generator").eval()
    if view is not None:
        last = model.nets["view"].mlp[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.atanh(view.reshape(6) / model.cfg.view_ranges))
    return model


def is_nan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


# ----------------------------------------------------------------------------------------------
# pose conventions
# ----------------------------------------------------------------------------------------------

def test_view_head_pose_roundtrip():
    rng = np.random.default_rng(0)
    ang = rng.uniform(-50, 50, (20, 3))
    v = E.view_from_head_pose(ang[:, 0], ang[:, 1], ang[:, 2])
    assert v.shape == (20, 6) and v.dtype == torch.float32 and (v[:, 3:] == 0).all()
    np.testing.assert_allclose(E.head_pose_from_view(v), ang, atol=1e-4)
    assert E.head_pose_from_view(v[0]).shape == (3,)


def test_first_order_signs():
    """+r_y (Unsup3d) = head turned to its right = -yaw; +r_x = chin down; +r_z = clockwise = +roll."""
    y, p, r = E.head_pose_from_view([0.0, 0.3, 0.0])
    assert y == pytest.approx(-math.degrees(0.3)) and abs(p) < 1e-9 and abs(r) < 1e-9
    assert E.head_pose_from_view([0.2, 0.0, 0.0])[1] == pytest.approx(-math.degrees(0.2))
    assert E.head_pose_from_view([0.0, 0.0, 0.2])[2] == pytest.approx(math.degrees(0.2))


@pytest.mark.parametrize("pose", [(25, 0, 0), (-25, 0, 0), (0, 15, 0), (0, -15, 0), (0, 0, 10), (20, -10, 5)])
def test_face_pipeline_recovers_synthetic_view(pose):
    """By construction: the mean face moved by the renderer with view_from_head_pose(+yaw...) and
    projected by the renderer is read back by the face pipeline's PnP as the same (+yaw...)."""
    from portrait3d.face.pose import estimate_head_pose

    cfg = R.RendererConfig(image_size=64)
    est = estimate_head_pose(project_mean_face(64, *pose, cfg=cfg), (64, 64), focal=cfg.focal(64))
    np.testing.assert_allclose(est.angles, pose, atol=0.05)


def test_rendered_nose_moves_right_for_positive_yaw():
    """A rendered relief: with +yaw (face pipeline) the tip of a bump toward the camera moves to the
    image right, as a nose does when a head turns to its left."""
    s = 32
    cfg = R.RendererConfig(image_size=s)
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij")
    bump = torch.exp(-((xx - (s - 1) / 2) ** 2 + (yy - (s - 1) / 2) ** 2) / (2 * 3.0 ** 2))
    depth = (1.0 - 0.08 * bump)[None]
    tip = (bump > 0.6).float()
    image = torch.stack([tip, torch.zeros_like(tip), torch.zeros_like(tip)])[None]

    def tip_x(yaw: float) -> float:
        out = R.render(depth, image, E.view_from_head_pose(yaw), cfg)
        red = out.image[0, 0] * out.mask[0, 0]
        return float((red * xx).sum() / red.sum())

    c = (s - 1) / 2
    assert abs(tip_x(0.0) - c) < 0.5
    assert tip_x(30.0) > c + 2
    assert tip_x(-30.0) < c - 2


def test_pose_error_by_construction(tiny_stylegan2):
    """D_V fixed to the view of head pose (20, 5, -3); the (fake) face pipeline sees the mean face
    rendered at that pose: the errors vanish (a flipped sign would give 40 / 10 / 6 degrees)."""
    pose = (20.0, 5.0, -3.0)
    model = tiny_model(tiny_stylegan2, E.view_from_head_pose(*pose))
    res = E.pose_error(model, 3, faces=FakeFaces(pose), batch=2, progress=False)
    assert res["n"] == 3
    assert res["dv_abs_mean"]["yaw"] == pytest.approx(20.0, abs=1e-3)
    for src in ("g2d", "render"):
        r = res[src]
        assert r["faces_found"] == 3 and r["measured"] == 3
        for k in ("yaw", "pitch", "roll"):
            assert r[f"{k}_mae"] < 0.1 and abs(r[f"{k}_bias"]) < 0.1
    flipped = E.pose_error(model, 2, faces=FakeFaces((-20.0, -5.0, 3.0)), sources=("g2d",), progress=False)
    assert flipped["g2d"]["yaw_mae"] == pytest.approx(40.0, abs=0.1)
    assert "render" not in flipped


# ----------------------------------------------------------------------------------------------
# depth metric
# ----------------------------------------------------------------------------------------------

def test_scale_invariant_depth_error():
    rng = np.random.default_rng(0)
    gt = rng.normal(size=40)
    e = E.scale_invariant_depth_error(3.0 * gt + 7.0, gt)
    assert e["rmse"] < 1e-9 and e["nrmse"] < 1e-9 and e["corr"] == pytest.approx(1.0)
    assert e["scale"] == pytest.approx(1 / 3) and e["shift"] == pytest.approx(-7 / 3)
    flat = E.scale_invariant_depth_error(np.full(40, 2.0), gt)
    assert flat["nrmse"] == pytest.approx(1.0) and is_nan(flat["corr"])
    inverted = E.scale_invariant_depth_error(-gt, gt)
    assert inverted["nrmse"] == pytest.approx(1.0) and inverted["scale"] == 0 and inverted["corr"] == pytest.approx(-1)
    noisy = E.scale_invariant_depth_error(gt + 0.1 * rng.normal(size=40), gt)
    assert 0 < noisy["nrmse"] < 0.2
    with pytest.raises(ValueError):
        E.scale_invariant_depth_error([1.0], [1.0])


def test_depth_error_keys_and_values(tiny_stylegan2):
    model = tiny_model(tiny_stylegan2, E.view_from_head_pose(0.0))
    for source in ("render", "g2d"):
        res = E.depth_error(model, 3, faces=FakeFaces(), batch=2, source=source, progress=False)
        assert {"depth_nrmse", "depth_nrmse_median", "depth_rmse_mm", "depth_corr", "n", "faces_found", "measured",
                "points_mean", "source", "points", "pseudo_gt"} <= set(res)
        assert res["faces_found"] == 3 and res["measured"] == 3 and res["source"] == source
        assert 10 <= res["points_mean"] <= 51
        assert 0 <= res["depth_nrmse"] <= 1 + 1e-9 and res["depth_rmse_mm"] >= 0
    with pytest.raises(ValueError):
        E.depth_error(model, 1, faces=FakeFaces(), source="photo")


# ----------------------------------------------------------------------------------------------
# no face found, keys
# ----------------------------------------------------------------------------------------------

def test_no_face_found_gives_nan_and_counts(tiny_stylegan2):
    model = tiny_model(tiny_stylegan2)
    none = FakeFaces(found=False)
    d = E.depth_error(model, 3, faces=none, progress=False)
    assert d["faces_found"] == 0 and d["measured"] == 0 and is_nan(d["depth_nrmse"]) and is_nan(d["depth_rmse_mm"])
    p = E.pose_error(model, 3, faces=none, progress=False)
    for src in ("g2d", "render"):
        assert p[src]["faces_found"] == 0 and p[src]["measured"] == 0
        assert all(is_nan(p[src][f"{k}_mae"]) for k in ("yaw", "pitch", "roll"))
    assert math.isfinite(p["dv_abs_mean"]["yaw"])
    i = E.identity_vs_yaw(model, (15, 30), n=2, nrsfm_editor=FakeEditor(), faces=none, progress=False)
    for m in i["methods"].values():
        assert m["frontal_faces"] == 0 and m["pairs"] == [0, 0] and all(is_nan(c) for c in m["cosine"])
        assert m["within_tolerance"] == [0.0, 0.0]  # a missing face is a rotation that did not turn
    assert none.calls > 0


def test_identity_vs_yaw_counts_rotations_within_tolerance(tiny_stylegan2):
    """Every image measures yaw +30: the +30 render turned as asked, -30 and +-15 did not."""
    model = tiny_model(tiny_stylegan2)
    res = E.identity_vs_yaw(model, (15, 30), n=2, faces=FakeFaces(pose=(30.0, 0.0, 0.0)), progress=False)
    m = res["methods"]["lifted_render"]
    assert res["tolerance_deg"] == 8.0
    assert m["within_tolerance"] == [0.0, 0.5]
    assert m["median_measured_yaw"][1] == pytest.approx(0.0, abs=1.0)  # +30 and -30 pooled
    loose = E.identity_vs_yaw(model, (15,), n=1, faces=FakeFaces(pose=(30.0, 0.0, 0.0)), tolerance_deg=20,
                              both_directions=False, progress=False)
    assert loose["methods"]["lifted_render"]["within_tolerance"] == [1.0]
    with pytest.raises(ValueError, match="pose_fit"):
        E.identity_vs_yaw(model, (15,), n=1, faces=FakeFaces(), pose_fit="5-point", progress=False)


def test_identity_vs_yaw_keys_and_nrsfm_targets(tiny_stylegan2):
    model = tiny_model(tiny_stylegan2)
    editor = FakeEditor()
    res = E.identity_vs_yaw(model, (15, 30, 45, 60), n=3, nrsfm_editor=editor, batch=2, with_manipulator=True,
                            faces=FakeFaces(), progress=False)
    assert res["yaws"] == [15, 30, 45, 60] and res["n"] == 3 and res["both_directions"]
    assert set(res["methods"]) == {"lifted_render", "lifted_manipulator", "nrsfm_linear"}
    for m in res["methods"].values():
        assert {"label", "cosine", "cosine_std", "pairs", "measured_yaw", "frontal_faces",
                "frontal_measured_yaw"} <= set(m)
        assert m["pairs"] == [6, 6, 6, 6] and m["frontal_faces"] == 3
        assert all(-1 - 1e-9 <= c <= 1 + 1e-9 for c in m["cosine"])
    # NRSfM: absolute yaw targets 0, +-15, ... for each batch (2 batches)
    yaws = sorted({round(float(t[0]), 6) for t in editor.targets})
    assert yaws == [-60, -45, -30, -15, 0, 15, 30, 45, 60]
    one_side = E.identity_vs_yaw(model, (30,), n=1, both_directions=False, faces=FakeFaces(), progress=False)
    assert list(one_side["methods"]) == ["lifted_render"] and one_side["methods"]["lifted_render"]["pairs"] == [1]


def test_identity_rotated_render_differs_from_frontal(tiny_stylegan2):
    imgs = E._lifted_render_views(tiny_model(tiny_stylegan2), torch.randn(2, 32), [0.0, 30.0, -30.0])
    assert set(imgs) == {0.0, 30.0, -30.0} and imgs[0.0].shape == (2, 16, 16, 3) and imgs[0.0].dtype == np.uint8
    assert (imgs[30.0] != imgs[0.0]).any() and (imgs[30.0] != imgs[-30.0]).any()


def test_fid_of_lifted_keys_with_stand_in_features(tiny_stylegan2):
    from portrait3d.metrics.fid import FeatureStats

    model = tiny_model(tiny_stylegan2)
    stats = FeatureStats.from_features(np.random.default_rng(0).normal(128, 30, size=(20, 3)))
    calls = []

    def ext(images: np.ndarray) -> np.ndarray:
        calls.append(images.shape)
        return images.reshape(len(images), -1, 3).mean(1).astype(np.float64)

    res = E.fid_of_lifted(model, 5, stats, batch=2, extractor=ext, progress=False)
    assert set(res) == {"fid_lifted", "fid_2d", "n", "real_n", "resolution", "truncation"}
    assert res["n"] == 5 and res["real_n"] == 20 and res["resolution"] == 16
    assert math.isfinite(res["fid_lifted"]) and math.isfinite(res["fid_2d"]) and res["fid_lifted"] >= 0
    assert sum(c[0] for c in calls) == 10 and all(c[1:] == (16, 16, 3) for c in calls)
    res1 = E.fid_of_lifted(model, 2, stats, with_2d=False, extractor=ext, progress=False)
    assert is_nan(res1["fid_2d"])
    with pytest.raises(ValueError):
        E.fid_of_lifted(model, 1, stats, extractor=ext)


def test_fid_of_lifted_with_inception(tiny_stylegan2):
    from portrait3d.metrics.fid import FeatureStats, inception_path

    try:
        inception_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))

    stats = FeatureStats.from_features(np.random.default_rng(0).random((3, 2048)))
    res = E.fid_of_lifted(tiny_model(tiny_stylegan2), 2, stats, with_2d=False, progress=False)
    assert math.isfinite(res["fid_lifted"]) and res["n"] == 2


def test_real_face_pipeline_on_tiny_images(tiny_stylegan2):
    """The real pipeline: no face on 16 px noise (NaN + counts); the template box always gives landmarks."""
    pytest.importorskip("mediapipe")
    pytest.importorskip("dlib")
    model = tiny_model(tiny_stylegan2)
    res = E.pose_error(model, 2, detector="mediapipe", progress=False)
    assert res["g2d"]["faces_found"] == 0 and is_nan(res["g2d"]["yaw_mae"])
    with E.FaceAnalyzer("template", work_size=64) as fa:
        img = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
        lm = fa.landmarks(img)
        assert lm.shape == (68, 2) and np.isfinite(lm).all()
        assert lm.min() > -8 and lm.max() < 24  # in the 16 px image's pixels
    with pytest.raises(ValueError):
        E.FaceAnalyzer("haar")


# ----------------------------------------------------------------------------------------------
# reports
# ----------------------------------------------------------------------------------------------

def test_markdown_and_plot(tmp_path, tiny_stylegan2):
    model = tiny_model(tiny_stylegan2)
    fig7 = E.identity_vs_yaw(model, (15, 30), n=1, nrsfm_editor=FakeEditor(), faces=FakeFaces(), progress=False)
    t7 = E.markdown_fig7(fig7)
    assert "LiftedGAN (3D render)" in t7 and "NRSfM (linear edit)" in t7 and len(t7.splitlines()) == 4
    rows = [{"name": "ours", "fid": {"fid_lifted": 12.3, "fid_2d": 10.0, "n": 4},
             "depth": E.depth_error(model, 1, faces=FakeFaces(), progress=False),
             "pose": E.pose_error(model, 1, faces=FakeFaces(found=False), progress=False)},
            {"name": "w/o flip", "fid": None, "depth": None, "pose": None}]
    t2 = E.markdown_table2(rows)
    lines = t2.splitlines()
    assert len(lines) == 4 and "| ours | 12.3 | 10.0 | 4 |" in t2 and "| w/o flip | - | - | - |" in t2
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    png = E.plot_identity_vs_yaw(fig7, tmp_path / "fig7.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------
# ablations
# ----------------------------------------------------------------------------------------------

def test_ablation_config_switches_the_named_losses_off():
    from portrait3d.methods.lifting.train import LiftTrainConfig

    cfg = E.ablation_config("perturb", 2.5, network="tiny")
    assert isinstance(cfg, LiftTrainConfig) and cfg.total_kimg == 2.5 and cfg.network == "tiny"
    w = cfg.effective_weights()
    assert w.perturb_image == w.perturb_generator == w.perturb_param == w.latent_prior == 0
    assert w.flip > 0 and w.identity > 0 and w.rec > 0
    assert E.ablation_config("albedo", 1).effective_weights().albedo_rank == 0
    assert E.ablation_config("full", 1).effective_weights() == LiftLossWeights()
    with pytest.raises(ValueError, match="unknown ablation"):
        E.ablation_config("rec", 1)


def test_find_lifted_file_and_train_ablation(tmp_path, tiny_stylegan2):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError):
        E.find_lifted_file(tmp_path)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(FileNotFoundError):
        E.find_lifted_file(tmp_path)
    model = tiny_model(tiny_stylegan2)
    model.resolved_renderer_cfg()
    saved = model.save(tmp_path / "sub" / "snap.safetensors")
    assert E.find_lifted_file(tmp_path) == saved and E.find_lifted_file(saved) == saved

    # a real (tiny) ablation run: the albedo rank term off, the architecture of the evaluated model
    path = E.train_ablation(tiny_stylegan2, "albedo", 0.002, tmp_path / "abl", lift=model.cfg, batch=2,
                            network="tiny-test-generator", w_stats_samples=64, grid_samples=2, device="cpu",
                            threads=1, perceptual_resize=32, progress=False)
    assert path == tmp_path / "abl" / "lifted.safetensors" and path.is_file()
    run = json.loads((tmp_path / "abl" / "config.json").read_text())
    run = run.get("config", run)
    assert run["ablate"] == ["albedo"] and run["total_kimg"] == 0.002
    back = LiftedGenerator.load(path, g2d=tiny_stylegan2)
    assert back.cfg == model.cfg
    with pytest.raises(FileExistsError):
        E.train_ablation(tiny_stylegan2, "albedo", 0.002, tmp_path / "abl", lift=model.cfg, progress=False)

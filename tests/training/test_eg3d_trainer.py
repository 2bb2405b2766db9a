"""EG3D trainer on a tiny tri-plane generator (32 px planes, 16 px neural rendering, 6+6 samples,
the fixed-width 2X super-resolution to 128 px) and a synthetic 8-face dataset with cameras."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import START_METHOD as START
from tests.conftest import make_dataset

from portrait3d.networks.eg3d.camera import camera_from_angles
from portrait3d.training import eg3d as E
from portrait3d.training.distributed import run_local_processes

RES = 128


def tiny_config(steps: int, batch: int = 2) -> E.EG3DTrainConfig:
    """Every phase (Gmain, density reg, Dmain, R1 on image + raw) runs at step 0; blur is on."""
    cfg = E.preset("tiny")
    cfg.run.batch = batch
    cfg.run.total_kimg = steps * batch / 1000
    cfg.run.threads = 1
    cfg.D_reg_interval = 2
    cfg.G_reg_interval = 2
    cfg.augment = "color,translation,cutout"
    cfg.D.mbstd_group_size = 2
    return cfg


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("eg3ddata"), 8, RES)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data):
    """4 uninterrupted steps, sample grids at the start and the end."""
    out = tmp_path_factory.mktemp("eg3dstraight")
    cfg = tiny_config(4)
    cfg.run.sample_kimg = 1.0
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        export = E.train_eg3d(cfg, data, out)
    finally:
        torch.set_num_threads(n)
    return out, export


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_losses_finite_and_outputs(straight):
    out, export = straight
    recs = _records(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        for k in ("loss_G", "loss_D", "score_real", "score_fake"):
            assert math.isfinite(r[k]), (k, r)
    for r in (recs[0], recs[2]):  # steps 0 and 2: density and R1 regularisation
        assert math.isfinite(r["density_tv"]) and math.isfinite(r["r1_penalty"])
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names == [f"{kind}-{k:08d}.png" for kind in ("depth", "fakes", "views") for k in (0, 4)]
    from portrait3d.checkpoints.native import load_native
    from portrait3d.networks.eg3d.triplane import TriPlaneGenerator

    G = load_native(export)
    assert isinstance(G, TriPlaneGenerator) and G.config.rendering.density_reg == 0.25
    c = camera_from_angles(0.0, 0.0)[None]
    o = G(torch.randn(1, G.z_dim), c, noise_mode="const", deterministic=True)
    assert o["image"].shape == (1, 3, RES, RES) and o["image_raw"].shape == (1, 3, 16, 16)
    assert torch.isfinite(o["image"]).all()


def test_resume_is_bit_exact(straight, data, tmp_path):
    out, _ = straight
    run2 = tmp_path / "resumed"
    E.train_eg3d(tiny_config(2), data, run2)
    E.train_eg3d(tiny_config(4), data, run2, resume=run2 / "snapshot-00000002")
    a = load_file(str(out / "snapshot-00000004" / "state.safetensors"))
    b = load_file(str(run2 / "snapshot-00000004" / "state.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


@pytest.mark.slow
def test_ddp_two_processes_match_one(data, tmp_path, capsys):
    """2 gloo processes x 2 samples == 1 process x 4 samples, 2 steps (all phases at step 0).

    Needs the minibatch-std group (2) to divide the per-process batch; lr 1e-3 as in the StyleGAN2
    test (Adam's per-element normalisation amplifies summation-order noise where gradients are ~0).
    """
    cfg = tiny_config(2, batch=4)
    cfg.lr_G = cfg.lr_D = 1e-3
    E.train_eg3d(cfg, data, tmp_path / "single")
    run_local_processes(E.train_eg3d, 2, cfg, data, tmp_path / "ddp", start_method=START)
    a = load_file(str(tmp_path / "single" / "snapshot-00000002" / "state.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "snapshot-00000002" / "state.safetensors"))
    worst = worst_rel = 0.0
    for k in a:
        if k.split(".")[0] in ("G", "D", "G_ema") and a[k].is_floating_point():
            d = (a[k] - b[k]).abs()
            worst, worst_rel = max(worst, float(d.max())), max(worst_rel, float((d / a[k].abs().clamp_min(1)).max()))
            assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-5), k
    with capsys.disabled():
        print(f"\n[EG3D DDP 2x2 vs 1x4] max |difference| = {worst:.3g}, / max(1, |p|) = {worst_rel:.3g}")


def test_schedules_and_helpers(data):
    from portrait3d.face.dataset import AlignedFaceDataset

    cfg = tiny_config(1, batch=32)
    assert E.blur_sigma(cfg, 0) == 10 and E.blur_sigma(cfg, 100_000) == 5 and E.blur_sigma(cfg, 10**6) == 0
    assert E.swapping_prob(cfg, 0) == 1 and E.swapping_prob(cfg, 10**6) == pytest.approx(0.5)
    cfg.neural_rendering_resolution_final = 32
    assert [E.neural_rendering_resolution(cfg, n) for n in (0, 500_000, 2 * 10**6)] == [16, 24, 32]
    x = torch.full([1, 3, 20, 20], 0.3)
    assert torch.allclose(E.gaussian_blur(x, 2.0)[..., 6:-6, 6:-6], x[..., 6:-6, 6:-6])
    assert E.gaussian_blur(x, 0.2) is x
    ds = AlignedFaceDataset(data, mirror=True)
    cams = E.dataset_cameras(ds)
    assert cams.shape == (16, 25)
    for i in (0, 11):
        assert torch.equal(cams[i], ds[i][1])
    back = E.EG3DTrainConfig.from_dict(json.loads(json.dumps(E.preset("cpu-small").to_dict())))
    assert back == E.preset("cpu-small")


def _tiny_pd() -> E.ProjectedDiscriminatorConfig:
    return E.ProjectedDiscriminatorConfig(c_dim=25, feature_resolution=64, proj_channels=8, head_channels=8,
                                          head_channels_max=16, cmap_dim=8)


@pytest.mark.parametrize("kind", ["projected", "both"])
def test_projected_discriminators_train_and_resume_bit_exactly(kind, data, tmp_path):
    def cfg(steps: int) -> E.EG3DTrainConfig:
        c = tiny_config(steps)
        c.discriminator, c.PD = kind, _tiny_pd()
        return c

    assert (cfg(1).gamma() == 0) == (kind == "projected")  # R1 only where a pixel D is
    E.train_eg3d(cfg(2), data, tmp_path / "a")
    E.train_eg3d(cfg(1), data, tmp_path / "b")
    E.train_eg3d(cfg(2), data, tmp_path / "b", resume=tmp_path / "b" / "snapshot-00000001")
    a = load_file(str(tmp_path / "a" / "snapshot-00000002" / "state.safetensors"))
    b = load_file(str(tmp_path / "b" / "snapshot-00000002" / "state.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rec = [r for r in _records(tmp_path / "a") if "loss_D" in r]
    assert rec and all(math.isfinite(r["loss_D"]) and math.isfinite(r["loss_G"]) for r in rec)


def test_init_from_2d_copies_every_matching_backbone_weight():
    from portrait3d.networks.stylegan2 import Generator, StyleGAN2Config

    cfg = E.preset("tiny")
    g3 = E.TriPlaneGenerator(cfg.G)
    syn = cfg.G.backbone
    g2 = Generator(StyleGAN2Config(z_dim=cfg.G.z_dim, w_dim=cfg.G.w_dim, img_resolution=cfg.G.plane_resolution,
                                   mapping=cfg.G.mapping, synthesis=syn))
    with torch.no_grad():
        for p in g2.parameters():
            p.normal_()
    copied = E.init_from_2d(g3, g2)
    bb = g3.backbone.state_dict()
    src = {f"synthesis.{k}": v for k, v in g2.synthesis.state_dict().items()}
    convs = [k for k in src if ".conv" in k and k.endswith(".weight")]
    assert convs and all(k in copied and torch.equal(bb[k], src[k]) for k in convs)
    assert not any("torgb" in k for k in copied)  # 3 colour channels there, 3 x C plane channels here
    assert "mapping.fc0.weight" in copied and any(k.startswith("mapping.fc1.") for k in copied)
    # fc0 also reads the camera embedding here; its camera columns start at zero, so W is the 2D one for any camera
    z = torch.randn(3, cfg.G.z_dim)
    c = torch.stack([camera_from_angles(y, p) for y, p in ((0, 0), (25, -10), (-40, 15))])
    assert torch.allclose(g3.mapping(z, c), g2.mapping(z, None), atol=1e-5)


def test_init_from_a_pose_conditioned_2d_generator_keeps_its_camera_mapping():
    """Pose-conditioned pretraining: a camera-conditioned 2D generator hands over its camera embedding and
    camera columns as they are, so the tri-plane backbone's W equals the 2D one for every camera."""
    from portrait3d.networks.stylegan2 import Generator, StyleGAN2Config

    cfg = E.preset("tiny")
    g3 = E.TriPlaneGenerator(cfg.G)
    g2 = Generator(StyleGAN2Config(z_dim=cfg.G.z_dim, c_dim=25, w_dim=cfg.G.w_dim,
                                   img_resolution=cfg.G.plane_resolution, mapping=cfg.G.mapping,
                                   synthesis=cfg.G.backbone))
    with torch.no_grad():
        for p in g2.parameters():
            p.normal_()
    copied = E.init_from_2d(g3, g2)
    assert {"mapping.embed.weight", "mapping.embed.bias", "mapping.fc0.weight"} <= set(copied)
    z = torch.randn(3, cfg.G.z_dim)
    c = torch.stack([camera_from_angles(y, p) for y, p in ((0, 0), (25, -10), (-40, 15))])
    w2 = g2.mapping(z, c)
    assert torch.allclose(g3.mapping(z, c), w2, rtol=1e-4, atol=1e-4 * float(w2.abs().max()))
    one = g2.mapping(z[:1].expand(3, -1), c)  # one latent, three cameras: the 2D W does depend on the camera
    assert (one[0] - one[1]).abs().max() > 1e-6  # float error here is ~1e-9


def _teacher_set(root: Path, data: Path, n: int = 6) -> Path:
    """A synthetic teacher set: the dataset's first faces and cameras, random latents, a relief-shaped mesh."""
    import numpy as np

    from portrait3d.face.dataset import AlignedFaceDataset
    from portrait3d.utils.io import write_json, write_npy

    ds = AlignedFaceDataset(data, mirror=False)
    g = np.random.default_rng(0)
    xy = g.uniform(40, 88, (n, 468, 2))
    z = -20 * np.exp(-((xy - 64) ** 2).sum(-1) / 400)  # a bump nearest the camera in the middle
    root.mkdir(parents=True)
    write_npy(root / "images.npy", ds.all_images_uint8(n))
    write_npy(root / "latents.npy", g.standard_normal((n, E.preset("tiny").G.z_dim)).astype(np.float32))
    write_npy(root / "mesh.npy", np.concatenate([xy, z[..., None]], -1).astype(np.float32))
    write_json(root / "labels.json", {"labels": [[f"s{i}", ds.cameras[i].tolist()] for i in range(n)],
                                      "summary": {"network": "synthetic"}})
    return root


@pytest.mark.parametrize("adversarial", [False, True])
def test_distillation_trains_g_and_leaves_d_alone_without_adversary(adversarial, data, tmp_path):
    from portrait3d.training.snapshots import load_training_state

    cfg = tiny_config(2)
    cfg.distill = str(_teacher_set(tmp_path / "teacher", data))
    cfg.adversarial = adversarial
    out = tmp_path / "run"
    E.train_eg3d(cfg, data, out)
    rec = [r for r in _records(out) if "distill_rec" in r]
    assert rec and all(math.isfinite(r["distill_rec"]) and math.isfinite(r["distill_depth"]) for r in rec)
    assert all(("loss_D" in r) == adversarial for r in rec)
    fresh, trained = E.build_networks(cfg, torch.device("cpu")), E.build_networks(cfg, torch.device("cpu"))
    load_training_state(max(out.glob("snapshot-*")), trained, "eg3d")
    d_same = all(torch.equal(a, b) for a, b in zip(fresh.D.state_dict().values(), trained.D.state_dict().values()))
    g_same = all(torch.equal(a, b) for a, b in zip(fresh.G.state_dict().values(), trained.G.state_dict().values()))
    assert d_same == (not adversarial) and not g_same


@pytest.mark.parametrize("with_teacher", [False, True])
def test_discriminator_warm_up_keeps_the_adversarial_term_from_g(with_teacher, data, tmp_path):
    """During --d-warmup the fresh D trains and G gets no adversarial gradient: it learns only from the teacher,
    or stays exactly as it was without one; afterwards G's adversarial term starts."""
    from portrait3d.training.snapshots import load_training_state

    cfg = tiny_config(4)
    cfg.d_warmup_kimg = 2 * cfg.run.batch / 1000  # the first two steps
    if with_teacher:
        cfg.distill = str(_teacher_set(tmp_path / "teacher", data))
    out = tmp_path / "run"
    cfg.run.snapshot_kimg = 2 * cfg.run.batch / 1000
    E.train_eg3d(cfg, data, out)
    rec = [r for r in _records(out) if "loss_D" in r]
    assert [("loss_G" in r) for r in rec] == [False, False, True, True]
    assert all(("distill_rec" in r) == with_teacher for r in rec)
    fresh, warm = E.build_networks(cfg, torch.device("cpu")), E.build_networks(cfg, torch.device("cpu"))
    load_training_state(out / "snapshot-00000002", warm, "eg3d")
    # parameters, not buffers: D's steps still track w_avg in G's mapping, as in any run
    g_same = all(torch.equal(a, b) for a, b in zip(fresh.G.parameters(), warm.G.parameters()))
    d_same = all(torch.equal(a, b) for a, b in zip(fresh.D.parameters(), warm.D.parameters()))
    assert g_same == (not with_teacher) and not d_same


def test_distillation_refuses_nothing_to_learn_from():
    cfg = tiny_config(1)
    cfg.adversarial = False
    with pytest.raises(E.UsageError, match="teacher"):
        cfg.validate()


def test_init_from_a_trained_eg3d(straight, data, tmp_path):
    """A new EG3D run starts from exported weights (how training continues from the shipped default-3d)."""
    from portrait3d.checkpoints.native import load_native, save_network

    out, export = straight[0], straight[1]
    G = load_native(export)
    with torch.no_grad():  # far from any fresh initialisation, so a start from it is unmistakable
        for p in G.parameters():
            p.add_(0.5)
    save_network(G, tmp_path / "moved.safetensors")
    cont = tmp_path / "cont"
    E.train_eg3d(tiny_config(1), data, cont, init_from=tmp_path / "moved.safetensors")
    src = dict(G.named_parameters())
    got = dict(load_native(cont / "G_ema.safetensors").named_parameters())
    assert max((got[k] - v).abs().max().item() for k, v in src.items()) < 0.05  # one EMA step from the source
    with pytest.raises(Exception, match="only one of"):
        E.train_eg3d(tiny_config(1), data, tmp_path / "x", init_from=export, resume=out)

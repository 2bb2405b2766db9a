"""StyleGAN2 trainer on tiny networks (32 px, <= 16 channels) and a synthetic 12-face dataset.

Also covers the shared loop pieces: global-batch sharding of data and randomness, DiffAugment,
bit-exact resume and 2-process gloo DDP against one process.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tests.conftest import START_METHOD as START
from tests.conftest import make_dataset

from portrait3d.interfaces.cli.train import stylegan2_cmd as main
from portrait3d.training import augment
from portrait3d.training.batches import GlobalBatchSampler
from portrait3d.training.distributed import run_local_processes
from portrait3d.training.randomness import BatchRandom, Shard
from portrait3d.training.stylegan2 import StyleGAN2TrainConfig, preset, train_stylegan2

RES = 32


def tiny_config(steps: int, batch: int = 4) -> StyleGAN2TrainConfig:
    """Tiny nets; every phase (Gmain, Greg path length, Dmain, Dreg R1) runs within 2 steps."""
    cfg = preset("tiny")
    cfg.run.batch = batch
    cfg.run.total_kimg = steps * batch / 1000
    cfg.run.threads = 1
    cfg.D_reg_interval = 2
    cfg.G_reg_interval = 2
    cfg.pl_weight = 2.0
    return cfg


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("sg2data"), 12, RES)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data):
    """4 uninterrupted steps with grids, a snapshot every 2 steps and a metrics hook."""
    out = tmp_path_factory.mktemp("sg2straight")
    cfg = tiny_config(4)
    cfg.run.sample_kimg = cfg.run.snapshot_kimg = cfg.run.metrics_kimg = 2 * cfg.run.batch / 1000
    calls = []

    def hook(G_ema, step):
        calls.append(step)
        return {"mean_abs": float(G_ema(torch.zeros(1, G_ema.z_dim), None, noise_mode="const").abs().mean())}

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        export = train_stylegan2(cfg, data, out, metrics=hook)
    finally:
        torch.set_num_threads(n)
    return out, export, calls


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_losses_finite_and_outputs(straight):
    out, export, calls = straight
    recs = [r for r in _records(out) if "step" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        for k in ("loss_G", "loss_D", "score_real", "score_fake"):
            assert math.isfinite(r[k]), (k, r)
    reg = [r for r in recs if r["step"] in (1, 3)]  # steps 0 and 2 ran R1 and path length
    assert all(math.isfinite(r["r1_penalty"]) and math.isfinite(r["pl_penalty"]) for r in reg)
    assert calls == [2, 4]
    assert (out / "reals.png").exists()
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "fakes-00000000.png", "fakes-00000002.png", "fakes-00000004.png"]
    meta = json.loads((out / "snapshot-00000004" / "state.json").read_text())
    assert meta["step"] == 4 and meta["images_seen"] == 16 and [m["step"] for m in meta["metrics"]] == [2, 4]
    from portrait3d.checkpoints.native import load_native

    G = load_native(export)
    img = G(torch.randn(2, G.z_dim), None, noise_mode="const")
    assert img.shape == (2, 3, RES, RES) and torch.isfinite(img).all()


def test_resume_is_bit_exact(straight, data, tmp_path):
    out, _, _ = straight
    run2 = tmp_path / "resumed"
    train_stylegan2(tiny_config(2), data, run2)
    train_stylegan2(tiny_config(4), data, run2, resume=run2)  # newest snapshot of the run folder
    a = load_file(str(out / "snapshot-00000004" / "state.safetensors"))
    b = load_file(str(run2 / "snapshot-00000004" / "state.safetensors"))
    assert a.keys() == b.keys()
    assert any(k.startswith("opt_D.state.") for k in a) and "extra.pl_mean" in a and "rng.torch" in a
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    meta = json.loads((run2 / "snapshot-00000004" / "state.json").read_text())
    assert (meta["step"], meta["images_seen"]) == (4, 16)


def test_resume_rejects_other_networks(straight, data, tmp_path):
    out, _, _ = straight
    cfg = tiny_config(6)
    cfg.G.synthesis.channel_max = 8
    with pytest.raises(Exception, match="do not match|other network settings"):
        train_stylegan2(cfg, data, tmp_path / "x", resume=out)


@pytest.mark.slow
def test_ddp_two_processes_match_one(data, tmp_path, capsys):
    """2 gloo processes x 4 samples == 1 process x 8 samples (same global batch), within 1e-5.

    Learning rate 1e-3: Adam normalises each element by its gradient's magnitude, so where a
    gradient is ~0 a different float summation order (batch 4 vs 8 in the kernels, all-reduce)
    moves the update by up to ~lr; at 1e-3 that stays < 1e-5 over 4 steps (at the default 2.5e-3
    the largest difference is one D weight off by ~2e-5; the losses agree to 1e-7).
    """
    cfg = tiny_config(4, batch=8)
    cfg.lr_G = cfg.lr_D = 1e-3
    train_stylegan2(cfg, data, tmp_path / "single")
    run_local_processes(train_stylegan2, 2, cfg, data, tmp_path / "ddp", start_method=START)
    a = load_file(str(tmp_path / "single" / "snapshot-00000004" / "state.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "snapshot-00000004" / "state.safetensors"))
    worst = worst_rel = 0.0
    for k in a:
        if k.split(".")[0] in ("G", "D", "G_ema") and a[k].is_floating_point():
            d = (a[k] - b[k]).abs()
            worst = max(worst, float(d.max()))
            worst_rel = max(worst_rel, float((d / a[k].abs().clamp_min(1)).max()))
            assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-5), k
    with capsys.disabled():  # mapping weights are stored x100 (lr multiplier 0.01): 1 ulp there is ~1e-5
        print(f"\n[DDP 2x4 vs 1x8] max |difference| = {worst:.3g}, max |difference| / max(1, |p|) = {worst_rel:.3g}")
    la = [r["loss_D"] for r in _records(tmp_path / "single")]
    lb = [r["loss_D"] for r in _records(tmp_path / "ddp")]
    assert np.allclose(la, lb, rtol=1e-5, atol=1e-6)


def test_global_batch_sharding():
    one = GlobalBatchSampler(10, 4, seed=3)
    ranks = [GlobalBatchSampler(10, 4, seed=3, rank=r, world=2, start_step=1) for r in range(2)]
    it = [iter(s) for s in ranks]
    for step in (1, 2, 3):
        full = one.global_batch(step)
        assert [next(i) for i in it] == [full[0::2], full[1::2]]
    seen = sum((one.global_batch(s) for s in range(5)), [])  # 20 draws = 2 epochs: each face twice
    assert sorted(seen) == sorted(list(range(10)) * 2)


def test_batch_random_same_numbers_however_split():
    def draws(shard: Shard, rows: int) -> list[torch.Tensor]:
        r = BatchRandom(7, (5, 1), shard, rows, torch.device("cpu"))
        out = [r.randn(3), r.randint(0, 100, 2), torch.tensor(r.shared_randint(1, 9))]
        src, cpu = r.source, torch.device("cpu")  # what the networks draw through random=
        out += [src.randn([rows, 1, 4, 4], device=cpu, dtype=torch.float32),
                src.rand([rows, 2, 4], device=cpu, dtype=torch.float32),
                src.rand([rows * 6, 5], device=cpu, dtype=torch.float32),
                src.randn([3], device=cpu, dtype=torch.float32)]
        out.append(augment.sample_params("color,translation,cutout", r.global_rows, 16, r.generator)
                   .take(shard.index, shard.count).shift)
        return out

    full = draws(Shard(0, 1), 8)
    for world in (2, 4):
        parts = [draws(Shard(i, world), 8 // world) for i in range(world)]
        for j, ref in enumerate(full):
            if j in (2, 6):  # shared draws: identical everywhere
                assert all(torch.equal(p[j], ref) for p in parts)
                continue
            got = torch.empty_like(ref) if j != 5 else torch.empty_like(ref.view(8, 6, 5))
            for i, p in enumerate(parts):
                got[i::world] = p[j] if j != 5 else p[j].view(-1, 6, 5)
            assert torch.equal(got.view_as(ref), ref), j
    assert not torch.equal(draws(Shard(0, 1), 8)[0], BatchRandom(7, (6, 1), Shard(), 8, "cpu").randn(3))


def test_diff_augment():
    x = torch.randn(6, 3, 16, 16, requires_grad=True)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert augment.diff_augment(x, "", g()) is x
    y = augment.diff_augment(x, "color,translation,cutout", g())
    assert torch.equal(y, augment.diff_augment(x, "color,translation,cutout", g()))
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # translation: integer shift with zero fill; cutout removes an 8x8 square (less at borders)
    ones = torch.ones(64, 1, 16, 16)
    p = augment.sample_params("translation", 64, 16, g())
    shifted = augment.apply(ones, p)
    expect = (16 - p.shift[:, 0].abs()) * (16 - p.shift[:, 1].abs())
    assert torch.equal(shifted.sum([1, 2, 3]), expect.float()) and p.shift.abs().max() <= 2
    cut = augment.apply(ones, augment.sample_params("cutout", 64, 16, g()))
    removed = 256 - cut.sum([1, 2, 3])
    assert removed.max() == 64 and removed.min() >= 16
    # rows of a global draw: rank r of 2 gets rows r::2
    xs = torch.randn(8, 3, 16, 16)
    full = augment.diff_augment(xs, "color,translation", g())
    assert torch.equal(augment.diff_augment(xs[1::2], "color,translation", g(), rank=1, world=2), full[1::2])
    with pytest.raises(ValueError, match="unknown DiffAugment policy"):
        augment.parse_policy("color,flip")


def test_config_json_round_trip():
    cfg = preset("cpu-small")
    back = StyleGAN2TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and isinstance(back.betas, tuple)
    assert preset("gpu").G.synthesis.channel_base == 16384


def test_cli_tiny_run(data, tmp_path):
    out = tmp_path / "cli"
    res = CliRunner().invoke(main, ["--data", str(data), "--out", str(out), "--config", "tiny", "--kimg", "0.008",
                                    "--batch", "4", "--threads", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (out / "G_ema.safetensors").exists() and (out / "snapshot-00000002" / "state.json").exists()
    res = CliRunner().invoke(main, ["--data", str(data), "--out", str(tmp_path / "bad"), "--config", "cpu-small"])
    assert res.exit_code != 0 and "128 px" in res.output


def test_init_from_a_trained_generator(straight, data, tmp_path):
    """A new run starts G and G_ema from exported weights (the shipped default when the run folder is gone);
    the discriminator stays fresh; weights of another config or kind are refused in one line."""
    from portrait3d.errors import UsageError
    from portrait3d.training.snapshots import init_generators
    from portrait3d.training.stylegan2 import build_networks

    _, export, _ = straight
    from portrait3d.checkpoints.native import load_native

    src = load_native(export).state_dict()
    nets = build_networks(tiny_config(1), torch.device("cpu"))
    d_before = {k: v.clone() for k, v in nets.D.state_dict().items()}
    assert "fresh discriminator" in init_generators(nets, export)
    for name in ("G", "G_ema"):
        got = getattr(nets, name).state_dict()
        assert all(torch.equal(got[k], v) for k, v in src.items())
    assert all(torch.equal(nets.D.state_dict()[k], v) for k, v in d_before.items())

    narrow = tiny_config(1)
    narrow.G.synthesis.channel_max = 8
    with pytest.raises(UsageError, match="do not fit"):
        init_generators(build_networks(narrow, torch.device("cpu")), export)
    from tests.conftest import make_tiny_eg3d

    from portrait3d.checkpoints.native import save_network

    save_network(make_tiny_eg3d(), tmp_path / "g3.safetensors")
    with pytest.raises(UsageError, match="TriPlaneGenerator, not a Generator"):
        init_generators(nets, tmp_path / "g3.safetensors")

    out = tmp_path / "cont"
    train_stylegan2(tiny_config(1), data, out, init_from=export)  # one step from the exported weights
    assert (out / "G_ema.safetensors").exists()
    res = CliRunner().invoke(main, ["--data", str(data), "--out", str(tmp_path / "both"), "--config", "tiny",
                                    "--init-from", str(export), "--resume", str(out), "--threads", "1"])
    assert res.exit_code == 2 and "only one of" in res.output


def test_pose_conditioned_pretraining_starts_as_the_source_and_learns_the_camera(straight, data, tmp_path):
    """`--pose-conditioned --init-from G`: at the start the camera changes nothing (its mapping columns at zero,
    the z columns rescaled for the wider fan-in), so every camera gives the source's W; a few steps against the
    camera-conditioned discriminator give the camera columns weight; the exported G takes a camera."""
    from portrait3d.checkpoints.native import load_native
    from portrait3d.networks.eg3d.camera import camera_from_angles
    from portrait3d.training.stylegan2 import CAMERA_DIM, build_networks, init_pose_conditioned

    _, export, _ = straight
    src = load_native(export).eval()
    cfg = tiny_config(1)
    cfg.G.c_dim = cfg.D.c_dim = cfg.PD.c_dim = CAMERA_DIM
    nets = build_networks(cfg, torch.device("cpu"))
    assert "camera embedding fresh" in init_pose_conditioned(nets, export)
    z = torch.randn(3, src.z_dim)
    c = torch.stack([camera_from_angles(y, p) for y, p in ((0, 0), (25, -10), (-40, 15))]).reshape(3, CAMERA_DIM)
    assert torch.allclose(nets.G_ema.mapping(z, c), src.mapping(z, None), atol=1e-5)

    out = tmp_path / "pc"
    res = CliRunner().invoke(main, ["--data", str(data), "--out", str(out), "--config", "tiny", "--kimg", "0.012",
                                    "--batch", "4", "--threads", "1", "--no-progress", "--init-from", str(export),
                                    "--pose-conditioned"])
    assert res.exit_code == 0, res.output
    G = load_native(out / "G_ema.safetensors")
    assert G.c_dim == CAMERA_DIM
    assert G.mapping.fc0.weight[:, src.z_dim:].abs().max() > 0  # the camera columns left zero
    img = G(z, c, noise_mode="const")
    assert img.shape == (3, 3, RES, RES) and torch.isfinite(img).all()
    recs = [r for r in _records(out) if "step" in r]
    assert len(recs) == 3 and all(math.isfinite(r["loss_G"]) and math.isfinite(r["loss_D"]) for r in recs)
    # resuming needs the flag again (other networks otherwise), as every network setting does
    res = CliRunner().invoke(main, ["--data", str(data), "--out", str(out), "--config", "tiny", "--kimg", "0.016",
                                    "--threads", "1", "--no-progress", "--resume", str(out)])
    assert res.exit_code == 2 and "other network settings" in res.output
    res = CliRunner().invoke(main, ["--data", str(data), "--out", str(out), "--config", "tiny", "--kimg", "0.016",
                                    "--threads", "1", "--no-progress", "--resume", str(out), "--pose-conditioned"])
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in _records(out) if "step" in r][-1] == 4


def test_face_metrics_hook_reports_demographic_coverage(tmp_path, monkeypatch, tiny_stylegan2):
    """With UTKFace names in the data, the training log gets coverage TVs; a 'generator' that makes the data's own
    faces covers it perfectly (TV 0 up to the probes' held-out split)."""
    pytest.importorskip("mediapipe")
    from tests.conftest import make_photo_dataset

    from portrait3d.metrics import face_stats
    from portrait3d.training import stylegan2 as sg2

    root = make_photo_dataset(tmp_path / "utk", 24)
    monkeypatch.setattr(face_stats, "generator_face_stats",
                        lambda G, n, **kw: face_stats.dataset_face_stats(root, 24, cache=False))
    out = sg2.face_metrics_hook(root, 24, torch.device("cpu"), n_real=24)(tiny_stylegan2, 0)
    assert {"fd_dlib", "detection", "coverage_tv_age", "coverage_tv_gender", "coverage_tv_ethnicity"} <= set(out)
    assert out["fd_dlib"] == pytest.approx(0, abs=1e-6)
    assert max(out[f"coverage_tv_{k}"] for k in ("age", "gender", "ethnicity")) < 1e-9

"""Pre-training E and P on pseudo pairs: losses, short runs, bit-exact resume, overfitting, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from portrait3d.methods.inversion3d import (
    EncoderConfig,
    LatentEncoder,
    PoseConfig,
    PoseEstimator,
    PseudoPairConfig,
    PseudoPairStream,
    load_module,
    sample_pseudo_pairs,
)
from portrait3d.methods.inversion3d.train import (
    EncoderTrainConfig,
    PoseTrainConfig,
    encoder_losses,
    pose_error_deg,
    pose_losses,
    train_encoder,
    train_pose,
)
from portrait3d.networks.discriminator import DiscriminatorConfig, DualDiscriminator

TINY = dict(layers=(1, 1, 1, 1), width=8, input_size=64)


pytestmark = pytest.mark.usefixtures("one_thread")


def _adam_losses(module: torch.nn.Module, lr: float, steps: int, loss_fn) -> list[float]:
    """Minimise ``loss_fn()`` over ``module``'s parameters with Adam; the loss before each step."""
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _tiny_D() -> DualDiscriminator:
    torch.manual_seed(1)
    return DualDiscriminator(DiscriminatorConfig(c_dim=25, img_resolution=128, channel_base=256, channel_max=16,
                                                 num_fp16_res=0, conv_clamp=None, mbstd_group_size=2)).eval()


def _enc_cfg(**kw) -> EncoderTrainConfig:
    base = dict(encoder=EncoderConfig(**TINY, head_channels=32), batch=2, total_kimg=0.004, lr=1e-3,
                lambda_perceptual=0.0, ema_kimg=0.01, snapshot_kimg=0, sample_kimg=0, device="cpu")
    base.update(kw)
    return EncoderTrainConfig(**base)


def _pose_cfg(**kw) -> PoseTrainConfig:
    base = dict(pose=PoseConfig(**TINY, head_channels=32), batch=2, total_kimg=0.004, lr=1e-3, ema_kimg=0.01,
                snapshot_kimg=0, sample_kimg=0, device="cpu")
    base.update(kw)
    return PoseTrainConfig(**base)


def _state(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_encoder_losses_terms(tiny_eg3d):
    from portrait3d.losses import PerceptualLoss

    G = tiny_eg3d.requires_grad_(False)
    cfg = _enc_cfg(lambda_perceptual=0.8, lambda_latent=0.1)
    E = LatentEncoder(cfg.encoder, G)
    batch = sample_pseudo_pairs(G, 2, cfg.pseudo, torch.Generator().manual_seed(0))
    terms = encoder_losses(E, G, batch, cfg, PerceptualLoss(resize=64).eval().requires_grad_(False), _tiny_D())
    assert {"loss", "l2", "perceptual", "adv", "reg", "latent", "recon"} <= set(terms)
    assert all(torch.isfinite(terms[k]) for k in ("loss", "l2", "perceptual", "adv", "reg", "latent"))
    assert terms["recon"].shape == batch["image"].shape
    assert float(terms["reg"].detach()) == 0.0  # fresh encoder: delta w = 0
    expected = (terms["l2"] + 0.8 * terms["perceptual"] + 0.1 * terms["adv"] + 2e-4 * terms["reg"]
                + 0.1 * terms["latent"])
    assert torch.allclose(terms["loss"], expected)
    terms["loss"].backward()
    assert E.mlp[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in G.parameters())


def test_encoder_reads_the_jittered_image_but_compares_with_the_clean_pair(tiny_eg3d):
    G = tiny_eg3d.requires_grad_(False)
    cfg = _enc_cfg()
    E = LatentEncoder(cfg.encoder, G).eval()
    batch = sample_pseudo_pairs(G, 2, cfg.pseudo, torch.Generator().manual_seed(0))
    jittered = {**batch, "image": -batch["image"], "target": batch["image"]}
    terms = encoder_losses(E, G, jittered, cfg)
    # a fresh E outputs w_avg for any input, so the only difference the target can make is in l2
    assert torch.allclose(terms["l2"], (terms["recon"] - batch["image"]).square().mean())
    assert not torch.allclose(terms["l2"], (terms["recon"] + batch["image"]).square().mean())


def test_encoder_latent_only_does_not_render(tiny_eg3d, monkeypatch):
    """With every image term off, the step regresses w alone and never runs G's synthesis (the costly part)."""
    import portrait3d.methods.inversion3d.train as train_module

    G = tiny_eg3d.requires_grad_(False)
    cfg = _enc_cfg(lambda_l2=0.0, lambda_perceptual=0.0, lambda_latent=1.0)
    E = LatentEncoder(cfg.encoder, G)
    batch = sample_pseudo_pairs(G, 2, cfg.pseudo, torch.Generator().manual_seed(0))

    def no_render(*args, **kwargs):
        raise AssertionError("G rendered")

    monkeypatch.setattr(train_module, "_render", no_render)
    terms = encoder_losses(E, G, batch, cfg, None, None)
    assert set(terms) == {"loss", "reg", "latent"}
    assert torch.allclose(terms["loss"], terms["latent"] + 2e-4 * terms["reg"])
    assert float(terms["latent"]) > 0
    terms["loss"].backward()
    assert E.mlp[-1].weight.grad.abs().sum() > 0


def test_encoder_fits_fixed_batch(tiny_eg3d):
    """A few steps on one fixed batch lower the reconstruction loss (decreasing-ish)."""
    G = tiny_eg3d.requires_grad_(False)
    cfg = _enc_cfg()
    torch.manual_seed(0)
    E = LatentEncoder(cfg.encoder, G).train()
    batch = sample_pseudo_pairs(G, 1, cfg.pseudo, torch.Generator().manual_seed(1))
    losses = _adam_losses(E, 3e-3, 6, lambda: encoder_losses(E, G, batch, cfg)["loss"])
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-3:]) < losses[0]


def test_train_encoder_run_files_and_bit_exact_resume(tiny_eg3d, tmp_path):
    G = tiny_eg3d
    D = _tiny_D()
    kw = dict(lambda_perceptual=0.5, perceptual_resize=32, lambda_latent=0.01, batch=1)
    full = train_encoder(G, _enc_cfg(total_kimg=0.004, **kw), tmp_path / "full", progress=False, D=D)
    part = train_encoder(G, _enc_cfg(total_kimg=0.002, sample_kimg=0.001, grid_samples=2, **kw), tmp_path / "part",
                         progress=False, D=D)
    resumed = train_encoder(G, _enc_cfg(total_kimg=0.004, **kw), tmp_path / "part", resume=tmp_path / "part",
                            progress=False, D=D)
    assert resumed == tmp_path / "part" / "encoder.safetensors" and full.exists() and part == resumed
    a = _state(tmp_path / "full" / "snapshot-00000004" / "state.safetensors")
    b = _state(tmp_path / "part" / "snapshot-00000004" / "state.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a) and any(k.startswith("opt.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # 2 + 2 steps changed the weights, and the exported (EMA) encoders are identical.
    first = _state(tmp_path / "part" / "snapshot-00000002" / "state.safetensors")
    assert not torch.equal(first["net.mlp.2.weight"], a["net.mlp.2.weight"])
    ea, eb = load_module(full), load_module(resumed)
    assert isinstance(ea, LatentEncoder)
    assert all(torch.equal(ea.state_dict()[k], eb.state_dict()[k]) for k in ea.state_dict())
    log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(math.isfinite(r[k]) for r in log for k in ("loss", "l2", "perceptual", "adv", "reg", "latent"))
    assert sorted(p.name for p in (tmp_path / "part" / "samples").glob("*.png")) == [
        "encoder-00000000.png", "encoder-00000001.png", "encoder-00000002.png"]
    with pytest.raises(ValueError):  # a pose snapshot is not an encoder snapshot
        train_pose(G, _pose_cfg(), tmp_path / "x", resume=tmp_path / "part")


def test_train_pose_bit_exact_resume_and_grid(tiny_eg3d, tmp_path):
    from PIL import Image

    G = tiny_eg3d
    full = train_pose(G, _pose_cfg(total_kimg=0.008), tmp_path / "full", progress=False)
    train_pose(G, _pose_cfg(sample_kimg=0.004, grid_samples=2), tmp_path / "part", progress=False)
    resumed = train_pose(G, _pose_cfg(total_kimg=0.008), tmp_path / "part2", resume=tmp_path / "part", progress=False)
    a = _state(tmp_path / "full" / "snapshot-00000004" / "state.safetensors")
    b = _state(tmp_path / "part2" / "snapshot-00000004" / "state.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    pa, pb = load_module(full), load_module(resumed)
    assert isinstance(pa, PoseEstimator)
    assert all(torch.equal(pa.state_dict()[k], pb.state_dict()[k]) for k in pa.state_dict())
    grid = Image.open(tmp_path / "part" / "samples" / "pose-00000002.png")
    assert grid.size == (2 + 4 * 130, 2 + 130)  # one row: input | render, input | render
    log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["yaw_err"]) for r in log)


def test_bf16_losses_and_gradients_match_fp32(tiny_eg3d):
    """The bf16 step (autocast over renders and networks) stays within bf16 tolerance of fp32."""
    G = tiny_eg3d.requires_grad_(False)
    cfg = _pose_cfg(lambda_reproj=1.0)
    torch.manual_seed(0)
    P = PoseEstimator(cfg.pose).train()
    grads, losses = [], []
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            batch = sample_pseudo_pairs(G, 2, cfg.pseudo, torch.Generator().manual_seed(0))
            batch = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
            terms = pose_losses(P, G, batch, cfg)
        assert terms["loss"].dtype == torch.float32
        P.zero_grad()
        terms["loss"].backward()
        losses.append(float(terms["loss"].detach()))
        grads.append(torch.cat([p.grad.flatten() for p in P.parameters() if p.grad is not None]))
    assert losses[1] == pytest.approx(losses[0], rel=0.05)
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > 0.95, float(cos)
    assert (grads[1].norm() / grads[0].norm() - 1).abs() < 0.1


@pytest.mark.parametrize("variant", [{"precision": "bf16"}, {"augment": 1.0}], ids=["bf16", "augment"])
def test_train_pose_variant_changes_training_and_resumes_bit_exactly(tiny_eg3d, tmp_path, variant):
    """bf16 autocast and the photometric jitter each change the run, and each resumes bit-exactly."""
    G = tiny_eg3d
    full = train_pose(G, _pose_cfg(total_kimg=0.008, **variant), tmp_path / "full", progress=False)
    train_pose(G, _pose_cfg(**variant), tmp_path / "part", progress=False)
    resumed = train_pose(G, _pose_cfg(total_kimg=0.008, **variant), tmp_path / "part2",
                         resume=tmp_path / "part", progress=False)
    pa, pb = load_module(full), load_module(resumed)
    assert all(torch.equal(pa.state_dict()[k], pb.state_dict()[k]) for k in pa.state_dict())
    plain = load_module(train_pose(G, _pose_cfg(total_kimg=0.008), tmp_path / "plain", progress=False))
    assert not all(torch.equal(pa.state_dict()[k], plain.state_dict()[k]) for k in pa.state_dict())
    with pytest.raises(ValueError):
        _pose_cfg(precision="fp16").validate()
    with pytest.raises(ValueError):
        _pose_cfg(augment=-1.0).validate()


def test_pose_losses_roll_and_reprojection(tiny_eg3d):
    G = tiny_eg3d.requires_grad_(False)
    cfg = _pose_cfg(pose=PoseConfig(**TINY, head_channels=32, roll=True),
                    pseudo=PseudoPairConfig(roll_range=(-10.0, 10.0), translation_std=0.02), lambda_reproj=1.0)
    cfg.validate()
    P = PoseEstimator(cfg.pose).train()
    batch = sample_pseudo_pairs(G, 2, cfg.pseudo, torch.Generator().manual_seed(0))
    terms = pose_losses(P, G, batch, cfg)
    assert {"loss", "angle", "rotation", "translation", "reproj"} <= set(terms)
    assert all(torch.isfinite(terms[k]) for k in ("loss", "angle", "rotation", "translation", "reproj"))
    terms["loss"].backward()
    assert P.head[-1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError):  # roll in the data but not in the estimator
        _pose_cfg(pseudo=PseudoPairConfig(roll_range=(-5.0, 5.0))).validate()
    with pytest.raises(ValueError):  # camera constants must agree
        _pose_cfg(pseudo=PseudoPairConfig(radius=3.0)).validate()


def test_pose_estimator_overfits_fixed_batch(tiny_eg3d):
    G = tiny_eg3d
    cfg = _pose_cfg()
    batch = PseudoPairStream(G, 4, cfg.pseudo).batch_at(0)
    torch.manual_seed(0)
    P = PoseEstimator(cfg.pose).train()
    losses = _adam_losses(P, 2e-3, 30, lambda: pose_losses(P, None, batch, cfg)["loss"])
    assert losses[0] > 5 * min(losses[-5:]), losses


def test_train_configs_json_round_trip():
    enc = _enc_cfg(pseudo=PseudoPairConfig(roll_range=(-2.0, 2.0), distribution="gaussian"), lambda_latent=0.5)
    assert EncoderTrainConfig.from_dict(json.loads(json.dumps(enc.to_dict()))) == enc
    pose = _pose_cfg(pose=PoseConfig(**TINY, roll=True, pivot=(0.0, 0.1, 0.2)),
                     pseudo=PseudoPairConfig(pivot=(0.0, 0.1, 0.2)))
    pose.validate()
    assert PoseTrainConfig.from_dict(json.loads(json.dumps(pose.to_dict()))) == pose
    with pytest.raises(ValueError):
        _enc_cfg(batch=0).validate()


def test_pose_error_deg(tiny_eg3d):
    P = PoseEstimator(PoseConfig(**TINY, head_channels=32)).train()
    cfg = PseudoPairConfig(yaw_range=(10.0, 20.0), pitch_range=(-5.0, -2.0))
    err = pose_error_deg(P, tiny_eg3d, 5, cfg, batch=4)
    assert err["n"] == 5 and P.training  # mode restored
    # A fresh estimator predicts the frontal pose: the errors are the drawn angles' magnitudes.
    assert 10 <= err["yaw_mean"] <= 20 and 10 <= err["yaw_median"] <= 20
    assert 2 <= err["pitch_mean"] <= 5 and err["roll_mean"] == 0 and err["translation_mean"] == 0


def test_cli(tiny_eg3d, tmp_path):
    from click.testing import CliRunner

    from portrait3d.checkpoints.native import save_network
    from portrait3d.interfaces.cli.train import train as cli

    net = save_network(tiny_eg3d, tmp_path / "g.safetensors")
    runner = CliRunner()
    res = runner.invoke(cli, ["encoder", "--help"])
    assert res.exit_code == 0 and "--discriminator" in res.output and "default: default-3d" in res.output
    res = runner.invoke(cli, ["pose", "--network", str(net), "--out", str(tmp_path / "p"), "--kimg", "0.002",
                              "--batch", "2", "--input-size", "32", "--depth", "18", "--width", "8",
                              "--device", "cpu", "--sample-every", "0", "--eval-n", "3", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p" / "pose.safetensors").exists() and "yaw_mean" in res.output
    res = runner.invoke(cli, ["encoder", "--network", str(tmp_path / "nope"), "--out", str(tmp_path / "e")])
    assert res.exit_code != 0 and "no such checkpoint" in res.output


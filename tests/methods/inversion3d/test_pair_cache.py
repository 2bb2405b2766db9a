from __future__ import annotations

import copy
import json

import pytest
import torch

from portrait3d.errors import UsageError
from portrait3d.methods.inversion3d import EncoderConfig, LatentEncoder, PoseConfig, PseudoPairConfig, PseudoPairStream
from portrait3d.methods.inversion3d.pair_cache import CACHE_KEY, CachedPairStream, PairCache, build_pair_cache
from portrait3d.methods.inversion3d.pseudo import sample_pseudo_pairs
from portrait3d.methods.inversion3d.train import (
    _EVAL_KEY,
    EncoderTrainConfig,
    PoseTrainConfig,
    encoder_error,
    train_encoder,
    train_pose,
)

TINY = dict(input_size=32, depth=18, width=8)
CFG = PseudoPairConfig(yaw_range=(-20.0, 20.0), translation_std=0.02, seed=3)


def test_cache_holds_the_stream_pairs_and_resumes(tiny_eg3d, tmp_path):
    G = tiny_eg3d
    reports = []
    build_pair_cache(G, tmp_path / "c", 10, CFG, network="tiny", shard_size=4, batch=2,
                     report=lambda done, total, sec: reports.append((done, total)))
    assert reports == [(4, 10), (8, 10), (10, 10)]
    cache = PairCache(tmp_path / "c")
    assert len(cache) == 10 and cache.pseudo == CFG and cache.meta["network"] == "tiny"
    # Pairs 6-7 are batch 3 of the cache's stream: same latent, camera and (8-bit) image.
    ref = PseudoPairStream(G, 2, CFG, key=CACHE_KEY).batch_at(3)
    got = cache.batch(torch.tensor([6, 7]))
    assert torch.equal(got["ws"], ref["ws"]) and torch.equal(got["camera"], ref["camera"])
    assert torch.equal(got["angles"], ref["angles"]) and torch.equal(got["translation"], ref["translation"])
    assert (got["image"] - ref["image"].clamp(-1, 1)).abs().max() <= 1 / 127.5 + 1e-6
    assert got["depth"].shape == ref["depth"].shape
    # A killed build (a shard missing) resumes; existing shards are not rendered again; a larger count extends.
    (tmp_path / "c" / "pairs-00001.safetensors").unlink()
    reports.clear()
    build_pair_cache(G, tmp_path / "c", 12, CFG, network="tiny", shard_size=4, batch=2,
                     report=lambda done, total, sec: reports.append((done, total)))
    assert reports == [(8, 12), (12, 12)]
    again = PairCache(tmp_path / "c")
    assert len(again) == 12 and torch.equal(again.tensors["w"][:10], cache.tensors["w"])
    assert json.loads((tmp_path / "c" / "cache.json").read_text())["count"] == 12
    with pytest.raises(UsageError, match="other settings"):
        build_pair_cache(G, tmp_path / "c", 12, PseudoPairConfig(), network="tiny", shard_size=4, batch=2)
    with pytest.raises(UsageError, match="not a pseudo-pair cache"):
        PairCache(tmp_path)


def test_cached_stream_visits_every_pair_once_per_pass_and_restarts(tiny_eg3d, tmp_path):
    build_pair_cache(tiny_eg3d, tmp_path / "c", 6, CFG, shard_size=6, batch=2)
    cache = PairCache(tmp_path / "c")
    key = {tuple(cache.tensors["w"][i, :4].tolist()): i for i in range(6)}

    def rows(batch):
        return [key[tuple(w[0, :4].tolist())] for w in batch["ws"]]

    stream = CachedPairStream(cache, 4, seed=1)
    seen = rows(next(stream)) + rows(next(stream)) + rows(next(stream))   # 12 pairs: two passes
    assert sorted(seen[:6]) == list(range(6)) and sorted(seen[6:]) == list(range(6))
    assert seen[:6] != seen[6:]   # each pass has its own order (with this seed)
    late = CachedPairStream(cache, 4, seed=1, start=2)
    assert rows(next(late)) == seen[8:]
    assert rows(CachedPairStream(cache, 4, seed=2).batch_at(0)) != seen[:4]


def test_per_pair_truncation(tiny_eg3d):
    G = tiny_eg3d
    from portrait3d.methods.inversion3d import generator_w_avg

    fixed = sample_pseudo_pairs(G, 6, PseudoPairConfig(truncation_psi=1.0, seed=0))
    spread = sample_pseudo_pairs(G, 6, PseudoPairConfig(truncation_psi=0.5, truncation_psi_max=0.9, seed=0))
    assert torch.equal(fixed["z"], spread["z"]) and torch.equal(fixed["camera"], spread["camera"])
    w_avg = generator_w_avg(G)
    psi = ((spread["ws"][:, 0] - w_avg).norm(dim=1) / (fixed["ws"][:, 0] - w_avg).norm(dim=1))
    assert ((psi > 0.5 - 1e-4) & (psi < 0.9 + 1e-4)).all() and psi.std() > 0.01
    with pytest.raises(ValueError, match="truncation_psi_max"):
        PseudoPairConfig(truncation_psi=0.7, truncation_psi_max=0.6).validate()


def test_encoder_and_pose_train_from_a_cache_and_resume_bit_exactly(tiny_eg3d, tmp_path):
    G = tiny_eg3d
    build_pair_cache(G, tmp_path / "c", 6, CFG, shard_size=6, batch=2)
    enc = dict(encoder=EncoderConfig(**TINY, head_channels=32), batch=2, lr=1e-3, lambda_l2=0.0,
               lambda_perceptual=0.0, lambda_latent=1.0, ema_kimg=0.01, sample_kimg=0, device="cpu",
               pairs=str(tmp_path / "c"))
    full = train_encoder(G, EncoderTrainConfig(**enc, total_kimg=0.008, snapshot_kimg=0), tmp_path / "full",
                         progress=False)
    train_encoder(G, EncoderTrainConfig(**enc, total_kimg=0.004, snapshot_kimg=0), tmp_path / "part", progress=False)
    resumed = train_encoder(G, EncoderTrainConfig(**enc, total_kimg=0.008, snapshot_kimg=0), tmp_path / "part",
                            resume=tmp_path / "part", progress=False)
    from safetensors.torch import load_file

    a, b = load_file(str(full)), load_file(str(resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = json.loads((tmp_path / "full" / "config.json").read_text())["config"]
    assert saved["pairs"] == str(tmp_path / "c") and saved["pseudo"]["yaw_range"] == [-20.0, 20.0]
    # The cache's camera settings replace the config's, so the pose estimator's camera check sees them.
    pose = PoseTrainConfig(pose=PoseConfig(**TINY, head_channels=32), batch=2, total_kimg=0.004, ema_kimg=0,
                           snapshot_kimg=0, sample_kimg=0, device="cpu", pairs=str(tmp_path / "c"))
    assert train_pose(G, pose, tmp_path / "pose", progress=False).exists()
    with pytest.raises(UsageError, match="not a pseudo-pair cache"):
        train_encoder(G, EncoderTrainConfig(**{**enc, "pairs": str(tmp_path)}), tmp_path / "x", progress=False)
    other = copy.deepcopy(G)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)   # same shapes, other weights: the cache's latents are not its own
    with pytest.raises(UsageError, match="another generator"):
        train_encoder(other, EncoderTrainConfig(**enc), tmp_path / "y", progress=False)


def test_cli_builds_a_cache_and_refuses_bad_options(tiny_eg3d, tmp_path):
    from click.testing import CliRunner

    from portrait3d.checkpoints.native import save_network
    from portrait3d.interfaces.cli import main

    net = save_network(tiny_eg3d, tmp_path / "g.safetensors")
    runner = CliRunner()
    res = runner.invoke(main, ["train", "pseudo-pairs", "--network", str(net), "--out", str(tmp_path / "c"),
                               "--count", "3", "--precision", "fp32"])
    assert res.exit_code == 0, res.output
    assert len(PairCache(tmp_path / "c")) == 3
    res = runner.invoke(main, ["train", "encoder", "--network", str(net), "--out", str(tmp_path / "e"),
                               "--pairs", str(tmp_path / "c"), "--kimg", "0.004", "--batch", "2", "--input-size",
                               "32", "--depth", "18", "--width", "8", "--lambda-l2", "0", "--lambda-perceptual", "0",
                               "--lambda-latent", "1", "--augment", "1", "--sample-every", "0", "--eval-n", "2",
                               "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "on 2 fresh pseudo pairs: latent error" in res.output
    saved = json.loads((tmp_path / "e" / "config.json").read_text())["config"]
    assert saved["augment"] == 1.0 and saved["pseudo"]["truncation_psi_max"] == 1.0
    res = runner.invoke(main, ["train", "pseudo-pairs", "--network", str(net), "--out", str(tmp_path / "d"),
                               "--psi", "0.9", "--psi-max", "0.5"])
    assert res.exit_code == 2 and "--psi-max" in res.output and not (tmp_path / "d").exists()


def test_encoder_error_measures_against_the_average_latent(tiny_eg3d):
    G = tiny_eg3d
    E = LatentEncoder(EncoderConfig(**TINY, head_channels=32), G)
    fresh = encoder_error(E, G, 3, CFG, batch=2)
    assert fresh["n"] == 3 and fresh["latent"] == fresh["latent_avg"] and fresh["psnr"] == fresh["psnr_avg"]
    with torch.no_grad():
        E.mlp[-1].bias.fill_(0.5)   # every guess moves by 0.5 in each dimension
    moved = encoder_error(E, G, 3, CFG, batch=2)
    pairs = [PseudoPairStream(G, 2, CFG, key=_EVAL_KEY).batch_at(i)["ws"][:, 0] for i in range(2)]
    w = torch.cat(pairs)[:3]
    expected = (E.w_avg + 0.5 - w).square().sum(1).mean()
    assert moved["latent"] == pytest.approx(float(expected), rel=1e-5)
    assert moved["latent_avg"] == pytest.approx(fresh["latent_avg"]) and moved["psnr"] != fresh["psnr"]

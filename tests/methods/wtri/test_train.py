"""W_tri trainer: a short run writes samples and the encoder, a resume is bit-exact, pseudo pairs add the latent
term, the identity chip comes from real photos' landmarks, and bad settings are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from portrait3d.errors import UsageError
from portrait3d.methods.wtri.encoder import WTriEncoder
from portrait3d.methods.wtri.losses import WTriLossConfig
from portrait3d.methods.wtri.train import WTriTrainConfig, fixed_chip_transform, train_wtri
from tests.conftest import make_dataset, make_photo_dataset, make_tiny_eg3d

pytestmark = pytest.mark.usefixtures("one_thread")

NO_NETS = WTriLossConfig(perceptual=0.0, identity=0.0, similarity=0.0)


def _cfg(data, **kw) -> WTriTrainConfig:
    base = dict(data=str(data), batch=2, pseudo=1, total_kimg=0.004, iterations=2, width=8, layers=(1, 1, 1, 1),
                losses=NO_NETS, bf16=False, snapshot_kimg=0.004, sample_kimg=0.004, lr=1e-3)
    return WTriTrainConfig(**{**base, **kw})


def test_short_run_writes_samples_encoder_and_logs(tmp_path):
    data = make_dataset(tmp_path / "data", 6, 128)
    path = train_wtri(_cfg(data), tmp_path / "run", progress=False, G=make_tiny_eg3d())
    enc = WTriEncoder.load(path)
    assert enc.config.space == "wtri" and enc.config.iterations == 2
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["recon-00000002.png"]
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(log) == 2 and '"latent"' in log[0] and '"cyc"' in log[0]  # the pseudo pair's latent term


def test_resume_is_bit_exact(tmp_path):
    data = make_dataset(tmp_path / "data", 6, 128)
    G = make_tiny_eg3d()
    straight = WTriEncoder.load(train_wtri(_cfg(data, total_kimg=0.008), tmp_path / "a", progress=False, G=G))
    train_wtri(_cfg(data), tmp_path / "b", progress=False, G=G)
    snap = sorted((tmp_path / "b").glob("snapshot-*"))[-1]
    resumed = WTriEncoder.load(train_wtri(_cfg(data, total_kimg=0.008), tmp_path / "b", resume=snap,
                                          progress=False, G=G))
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_warmup_trains_on_codes_alone_then_switches_to_the_image_losses(tmp_path):
    data = make_dataset(tmp_path / "data", 6, 128)
    G = make_tiny_eg3d()
    train_wtri(_cfg(data, total_kimg=0.008, warmup_kimg=0.004, sample_kimg=0.008, snapshot_kimg=0.008),
               tmp_path / "run", progress=False, G=G)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    warm, full = [r for r in log if "latent_first" in r], [r for r in log if "cyc" in r]
    assert len(warm) == 2 and len(full) == 2  # 4 images of warm-up at batch 2, then the full losses
    assert all("rec" not in r for r in warm) and all("latent" in r for r in full)


def test_warmup_gradient_never_enters_the_generator(tmp_path):
    data = make_dataset(tmp_path / "data", 4, 128)
    G = make_tiny_eg3d().requires_grad_(True)
    before = {k: v.clone() for k, v in G.state_dict().items()}
    enc = WTriEncoder.load(train_wtri(_cfg(data, warmup_kimg=1.0, lr=1e-2), tmp_path / "run", progress=False, G=G))
    assert all(p.grad is None for p in G.parameters())
    assert all(torch.equal(before[k], v) for k, v in G.state_dict().items())
    assert any(p.abs().sum() > 0 for p in enc.mlp[-1].parameters())  # the zero-initialised head has moved


def test_wplus_baseline_trains_too(tmp_path):
    data = make_dataset(tmp_path / "data", 4, 128)
    enc = WTriEncoder.load(train_wtri(_cfg(data, space="wplus", pseudo=0), tmp_path / "run", progress=False,
                                      G=make_tiny_eg3d()))
    assert enc.config.space == "wplus"


def test_identity_chip_from_real_photos(tmp_path):
    data = make_photo_dataset(tmp_path / "photos", 4)
    t = fixed_chip_transform(np.load(data / "images.npy"), 4)
    assert t.shape == (1, 2, 3)
    width = np.hypot(*t[0, :, 0]) * 150  # the chip in image pixels: the face plus dlib's 25% padding each side
    centre = t[0] @ np.array([74.5, 74.5, 1.0])
    assert 80 < width < 200 and np.abs(centre - 63.5).max() < 15


@pytest.mark.parametrize("change", [dict(data=""), dict(pseudo=3), dict(batch=0), dict(iterations=0)])
def test_bad_settings_are_refused(tmp_path, change):
    with pytest.raises(UsageError):
        _cfg(**{"data": tmp_path, **change}).validate()


def test_bootstrapped_run_records_its_start_encoder(tmp_path):
    data = make_dataset(tmp_path / "data", 6, 128)
    G = make_tiny_eg3d()
    with pytest.raises(UsageError, match="bootstrap"):
        train_wtri(_cfg(data, bootstrap="E.safetensors"), tmp_path / "no", progress=False, G=G)
    with pytest.raises(UsageError, match="bootstrap"):
        train_wtri(_cfg(data), tmp_path / "no", progress=False, G=G, start=lambda x: x)
    calls = []

    def start(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        w = G.backbone.mapping.w_avg.detach() + 0.1
        return w[None, None].expand(len(x), G.num_ws, -1)

    enc = WTriEncoder.load(train_wtri(_cfg(data, bootstrap="E.safetensors"), tmp_path / "run", progress=False, G=G,
                                      start=start))
    assert enc.config.bootstrap == "E.safetensors" and calls
    assert enc.config.bootstrap_sha256 == ""  # a plain function has no weights to fingerprint


def test_lazy_cycle_runs_every_kth_step_only(tmp_path):
    data = make_dataset(tmp_path / "data", 6, 128)
    train_wtri(_cfg(data, total_kimg=0.008, cyc_every=2, snapshot_kimg=0.008, sample_kimg=0.008),
               tmp_path / "run", progress=False, G=make_tiny_eg3d())
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert ["cyc" in r for r in log] == [True, False, True, False]  # steps 0 and 2 of 4
    with pytest.raises(UsageError, match="cyc_every"):
        _cfg(data, cyc_every=0).validate()


def test_a_new_run_can_start_from_an_exported_encoder(tmp_path):
    """--init (e.g. the shipped encoder, when its run folder is gone): its weights, this run's architecture."""
    from portrait3d.methods.wtri.encoder import WTriEncoderConfig
    from portrait3d.methods.wtri.train import _init_from

    data = make_dataset(tmp_path / "data", 6, 128)
    G = make_tiny_eg3d()
    path = train_wtri(_cfg(data), tmp_path / "a", progress=False, G=G)
    arch = dict(iterations=2, input_size=int(G.img_resolution), width=8, layers=(1, 1, 1, 1))
    enc = WTriEncoder(WTriEncoderConfig.for_generator(G, **arch))
    _init_from(enc, str(path))
    for (k, a), b in zip(enc.state_dict().items(), WTriEncoder.load(path).state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(UsageError, match="space"):
        _init_from(WTriEncoder(WTriEncoderConfig.for_generator(G, space="wplus", **arch)), str(path))
    train_wtri(_cfg(data, init=str(path)), tmp_path / "b", progress=False, G=G)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["config"]["init"] == str(path)


def test_max_minutes_stops_early_with_a_snapshot_that_resumes(tmp_path):
    data = make_dataset(tmp_path / "data", 6, 128)
    G = make_tiny_eg3d()
    path = train_wtri(_cfg(data, total_kimg=0.008, snapshot_kimg=0.008, sample_kimg=0.008), tmp_path / "run",
                      progress=False, G=G, device="cpu", max_minutes=1e-9)
    assert path.is_file() and [p.name for p in (tmp_path / "run").glob("snapshot-*")] == ["snapshot-00000001"]
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 1
    train_wtri(_cfg(data, total_kimg=0.008, snapshot_kimg=0.008, sample_kimg=0.008), tmp_path / "run",
               resume=tmp_path / "run", progress=False, G=G)
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 4

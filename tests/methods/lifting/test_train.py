"""LiftedGAN training loop (:mod:`portrait3d.methods.lifting.train`) on a tiny random StyleGAN2 at
16 px: finite loss terms in the log, sample grids, the exported lifting file, bit-exact resume
(2 + 2 steps == 4 steps), ablations and the run-folder rules."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from portrait3d.methods.lifting.networks import LiftedGenerator
from portrait3d.methods.lifting.train import (
    ABLATIONS,
    GRID_ROWS,
    LiftTrainConfig,
    generator_matches,
    train_lifting,
    yaw_view,
)
from tests.methods.lifting.test_networks import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

TERMS = {"rec", "flip", "perturb_image", "perturb_generator", "perturb_param", "latent_prior", "identity",
         "albedo_rank"}


def make_cfg(steps: int, batch: int = 2, **kw) -> LiftTrainConfig:
    base = dict(network="tiny-test-generator", batch=batch, total_kimg=steps * batch / 1000, lift=tiny_config(),
                grid_samples=3, w_stats_samples=256, device="cpu", sample_kimg=0.0, snapshot_kimg=0.0,
                perceptual_resize=32)
    base.update(kw)
    return LiftTrainConfig(**base)


def _log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_few_steps_finite_losses_grid_and_export(tiny_stylegan2, tmp_path):
    before = {k: v.clone() for k, v in tiny_stylegan2.state_dict().items()}
    run = tmp_path / "run"
    path = train_lifting(tiny_stylegan2, make_cfg(2, sample_kimg=0.002), run, progress=False)
    assert path == run / "lifted.safetensors" and path.is_file()
    log = _log(run)
    assert [r["step"] for r in log] == [1, 2]
    for r in log:
        assert TERMS | {"total"} <= set(r)
        assert all(math.isfinite(r[t]) for t in TERMS | {"total"})
        assert r["total"] == pytest.approx(sum(r[t] for t in TERMS), rel=1e-5)
    # grids at the start and after each step: 9 rows (G2D | albedo | depth | normal | shading |
    # re-rendered | yaw -30 | yaw +30 | relit) x 3 faces of 16 px with 2 px padding
    grids = sorted(p.name for p in (run / "samples").glob("grid-*.png"))
    assert grids == ["grid-00000000.png", "grid-00000001.png", "grid-00000002.png"]
    with Image.open(run / "samples" / grids[-1]) as im:
        assert im.size == (3 * 18 + 2, len(GRID_ROWS) * 18 + 2)
    # the export loads onto the 2D generator and equals the final snapshot's networks
    model = LiftedGenerator.load(path, g2d=tiny_stylegan2)
    assert model.generator_ref == "tiny-test-generator" and model.cfg == tiny_config()
    snap = load_file(str(run / "snapshot-00000002" / "state.safetensors"))
    for k, v in model.nets.state_dict().items():
        assert torch.equal(v, snap[f"nets.{k}"]), k
    torch.manual_seed(0)
    fresh = LiftedGenerator(tiny_stylegan2, tiny_config())
    assert not torch.equal(fresh.nets["depth"].decoder.head.weight, model.nets["depth"].decoder.head.weight)
    with torch.no_grad():
        out = model(torch.randn(2, 32))
    assert torch.isfinite(out.image).all() and out.depth.shape == (2, 16, 16)
    meta = json.loads((run / "snapshot-00000002" / "state.json").read_text())
    assert meta["trainer"] == "lifting" and meta["step"] == 2 and meta["images_seen"] == 4
    assert LiftTrainConfig.from_dict(meta["config"]).to_dict() == meta["config"]
    # the 2D generator is frozen
    for k, v in tiny_stylegan2.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_resume_is_bit_exact(tiny_stylegan2, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train_lifting(tiny_stylegan2, make_cfg(4), whole, progress=False)
    train_lifting(tiny_stylegan2, make_cfg(2), split, progress=False)
    with open(split / "log.jsonl", "a") as f:  # a step logged after the last snapshot is dropped on resume
        f.write(json.dumps({"step": 3, "total": -1.0}) + "\n")
    torch.manual_seed(123)  # the snapshot restores the global RNG state too
    train_lifting(tiny_stylegan2, make_cfg(4), split, resume=split, progress=False)
    a, b = load_file(str(whole / "lifted.safetensors")), load_file(str(split / "lifted.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = load_file(str(whole / "snapshot-00000004" / "state.safetensors"))
    sb = load_file(str(split / "snapshot-00000004" / "state.safetensors"))
    moments = [k for k in sa if k.startswith("opt.state.")]
    assert moments and all(torch.equal(sa[k], sb[k]) for k in moments)
    la, lb = _log(whole), _log(split)
    assert [r["step"] for r in lb] == [1, 2, 3, 4]
    assert [r["total"] for r in la] == [r["total"] for r in lb]


def test_ablations_switch_terms_off(tiny_stylegan2, tmp_path):
    cfg = make_cfg(1, ablate=("flip", "perturb", "identity", "albedo"), grid_samples=0)
    w = cfg.effective_weights()
    off = {name for names in ABLATIONS.values() for name in names}
    assert all(getattr(w, name) == 0 for name in off) and w.rec == cfg.weights.rec
    train_lifting(tiny_stylegan2, cfg, tmp_path / "r", progress=False)
    (rec,) = _log(tmp_path / "r")
    assert TERMS & set(rec) == {"rec"} and rec["total"] == pytest.approx(rec["rec"])
    with pytest.raises(ValueError, match="unknown ablation"):
        make_cfg(1, ablate=("bogus",)).validate()


def test_run_folder_rules(tiny_stylegan2, tmp_path):
    run = tmp_path / "run"
    cfg = make_cfg(1, grid_samples=0, network="default-3d")  # only the reference matters here
    train_lifting(tiny_stylegan2, cfg, run, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train_lifting(tiny_stylegan2, cfg, run, progress=False)
    # resuming with other networks is refused; so is another 2D generator
    with pytest.raises(ValueError, match="other lifting-network"):
        train_lifting(tiny_stylegan2, make_cfg(2, lift=tiny_config(mlp_dim=16), network="default-3d"), run,
                      resume=run, progress=False)
    with pytest.raises(ValueError, match="lifts the 2D generator 'default-3d'"):
        train_lifting(tiny_stylegan2, make_cfg(2, network="default-2d"), run, resume=run, progress=False)
    # a resumed run is not written over another run either
    other = tmp_path / "other"
    train_lifting(tiny_stylegan2, cfg, other, progress=False)
    with pytest.raises(FileExistsError, match="already exists"):
        train_lifting(tiny_stylegan2, make_cfg(2, grid_samples=0, network="default-3d"), other, resume=run,
                      progress=False)
    # --force starts over: the old log and snapshots go
    train_lifting(tiny_stylegan2, cfg, run, progress=False, force=True)
    assert [r["step"] for r in _log(run)] == [1]
    assert sorted(p.name for p in run.glob("snapshot-*")) == ["snapshot-00000001"]


def test_helpers():
    v = yaw_view(30.0, 2)
    assert v.shape == (2, 6) and v[0, 1] == pytest.approx(math.radians(30))
    assert v[0, 3] == pytest.approx(0.02 * 0.5) and (v[:, [0, 2, 4, 5]] == 0).all()
    assert generator_matches("default-2d", "default-2d") is True
    assert generator_matches("default-2d", "default-3d") is False
    assert generator_matches("nowhere.safetensors", "default-2d") is None
    cfg = make_cfg(3, ablate=("flip",))
    assert dataclasses.asdict(LiftTrainConfig.from_dict(cfg.to_dict()).effective_weights())["flip"] == 0
    with pytest.raises(ValueError, match="renderer image_size"):
        from portrait3d.geometry.render import RendererConfig

        make_cfg(1, renderer=RendererConfig(image_size=32)).validate()
    with pytest.raises(ValueError, match="at least one latent"):
        make_cfg(1, total_kimg=1e-5).validate()

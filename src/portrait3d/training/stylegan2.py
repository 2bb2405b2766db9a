"""StyleGAN2 trainer: non-saturating logistic loss, lazy R1, style mixing, EMA, DiffAugment.

    python -m portrait3d.training.stylegan2 --data ~/.cache/portrait3d/utkface128 --out runs/sg2 \\
        --config cpu-small --kimg 500 --batch 16
    torchrun --nproc_per_node=4 -m portrait3d.training.stylegan2 --data ... --config gpu --batch 64

Per step (as NVIDIA's StyleGAN2-ADA loop, each phase its own optimiser step):

* ``Gmain``: ``softplus(-D(aug(G(z))))``;
* ``Greg`` (every ``G_reg_interval`` steps, only if ``pl_weight > 0``): path-length regulariser;
* ``Dmain``: ``softplus(D(aug(G(z)))) + softplus(-D(aug(x)))``;
* ``Dreg`` (every ``D_reg_interval`` steps): R1 ``gamma/2 * |grad_x D(aug(x))|^2``, scaled by the
  interval (lazy regularisation; the Adam hyper-parameters are rescaled to match).

``aug`` is DiffAugment (:mod:`portrait3d.training.augment`) applied to reals and fakes alike, so
the generator learns the un-augmented distribution; with ~22k faces (44k mirrored) it keeps the
discriminator from memorising. Mixed precision on CUDA uses the networks' fp16 blocks
(``num_fp16_res``, with ``conv_clamp``) as the official code does; CPU runs in float32.
Randomness, sharding and checkpoints: :mod:`portrait3d.training.loop`.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click
import torch
import torch.nn.functional as F

from portrait3d.networks.discriminator import Discriminator, DiscriminatorConfig
from portrait3d.networks.stylegan2 import Generator, MappingConfig, StyleGAN2Config, SynthesisConfig
from portrait3d.training import augment
from portrait3d.training.loop import (CLI_SETTINGS, BatchRandom, Counters, DistInfo, MetricsFn, Networks, RunConfig,
                                      Shard, StepFn, all_reduce_mean, apply_cli_options, broadcast_module,
                                      config_to_dict, init_distributed, lazy_adam, load_training_state, make_loader,
                                      gan_step, run_cli, run_loop, run_options, save_grid, shutdown_distributed)

__all__ = ["StyleGAN2TrainConfig", "PRESETS", "preset", "train_stylegan2", "auto_r1_gamma"]

PHASE_IDS = {"Gmain": 1, "Greg": 2, "Dmain": 3, "Dreg": 4}


def auto_r1_gamma(resolution: int, batch: int) -> float:
    """StyleGAN2-ADA's heuristic R1 weight ``0.0002 * R^2 / batch``."""
    return 0.0002 * resolution**2 / batch


@dataclass
class StyleGAN2TrainConfig:
    """Everything a StyleGAN2 run needs besides the data; stored in every snapshot."""

    G: StyleGAN2Config = field(default_factory=StyleGAN2Config)
    D: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    run: RunConfig = field(default_factory=RunConfig)
    lr_G: float = 0.0025
    lr_D: float = 0.0025
    betas: tuple[float, float] = (0.0, 0.99)
    eps: float = 1e-8
    r1_gamma: float | None = None       # None: auto_r1_gamma(resolution, batch)
    D_reg_interval: int = 16
    G_reg_interval: int = 4
    pl_weight: float = 0.0              # path-length regularisation (off by default)
    pl_batch_shrink: int = 2
    pl_decay: float = 0.01
    style_mixing_prob: float = 0.9
    augment: str = "color,translation,cutout"

    def gamma(self) -> float:
        return self.r1_gamma if self.r1_gamma is not None else auto_r1_gamma(self.G.img_resolution, self.run.batch)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StyleGAN2TrainConfig":
        d = dict(d)
        return cls(G=StyleGAN2Config.from_dict(d.pop("G")), D=DiscriminatorConfig(**d.pop("D")),
                   run=RunConfig(**d.pop("run")), betas=tuple(d.pop("betas", (0.0, 0.99))), **d)

    def validate(self) -> None:
        augment.parse_policy(self.augment)
        if self.D.img_resolution != self.G.img_resolution or self.D.c_dim != self.G.c_dim:
            raise ValueError("G and D must agree on resolution and label size")
        if self.G.c_dim != 0:
            raise ValueError("this trainer is unconditional (c_dim = 0)")
        if self.run.batch <= 0 or self.D_reg_interval <= 0 or self.G_reg_interval <= 0:
            raise ValueError("batch and regularisation intervals must be positive")


def _cpu_small() -> StyleGAN2TrainConfig:
    return StyleGAN2TrainConfig(
        G=StyleGAN2Config(z_dim=256, w_dim=256, img_resolution=128,
                          mapping=MappingConfig(num_layers=4),
                          synthesis=SynthesisConfig(channel_base=8192, channel_max=256)),
        D=DiscriminatorConfig(img_resolution=128, channel_base=8192, channel_max=256),
        run=RunConfig(batch=16, total_kimg=1000, snapshot_kimg=10, sample_kimg=2, workers=0))


def _cpu_fast() -> StyleGAN2TrainConfig:
    # Thin high-resolution layers (16 ch at 128 px, 32 at 64 px): ~0.09 s per image for a G+D step on
    # 2 CPU cores, 11x faster than cpu-small, so a CPU session sees tens of thousands of images.
    # No DiffAugment: D cannot memorise 44k mirrored faces in the few hundred kimg a CPU reaches.
    return StyleGAN2TrainConfig(
        G=StyleGAN2Config(z_dim=256, w_dim=256, img_resolution=128,
                          mapping=MappingConfig(num_layers=4),
                          synthesis=SynthesisConfig(channel_base=2048, channel_max=256)),
        D=DiscriminatorConfig(img_resolution=128, channel_base=2048, channel_max=256),
        augment="",
        run=RunConfig(batch=16, total_kimg=1000, snapshot_kimg=4, sample_kimg=2, workers=0))


def _gpu() -> StyleGAN2TrainConfig:
    # Paper-like for 128 px: StyleGAN2 config-F widths at half the base (as StyleGAN2-ADA at <512 px).
    return StyleGAN2TrainConfig(
        G=StyleGAN2Config(z_dim=512, w_dim=512, img_resolution=128, mapping=MappingConfig(num_layers=8),
                          synthesis=SynthesisConfig(channel_base=16384, channel_max=512)),
        D=DiscriminatorConfig(img_resolution=128, channel_base=16384, channel_max=512),
        run=RunConfig(batch=32, total_kimg=25000, snapshot_kimg=200, sample_kimg=50, workers=3))


def _tiny() -> StyleGAN2TrainConfig:
    # Smoke tests: 32 px, a few channels.
    return StyleGAN2TrainConfig(
        G=StyleGAN2Config(z_dim=32, w_dim=32, img_resolution=32, mapping=MappingConfig(num_layers=2),
                          synthesis=SynthesisConfig(channel_base=256, channel_max=16)),
        D=DiscriminatorConfig(img_resolution=32, channel_base=256, channel_max=16),
        run=RunConfig(batch=4, total_kimg=0.02, snapshot_kimg=0, sample_kimg=0, workers=0, progress=False))


PRESETS: dict[str, Callable[[], StyleGAN2TrainConfig]] = {"cpu-small": _cpu_small, "cpu-fast": _cpu_fast, "gpu": _gpu, "tiny": _tiny}


def preset(name: str) -> StyleGAN2TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]()


# ----------------------------------------------------------------------------- losses


def _synthesis_kwargs(run: RunConfig, info: DistInfo) -> dict[str, Any]:
    return {} if (run.amp and info.device.type == "cuda") else {"force_fp32": True}


def _generate(G: Generator, rnd: BatchRandom, mixing_prob: float, update_emas: bool,
              kw: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and ws for this shard's latents, with style mixing (one cutoff per batch)."""
    z = rnd.randn(G.z_dim)
    ws = G.mapping(z, None, update_emas=update_emas)
    if mixing_prob > 0:
        cutoff = rnd.shared_randint(1, ws.shape[1])
        if rnd.shared_rand() < mixing_prob:
            ws[:, cutoff:] = G.mapping(rnd.randn(G.z_dim), None, update_emas=False)[:, cutoff:]
    with rnd.patch_torch():
        img = G.synthesis(ws, update_emas=update_emas, **kw)
    return img, ws


def _discriminate(D: Discriminator, img: torch.Tensor, rnd: BatchRandom, policy: str,
                  kw: dict[str, Any]) -> torch.Tensor:
    img = augment.diff_augment(img, policy, rnd.generator, rank=rnd.shard.index, world=rnd.shard.count)
    return D(img, None, **kw)


def make_step(cfg: StyleGAN2TrainConfig, nets: Networks, info: DistInfo) -> StepFn:
    """The per-step function for :func:`portrait3d.training.loop.run_loop`."""
    G, D = nets.G, nets.D
    run = cfg.run
    local = run.batch // info.world
    micro = run.batch_gpu or local
    if local % micro:
        raise ValueError(f"per-process batch {local} is not a multiple of batch_gpu {micro}")
    shards = Shard.rounds(info, local // micro)
    kw = _synthesis_kwargs(run, info)
    gamma = cfg.gamma()
    pl_rows = max(1, micro // cfg.pl_batch_shrink)

    def step_fn(step: int, images_seen: int, batch: Any) -> dict[str, float]:
        real = batch[0].to(info.device, non_blocking=True).to(torch.float32)
        parts = [real[k::len(shards)] for k in range(len(shards))]
        stats: dict[str, list[torch.Tensor]] = {}

        def note(name: str, v: torch.Tensor) -> None:
            stats.setdefault(name, []).append(v.detach().float().mean())

        def rnd(phase: str, shard: Shard, rows: int = micro) -> BatchRandom:
            return BatchRandom(run.seed, (step, PHASE_IDS[phase]), shard, rows, info.device)

        def g_main(shard: Shard) -> torch.Tensor:
            r = rnd("Gmain", shard)
            img, _ = _generate(G, r, cfg.style_mixing_prob, False, kw)
            logits = _discriminate(D, img, r, cfg.augment, kw)
            loss = F.softplus(-logits).mean()
            note("loss_G", loss)
            return loss

        def g_reg(shard: Shard) -> torch.Tensor:
            r = rnd("Greg", shard, pl_rows)
            img, ws = _generate(G, r, cfg.style_mixing_prob, False, kw)
            noise = r.randn(*img.shape[1:]) / math.sqrt(img.shape[2] * img.shape[3])
            (grads,) = torch.autograd.grad((img * noise).sum(), ws, create_graph=True)
            lengths = grads.square().sum(2).mean(1).sqrt()
            pl_mean = nets.extra["pl_mean"]
            pl_mean.copy_(pl_mean.lerp(all_reduce_mean(lengths.mean().detach(), info), cfg.pl_decay))
            penalty = (lengths - pl_mean).square()
            note("pl_penalty", penalty)
            return (img[:, 0, 0, 0] * 0 + penalty * cfg.pl_weight).mean()

        def d_main(shard: Shard, x: torch.Tensor) -> torch.Tensor:
            r = rnd("Dmain", shard)
            with torch.no_grad():
                img, _ = _generate(G, r, cfg.style_mixing_prob, True, kw)
            fake_logits = _discriminate(D, img, r, cfg.augment, kw)
            real_logits = _discriminate(D, x, r, cfg.augment, kw)
            loss = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
            note("loss_D", loss)
            note("score_real", real_logits)
            note("score_fake", fake_logits)
            return loss

        def d_reg(shard: Shard, x: torch.Tensor) -> torch.Tensor:
            r = rnd("Dreg", shard)
            x = x.detach().requires_grad_(True)
            logits = _discriminate(D, x, r, cfg.augment, kw)
            (grads,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
            penalty = grads.square().sum([1, 2, 3])
            note("r1_penalty", penalty)
            return (penalty * (gamma / 2)).mean()

        return gan_step(nets, info, step, shards, parts, g_main, g_reg, d_main, d_reg,
                        g_reg_interval=cfg.G_reg_interval if cfg.pl_weight > 0 else None,
                        d_reg_interval=cfg.D_reg_interval if gamma > 0 else None, stats=stats)

    return step_fn


# ----------------------------------------------------------------------------- building and training


def build_networks(cfg: StyleGAN2TrainConfig, device: torch.device) -> Networks:
    """G, D, G_ema and optimisers, initialised from ``cfg.run.seed`` (identical on every rank)."""
    torch.manual_seed(cfg.run.seed)
    G = Generator(cfg.G).train().requires_grad_(False).to(device)
    D = Discriminator(cfg.D).train().requires_grad_(False).to(device)
    G_ema = copy.deepcopy(G).eval()
    opt_G = lazy_adam(G.parameters(), cfg.lr_G, cfg.betas, cfg.eps, cfg.G_reg_interval if cfg.pl_weight > 0 else None)
    opt_D = lazy_adam(D.parameters(), cfg.lr_D, cfg.betas, cfg.eps, cfg.D_reg_interval if cfg.gamma() > 0 else None)
    return Networks(G, D, G_ema, opt_G, opt_D, extra={"pl_mean": torch.zeros([], device=device)})


def _check_resume_config(cfg: StyleGAN2TrainConfig, meta: dict[str, Any]) -> None:
    old = StyleGAN2TrainConfig.from_dict(meta["config"])
    if old.G != cfg.G or old.D != cfg.D:
        raise ValueError("the snapshot was trained with other network settings than the given config")


def train_stylegan2(cfg: StyleGAN2TrainConfig, data_root: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                    resume: str | os.PathLike[str] | None = None, metrics: MetricsFn | None = None) -> Path:
    """Train (or continue training) a StyleGAN2 on a built :class:`AlignedFaceDataset`.

    Works as a single process (CPU or one GPU) or under ``torchrun`` (one process per GPU, or gloo
    on CPU); the global batch ``cfg.run.batch`` is split over the processes. Writes into
    ``out_dir``: ``snapshot-<step>/`` (resumable state + ``G_ema.safetensors``), ``samples/*.png``,
    ``log.jsonl``, ``config.json`` and finally ``G_ema.safetensors``, whose path is returned.

    Args:
        cfg: configuration (see :data:`PRESETS`).
        data_root: folder written by ``python -m portrait3d.training.dataset build``.
        out_dir: run folder.
        resume: a snapshot folder, or a run folder (its newest snapshot): continue from there,
            bit-exactly (``cfg`` may change the schedule, not the networks).
        metrics: hook ``fn(G_ema, step) -> {name: value}`` run on rank 0 every
            ``cfg.run.metrics_kimg`` and at the end; results go to ``log.jsonl`` and snapshots.
    """
    from portrait3d.checkpoints.native import save_network
    from portrait3d.training.dataset import AlignedFaceDataset
    cfg.validate()
    info = init_distributed(cfg.run.device)
    try:
        if info.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        run = cfg.run
        run.apply_threads()
        ds = AlignedFaceDataset(data_root, mirror=run.mirror, limit=run.limit)
        if ds.resolution != cfg.G.img_resolution:
            raise ValueError(f"dataset images are {ds.resolution} px but the generator makes {cfg.G.img_resolution} px")
        nets = build_networks(cfg, info.device)
        counters = Counters()
        if resume is not None:
            counters, meta = load_training_state(resume, nets, "stylegan2")
            _check_resume_config(cfg, meta)
        for m in (nets.G, nets.D, nets.G_ema):
            broadcast_module(m, info)
        sampler, loader = make_loader(ds, run, info, counters.step)
        out = Path(out_dir)
        grid_z = torch.randn([run.grid_samples, cfg.G.z_dim], generator=torch.Generator().manual_seed(run.seed + 1))

        @torch.no_grad()
        def grid_fn() -> dict[str, torch.Tensor]:
            imgs = [nets.G_ema(z.to(info.device), None, noise_mode="const").cpu() for z in grid_z.split(8)]
            return {"fakes": torch.cat(imgs)}

        if info.is_main and counters.step == 0 and run.grid_samples > 0:
            out.mkdir(parents=True, exist_ok=True)
            reals = torch.stack([ds[i][0] for i in sampler.positions(0, run.grid_samples)])
            save_grid(out / "reals.png", reals)
        return run_loop(trainer="stylegan2", config=cfg.to_dict(), run=run, info=info, out_dir=out, nets=nets,
                        counters=counters, batches=iter(loader), step_fn=make_step(cfg, nets, info),
                        grid_fn=grid_fn, export_fn=lambda p: save_network(nets.G_ema, p, overwrite=True),
                        metrics=metrics)
    finally:
        shutdown_distributed(info)


# ----------------------------------------------------------------------------- command line


def fid_hook(data_root: str | os.PathLike[str], n_gen: int, device: torch.device,
             cameras: torch.Tensor | None = None) -> MetricsFn:
    """A metrics hook computing FID of ``n_gen`` EMA samples against the dataset (cached statistics)."""
    from portrait3d.metrics.fid import compute_fid, generator_sample_fn

    def hook(G_ema: torch.nn.Module, step: int) -> dict[str, float]:
        gen = generator_sample_fn(G_ema, seed=0, cameras=cameras, device=device)  # same latents every time
        return {f"fid{n_gen // 1000}k" if n_gen >= 1000 else f"fid{n_gen}":
                compute_fid(gen, data_root, n_gen=n_gen, device=device, progress=False)}

    return hook


@click.command(context_settings=CLI_SETTINGS)
@run_options(PRESETS, data_help="Built dataset folder (images.npy + labels.json).", lr_d_default=0.0025, extra=[
    click.option("--augment", "policy", type=str, default=None, help="DiffAugment policy, '' for none."),
    click.option("--mixing", type=click.FloatRange(0, 1), default=None, help="Style-mixing probability [0.9]."),
    click.option("--pl-weight", type=float, default=None, help="Path-length regularisation weight [0 = off]."),
])
def main(data: Path, out: Path, preset_name: str, resume: Path | None, fid: int, policy: str | None,
         mixing: float | None, pl_weight: float | None, **overrides: Any) -> None:
    """Train a StyleGAN2 on an aligned-face dataset (single process or under torchrun)."""
    cfg = preset(preset_name)
    apply_cli_options(cfg, **overrides)
    for name, v in (("augment", policy), ("style_mixing_prob", mixing), ("pl_weight", pl_weight)):
        if v is not None:
            setattr(cfg, name, v)
    run_cli(train_stylegan2, cfg, data, out, resume, fid, lambda dev: fid_hook(data, fid, dev))


if __name__ == "__main__":
    main()

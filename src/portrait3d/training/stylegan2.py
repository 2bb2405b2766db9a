"""StyleGAN2 trainer: non-saturating logistic loss, lazy R1, style mixing, EMA, DiffAugment.

    portrait3d train stylegan2 --data ~/.cache/portrait3d/utkface128 --out runs/sg2 \\
        --config cpu-small --kimg 500 --batch 16
    torchrun --nproc_per_node=4 -m portrait3d.interfaces.cli train stylegan2 --data ... --config gpu --batch 64

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
Pose-conditioned (``G.c_dim = 25``, ``portrait3d train stylegan2 --pose-conditioned``): the mapping network reads
EG3D's 25-d camera as its label, as EG3D's own mapping does. Fakes take cameras drawn from the dataset's labels,
reals their own (mirrored with the image), and the discriminator is conditioned on the camera by projection. The
pretraining this gives a tri-plane generator (:func:`portrait3d.training.eg3d.init_from_2d` copies the camera
embedding too) is a latent space whose pose is a separate input rather than mixed into ``z``.
Randomness, sharding and checkpoints: :mod:`portrait3d.training.randomness`, :mod:`~portrait3d.training.snapshots`, :mod:`~portrait3d.training.loop`.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from portrait3d.config import ConfigMixin
from portrait3d.errors import UsageError
from portrait3d.networks.discriminator import Discriminator, DiscriminatorConfig
from portrait3d.networks.projected import ProjectedDiscriminator, ProjectedDiscriminatorConfig, VisionAidedDiscriminator
from portrait3d.networks.stylegan2 import Generator, MappingConfig, StyleGAN2Config, SynthesisConfig
from portrait3d.training import augment
from portrait3d.training.batches import make_loader
from portrait3d.training.distributed import (
    DistInfo,
    all_reduce_mean,
    broadcast_module,
    init_distributed,
    shutdown_distributed,
)
from portrait3d.training.loop import MetricsFn, StepFn, run_loop
from portrait3d.training.memory import check_training_memory
from portrait3d.training.optim import Counters, Networks, gan_step, lazy_adam
from portrait3d.training.progress import save_grid
from portrait3d.training.randomness import BatchRandom, Shard
from portrait3d.training.run_config import RunConfig
from portrait3d.training.snapshots import init_generators, load_training_state, read_snapshot, state_with_prefix

__all__ = ["StyleGAN2TrainConfig", "PRESETS", "DISCRIMINATORS", "preset", "train_stylegan2", "auto_r1_gamma",
           "grow_generator", "discriminator_losses", "generator_loss"]

PHASE_IDS = {"Gmain": 1, "Greg": 2, "Dmain": 3, "Dreg": 4}
DISCRIMINATORS = ("stylegan2", "projected", "both")
CAMERA_DIM = 25  # EG3D's camera label: a flattened 4x4 cam2world matrix and 3x3 normalised intrinsics


def auto_r1_gamma(resolution: int, batch: int) -> float:
    """StyleGAN2-ADA's heuristic R1 weight ``0.0002 * R^2 / batch``."""
    return 0.0002 * resolution**2 / batch


@dataclass
class StyleGAN2TrainConfig(ConfigMixin):
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
    discriminator: str = "stylegan2"    # 'stylegan2' (pixel, R1) | 'projected' | 'both' (vision-aided)
    PD: ProjectedDiscriminatorConfig = field(default_factory=ProjectedDiscriminatorConfig)
    projected_weight: float = 1.0       # weight of the projected head's loss beside the pixel D ('both')

    def gamma(self) -> float:
        """R1 weight; the projected discriminator alone has no R1 (hinge loss, spectral norm)."""
        if self.discriminator == "projected":
            return 0.0
        return self.r1_gamma if self.r1_gamma is not None else auto_r1_gamma(self.G.img_resolution, self.run.batch)

    def validate(self) -> None:
        augment.parse_policy(self.augment)
        if self.discriminator not in DISCRIMINATORS:
            raise UsageError(f"discriminator must be one of {DISCRIMINATORS}, not {self.discriminator!r}")
        self.PD.validate()
        self.run.fast_path()  # validates the precision
        if self.D.img_resolution != self.G.img_resolution or self.D.c_dim != self.G.c_dim:
            raise UsageError("G and D must agree on resolution and label size")
        if self.G.c_dim not in (0, CAMERA_DIM):
            raise UsageError(f"c_dim must be 0 (unconditional) or {CAMERA_DIM} (conditioned on the camera)")
        if self.discriminator != "stylegan2" and self.PD.c_dim != self.G.c_dim:
            raise UsageError("the projected discriminator must take the generator's label (PD.c_dim = G.c_dim)")
        if self.run.batch <= 0 or self.D_reg_interval <= 0 or self.G_reg_interval <= 0:
            raise UsageError("batch and regularisation intervals must be positive")


def _cpu_nets(channel_base: int) -> dict[str, Any]:
    """G and D of the CPU presets: 128 px, z = w = 256, 4 mapping layers, at most 256 channels."""
    return dict(G=StyleGAN2Config(z_dim=256, w_dim=256, img_resolution=128, mapping=MappingConfig(num_layers=4),
                                  synthesis=SynthesisConfig(channel_base=channel_base, channel_max=256)),
                D=DiscriminatorConfig(img_resolution=128, channel_base=channel_base, channel_max=256))


def _cpu_small() -> StyleGAN2TrainConfig:
    return StyleGAN2TrainConfig(
        **_cpu_nets(8192),
        run=RunConfig(batch=16, total_kimg=1000, snapshot_kimg=10, sample_kimg=2, workers=0))


def _cpu_fast() -> StyleGAN2TrainConfig:
    # Thin high-resolution layers (16 ch at 128 px, 32 at 64 px): ~0.09 s per image for a G+D step on
    # 2 CPU cores, 11x faster than cpu-small, so a CPU session sees tens of thousands of images.
    # No DiffAugment: D cannot memorise 44k mirrored faces in the few hundred kimg a CPU reaches.
    return StyleGAN2TrainConfig(
        **_cpu_nets(2048),
        augment="",
        run=RunConfig(batch=16, total_kimg=1000, snapshot_kimg=4, sample_kimg=2, workers=0))


def _gpu() -> StyleGAN2TrainConfig:
    # Paper-like for 128 px: StyleGAN2 config-F widths at half the base (as StyleGAN2-ADA at <512 px).
    return StyleGAN2TrainConfig(
        G=StyleGAN2Config(z_dim=512, w_dim=512, img_resolution=128, mapping=MappingConfig(num_layers=8),
                          synthesis=SynthesisConfig(channel_base=16384, channel_max=512)),
        D=DiscriminatorConfig(img_resolution=128, channel_base=16384, channel_max=512),
        run=RunConfig(batch=32, total_kimg=25000, snapshot_kimg=200, sample_kimg=50, workers=3))


def _cpu_proj() -> StyleGAN2TrainConfig:
    # The CPU recipe: projected discriminator on frozen EfficientNet-Lite0 features (hinge, DiffAugment
    # colour + translation, no R1), bf16 autocast + channels_last + compiled G. 64 ch at 64 px, 32 at 128.
    # Train at 64 px first (--resolution 64), then --grow-from that run at 128 px.
    return StyleGAN2TrainConfig(
        **_cpu_nets(4096),
        discriminator="projected", augment="color,translation", lr_G=0.0025, lr_D=0.002,
        run=RunConfig(batch=16, total_kimg=1000, snapshot_kimg=2, sample_kimg=1, workers=0,
                      precision="bf16", channels_last=True, compile=True, keep_snapshots=3))


def _tiny() -> StyleGAN2TrainConfig:
    # Smoke tests: 32 px, a few channels.
    return StyleGAN2TrainConfig(
        G=StyleGAN2Config(z_dim=32, w_dim=32, img_resolution=32, mapping=MappingConfig(num_layers=2),
                          synthesis=SynthesisConfig(channel_base=256, channel_max=16)),
        D=DiscriminatorConfig(img_resolution=32, channel_base=256, channel_max=16),
        run=RunConfig(batch=4, total_kimg=0.02, snapshot_kimg=0, sample_kimg=0, workers=0, progress=False))


PRESETS: dict[str, Callable[[], StyleGAN2TrainConfig]] = {"cpu-small": _cpu_small, "cpu-fast": _cpu_fast,
                                                         "cpu-proj": _cpu_proj, "gpu": _gpu, "tiny": _tiny}


def preset(name: str) -> StyleGAN2TrainConfig:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]()


# ----------------------------------------------------------------------------- losses


def _synthesis_kwargs(run: RunConfig, info: DistInfo) -> dict[str, Any]:
    return {} if (run.amp and info.device.type == "cuda") else {"force_fp32": True}


def generator_loss(logits: torch.Tensor | tuple[torch.Tensor, torch.Tensor], projected_weight: float = 1.0,
                   kind: str = "stylegan2") -> torch.Tensor:
    """The generator's loss on fakes, float32.

    Pixel D: non-saturating ``softplus(-D(G(z)))`` (StyleGAN2). Projected D: hinge ``-D(G(z))``
    averaged over every logit of every scale (Projected GAN). ``'both'``: their sum, the projected
    part weighted by ``projected_weight``.
    """
    if kind == "stylegan2":
        return F.softplus(-logits.float()).mean()
    if kind == "projected":
        return -logits.float().mean()
    pixel, proj = logits
    return F.softplus(-pixel.float()).mean() - projected_weight * proj.float().mean()


def discriminator_losses(fake: Any, real: Any, projected_weight: float = 1.0,
                         kind: str = "stylegan2") -> torch.Tensor:
    """The discriminator's loss on a fake and a real batch, float32.

    Pixel D: ``softplus(D(fake)) + softplus(-D(real))``. Projected D: hinge
    ``relu(1 + D(fake)) + relu(1 - D(real))`` (mean over logits). ``'both'``: their weighted sum.
    """
    def pixel(f: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return F.softplus(f.float()).mean() + F.softplus(-r.float()).mean()

    def hinge(f: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return F.relu(1 + f.float()).mean() + F.relu(1 - r.float()).mean()

    if kind == "stylegan2":
        return pixel(fake, real)
    if kind == "projected":
        return hinge(fake, real)
    return pixel(fake[0], real[0]) + projected_weight * hinge(fake[1], real[1])


def dataset_cameras(ds: Any) -> torch.Tensor:
    """The 25-d camera of every item of an :class:`AlignedFaceDataset` (mirrored items included)."""
    from portrait3d.face.dataset import mirror_camera

    cams = ds.cameras[: ds.count]
    if ds.mirror:
        cams = torch.cat([cams, torch.stack([mirror_camera(c) for c in cams])]) if len(cams) else cams
    return cams.contiguous()


def _generate(G: Generator, synthesis: Callable[..., torch.Tensor], rnd: BatchRandom, mixing_prob: float,
              update_emas: bool, kw: dict[str, Any],
              cams: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Images, ws and labels for this shard's latents, with style mixing (one cutoff per batch).

    A pose-conditioned G takes a camera per row drawn from ``cams`` (the dataset's labels), and the mixed-in
    latent keeps the same camera. The noise inputs are drawn here from ``rnd`` (per sample, as every other
    draw), not inside the network, so a compiled ``synthesis`` holds no random op.
    """
    z = rnd.randn(G.z_dim)
    c = cams[rnd.randint(0, len(cams))] if G.c_dim else None
    ws = G.mapping(z, c, update_emas=update_emas)
    if mixing_prob > 0:
        cutoff = rnd.shared_randint(1, ws.shape[1])
        if rnd.shared_rand() < mixing_prob:
            ws[:, cutoff:] = G.mapping(rnd.randn(G.z_dim), c, update_emas=False)[:, cutoff:]
    noise = [rnd.randn(*shape[1:]) for shape in G.synthesis.noise_shapes(ws.shape[0])]
    img = synthesis(ws, noise_inputs=noise, update_emas=update_emas, **kw)
    return img, ws, c


def _augment(img: torch.Tensor, rnd: BatchRandom, policy: str) -> torch.Tensor:
    return augment.diff_augment(img, policy, rnd.generator, rank=rnd.shard.index, world=rnd.shard.count)


def make_step(cfg: StyleGAN2TrainConfig, nets: Networks, info: DistInfo, cams: torch.Tensor | None = None) -> StepFn:
    """The per-step function for :func:`portrait3d.training.loop.run_loop`; ``cams [M, 25]``, the dataset's
    cameras, for a pose-conditioned G."""
    if cfg.G.c_dim and (cams is None or not len(cams)):
        raise UsageError("a pose-conditioned generator needs the dataset's cameras")
    G, D = nets.G, nets.D
    run = cfg.run
    fast = run.fast_path()
    kind = cfg.discriminator
    local = run.batch // info.world
    micro = run.batch_gpu or local
    if local % micro:
        raise UsageError(f"per-process batch {local} is not a multiple of batch_gpu {micro}")
    shards = Shard.rounds(info, local // micro)
    kw = _synthesis_kwargs(run, info)
    gamma = cfg.gamma()
    pl_rows = max(1, micro // cfg.pl_batch_shrink)
    synthesis = fast.wrap_G(G.synthesis)
    disc = fast.wrap_D(D)
    d_kw = {} if kind == "projected" else kw

    def step_fn(step: int, images_seen: int, batch: Any) -> dict[str, float]:
        real = batch[0].to(info.device, non_blocking=True).to(torch.float32)
        if fast.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        real_c = batch[1].to(info.device, non_blocking=True).to(torch.float32) if cfg.G.c_dim else None
        parts = [(real[k::len(shards)], None if real_c is None else real_c[k::len(shards)])
                 for k in range(len(shards))]
        stats: dict[str, list[torch.Tensor]] = {}

        def note(name: str, v: torch.Tensor) -> None:
            stats.setdefault(name, []).append(v.detach().float().mean())

        def rnd(phase: str, shard: Shard, rows: int = micro) -> BatchRandom:
            return BatchRandom(run.seed, (step, PHASE_IDS[phase]), shard, rows, info.device)

        def g_main(shard: Shard) -> torch.Tensor:
            r = rnd("Gmain", shard)
            with fast.autocast(info.device):
                img, _, c = _generate(G, synthesis, r, cfg.style_mixing_prob, False, kw, cams)
                logits = disc(_augment(img, r, cfg.augment), c, **d_kw)
            loss = generator_loss(logits, cfg.projected_weight, kind)
            note("loss_G", loss)
            return loss

        def g_reg(shard: Shard) -> torch.Tensor:
            r = rnd("Greg", shard, pl_rows)
            with fast.regulariser_context(info.device):
                img, ws, _ = _generate(G, G.synthesis, r, cfg.style_mixing_prob, False, kw, cams)
                noise = r.randn(*img.shape[1:]) / math.sqrt(img.shape[2] * img.shape[3])
                (grads,) = torch.autograd.grad((img * noise).sum(), ws, create_graph=True)
            lengths = grads.square().sum(2).mean(1).sqrt()
            pl_mean = nets.extra["pl_mean"]
            pl_mean.copy_(pl_mean.lerp(all_reduce_mean(lengths.mean().detach(), info), cfg.pl_decay))
            penalty = (lengths - pl_mean).square()
            note("pl_penalty", penalty)
            return (img[:, 0, 0, 0] * 0 + penalty * cfg.pl_weight).mean()

        def d_main(shard: Shard, part: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
            x, x_c = part
            r = rnd("Dmain", shard)
            with fast.autocast(info.device):
                with torch.no_grad():
                    img, _, c = _generate(G, synthesis, r, cfg.style_mixing_prob, True, kw, cams)
                fake_logits = disc(_augment(img, r, cfg.augment), c, **d_kw)
                real_logits = disc(_augment(x, r, cfg.augment), x_c, **d_kw)
            loss = discriminator_losses(fake_logits, real_logits, cfg.projected_weight, kind)
            note("loss_D", loss)
            for name, v in (("real", real_logits), ("fake", fake_logits)):
                if kind == "both":
                    note(f"score_{name}", v[0])
                    note(f"score_{name}_proj", v[1])
                else:
                    note(f"score_{name}", v)
            return loss

        def d_reg(shard: Shard, part: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
            x, x_c = part
            r = rnd("Dreg", shard)
            x = x.detach().requires_grad_(True)
            pixel_d = D.pixel if kind == "both" else D
            with fast.regulariser_context(info.device):
                logits = pixel_d(_augment(x, r, cfg.augment), x_c, **kw)
                (grads,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
            penalty = grads.square().sum([1, 2, 3])
            note("r1_penalty", penalty)
            return (penalty * (gamma / 2)).mean()

        return gan_step(nets, info, step, shards, parts, g_main, g_reg, d_main, d_reg,
                        g_reg_interval=cfg.G_reg_interval if cfg.pl_weight > 0 else None,
                        d_reg_interval=cfg.D_reg_interval if gamma > 0 else None, stats=stats)

    return step_fn


# ----------------------------------------------------------------------------- building and training


def frontal_camera(n: int, device: torch.device) -> torch.Tensor:
    """``[n, 25]``: the frontal camera (yaw = pitch = 0) of EG3D's conventions."""
    from portrait3d.networks.eg3d.camera import camera_from_angles

    return camera_from_angles(0.0, 0.0).reshape(1, CAMERA_DIM).expand(n, -1).to(device)


@torch.no_grad()
def copy_matching(dst: dict[str, torch.Tensor], src: dict[str, torch.Tensor], z_dim: int) -> list[str]:
    """Copy ``src`` tensors into ``dst`` (state dicts) where names and shapes match, in place.

    One exception: an unconditional generator's first mapping layer (``mapping.fc0.weight``, ``[F, z_dim]``) goes
    into a camera-conditioned one's (``[F, z_dim + E]``, ``z`` then the label embedding): its ``z`` columns take
    the source weights, rescaled because the equalised-learning-rate gain ``1/sqrt(fan_in)`` counts the extra
    inputs, and the label columns start at zero, so the conditioned mapping equals the source for every label
    until training conditions it. Returns the copied names."""
    copied = []
    for name, value in src.items():
        if name not in dst:
            continue
        if name == "mapping.fc0.weight" and dst[name].shape[0] == value.shape[0] \
                and dst[name].shape[1] > value.shape[1] == z_dim:
            gain = (dst[name].shape[1] / value.shape[1]) ** 0.5
            dst[name].zero_()
            dst[name][:, : value.shape[1]] = value.to(dst[name].dtype) * gain
        elif dst[name].shape == value.shape:
            dst[name].copy_(value.to(dst[name].dtype))
        else:
            continue
        copied.append(name)
    return copied


def init_pose_conditioned(nets: Networks, source: str | os.PathLike[str]) -> str:
    """Start a pose-conditioned run's G and G_ema from an unconditional generator of the same widths (e.g.
    ``default-2d``) by :func:`copy_matching`: at the start the camera changes nothing, and training teaches the
    mapping to read it. Returns a one-line description for the log."""
    from portrait3d.checkpoints.load import load_network

    src = load_network(source, device=torch.device("cpu"))
    if not isinstance(src, Generator) or src.c_dim != 0:
        raise UsageError(f"{source}: pose-conditioned pretraining starts from an unconditional 2D StyleGAN2")
    theirs = src.state_dict()
    for name in ("G", "G_ema"):
        net = getattr(nets, name)
        ours = net.state_dict()
        copied = copy_matching(ours, theirs, src.z_dim)
        missing = sorted(k for k in ours if k not in copied and not k.startswith("mapping.embed."))
        if missing:
            raise UsageError(f"{source}: {len(missing)} weights do not fit this run's generator (e.g. "
                             f"{', '.join(missing[:3])}); give the config it was trained with")
        net.load_state_dict(ours)
    return (f"started the pose-conditioned G and G_ema from {source} (camera embedding fresh, its mapping columns at "
            f"zero); fresh discriminator and optimisers")


def build_discriminator(cfg: StyleGAN2TrainConfig) -> torch.nn.Module:
    """The discriminator ``cfg.discriminator`` names; projected ones get the trained, frozen
    EfficientNet-Lite0 from the installed wheel."""
    from portrait3d.losses.perceptual import load_efficientnet_lite0

    if cfg.discriminator == "stylegan2":
        return Discriminator(cfg.D)
    proj = ProjectedDiscriminator(cfg.PD, load_efficientnet_lite0())
    return proj if cfg.discriminator == "projected" else VisionAidedDiscriminator(Discriminator(cfg.D), proj)


def _check_memory(cfg: StyleGAN2TrainConfig, nets: Networks, info: DistInfo) -> None:
    """Refuse a micro-batch that cannot fit in memory (:mod:`portrait3d.training.memory`) before training starts."""
    c = frontal_camera(1, info.device) if cfg.G.c_dim else None

    def forward() -> None:  # draws inside the probe, whose random streams are put back
        nets.D(nets.G(torch.randn([1, cfg.G.z_dim], device=info.device, requires_grad=True), c), c)

    check_training_memory(forward, [nets.G, nets.D], cfg.run.batch, cfg.run.batch_gpu, info.world, info.device,
                          f"{cfg.G.img_resolution} px")


def build_networks(cfg: StyleGAN2TrainConfig, device: torch.device) -> Networks:
    """G, D, G_ema and optimisers, initialised from ``cfg.run.seed`` (identical on every rank)."""
    torch.manual_seed(cfg.run.seed)
    fast = cfg.run.fast_path()
    G = fast.prepare(Generator(cfg.G).train().requires_grad_(False).to(device))
    D = build_discriminator(cfg).train().requires_grad_(False).to(device)
    fast.prepare(D)
    if isinstance(D, (ProjectedDiscriminator, VisionAidedDiscriminator)):
        proj = D if isinstance(D, ProjectedDiscriminator) else D.projected
        fast.prepare(proj.features)
    G_ema = copy.deepcopy(G).eval()
    opt_G = lazy_adam(G.parameters(), cfg.lr_G, cfg.betas, cfg.eps, cfg.G_reg_interval if cfg.pl_weight > 0 else None)
    opt_D = lazy_adam(D.parameters(), cfg.lr_D, cfg.betas, cfg.eps, cfg.D_reg_interval if cfg.gamma() > 0 else None)
    return Networks(G, D, G_ema, opt_G, opt_D, extra={"pl_mean": torch.zeros([], device=device)})


@torch.no_grad()
def grow_generator(dst: Generator, src: Generator) -> list[str]:
    """Initialise ``dst`` from ``src`` of the same or a lower resolution (progressive growing of a skip
    generator).

    Every tensor whose name and shape match is copied (mapping, and all blocks up to ``src``'s
    resolution when the channel widths agree). The ToRGB layers of the new top blocks are zeroed,
    so ``dst`` starts out drawing exactly the upsampled image of ``src``. Returns the names copied.
    """
    if dst.img_resolution < src.img_resolution:
        raise UsageError(f"cannot grow a {src.img_resolution} px generator to {dst.img_resolution} px")
    if dst.config.synthesis.architecture != "skip":
        raise UsageError("growing needs the skip architecture (the image is a sum over resolutions)")
    own = dst.state_dict()
    copied = []
    for k, v in src.state_dict().items():
        if k in own and own[k].shape == v.shape:
            own[k].copy_(v)
            copied.append(k)
    for res in dst.synthesis.block_resolutions:
        if res > src.img_resolution:
            torgb = getattr(dst.synthesis, f"b{res}").torgb
            torgb.weight.zero_()
            torgb.bias.zero_()
    return copied


def _check_resume_config(cfg: StyleGAN2TrainConfig, meta: dict[str, Any]) -> None:
    old = StyleGAN2TrainConfig.from_dict(meta["config"])
    if old.G != cfg.G or old.D != cfg.D or old.discriminator != cfg.discriminator or (
            cfg.discriminator != "stylegan2" and old.PD != cfg.PD):
        raise UsageError("the snapshot was trained with other network settings than the given config "
                         "(give the same --config and network options as the run)")


def train_stylegan2(cfg: StyleGAN2TrainConfig, data_root: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                    resume: str | os.PathLike[str] | None = None, metrics: MetricsFn | None = None,
                    grow_from: str | os.PathLike[str] | None = None,
                    init_from: str | os.PathLike[str] | None = None) -> Path:
    """Train (or continue training) a StyleGAN2 on a built :class:`AlignedFaceDataset`.

    Works as a single process (CPU or one GPU) or under ``torchrun`` (one process per GPU, or gloo
    on CPU); the global batch ``cfg.run.batch`` is split over the processes. Writes into
    ``out_dir``: ``snapshot-<step>/`` (resumable state + ``G_ema.safetensors``), ``samples/*.png``,
    ``log.jsonl``, ``config.json`` and finally ``G_ema.safetensors``, whose path is returned.

    Args:
        cfg: configuration (see :data:`PRESETS`).
        data_root: folder written by ``portrait3d dataset build``.
        out_dir: run folder.
        resume: a snapshot folder, or a run folder (its newest snapshot): continue from there,
            bit-exactly (``cfg`` may change the schedule, not the networks).
        metrics: hook ``fn(G_ema, step) -> {name: value}`` run on rank 0 every
            ``cfg.run.metrics_kimg`` and at the end; results go to ``log.jsonl`` and snapshots.
        grow_from: a snapshot (or run folder) of a run of the same widths at the same or a lower
            resolution: start a new run from it (:func:`grow_generator` for G and G_ema; the
            discriminator's weights when their shapes match, as a projected one's do at any
            resolution, also as the projected head of a ``'both'`` D; fresh optimisers).
        init_from: a trained generator (checkpoint or built-in name, e.g. ``default-2d``) of this config: start
            a new run from its weights, with a fresh discriminator (:func:`init_generators`).
    """
    from portrait3d.checkpoints.native import save_network
    from portrait3d.face.dataset import AlignedFaceDataset
    cfg.validate()
    info = init_distributed(cfg.run.device)
    try:
        if info.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        run = cfg.run
        run.apply_threads()
        ds = AlignedFaceDataset(data_root, mirror=run.mirror, limit=run.limit, resolution=cfg.G.img_resolution)
        nets = build_networks(cfg, info.device)
        counters = Counters()
        if sum(x is not None for x in (resume, grow_from, init_from)) > 1:
            raise UsageError("give only one of resume, grow_from and init_from")
        if grow_from is not None:
            _grow_networks(cfg, nets, grow_from)
        if init_from is not None:
            note = init_pose_conditioned(nets, init_from) if cfg.G.c_dim else init_generators(nets, init_from)
            if info.is_main:
                print(note)
        if resume is not None:
            counters, meta = load_training_state(resume, nets, "stylegan2",
                                                 check=lambda m: _check_resume_config(cfg, m))
        for m in (nets.G, nets.D, nets.G_ema):
            broadcast_module(m, info)
        _check_memory(cfg, nets, info)
        sampler, loader = make_loader(ds, run, info, counters.step)
        out = Path(out_dir)
        grid_z = torch.randn([run.grid_samples, cfg.G.z_dim], generator=torch.Generator().manual_seed(run.seed + 1))
        cams = dataset_cameras(ds).to(info.device) if cfg.G.c_dim else None

        @torch.no_grad()
        def grid_fn() -> dict[str, torch.Tensor]:
            c = frontal_camera(8, info.device) if cfg.G.c_dim else None  # conditioned grids: the frontal camera
            imgs = [nets.G_ema(z.to(info.device), None if c is None else c[: len(z)], noise_mode="const").cpu()
                    for z in grid_z.split(8)]
            return {"fakes": torch.cat(imgs)}

        if info.is_main and counters.step == 0 and run.grid_samples > 0:
            out.mkdir(parents=True, exist_ok=True)
            reals = torch.stack([ds[i][0] for i in sampler.positions(0, run.grid_samples)])
            save_grid(out / "reals.png", reals)
        return run_loop(trainer="stylegan2", config=cfg.to_dict(), run=run, info=info, out_dir=out, nets=nets,
                        counters=counters, batches=iter(loader), step_fn=make_step(cfg, nets, info, cams),
                        grid_fn=grid_fn, export_fn=lambda p: save_network(nets.G_ema, p, overwrite=True),
                        metrics=metrics)
    finally:
        shutdown_distributed(info)


def _grow_networks(cfg: StyleGAN2TrainConfig, nets: Networks, source: str | os.PathLike[str]) -> None:
    """Initialise a fresh run's networks from a snapshot at the same or a lower resolution (``grow_from``)."""
    meta, tensors = read_snapshot(source, "stylegan2")
    old = StyleGAN2TrainConfig.from_dict(meta["config"])
    for name in ("G", "G_ema"):
        src = Generator(old.G)
        src.load_state_dict(state_with_prefix(tensors, name))
        grow_generator(getattr(nets, name), src)
    d_state = state_with_prefix(tensors, "D")
    target = nets.D
    if old.discriminator == "projected" and cfg.discriminator == "both":
        target = nets.D.projected  # the vision-aided D keeps the trained projected head; its pixel D starts fresh
    elif old.discriminator != cfg.discriminator:
        return
    own = target.state_dict()
    if set(d_state) == set(own) and all(own[k].shape == v.shape for k, v in d_state.items()):
        target.load_state_dict(d_state)


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


def face_metrics_hook(data_root: str | os.PathLike[str], n_gen: int, device: torch.device,
                      n_real: int = 2000, cameras: torch.Tensor | None = None) -> MetricsFn:
    """A metrics hook: FD-dlib, KID-dlib, detection rate, pose spread and identity diversity of
    ``n_gen`` EMA samples against ``n_real`` training faces (:mod:`portrait3d.metrics.face_stats`), and, when the
    photos' file names carry UTKFace labels, the demographic coverage of the samples as total-variation distances
    ``coverage_tv_age`` / ``_gender`` / ``_ethnicity`` (:mod:`portrait3d.metrics.demographics`). ``cameras``: the
    labels a pose-conditioned G samples with."""
    from portrait3d.metrics.demographics import coverage, dataset_attributes
    from portrait3d.metrics.face_stats import compare, dataset_face_stats, generator_face_stats

    keys = ("fd_dlib", "kid_dlib", "detection", "yaw_std_ratio", "pitch_std_ratio", "identity_diversity_ratio")

    real: list[Any] = []  # the reference and the labelled descriptors, measured (or read from cache) at the first call

    def hook(G_ema: torch.nn.Module, step: int) -> dict[str, float]:
        if not real:
            real.append(dataset_face_stats(data_root, n_real))
            try:
                real.append(dataset_attributes(data_root, 1000))
            except ValueError:  # no UTKFace labels in the file names: no coverage
                real.append(None)
        gen = generator_face_stats(G_ema, n_gen, seed=0, device=device, cameras=cameras)
        m = compare(gen, real[0])
        out = {k: m[k] for k in keys}
        if real[1] is not None and len(gen.descriptors):
            out.update({f"coverage_tv_{k}": v for k, v in coverage(gen.descriptors, real[1])["tv"].items()})
        return out

    return hook


def _hooks(*hooks: MetricsFn | None) -> MetricsFn:
    def hook(G_ema: torch.nn.Module, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for h in hooks:
            if h is not None:
                out.update(h(G_ema, step))
        return out

    return hook

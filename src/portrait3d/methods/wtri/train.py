"""Training the W_tri encoder (Oh & Jo, Sec. 3.3) on aligned photos with their cameras, plus generator pseudo pairs.

Each step draws, from ``(seed, step)`` (so a resume is bit-exact without data-order state):

* ``batch - pseudo`` photos of the training set with their face-pipeline cameras (mirrored copies included);
* ``pseudo`` generator images ``G(w, c)`` at cameras of the training set, whose code ``w_tri(w)`` is known:
  besides eqs. 1-4 they add ``lambda_latent ||E(x) - w_tri(w)||^2`` (pSp's synthetic-pair supervision), which
  anchors the encoder to codes the generator can render well;
* the cycle's novel cameras ``p_hat`` (eq. 3), also cameras of the training set.

An optional supervised warm-up (``warmup_kimg``, pSp's synthetic-pair pretraining) comes first: every batch is
pseudo pairs and the loss is the latent term after every iteration, with the renders the encoder reads made
outside autograd. No gradient goes back through the generator, which makes a warm-up image about 4x cheaper
than a full one on a CPU, so the encoder learns the code space before the image losses refine it.

With ``bootstrap`` (ReStyle's encoder bootstrapping) the iterations start from a frozen one-pass encoder's code
(Ko et al.'s E into W, which reads this generator's renders well) instead of the average code: the W_tri heads
start at zero, so the run begins as good as that encoder and learns only the refinement.

The identity term puts every image's dlib chip at one fixed place: the mean 68 landmarks of the first training
photos (the aligned crops share one face placement), measured once and kept in ``chip.json``.

The run folder holds ``config.json``, ``chip.json``, ``snapshot-<step>/`` (resumable), sample grids
``samples/recon-<step>.png`` (per row: photo | the reconstruction after each iteration | -30 and +30 degree views)
and the exported ``encoder.safetensors``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from portrait3d.checkpoints.fingerprint import module_fingerprint
from portrait3d.config import ConfigMixin
from portrait3d.errors import UsageError
from portrait3d.methods.wtri.encoder import WTriEncoder, WTriEncoderConfig
from portrait3d.methods.wtri.losses import WTriLossConfig, code_distance, wtri_losses
from portrait3d.networks.eg3d.triplane import WTri
from portrait3d.training.loop import fit_module
from portrait3d.training.snapshots import load_module_snapshot

__all__ = ["EXPORT_NAME", "WTriTrainConfig", "fixed_chip_transform", "train_wtri"]

TRAINER = "wtri-encoder"
EXPORT_NAME = "encoder.safetensors"


@dataclass
class WTriTrainConfig(ConfigMixin):
    network: str = "default-3d"        # the EG3D generator the encoder inverts into
    data: str = ""                     # built aligned dataset with cameras (portrait3d dataset build)
    space: str = "wtri"                # 'wtri' (the paper) or 'wplus' (the ReStyle baseline)
    batch: int = 4
    pseudo: int = 1                    # of each batch, generator pseudo pairs
    total_kimg: float = 20.0
    lr: float = 1e-4                   # ReStyle: 1e-4
    truncation: float = 0.7            # pseudo pairs' latents
    latent_weight: float = 1.0         # lambda_latent of the pseudo pairs
    warmup_kimg: float = 0.0           # first images: pseudo pairs only, latent term only, no backward through G
    cyc_every: int = 1                 # the cycle loss every k-th step at k times its weight (lazy, as R1 in SG2)
    losses: WTriLossConfig = field(default_factory=WTriLossConfig)
    iterations: int = 5
    width: int = 32
    layers: tuple[int, int, int, int] = (2, 2, 2, 2)
    bf16: bool = True                  # generator and encoder passes in bfloat16 (the fast CPU path)
    bootstrap: str = ""                # start encoder (ReStyle's bootstrapping): a network's shipped E, or a file
    init: str = ""                     # an exported encoder whose weights start a new run (fresh optimiser)
    chip_photos: int = 64              # photos whose mean landmarks place the identity chip
    snapshot_kimg: float = 1.0
    sample_kimg: float = 1.0
    keep_snapshots: int = 2
    seed: int = 0

    def validate(self) -> None:
        if not self.data:
            raise UsageError("the W_tri trainer needs --data (a built aligned dataset with cameras)")
        if self.batch < 1 or not 0 <= self.pseudo <= self.batch:
            raise UsageError(f"need batch >= 1 and 0 <= pseudo <= batch, not {self.batch} / {self.pseudo}")
        if self.total_kimg <= 0 or self.lr <= 0 or self.iterations < 1:
            raise UsageError("kimg and lr must be > 0 and iterations >= 1")
        if self.cyc_every < 1:
            raise UsageError(f"cyc_every must be >= 1, not {self.cyc_every}")
        if not 0 <= self.warmup_kimg < float("inf"):
            raise UsageError(f"warmup_kimg must be a finite number >= 0, not {self.warmup_kimg}")


def fixed_chip_transform(images: np.ndarray, count: int) -> np.ndarray:
    """The ``[1, 2, 3]`` dlib chip -> image affine of the mean 68 landmarks of the first ``count`` aligned images
    (``uint8 [N, H, W, 3]``), found by dlib's predictor in the aligned crops' fixed face box."""
    from portrait3d.face.analyzer import FaceAnalyzer
    from portrait3d.face.identity import face_chip_transform

    pts = []
    with FaceAnalyzer("template") as fa:
        for img in images[:count]:
            lm = fa.landmarks(np.ascontiguousarray(img))
            if lm is not None:
                pts.append(lm)
    if not pts:
        raise UsageError("no landmarks found on the dataset's first photos: is it a built aligned dataset?")
    return face_chip_transform(np.mean(pts, 0))[None]


def _draw(seed: int, step: int, key: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, key]).generate_state(1)[0]))


def _fingerprint(start: Callable[[torch.Tensor], torch.Tensor] | None) -> str:
    """The start encoder's weights' fingerprint, recorded so a changed start encoder is noticed at load time."""
    return module_fingerprint(start) if isinstance(start, torch.nn.Module) else ""


def _init_from(enc: WTriEncoder, path: str) -> None:
    """Start ``enc`` from the weights of an exported encoder (e.g. the shipped one, to train it further when its
    run folder is gone). Its architecture and start encoder must be this run's; the optimiser starts fresh.

    Raises:
        UsageError: another architecture, space or start encoder, in one line.
    """
    src = WTriEncoder.load(path)
    mine, theirs = enc.config.to_dict(), src.config.to_dict()
    differ = sorted(k for k in mine if k not in ("iterations", "bootstrap_sha256") and mine[k] != theirs.get(k))
    if differ:
        raise UsageError(f"{path}: another encoder configuration than this run's ({', '.join(differ)} differ)")
    if theirs.get("bootstrap_sha256") and theirs["bootstrap_sha256"] != mine["bootstrap_sha256"]:
        raise UsageError(f"{path} was trained from other weights of its start encoder {mine['bootstrap']!r}")
    enc.load_state_dict(src.state_dict())


def train_wtri(cfg: WTriTrainConfig, out_dir: str | os.PathLike[str], resume: str | os.PathLike[str] | None = None,
               progress: bool = True, G: Any = None, identity_encoder: Any = None,
               perceptual: Any = None, start: Callable[[torch.Tensor], torch.Tensor] | None = None,
               device: torch.device | str = "cpu", max_minutes: float = 0.0) -> Path:
    """Train the W_tri encoder (or the W+ baseline, ``cfg.space='wplus'``) for ``cfg.network`` (or the given
    ``G``); resumable bit-exactly. ``identity_encoder`` / ``perceptual``: the networks of the identity and
    perceptual terms (default: dlib's and EfficientNet-Lite0, loaded when their weights are non-zero).
    ``start``: the frozen start encoder ``cfg.bootstrap`` names (``x -> ws``), required with it, on ``device``.
    ``device``: where every network runs (bf16 autocast of that device type); ``max_minutes`` > 0 ends the run
    early with a snapshot and the export. Returns the exported ``encoder.safetensors``."""
    from portrait3d.face.dataset import AlignedFaceDataset
    from portrait3d.losses.identity import IdentityLoss, _default_encoder
    from portrait3d.training.eg3d import dataset_cameras
    from portrait3d.training.progress import save_grid

    cfg.validate()
    if bool(cfg.bootstrap) != (start is not None):
        raise UsageError("bootstrap names the start encoder and start is that encoder: give both or neither")
    out = Path(out_dir)
    if G is None:
        from portrait3d.checkpoints import load_network

        G = load_network(cfg.network)
    if not hasattr(G, "synthesis_wtri"):
        raise UsageError(f"{cfg.network}: the W_tri encoder inverts into an EG3D (tri-plane) generator")
    dev = torch.device(device)
    G = G.eval().requires_grad_(False).to(dev)
    ds = AlignedFaceDataset(cfg.data, mirror=True, resolution=int(G.img_resolution))
    cameras = dataset_cameras(ds)
    if len(ds) == 0:
        raise UsageError(f"{cfg.data} holds no faces")
    torch.manual_seed(cfg.seed)
    enc = WTriEncoder(WTriEncoderConfig.for_generator(G, space=cfg.space, iterations=cfg.iterations,
                                                      input_size=int(G.img_resolution), width=cfg.width,
                                                      layers=cfg.layers, bootstrap=cfg.bootstrap,
                                                      bootstrap_sha256=_fingerprint(start)))
    enc.set_start(start)
    enc.to(dev)
    opt = torch.optim.Adam(enc.parameters(), lr=cfg.lr)
    step = images_seen = 0
    if resume is not None:
        step, images_seen = load_module_snapshot(resume, TRAINER, enc, opt)
    elif cfg.init:
        _init_from(enc, cfg.init)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"trainer": TRAINER, "config": cfg.to_dict()}, indent=1))
    w = cfg.losses
    chip_path = out / "chip.json"
    transform = None
    if w.identity > 0:
        if chip_path.is_file():
            transform = np.asarray(json.loads(chip_path.read_text())["transform"], np.float64)
        else:
            transform = fixed_chip_transform(ds.images, cfg.chip_photos)
            chip_path.write_text(json.dumps({"transform": transform.tolist(), "photos": cfg.chip_photos}))
        identity_encoder = (identity_encoder if identity_encoder is not None else _default_encoder()).to(dev)
    if perceptual is None and (w.perceptual > 0 or w.similarity > 0):
        from portrait3d.losses.perceptual import PerceptualLoss

        perceptual = PerceptualLoss(resize=None).eval().requires_grad_(False).to(dev)

    def features(images: torch.Tensor) -> torch.Tensor:  # e4e's MoCo similarity stand-in: pooled deepest features
        return perceptual.features(images)[-1].mean((2, 3))

    def render(code: WTri, c: torch.Tensor, **kw: Any) -> dict[str, torch.Tensor]:
        # mid-bin depth samples: no global-RNG draws, so the encoder's inputs (its own reconstructions) repeat
        # exactly and a resume is bit-exact; the generator is frozen, so ray jitter would teach it nothing
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            res = G.synthesis_wtri(code, c, deterministic=True, **kw)
        return {k: v.float() for k, v in res.items()}

    class _Fast:  # the generator as the losses see it, rendering on the fast path
        def __init__(self) -> None:
            self.backbone, self.num_ws, self.w_dim = G.backbone, G.num_ws, G.w_dim
            self.wtri_from_ws = G.wtri_from_ws
            self.synthesis_wtri = render

    fast = _Fast()

    class _Frozen(_Fast):  # renders as inputs only: the warm-up's gradient never enters the generator
        def synthesis_wtri(self, code: WTri, c: torch.Tensor, **kw: Any) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                return render(code, c, **kw)

    frozen = _Frozen()

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, WTri | None]:
        g = _draw(cfg.seed, step, 0)
        n_real = cfg.batch - cfg.pseudo
        rows = torch.randint(len(ds), (n_real,), generator=g).tolist()
        xs = [ds[i][0] for i in rows]
        cs = [cameras[i] for i in rows]
        target = None
        if cfg.pseudo:
            y, c, target = pseudo_pairs(g, cfg.pseudo)
            xs += list(y)
            cs += list(c)
        novel = cameras[torch.randint(len(cameras), (cfg.batch,), generator=g)]
        return torch.stack(xs).to(dev), torch.stack(cs).to(dev), novel.to(dev), target

    def pseudo_pairs(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor, WTri]:
        c = cameras[torch.randint(len(cameras), (n,), generator=g)].to(dev)
        z = torch.randn(n, G.z_dim, generator=g).to(dev)  # drawn on the CPU: the same stream on any device
        with torch.no_grad():
            target = G.wtri_from_ws(G.mapping(z, c, truncation_psi=cfg.truncation))
            y = render(target, c, noise_mode="const")["image"].clamp(-1, 1)
        return y, c, target

    def warmup_losses(step: int) -> dict[str, torch.Tensor]:
        x, c, target = pseudo_pairs(_draw(cfg.seed, step, 1), cfg.batch)
        enc.train()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            codes, _ = enc.invert(frozen, x, c)
        per_step = [code_distance(code, target, p=2).mean() for code in codes]
        latent = torch.stack(per_step).mean()
        return {"loss": cfg.latent_weight * latent, "latent": per_step[-1].detach(),
                "latent_first": per_step[0].detach()}

    warmup_steps = int(round(cfg.warmup_kimg * 1000)) // cfg.batch

    def losses(step: int) -> dict[str, torch.Tensor]:
        if step < warmup_steps:
            return warmup_losses(step)
        x, c, novel, target = batch(step)
        identity = None
        if transform is not None:
            identity = IdentityLoss(x, transforms=np.repeat(transform, len(x), 0), encoder=identity_encoder)
        enc.train()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            terms = wtri_losses(enc, fast, x, c, novel, w, perceptual=perceptual if w.perceptual > 0 else None,
                                identity=identity, features=features if w.similarity > 0 else None,
                                keep_codes=target is not None,
                                cyc_scale=float(cfg.cyc_every) if step % cfg.cyc_every == 0 else 0.0)
        if target is not None:
            final = terms.pop("codes")[-1]
            k = len(x) - cfg.pseudo
            part = WTri(final.shared[k:], final.planes[k:], final.sr[k:])
            terms["latent"] = code_distance(part, target, p=2).mean()
            terms["loss"] = terms["loss"] + cfg.latent_weight * terms["latent"]
        return terms

    # spread over the set: its first photos share one age (the files sort by age), which hides how others fare
    fixed_rows = sorted({int(round(v)) for v in np.linspace(0, ds.count - 1, min(4, ds.count))})

    @torch.no_grad()
    def samples(step: int) -> None:
        from portrait3d.networks.eg3d.camera import camera_from_angles

        enc.eval()
        x = torch.stack([ds[i][0] for i in fixed_rows]).to(dev)
        c = torch.stack([cameras[i] for i in fixed_rows]).to(dev)
        codes, images = enc.invert(fast, x, c)
        views = [render(codes[-1], camera_from_angles([yaw] * len(x), [0.0] * len(x)).reshape(len(x), 25).to(dev),
                        noise_mode="const")["image"] for yaw in (-30.0, 30.0)]
        cols = [x, *images, *views]
        grid = torch.stack(cols, 1).flatten(0, 1)
        (out / "samples").mkdir(exist_ok=True)
        save_grid(out / "samples" / f"recon-{step:08d}.png", grid.clamp(-1, 1).float().cpu(), cols=len(cols))

    total = int(round(cfg.total_kimg * 1000))
    fit_module(enc, opt, out, TRAINER, cfg.to_dict(), EXPORT_NAME, step, images_seen, total, cfg.batch,
               cfg.snapshot_kimg, cfg.keep_snapshots, progress, losses, samples, cfg.sample_kimg,
               max_minutes=max_minutes, device=dev)
    enc.eval()
    return enc.save(out / EXPORT_NAME, overwrite=True)

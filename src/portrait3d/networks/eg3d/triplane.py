"""EG3D tri-plane generator (Chan et al., "Efficient Geometry-aware 3D Generative Adversarial Networks").

A StyleGAN2 backbone synthesises three 32-channel feature planes (Sec. 3.2); an
``OSGDecoder`` turns averaged plane features into density and colour features,
which the :class:`ImportanceRenderer` volume-renders (Sec. 3.3) into a low-resolution
feature image; a super-resolution module produces the final image (Sec. 4.2).

Official signatures::

    ws  = G.mapping(z, c, truncation_psi=0.7)                      # [N, num_ws, 512]
    out = G.synthesis(ws, c, neural_rendering_resolution=None,     # dict:
                      noise_mode='const', deterministic=False)     #  image [N,3,R,R], image_raw, image_depth
    out = G(z, c)                                                  # mapping + synthesis

``c`` is the 25-d camera: row-major cam2world 4x4 (16) + normalised intrinsics 3x3 (9),
see :func:`portrait3d.networks.eg3d.camera.camera_from_angles`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from portrait3d.config import ConfigMixin
from portrait3d.networks.eg3d.decoder import OSGDecoder
from portrait3d.networks.eg3d.ray_sampler import RaySampler
from portrait3d.networks.eg3d.renderer import ImportanceRenderer, sample_density_grid
from portrait3d.networks.eg3d.superresolution import build_superresolution
from portrait3d.networks.ops import RandomSource, draw_randn
from portrait3d.networks.stylegan2 import Generator, MappingConfig, StyleGAN2Config, SynthesisConfig

__all__ = ["RenderingConfig", "EG3DConfig", "TriPlaneGenerator", "WTri"]


@dataclass
class RenderingConfig(ConfigMixin):
    """EG3D ``rendering_kwargs``. Fields the renderer reads plus the training options checkpoints carry."""

    image_resolution: int = 512
    superresolution_module: str = "training.superresolution.SuperresolutionHybrid8XDC"
    sr_antialias: bool = True
    superresolution_noise_mode: str = "none"
    disparity_space_sampling: bool = False
    clamp_mode: str = "softplus"
    c_gen_conditioning_zero: bool = False
    c_scale: float = 1.0
    depth_resolution: int = 48
    depth_resolution_importance: int = 48
    ray_start: float | str = 2.25
    ray_end: float | str = 3.3
    box_warp: float = 1.0
    avg_camera_radius: float = 2.7
    avg_camera_pivot: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.2])
    decoder_lr_mul: float = 1.0
    white_back: bool = False
    density_noise: float = 0.0
    # Training-only options kept so a converted checkpoint carries everything it had.
    gpc_reg_prob: float = 0.5
    density_reg: float = 0.25
    density_reg_p_dist: float = 0.004
    reg_type: str = "l1"
    extra: dict[str, Any] = field(default_factory=dict)

    def options(self) -> dict[str, Any]:
        """The flat dict the renderer and official code read (``rendering_kwargs``)."""
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        return {**extra, **d}

    @classmethod
    def from_kwargs(cls, kw: dict[str, Any]) -> "RenderingConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: v for k, v in kw.items() if k not in known}
        vals = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items() if k in known}
        return cls(extra=extra, **vals)


@dataclass
class EG3DConfig(ConfigMixin):
    """Everything needed to build a :class:`TriPlaneGenerator`; saved as JSON beside our safetensors."""

    z_dim: int = 512
    c_dim: int = 25
    w_dim: int = 512
    img_resolution: int = 512
    img_channels: int = 3
    neural_rendering_resolution: int = 64
    sr_num_fp16_res: int = 4
    mapping: MappingConfig = field(default_factory=lambda: MappingConfig(num_layers=2, w_avg_beta=0.998))
    backbone: SynthesisConfig = field(default_factory=lambda: SynthesisConfig(
        channel_base=32768, channel_max=512, num_fp16_res=0, conv_clamp=None))
    sr_fused_modconv_default: bool | str = "inference_only"
    rendering: RenderingConfig = field(default_factory=RenderingConfig)
    plane_channels: int = 32
    plane_resolution: int = 256

    def validate(self) -> None:
        """Raise ``ValueError`` for dimensions no EG3D generator can have."""
        from portrait3d.networks.stylegan2 import _check_dims

        _check_dims("EG3DConfig", z_dim=("nonneg", self.z_dim), c_dim=("nonneg", self.c_dim), w_dim=("pos", self.w_dim),
                    img_resolution=("pow2", self.img_resolution), plane_resolution=("pow2", self.plane_resolution),
                    plane_channels=("pos", self.plane_channels),
                    neural_rendering_resolution=("pos", self.neural_rendering_resolution),
                    channel_base=("pos", self.backbone.channel_base), channel_max=("pos", self.backbone.channel_max),
                    mapping_num_layers=("pos", self.mapping.num_layers))


def _check_camera(c: torch.Tensor) -> None:
    if c.ndim != 2 or c.shape[1] != 25:
        raise ValueError(f"camera c must have shape [N, 25], not {list(c.shape)}")


@dataclass
class WTri:
    """A code of the W_tri space (Oh & Jo): ``w_tri = (w_shared, w_xy, w_yz, w_xz, w_sp)``.

    * ``shared [N, S, w_dim]``: the W+ rows of every backbone block but the last (``S`` = the index of the last
      block's first row + 1, since the block before it reads that row for its ToRGB);
    * ``planes [N, 3, 3, w_dim]``: per plane, the three rows of the last block (conv0, conv1, ToRGB); the last
      block runs once per plane and keeps that plane's channels. Planes follow the renderer's order: 0 ``(x, y)``,
      1 ``(x, z)``, 2 official EG3D's ``(z, x)`` (its quirk; the paper's third, "yz", plane);
    * ``sr [N, w_dim]``: the super-resolution module's code (EG3D feeds it the last W+ row).

    The generator's ``synthesis``, ``planes``, ``sample_mixed`` and ``density_grid`` take a code wherever they take
    ``ws``, so views, videos and meshes of a code use the same functions as those of a W+ latent; for them a code
    slices along the batch (``code[:1]``) and reports its ``device`` like a tensor.
    """

    shared: torch.Tensor
    planes: torch.Tensor
    sr: torch.Tensor

    def detach(self) -> "WTri":
        return WTri(self.shared.detach(), self.planes.detach(), self.sr.detach())

    def to(self, device: torch.device | str) -> "WTri":
        return WTri(self.shared.to(device), self.planes.to(device), self.sr.to(device))

    def __getitem__(self, index: Any) -> "WTri":
        if not isinstance(index, slice):
            raise TypeError("a W_tri code slices along its batch only (code[a:b])")
        return WTri(self.shared[index], self.planes[index], self.sr[index])

    def __len__(self) -> int:
        return len(self.shared)

    @property
    def device(self) -> torch.device:
        return self.shared.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """The three parts by name (for a ``.npz`` / safetensors file)."""
        return {"shared": self.shared, "planes": self.planes, "sr": self.sr}


class TriPlaneGenerator(nn.Module):
    """EG3D generator: camera-conditioned mapping, tri-plane backbone, renderer, super-resolution."""

    def __init__(self, config: EG3DConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.z_dim = config.z_dim
        self.c_dim = config.c_dim
        self.w_dim = config.w_dim
        self.img_resolution = config.img_resolution
        self.img_channels = config.img_channels
        self.rendering_kwargs = config.rendering.options()
        self.neural_rendering_resolution = config.neural_rendering_resolution
        self.renderer = ImportanceRenderer()
        self.ray_sampler = RaySampler()
        self.backbone = Generator(StyleGAN2Config(
            z_dim=config.z_dim, c_dim=config.c_dim, w_dim=config.w_dim,
            img_resolution=config.plane_resolution, img_channels=config.plane_channels * 3,
            mapping=config.mapping, synthesis=config.backbone))
        self.superresolution = build_superresolution(
            config.rendering.superresolution_module, channels=config.plane_channels,
            img_resolution=config.img_resolution, sr_num_fp16_res=config.sr_num_fp16_res,
            sr_antialias=config.rendering.sr_antialias, fused_modconv_default=config.sr_fused_modconv_default,
            w_dim=config.w_dim)
        self.decoder = OSGDecoder(config.plane_channels, {"decoder_lr_mul": config.rendering.decoder_lr_mul,
                                                          "decoder_output_dim": config.plane_channels})
        self._last_planes: torch.Tensor | None = None

    @property
    def num_ws(self) -> int:
        return self.backbone.num_ws

    def mapping(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1,
                truncation_cutoff: int | None = None, update_emas: bool = False) -> torch.Tensor:
        """``z [N, z_dim], c [N, 25] -> ws [N, num_ws, w_dim]`` (camera-conditioned, Sec. 4.3)."""
        if self.rendering_kwargs["c_gen_conditioning_zero"]:
            c = torch.zeros_like(c)
        return self.backbone.mapping(z, c * self.rendering_kwargs.get("c_scale", 0), truncation_psi=truncation_psi,
                                     truncation_cutoff=truncation_cutoff, update_emas=update_emas)

    def planes(self, ws: torch.Tensor | WTri, random: RandomSource | None = None,
               **synthesis_kwargs: Any) -> torch.Tensor:
        """Tri-plane features ``[N, 3, C, H, W]`` for ``ws`` (backbone noise from ``random`` when given), or for a
        W_tri code (:meth:`planes_wtri`)."""
        if isinstance(ws, WTri):
            synthesis_kwargs.pop("update_emas", None)
            return self.planes_wtri(ws, **synthesis_kwargs)
        if random is not None and synthesis_kwargs.get("noise_mode", "random") == "random" \
                and synthesis_kwargs.get("noise_inputs") is None:
            synthesis_kwargs["noise_inputs"] = [draw_randn(random, shape, ws.device)
                                                for shape in self.backbone.synthesis.noise_shapes(len(ws))]
        planes = self.backbone.synthesis(ws, **synthesis_kwargs)
        return planes.view(len(planes), 3, self.config.plane_channels, planes.shape[-2], planes.shape[-1])

    # ------------------------------------------------------------------ W_tri (Oh & Jo)
    @property
    def wtri_shared_rows(self) -> int:
        """Rows of ``WTri.shared``: the last block's first W+ row index + 1."""
        syn = self.backbone.synthesis
        last = getattr(syn, f"b{syn.block_resolutions[-1]}")
        return syn.num_ws - (last.num_conv + last.num_torgb) + 1

    def wtri_from_ws(self, ws: torch.Tensor) -> WTri:
        """The W_tri code that renders exactly as ``ws [N, num_ws, w_dim]`` (every plane gets the same rows)."""
        k = self.wtri_shared_rows - 1
        last_rows = ws[:, k:k + 3]
        return WTri(ws[:, :k + 1], last_rows[:, None].expand(-1, 3, -1, -1).clone(), ws[:, -1])

    def planes_wtri(self, w: WTri, batched: bool = False, **synthesis_kwargs: Any) -> torch.Tensor:
        """Tri-plane features ``[N, 3, C, H, W]`` of a W_tri code: the backbone's blocks but the last run on
        ``w.shared``; the last block runs once per plane on that plane's rows and keeps its channels.

        ``batched``: the three runs as one call on a ``3N`` batch, so each modulated convolution is one grouped
        convolution over (sample, plane) pairs; else three calls (the default: on this CPU, default-3d, batch 4,
        one thread, the three calls took 0.68x the grouped call's time forward and 0.46x forward + backward in
        bf16, ``bench/bench_wtri_planes.py``). Same result either way. (Noise: ``noise_mode`` 'const' or 'none';
        per-plane runs would otherwise draw different noise.)"""
        syn = self.backbone.synthesis
        if synthesis_kwargs.get("noise_mode", "random") == "random":
            raise ValueError("planes_wtri needs noise_mode 'const' or 'none' (one noise for the three runs)")
        n, k = len(w.shared), self.wtri_shared_rows
        if tuple(w.shared.shape[1:]) != (k, self.w_dim) or tuple(w.planes.shape[1:]) != (3, 3, self.w_dim) or \
                tuple(w.sr.shape) != (n, self.w_dim):
            raise ValueError(f"W_tri code of shapes {list(w.shared.shape)}, {list(w.planes.shape)}, "
                             f"{list(w.sr.shape)}; expected [N, {k}, {self.w_dim}], [N, 3, 3, {self.w_dim}], "
                             f"[N, {self.w_dim}]")
        shared = w.shared.float()
        x = img = None
        w_idx = 0
        blocks = [getattr(syn, f"b{res}") for res in syn.block_resolutions]
        for block in blocks[:-1]:
            x, img = block(x, img, shared.narrow(1, w_idx, block.num_conv + block.num_torgb), **synthesis_kwargs)
            w_idx += block.num_conv
        c = self.config.plane_channels
        if batched:  # plane-major: row p * N + i is plane p of sample i
            ws3 = w.planes.float().transpose(0, 1).reshape(3 * n, 3, self.w_dim)
            img3 = None if img is None else img.repeat(3, 1, 1, 1)
            _, out3 = blocks[-1](x.repeat(3, 1, 1, 1), img3, ws3, **synthesis_kwargs)
            out3 = out3.reshape(3, n, *out3.shape[1:])
            return torch.stack([out3[p, :, p * c:(p + 1) * c] for p in range(3)], dim=1)
        out = []
        for p in range(3):
            _, img_p = blocks[-1](x, None if img is None else img.clone(), w.planes[:, p].float(), **synthesis_kwargs)
            out.append(img_p[:, p * c:(p + 1) * c])
        return torch.stack(out, dim=1)

    def synthesis_wtri(self, w: WTri, c: torch.Tensor, neural_rendering_resolution: int | None = None,
                       deterministic: bool = False, random: RandomSource | None = None,
                       **synthesis_kwargs: Any) -> dict[str, torch.Tensor]:
        """Render a W_tri code from camera ``c`` (as :meth:`synthesis`; equal to it for
        ``wtri_from_ws(ws)``)."""
        return self.synthesis(w, c, neural_rendering_resolution=neural_rendering_resolution,
                              deterministic=deterministic, random=random, **synthesis_kwargs)

    def synthesis(self, ws: torch.Tensor | WTri, c: torch.Tensor, neural_rendering_resolution: int | None = None,
                  update_emas: bool = False, cache_backbone: bool = False, use_cached_backbone: bool = False,
                  deterministic: bool = False, random: RandomSource | None = None, depth_spread: bool = False,
                  rendering: dict[str, Any] | None = None, planes: torch.Tensor | None = None,
                  **synthesis_kwargs: Any) -> dict[str, torch.Tensor]:
        """Render ``ws`` from camera ``c``.

        Args:
            ws: ``[N, num_ws, w_dim]``, or a :class:`WTri` code; c: ``[N, 25]``.
            neural_rendering_resolution: volume-rendering resolution (default: the model's).
            deterministic: mid-bin stratified depths and ``det=True`` importance sampling.
            rendering: ``rendering_kwargs`` to override for this call only (e.g. ``depth_resolution`` /
                ``depth_resolution_importance``, the samples per ray).
            random: source of the backbone noise (``noise_mode='random'``), ray jitter, importance samples and
                density noise (:class:`~portrait3d.networks.ops.RandomSource`; the global RNG when None).
            planes: ``ws``'s tri-planes ``[N, 3, C, H, W]`` from :meth:`planes` (same noise), to render several
                cameras of one fixed ``ws`` without running the backbone again; the backbone is skipped.
        Returns:
            ``image [N,3,R,R]``, ``image_raw [N,3,r,r]``, ``image_depth [N,1,r,r]``; with ``depth_spread``
            also ``image_depth_spread [N,1,r,r]`` (how far each ray's opacity spreads around its depth).
        """
        _check_camera(c)
        if planes is None and use_cached_backbone:
            planes = self._last_planes
        if planes is None:
            planes = self.planes(ws, update_emas=update_emas, random=random, **synthesis_kwargs)
        if cache_backbone:
            self._last_planes = planes
        return self._render_planes(planes, ws, c, neural_rendering_resolution, deterministic, random, depth_spread,
                                   synthesis_kwargs, rendering)

    def _render_planes(self, planes: torch.Tensor, ws: torch.Tensor, c: torch.Tensor,
                       neural_rendering_resolution: int | None, deterministic: bool, random: RandomSource | None,
                       depth_spread: bool, synthesis_kwargs: dict[str, Any],
                       rendering: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """Volume-render tri-planes from camera ``c`` and super-resolve (the SR reads ``ws``'s last row, or a
        W_tri code's ``sr``)."""
        if isinstance(ws, WTri):
            ws = ws.sr[:, None]
        cam2world = c[:, :16].view(-1, 4, 4)
        intrinsics = c[:, 16:25].view(-1, 3, 3)
        if neural_rendering_resolution is None:
            neural_rendering_resolution = self.neural_rendering_resolution
        else:
            self.neural_rendering_resolution = neural_rendering_resolution
        ray_origins, ray_directions = self.ray_sampler(cam2world, intrinsics, neural_rendering_resolution)
        n = ray_origins.shape[0]
        kwargs = {**self.rendering_kwargs, **rendering} if rendering else self.rendering_kwargs
        rendered = self.renderer(planes, self.decoder, ray_origins, ray_directions, kwargs,
                                 deterministic=deterministic, random=random, with_spread=depth_spread)
        features, depth = rendered[:2]
        h = w = neural_rendering_resolution
        feature_image = features.permute(0, 2, 1).reshape(n, features.shape[-1], h, w).contiguous()
        depth_image = depth.permute(0, 2, 1).reshape(n, 1, h, w)
        rgb_image = feature_image[:, :3]
        sr_kwargs = {k: v for k, v in synthesis_kwargs.items() if k not in ("noise_mode", "noise_inputs")}
        if random is not None and self.rendering_kwargs["superresolution_noise_mode"] == "random":
            raise ValueError("an explicit random source does not reach the super-resolution noise; "
                             "use superresolution_noise_mode 'none' or 'const' (EG3D's models use 'none')")
        sr_image = self.superresolution(rgb_image, feature_image, ws,
                                        noise_mode=self.rendering_kwargs["superresolution_noise_mode"], **sr_kwargs)
        out = {"image": sr_image, "image_raw": rgb_image, "image_depth": depth_image}
        if depth_spread:
            out["image_depth_spread"] = rendered[3].permute(0, 2, 1).reshape(n, 1, h, w)
        return out

    def sample(self, coordinates: torch.Tensor, directions: torch.Tensor, z: torch.Tensor, c: torch.Tensor,
               truncation_psi: float = 1, truncation_cutoff: int | None = None, update_emas: bool = False,
               **synthesis_kwargs: Any) -> dict[str, torch.Tensor]:
        """Decoder output at points ``[N, M, 3]``: ``{'rgb': [N,M,32], 'sigma': [N,M,1]}`` (raw density)."""
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                          update_emas=update_emas)
        return self.sample_mixed(coordinates, directions, ws, update_emas=update_emas, **synthesis_kwargs)

    def sample_mixed(self, coordinates: torch.Tensor, directions: torch.Tensor, ws: torch.Tensor,
                     truncation_psi: float = 1, truncation_cutoff: int | None = None, update_emas: bool = False,
                     random: RandomSource | None = None, **synthesis_kwargs: Any) -> dict[str, torch.Tensor]:
        """As :meth:`sample` but from given ``ws`` (``random``: see :meth:`synthesis`)."""
        planes = self.planes(ws, update_emas=update_emas, random=random, **synthesis_kwargs)
        return self.renderer.run_model(planes, self.decoder, coordinates, directions, self.rendering_kwargs, random)

    @torch.no_grad()
    def density_grid(self, ws: torch.Tensor, resolution: int = 128, max_batch: int = 1_000_000,
                     **synthesis_kwargs: Any) -> tuple[torch.Tensor, Any, float]:
        """Raw density on EG3D's shape-extraction grid for one latent (``ws [1, num_ws, w_dim]``).

        Returns ``(sigmas [R, R, R], corner [3], voxel_size)`` (see
        :func:`portrait3d.networks.eg3d.renderer.sample_density_grid`); meshes come from
        marching cubes on this grid.
        """
        planes = self.planes(ws[:1], **synthesis_kwargs)
        box = float(self.rendering_kwargs["box_warp"])

        def decode(coords: torch.Tensor) -> torch.Tensor:
            dirs = torch.zeros_like(coords)
            dirs[..., -1] = -1
            return self.renderer.run_model(planes, self.decoder, coords, dirs, self.rendering_kwargs)["sigma"]

        return sample_density_grid(decode, resolution=resolution, cube_length=box, max_batch=max_batch,
                                   device=ws.device)

    def forward(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1,
                truncation_cutoff: int | None = None, neural_rendering_resolution: int | None = None,
                update_emas: bool = False, cache_backbone: bool = False, use_cached_backbone: bool = False,
                **synthesis_kwargs: Any) -> dict[str, torch.Tensor]:
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                          update_emas=update_emas)
        return self.synthesis(ws, c, update_emas=update_emas, neural_rendering_resolution=neural_rendering_resolution,
                              cache_backbone=cache_backbone, use_cached_backbone=use_cached_backbone,
                              **synthesis_kwargs)

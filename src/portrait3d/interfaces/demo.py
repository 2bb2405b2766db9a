"""``portrait3d demo``: samples from the 2D and 3D generators, a yaw sweep and depth maps."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from portrait3d.checkpoints.load import BUILTIN_NETWORKS, load_network
from portrait3d.networks.eg3d.camera import camera_from_angles
from portrait3d.face.io import save_image
from portrait3d.utils.image import depth_to_uint8, make_grid, to_uint8

YAWS = (-30.0, -15.0, 0.0, 15.0, 30.0)


def _tiny_networks(seed: int) -> tuple[nn.Module, nn.Module]:
    """Small random-weight generators, used only while no trained default model is shipped."""
    from portrait3d.networks.eg3d.triplane import EG3DConfig, RenderingConfig, TriPlaneGenerator
    from portrait3d.networks.stylegan2 import Generator, MappingConfig, StyleGAN2Config, SynthesisConfig

    torch.manual_seed(seed)
    g2 = Generator(StyleGAN2Config(z_dim=64, w_dim=64, img_resolution=64,
                                   mapping=MappingConfig(num_layers=2),
                                   synthesis=SynthesisConfig(channel_base=2048, channel_max=64)))
    g3 = TriPlaneGenerator(EG3DConfig(
        z_dim=64, w_dim=512, img_resolution=128, neural_rendering_resolution=32,
        mapping=MappingConfig(num_layers=2, w_avg_beta=0.998),
        backbone=SynthesisConfig(channel_base=2048, channel_max=64, num_fp16_res=0, conv_clamp=None),
        rendering=RenderingConfig(image_resolution=128,
                                  superresolution_module="training.superresolution.SuperresolutionHybrid2X",
                                  depth_resolution=24, depth_resolution_importance=24)))
    return g2.eval().requires_grad_(False), g3.eval().requires_grad_(False)


def _get(name: str, fallback: nn.Module) -> tuple[nn.Module, str]:
    if name.startswith("default-") and name not in BUILTIN_NETWORKS:
        return fallback, "random weights (the trained default model is not shipped yet)"
    return load_network(name), name


def run_demo(out: Path, network_2d: str, network_3d: str, samples: int, seed: int, truncation: float,
             force: bool) -> None:
    """Write ``samples_2d.png``, ``views_3d.png``, ``depth_3d.png`` and ``README.txt`` into ``out``."""
    from tqdm import tqdm

    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} already holds files (pass --force to write into it)")
    tiny2, tiny3 = _tiny_networks(seed)
    g2, src2 = _get(network_2d, tiny2)
    g3, src3 = _get(network_3d, tiny3)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = torch.randn(samples, g2.z_dim, generator=gen)
        img2 = g2(z, torch.zeros(samples, g2.c_dim), truncation_psi=truncation, noise_mode="const")
        save_image(out / "samples_2d.png", make_grid(to_uint8(img2), cols=min(samples, 8)), overwrite=force)

        z3 = torch.randn(samples, g3.z_dim, generator=gen)
        c_front = camera_from_angles([0.0] * samples, [0.0] * samples)
        ws = g3.mapping(z3, c_front, truncation_psi=truncation)
        views, depths = [], []
        for i, yaw in enumerate(tqdm(YAWS, desc="rendering yaw sweep", unit="view")):
            # The tri-planes do not depend on the camera: synthesise them once, then only render.
            o = g3.synthesis(ws, camera_from_angles([yaw] * samples, [0.0] * samples), noise_mode="const",
                             cache_backbone=(i == 0), use_cached_backbone=(i > 0))
            views.append(o["image"])
            depths.append(torch.nn.functional.interpolate(o["image_depth"], size=o["image"].shape[-1]))
    order = lambda ts: torch.stack(ts, 1).flatten(0, 1)  # noqa: E731 - rows = samples, columns = yaws
    save_image(out / "views_3d.png", make_grid(to_uint8(order(views)), cols=len(YAWS)), overwrite=force)
    save_image(out / "depth_3d.png", make_grid(depth_to_uint8(order(depths)), cols=len(YAWS)), overwrite=force)
    readme = (
        "portrait3d demo output\n\n"
        f"samples_2d.png  {samples} faces from the 2D StyleGAN2 generator ({src2}), truncation {truncation}.\n"
        f"views_3d.png    {samples} faces from the 3D EG3D generator ({src3}); each row is one face seen at "
        f"yaw {', '.join(f'{y:+.0f}' for y in YAWS)} degrees (positive = head turned to its left).\n"
        "depth_3d.png    the rendered depth of each view in views_3d.png (near = bright).\n"
        f"seed {seed}\n")
    from portrait3d.checkpoints.native import atomic_write

    atomic_write(out / "README.txt", lambda tmp: Path(tmp).write_text(readme), overwrite=force)
    print(f"wrote {out}/ (samples_2d.png, views_3d.png, depth_3d.png, README.txt)")

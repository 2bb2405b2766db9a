"""``portrait3d demo``: 2D and 3D samples, a yaw sweep with depth maps and an orbit video.

Writes into one folder:

* ``samples_2d.png``  grid of StyleGAN2 samples;
* ``lifted_2d.png``   the first 2D samples lifted to 3D by LiftedGAN (rotated, relit, depth), when the
  2D generator has a shipped lifted model (``default-2d`` has none at present);
* ``edits_2d.png``    the first 2D samples turned by the shipped NRSfM editor (Haas et al., linear edits of
  :data:`EDIT_YAWS` degrees of yaw), when the 2D generator has one;
* ``samples_3d.png``  grid of EG3D samples seen from the front;
* ``views_3d.png``    the same EG3D faces, one row each, at yaw -30, -15, 0, +15, +30 degrees;
* ``depth_3d.png``    the rendered depth of every view of ``views_3d.png`` (colour-mapped);
* ``orbit.mp4``       a few of those faces side by side on EG3D's elliptical camera orbit;
* ``README.txt``      what each file is, the models (and whether they are random), seeds, cameras.

The tri-planes of each face are synthesised once; every further view / video frame only
volume-renders and super-resolves them (``cache_backbone`` / ``use_cached_backbone``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from portrait3d.checkpoints.load import BUILTIN_NETWORKS, load_network
from portrait3d.errors import UsageError
from portrait3d.face.io import save_image
from portrait3d.networks.eg3d.camera import camera_from_angles
from portrait3d.utils.compute import auto_threads
from portrait3d.utils.visualize import colour_depth, make_grid, to_uint8

__all__ = ["EDITS_OUTPUT", "EDIT_YAWS", "LIFTED_OUTPUT", "LIFT_YAWS", "OUTPUTS", "YAWS", "run_demo"]

YAWS = (-30.0, -15.0, 0.0, 15.0, 30.0)
LIFT_YAWS = (-45.0, -20.0, 0.0, 20.0, 45.0)
LIFTED_OUTPUT = "lifted_2d.png"  # written only when the 2D generator has a shipped lifted model
LIFTED_FACES = 4
EDITS_OUTPUT = "edits_2d.png"   # written only when the 2D generator has a shipped NRSfM editor
EDIT_YAWS = (-20.0, 0.0, 20.0)  # yaw changes (degrees) of the edits panel; 0 = the face itself
EDIT_FACES = 4
OUTPUTS = ("samples_2d.png", "samples_3d.png", "views_3d.png", "depth_3d.png", "orbit.mp4", "README.txt")
_FALLBACK_SEED = 0  # the random fallback networks are the same whatever --seed is


def _tiny_networks() -> tuple[nn.Module, nn.Module]:
    """Small random-weight generators, used only while no trained default model is shipped."""
    from portrait3d.networks.eg3d.triplane import EG3DConfig, RenderingConfig, TriPlaneGenerator
    from portrait3d.networks.stylegan2 import Generator, MappingConfig, StyleGAN2Config, SynthesisConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_FALLBACK_SEED)
        g2 = Generator(StyleGAN2Config(z_dim=64, w_dim=64, img_resolution=64,
                                       mapping=MappingConfig(num_layers=2),
                                       synthesis=SynthesisConfig(channel_base=2048, channel_max=64)))
        g3 = TriPlaneGenerator(EG3DConfig(
            z_dim=64, w_dim=512, img_resolution=128, neural_rendering_resolution=32,
            mapping=MappingConfig(num_layers=2, w_avg_beta=0.998),
            backbone=SynthesisConfig(channel_base=2048, channel_max=64, num_fp16_res=0, conv_clamp=None),
            rendering=RenderingConfig(image_resolution=128,
                                      superresolution_module="training.superresolution.SuperresolutionHybrid2X",
                                      depth_resolution=24, depth_resolution_importance=24),
            plane_resolution=64))
    return g2.eval().requires_grad_(False), g3.eval().requires_grad_(False)


def _builtin_available(name: str) -> bool:
    """Whether the built-in network ``name`` is registered and its file is installed."""
    import portrait3d

    rel = BUILTIN_NETWORKS.get(name)
    return rel is not None and (Path(portrait3d.__file__).resolve().parent / rel).is_file()


def _get(name: str, kind: str, device: torch.device) -> tuple[nn.Module, str, bool]:
    """``(network, description, is_random)`` for a checkpoint path or built-in name."""
    from portrait3d.networks.eg3d.triplane import TriPlaneGenerator
    from portrait3d.networks.stylegan2 import Generator

    if name.startswith("default-") and not _builtin_available(name):
        g2, g3 = _tiny_networks()
        net = g2 if kind == "2d" else g3
        desc = (f"{name}: NOT AVAILABLE (its trained weights are not shipped with this installation); "
                f"a small RANDOM-WEIGHT {type(net).__name__} (seed {_FALLBACK_SEED}) was used instead, "
                "so the pictures show untrained-network patterns, not faces")
        return net.to(device), desc, True
    net = load_network(name, device=device)
    want = Generator if kind == "2d" else TriPlaneGenerator
    if not isinstance(net, want):
        raise UsageError(f"--network-{kind} {name} is a {type(net).__name__}, expected a {want.__name__}")
    return net, f"{name} ({type(net).__name__})", False


def _describe(net: nn.Module) -> str:
    params = sum(p.numel() for p in net.parameters())
    cfg = net.config
    text = f"{net.img_resolution} px, z {cfg.z_dim}, w {cfg.w_dim}, {params / 1e6:.2f} M parameters"
    if hasattr(cfg, "plane_resolution"):
        text += (f", tri-planes {cfg.plane_resolution} px, neural rendering {cfg.neural_rendering_resolution} px, "
                 f"{cfg.rendering.depth_resolution}+{cfg.rendering.depth_resolution_importance} depth samples")
    return text



def _lifted_grid(g2: nn.Module, network_2d: str, z: torch.Tensor, truncation: float,
                 dev: torch.device) -> tuple[np.ndarray | None, str]:
    """LiftedGAN rows for the 2D faces ``z`` (one row a face: :data:`LIFT_YAWS`, the four relit views,
    the depth), or ``None`` and the reason when ``network_2d`` ships no lifted model."""
    from portrait3d.interfaces.lift import RELIGHT_DIRECTIONS
    from portrait3d.methods.lifting.networks import LiftedGenerator
    from portrait3d.methods.lifting.pipeline import builtin_lifted_path, render_views

    path = builtin_lifted_path(network_2d)
    if path is None or not path.is_file():
        return None, f"no shipped lifted model for the 2D generator {network_2d!r}"
    model = LiftedGenerator.load(path, g2d=g2, device=dev)
    w = g2.mapping(z, torch.zeros(len(z), g2.c_dim, device=dev), truncation_psi=truncation)[:, 0]
    lo = model(w)
    _, rotated, relit = render_views(model, lo, LIFT_YAWS, RELIGHT_DIRECTIONS)
    size = int(lo.depth.shape[-1])
    depth = torch.from_numpy(colour_depth(lo.depth.reshape(len(z), 1, size, size), size))
    tiles = torch.cat([_uint8_tiles(rotated), _uint8_tiles(relit), depth[:, None]], 1)
    return tiles.reshape(-1, *tiles.shape[2:]).numpy(), str(path)


def _edits_grid(g2: nn.Module, network_2d: str, z: torch.Tensor, truncation: float,
                dev: torch.device) -> tuple[np.ndarray | None, str]:
    """NRSfM yaw edits of the 2D faces ``z`` (one row a face, one column per :data:`EDIT_YAWS` change), or ``None``
    and the reason when ``network_2d`` ships no editor."""
    from portrait3d.methods.nrsfm.data import synthesize
    from portrait3d.methods.nrsfm.edit import EditSpec
    from portrait3d.methods.nrsfm.editor import NRSfMEditor
    from portrait3d.methods.nrsfm.pipeline import builtin_editor_path

    path = builtin_editor_path(network_2d)
    if path is None or not path.is_file():
        return None, f"no shipped NRSfM editor for the 2D generator {network_2d!r}"
    editor = NRSfMEditor.load(path)
    with torch.no_grad():
        w = g2.mapping(z, torch.zeros(len(z), g2.c_dim, device=dev), truncation_psi=truncation)[:, 0].cpu()
    cols = []
    for dy in EDIT_YAWS:
        if dy == 0:
            w1 = w
        else:
            with torch.enable_grad():  # the Jacobian of phi needs autograd
                w1, _ = editor.edit(g2, w, editor.target(w, EditSpec(yaw=dy)), "linear")
        with torch.no_grad():
            cols.append(to_uint8(synthesize(g2, w1.to(dev), "w")))
    return np.stack(cols, 1).reshape(-1, *cols[0].shape[1:]), str(path)


def _uint8_tiles(images: torch.Tensor) -> torch.Tensor:
    """``[N, K, 3, S, S]`` in ``[-1, 1]`` -> ``uint8 [N, K, S, S, 3]``."""
    n, k = images.shape[:2]
    return torch.from_numpy(to_uint8(images.reshape(n * k, *images.shape[2:]).clamp(-1, 1))).reshape(
        n, k, *images.shape[3:], 3)


def run_demo(out: Path, network_2d: str, network_3d: str, samples: int, seed: int, truncation: float,
             force: bool, orbit_faces: int = 3, orbit_frames: int = 48, fps: int = 24,
             device: str = "cpu", progress: bool = True, threads: int | None = None) -> dict[str, float]:
    """Write the files of :data:`OUTPUTS` into ``out``; returns the wall time of each stage in seconds.

    ``threads``: CPU threads for PyTorch during the demo (default: :func:`auto_threads`); the
    previous setting is restored afterwards.

    Raises:
        FileExistsError: one of the outputs exists and ``force`` is False (checked before any work).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads or auto_threads())
    try:
        return _run_demo(out, network_2d, network_3d, samples, seed, truncation, force, orbit_faces, orbit_frames,
                         fps, device, progress)
    finally:
        torch.set_num_threads(before)


def _run_demo(out: Path, network_2d: str, network_3d: str, samples: int, seed: int, truncation: float,
              force: bool, orbit_faces: int, orbit_frames: int, fps: int, device: str,
              progress: bool) -> dict[str, float]:
    from tqdm import tqdm

    from portrait3d.checkpoints.native import atomic_write
    from portrait3d.utils.video import orbit_cameras, write_mp4

    t_start = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    existing = [n for n in (*OUTPUTS, LIFTED_OUTPUT, EDITS_OUTPUT) if (out / n).exists()]
    if existing and not force:
        raise FileExistsError(f"{out} already holds demo outputs ({', '.join(existing)}); pass --force to overwrite")
    dev = torch.device(device)
    times: dict[str, float] = {}
    t = time.perf_counter()
    g2, src2, random2 = _get(network_2d, "2d", dev)
    g3, src3, random3 = _get(network_3d, "3d", dev)
    for is_random, desc in ((random2, src2), (random3, src3)):
        if is_random:
            print(f"note: {desc}")
    times["load"] = time.perf_counter() - t
    orbit_faces = max(1, min(orbit_faces, samples))
    gen2 = torch.Generator().manual_seed(seed)
    gen3 = torch.Generator().manual_seed(seed + 1)
    bar_off = not progress

    with torch.no_grad():
        # ---------------------------------------------------------------- 2D samples
        t = time.perf_counter()
        z2 = torch.randn(samples, g2.z_dim, generator=gen2).to(dev)
        imgs2 = []
        for i in tqdm(range(0, samples, 4), desc="2D samples", unit="batch", disable=bar_off):
            zb = z2[i:i + 4]
            imgs2.append(to_uint8(g2(zb, torch.zeros(len(zb), g2.c_dim, device=dev), truncation_psi=truncation,
                                     noise_mode="const")))
        grid_cols = min(samples, 4 if samples <= 8 else 8)
        save_image(out / "samples_2d.png", make_grid(np.concatenate(imgs2), cols=grid_cols), overwrite=force)
        times["samples_2d"] = time.perf_counter() - t

        # ---------------------------------------------------------------- the 2D faces lifted (LiftedGAN)
        t = time.perf_counter()
        lifted_faces = min(samples, LIFTED_FACES)
        lifted, lifted_src = (None, "the 2D model is a random placeholder") if random2 else \
            _lifted_grid(g2, network_2d, z2[:lifted_faces], truncation, dev)
        if lifted is not None:
            save_image(out / LIFTED_OUTPUT, make_grid(lifted, cols=len(lifted) // lifted_faces), overwrite=force)
        times["lifted_2d"] = time.perf_counter() - t

        # ---------------------------------------------------------------- the 2D faces turned (NRSfM)
        t = time.perf_counter()
        edit_faces = min(samples, EDIT_FACES)
        edits, edits_src = (None, "the 2D model is a random placeholder") if random2 else \
            _edits_grid(g2, network_2d, z2[:edit_faces], truncation, dev)
        if edits is not None:
            save_image(out / EDITS_OUTPUT, make_grid(edits, cols=len(EDIT_YAWS)), overwrite=force)
        times["edits_2d"] = time.perf_counter() - t

        # ---------------------------------------------------------------- 3D yaw sweep
        t = time.perf_counter()
        z3 = torch.randn(samples, g3.z_dim, generator=gen3).to(dev)
        c_front = camera_from_angles([0.0] * samples, [0.0] * samples).to(dev)
        ws = g3.mapping(z3, c_front, truncation_psi=truncation)  # conditioned on the frontal camera
        views: list[list[np.ndarray]] = [[] for _ in YAWS]  # per yaw, chunks of faces
        depths: list[list[np.ndarray]] = [[] for _ in YAWS]
        chunk = 8  # faces rendered together (bounds memory for --samples 64)
        with tqdm(total=samples * len(YAWS), desc="3D views", unit="view", disable=bar_off) as bar:
            for s0 in range(0, samples, chunk):
                wc = ws[s0:s0 + chunk]
                for i, yaw in enumerate(YAWS):
                    cam = camera_from_angles([yaw] * len(wc), [0.0] * len(wc)).to(dev)
                    o = g3.synthesis(wc, cam, noise_mode="const", deterministic=True, cache_backbone=(i == 0),
                                     use_cached_backbone=(i > 0))
                    views[i].append(to_uint8(o["image"]))
                    depths[i].append(colour_depth(o["image_depth"], o["image"].shape[-1]))
                    bar.update(len(wc))
        views = [np.concatenate(v) for v in views]
        depths = [np.concatenate(d) for d in depths]
        by_face = lambda arrs: np.stack(arrs, 1).reshape(-1, *arrs[0].shape[1:])  # noqa: E731 rows = faces
        front = views[YAWS.index(0.0)]
        save_image(out / "samples_3d.png", make_grid(front, cols=grid_cols), overwrite=force)
        save_image(out / "views_3d.png", make_grid(by_face(views), cols=len(YAWS)), overwrite=force)
        save_image(out / "depth_3d.png", make_grid(by_face(depths), cols=len(YAWS)), overwrite=force)
        times["views_3d"] = time.perf_counter() - t

        # ---------------------------------------------------------------- orbit video
        t = time.perf_counter()
        cams = orbit_cameras(orbit_frames).to(dev)
        wk = ws[:orbit_faces]
        frames = []
        for i in tqdm(range(orbit_frames), desc="orbit video", unit="frame", disable=bar_off):
            o = g3.synthesis(wk, cams[i:i + 1].expand(orbit_faces, 25), noise_mode="const", deterministic=True,
                             cache_backbone=(i == 0), use_cached_backbone=(i > 0))
            frames.append(make_grid(to_uint8(o["image"]), cols=orbit_faces))
        g3._last_planes = None
    write_mp4(np.stack(frames), out / "orbit.mp4", fps=fps, overwrite=force)
    times["orbit"] = time.perf_counter() - t

    yaws = ", ".join(f"{y:+.0f}" for y in YAWS)
    where = f"cpu ({torch.get_num_threads()} thread(s))" if dev.type == "cpu" else str(dev)
    n_rows = (samples + grid_cols - 1) // grid_cols
    warn = ""
    if random2 or random3:
        warn = ("!! At least one model below is a RANDOM-WEIGHT placeholder: its pictures are untrained-network\n"
                "!! patterns, not faces. Pass a trained checkpoint with --network-2d / --network-3d.\n\n")
    if lifted is not None:
        lifted_line = (f"{LIFTED_OUTPUT}   the first {lifted_faces} faces of samples_2d.png lifted to 3D by LiftedGAN\n"
                       f"                ({lifted_src}), one row each: the render turned to yaw "
                       f"{', '.join(f'{y:+.0f}' for y in LIFT_YAWS)}\n"
                       f"                degrees, then frontal and lit from the left, top, right and bottom, then the\n"
                       f"                lifted depth (near = bright).")
    else:
        lifted_line = f"{LIFTED_OUTPUT}   not written: {lifted_src}."
    if edits is not None:
        edits_line = (f"{EDITS_OUTPUT}    the first {edit_faces} faces of samples_2d.png, one row each, turned by "
                      f"the NRSfM\n"
                      f"                editor ({edits_src}; linear edits, eq. 14 in the latents' own metric):\n"
                      f"                yaw change {', '.join(f'{y:+.0f}' for y in EDIT_YAWS)} degrees.")
    else:
        edits_line = f"{EDITS_OUTPUT}    not written: {edits_src}."
    readme = f"""portrait3d demo output
{'=' * 22}

{warn}Models
------
2D (StyleGAN2): {src2}
    {_describe(g2)}
3D (EG3D):      {src3}
    {_describe(g3)}
Truncation psi {truncation} for both (1 = no truncation).

Files
-----
samples_2d.png  {samples} faces from the 2D generator, {grid_cols} per row ({n_rows} rows).
{lifted_line}
{edits_line}
samples_3d.png  {samples} faces from the 3D generator, seen from the front (yaw 0, pitch 0); the same
                faces as views_3d.png, in the same order.
views_3d.png    one row per 3D face (the faces of samples_3d.png, left to right, top to bottom); the
                columns are the camera yaw {yaws} degrees, pitch 0.
depth_3d.png    the volume-rendered depth of every view of views_3d.png, same layout: colour map
                'inferno', near = bright, far = dark, scaled per view between its 1st and 99th depth
                percentiles (rendered at {g3.neural_rendering_resolution} px and upsampled).
orbit.mp4       the first {orbit_faces} 3D face(s), side by side, on EG3D's elliptical camera orbit:
                {orbit_frames} frames at {fps} fps ({orbit_frames / fps:.1f} s, loops seamlessly), yaw = 35 sin(2 pi t),
                pitch = 10 cos(2 pi t) degrees for t = frame / {orbit_frames}. H.264, yuv420p.
README.txt      this file.

Seeds
-----
2D latents: z ~ N(0, I) from torch.Generator().manual_seed({seed}).
3D latents: z ~ N(0, I) from torch.Generator().manual_seed({seed + 1}).
Rerun with --seed {seed} and the same models for identical pictures.

Cameras
-------
EG3D convention (portrait3d.networks.eg3d.camera.camera_from_angles): the camera sits 2.7 units from
the origin and looks at the pivot (0, 0, 0.2) with an 18.837 degree field of view; yaw 0 / pitch 0 is
frontal. Positive yaw = the head turned to ITS left (the nose points toward the image right);
positive pitch = the head tilted up. Pictures are not mirrored (the subject's left is on the image
right). Every 3D face is conditioned on the frontal camera (the mapping network sees yaw 0, pitch 0),
as EG3D's own video scripts do, and its tri-planes are synthesised once: every view and every video
frame only re-renders them, so the views are of one and the same 3D head. Rays are sampled
deterministically (mid-bin depths, deterministic importance sampling), so the video does not flicker.

Made by `portrait3d demo` in {time.perf_counter() - t_start:.1f} s on {where}.
"""
    atomic_write(out / "README.txt", lambda tmp: Path(tmp).write_text(readme), overwrite=force)
    times["total"] = time.perf_counter() - t_start
    written = [*OUTPUTS] + [name for name, made in ((LIFTED_OUTPUT, lifted), (EDITS_OUTPUT, edits)) if made is not None]
    print(f"wrote {out}/ ({', '.join(written)}) in {times['total']:.1f} s")
    if random2 or random3:
        print("note: random-weight placeholder model(s) were used; see README.txt")
    return times

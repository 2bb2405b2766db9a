"""3D GAN inversion of one photo, end to end (Ko et al.): align, initialise, optimise latent and camera, render novel
views, depth, an orbit and a mesh, and measure identity. Returns an :class:`InversionReport`; writing files is the
caller's (``portrait3d invert3d`` in :mod:`portrait3d.interfaces.invert3d`).

Camera convention: EG3D's 25-d label (cam2world 4x4 flattened, then normalised intrinsics 3x3), looking at the pivot
``(0, 0, 0.2)``; yaw > 0 turns the head to its left, pitch > 0 raises the chin (:mod:`portrait3d.networks.eg3d.camera`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from portrait3d.errors import UsageError
from portrait3d.face.pipeline import face_landmarks68, several_faces_note
from portrait3d.methods.inversion3d.camera_params import view_camera
from portrait3d.metrics.psnr import psnr
from portrait3d.networks.eg3d.camera import pose_angles_from_camera
from portrait3d.utils.visualize import colour_depth, to_uint8

__all__ = ["NOVEL_YAWS", "PTI_NOVEL_IDENTITY",
           "HISTORY_TAIL", "InversionReport", "IdentityMeter", "invert_photo", "view_camera",
           "orbit_cameras_at", "render_views", "camera_record", "load_generator", "load_networks", "resolve_align",
           "face_landmarks68", "to_tensor", "load_init_modules", "initialise", "make_inversion_config", "fmt_deg",
           "builtin_init_paths"]

IDENTITY_COSINE_MIN = 0.9
"""dlib cosine between input and render below which a summary warns that identity was lost. Measured on 79 labelled
pairs of ../shared/data/portraits/deepface/master.csv: cosine 0.88-0.92 separates same from different people on all of
them, and dlib's 0.6 same-person distance falls at cosine 0.905 (descriptor norms are about 1.5, not 1)."""
NOVEL_YAWS = (-30.0, 30.0)
"""Yaws (degrees, absolute) of the two novel views of every inversion."""
PTI_NOVEL_IDENTITY = 1.0
"""``invert3d --pti``'s weight of PTI's novel-view identity term (ours; PTIConfig's own default, 0, is PTI as
published). README "A photo in 3D" has the measurement."""
HISTORY_TAIL = 10


def fmt_deg(v: float) -> str:
    """``+30``, ``-05``, ``+00``, ``+12.5``: sign, at least two integer digits."""
    if float(v).is_integer():
        return f"{int(v):+03d}"
    return f"{v:+05.1f}" if abs(v) < 10 else f"{v:+.1f}"


def orbit_cameras_at(base: torch.Tensor, frames: int) -> torch.Tensor:
    """EG3D's orbit (:func:`portrait3d.utils.video.orbit_cameras`) at ``base``'s distance and intrinsics."""
    from portrait3d.utils.video import orbit_cameras

    base = base.reshape(-1)[:25].detach().float().cpu()
    radius = pose_angles_from_camera(base)[3]
    cams = orbit_cameras(frames, radius=float(radius))
    cams[:, 16:] = base[16:]
    return cams


@torch.no_grad()
def render_views(G: nn.Module, ws: torch.Tensor, cameras: torch.Tensor, progress: bool = False,
                 desc: str = "rendering") -> tuple[np.ndarray, torch.Tensor]:
    """Render one latent from several cameras, synthesising its tri-planes once.

    Args:
        G: EG3D generator; ws: ``[1, num_ws, w_dim]``; cameras: ``[N, 25]``.
    Returns:
        ``(images uint8 [N, R, R, 3], depth float32 [N, 1, r, r])``.
    """
    from tqdm import tqdm

    dev = ws.device
    images, depths = [], []
    try:
        for i in tqdm(range(len(cameras)), desc=desc, unit="view", disable=not progress or len(cameras) < 4):
            o = G.synthesis(ws[:1], cameras[i:i + 1].to(dev), noise_mode="const", deterministic=True,
                            cache_backbone=(i == 0), use_cached_backbone=(i > 0))
            images.append(to_uint8(o["image"])[0])
            depths.append(o["image_depth"].float().cpu())
    finally:
        G._last_planes = None
    return np.stack(images), torch.cat(depths)


def camera_record(c: torch.Tensor) -> dict[str, Any]:
    c = c.reshape(-1)[:25].detach().float().cpu()
    yaw, pitch, roll, radius = pose_angles_from_camera(c)
    return {"label": [round(float(v), 8) for v in c.tolist()], "yaw_deg": yaw, "pitch_deg": pitch,
            "roll_deg": roll, "radius": radius}


def load_generator(network: str, device: torch.device | str) -> tuple[nn.Module, str]:
    """``(EG3D generator, reference)`` for a checkpoint path or built-in name.

    The generator is in eval mode with ``requires_grad`` off; the reference (stored in ``result.json``)
    is the built-in name, else the resolved checkpoint path.

    Raises:
        CheckpointError: unreadable checkpoint, or a built-in network that is not installed.
        UsageError: not an EG3D (3D) generator.
    """
    from portrait3d.checkpoints.load import builtin_network_path, load_network
    from portrait3d.checkpoints.safe_pickle import CheckpointError
    from portrait3d.networks.eg3d.triplane import TriPlaneGenerator

    builtin = builtin_network_path(network)
    if builtin is not None:
        if not builtin.is_file():
            raise CheckpointError(f"built-in network {network} is not installed; pass --network PATH")
        ref = network
    else:
        ref = str(Path(network).expanduser().resolve())
    G = load_network(network, device=device)
    if not isinstance(G, TriPlaneGenerator):
        raise UsageError(f"{network} is a {type(G).__name__}, not an EG3D (3D) generator")
    return G.eval().requires_grad_(False), ref


def resolve_align(align: str, network: str | Path) -> str:
    """The crop style for ``--align``: ``auto`` is ``default`` for the built-in networks, ``eg3d`` otherwise."""
    if align != "auto":
        return align
    from portrait3d.checkpoints.load import BUILTIN_NETWORKS

    return "default" if str(network) in BUILTIN_NETWORKS else "eg3d"


def locate_face(pipe: Any, image: np.ndarray, name: str, face_index: int | None
                ) -> tuple[Any, np.ndarray, np.ndarray]:
    """``(FaceResult, aligned crop uint8 [R, R, 3], its 68 landmarks [68, 2])`` of the face in ``image``.

    Raises:
        FaceError: no face, or ``face_index`` out of range (the message names the photo)."""
    from portrait3d.face.errors import FaceError

    try:
        face = pipe(image, face_index=face_index)
    except FaceError as e:
        raise type(e)(f"{name}: {e}") from None
    return face, face.aligned.image, face_landmarks68(face)


def to_tensor(img: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """``uint8 [H, W, 3]`` -> float ``[1, 3, H, W]`` in ``[-1, 1]``."""
    return (torch.as_tensor(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 127.5 - 1).to(device)


def builtin_init_paths(network: str | Path) -> tuple[Path | None, Path | None]:
    """The shipped ``(encoder.safetensors, pose.safetensors)`` beside a built-in network's generator, each ``None``
    when that file is not shipped (or ``network`` is not built in)."""
    from portrait3d.checkpoints.load import builtin_network_path

    generator = builtin_network_path(network)
    if generator is None:
        return None, None
    enc, pose = generator.parent / "encoder.safetensors", generator.parent / "pose.safetensors"
    return (enc if enc.is_file() else None), (pose if pose.is_file() else None)


def load_init_modules(G: nn.Module, encoder_path: Path | None, pose_path: Path | None,
                      device: torch.device | str) -> tuple[nn.Module | None, nn.Module | None]:
    """``(latent encoder or None, pose estimator or None)`` loaded from their files, checked against ``G``.

    Raises:
        ValueError (a :class:`CheckpointError` for unreadable files): not a
            :class:`~portrait3d.methods.inversion3d.networks.LatentEncoder` /
            :class:`~portrait3d.methods.inversion3d.networks.PoseEstimator`, or an encoder whose latents do not
            fit ``G`` -- always with a one-line message.
    """
    if encoder_path is None and pose_path is None:
        return None, None
    from portrait3d.methods.inversion3d.networks import LatentEncoder, PoseEstimator, load_module

    enc = pose = None
    if encoder_path is not None:
        enc = load_module(encoder_path, device=device)
        if not isinstance(enc, LatentEncoder):
            raise UsageError(f"{encoder_path} is a {type(enc).__name__}, not a latent encoder")
        if (enc.num_ws, enc.w_dim) != (G.num_ws, G.w_dim):
            raise UsageError(f"{encoder_path} encodes latents [{enc.num_ws}, {enc.w_dim}]; the generator "
                             f"needs [{G.num_ws}, {G.w_dim}]")
    if pose_path is not None:
        pose = load_module(pose_path, device=device)
        if not isinstance(pose, PoseEstimator):
            raise UsageError(f"{pose_path} is a {type(pose).__name__}, not a pose estimator")
    return enc, pose


@torch.no_grad()
def initialise(G: nn.Module, target: torch.Tensor, face_camera: torch.Tensor, encoder: nn.Module | None,
               pose: nn.Module | None) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, str]]:
    """Initial ``(ws [1, num_ws, w_dim] or None, camera [1, 25], how)`` (Ko et al., Sec. 3.2).

    ``ws = encoder(target)`` (else ``None``: the optimiser's default start, ``w_avg``); the camera is
    ``pose.camera(target)``, else ``face_camera`` (the face pipeline's PnP camera). ``encoder`` / ``pose``
    come from :func:`load_init_modules` (``G`` is the generator they were checked against). ``how`` says
    where each came from: ``{"latent": "encoder" | "optimiser default",
    "camera": "pose estimator" | "face pipeline (PnP head pose)"}``.
    """
    ws, camera = None, face_camera.reshape(1, 25).float().to(target.device)
    how = {"latent": "optimiser default", "camera": "face pipeline (PnP head pose)"}
    if encoder is not None:
        ws = encoder(target).detach().float()
        how["latent"] = "encoder"
    if pose is not None:
        camera = pose.camera(target).detach().float().reshape(1, 25)
        how["camera"] = "pose estimator"
    return ws, camera, how


FAST_SAMPLES = (12, 12)
"""Samples per ray (stratified, importance) of the fast optimisation renders (the model was trained with more)."""


def make_inversion_config(algorithm: int, steps: int | None, pti: bool, pti_steps: int | None,
                          seed: int | None, fast: bool = False, pti_novel_identity: float | None = None) -> Any:
    """:class:`~portrait3d.methods.inversion3d.optimize.InversionConfig`; ``None`` keeps its defaults. ``fast``:
    the optimisation renders in bf16 with :data:`FAST_SAMPLES` per ray (the results are rendered in full) and the
    perceptual loss sees the images at their own size up to 224 px (``perceptual_no_upsample``).
    ``pti_novel_identity``: with ``pti``, the weight of PTI's novel-view identity term
    (:attr:`~portrait3d.methods.inversion3d.pti.PTIConfig.novel_view_identity_weight`; ``None``:
    :data:`PTI_NOVEL_IDENTITY`, 0: PTI as published)."""
    from portrait3d.methods.inversion3d.optimize import InversionConfig

    cfg = InversionConfig(algorithm=int(algorithm), pti=bool(pti))
    if fast:
        cfg.precision, cfg.optimization_samples = "bf16", FAST_SAMPLES
        cfg.perceptual_no_upsample = True
    if steps is not None:
        cfg.steps = int(steps)
    if seed is not None:
        cfg.seed = int(seed)
    if pti and pti_steps is not None:
        cfg.pti_config = dataclasses.replace(cfg.pti_config, steps=int(pti_steps))
    if pti:
        weight = PTI_NOVEL_IDENTITY if pti_novel_identity is None else float(pti_novel_identity)
        cfg.pti_config = dataclasses.replace(cfg.pti_config, novel_view_identity_weight=weight)
    cfg.validate()
    return cfg


class IdentityMeter:
    """dlib identity between the aligned input and generated images: ``meter(image)`` is the descriptors' cosine,
    :meth:`measure` also their Euclidean distance (dlib's same-person rule: < 0.6); ``None`` where no face is found.
    """

    def __init__(self, pipe: Any, reference: np.ndarray, reference_landmarks: np.ndarray) -> None:
        self.pipe, self.reference, self.reference_landmarks = pipe, reference, reference_landmarks
        self._ref: np.ndarray | None = None

    def __call__(self, image: np.ndarray) -> float | None:
        m = self.measure(image)
        return None if m is None else m["cosine"]

    def measure(self, image: np.ndarray) -> dict[str, float] | None:
        """``{"cosine", "distance"}`` of ``image``'s face against the reference, ``None`` where none is found."""
        from portrait3d.face.identity import cosine_similarity, dlib_descriptor

        lm = self.pipe.find_landmarks68(image)
        if lm is None:
            return None
        if self._ref is None:
            self._ref = dlib_descriptor(self.reference, self.reference_landmarks)
        d = dlib_descriptor(image, lm)
        return {"cosine": float(cosine_similarity(self._ref, d)), "distance": float(np.linalg.norm(self._ref - d))}


@dataclass
class Renders:
    """What ``invert3d`` / ``encode3d`` show of a latent (images ``uint8 [R, R, 3]``)."""

    reconstruction: np.ndarray
    views: dict[str, np.ndarray]               # file name -> image, at NOVEL_YAWS
    depth: np.ndarray                          # colour-mapped depth of the reconstruction
    orbit: np.ndarray                          # [F, R, R, 3]
    mesh: Any                                  # portrait3d.utils.mesh.Mesh
    identity: dict[str, float | None]          # dlib cosine to the aligned input, per image


def render_outputs(G: nn.Module, latent: Any, camera: torch.Tensor, pipe: Any, aligned: np.ndarray,
                   landmarks: np.ndarray, orbit_frames: int, mesh_resolution: int, progress: bool,
                   times: dict[str, float]) -> Renders:
    """Reconstruction and novel views (:data:`NOVEL_YAWS`), depth, orbit, mesh and identity of ``latent`` (W+ rows or
    a W_tri code) seen from ``camera [1, 25]``; each stage's seconds go into ``times``."""
    from portrait3d.utils.mesh import extract_mesh

    t = time.perf_counter()
    cams = torch.cat([camera.cpu()] + [view_camera(camera, y) for y in NOVEL_YAWS])
    imgs, depth = render_views(G, latent, cams)
    views = {f"view_yaw{fmt_deg(y)}.png": imgs[1 + i] for i, y in enumerate(NOVEL_YAWS)}
    depth_img = colour_depth(depth[:1], int(G.img_resolution))[0]
    times["views"] = time.perf_counter() - t
    t = time.perf_counter()
    frames, _ = render_views(G, latent, orbit_cameras_at(camera, orbit_frames), progress=progress,
                             desc="orbit video")
    times["orbit"] = time.perf_counter() - t
    t = time.perf_counter()
    mesh = extract_mesh(G, latent, resolution=mesh_resolution)
    times["mesh"] = time.perf_counter() - t
    t = time.perf_counter()
    meter = IdentityMeter(pipe, aligned, landmarks)
    identity = {"reconstruction.png": meter(imgs[0]), **{n: meter(v) for n, v in views.items()}}
    times["identity"] = time.perf_counter() - t
    return Renders(imgs[0], views, depth_img, frames, mesh, identity)


def identity_notes(identity: dict[str, float | None]) -> list[str]:
    """A warning naming the images whose identity was not kept (cosine below :data:`IDENTITY_COSINE_MIN`)."""
    lost = [n for n, v in identity.items() if v is None or v < IDENTITY_COSINE_MIN]
    if not lost:
        return []
    return [f"identity not kept in {', '.join(lost)} (dlib cosine to the input below {IDENTITY_COSINE_MIN:g}, "
            "or no face found)"]


def load_networks(network: str, encoder_path: Path | None, pose_path: Path | None, device: str | torch.device,
                  ) -> tuple[nn.Module, nn.Module | None, nn.Module | None]:
    """``(G, encoder or None, pose estimator or None)`` (:func:`load_generator`, :func:`load_init_modules`)."""
    G, _ = load_generator(network, device)
    enc, pose = load_init_modules(G, encoder_path, pose_path, device)
    return G, enc, pose


@dataclass
class InversionReport:
    """Everything one inversion produced (images ``uint8 [R, R, 3]``), and :meth:`record` for ``result.json``."""

    photo: str
    face: Any                                  # portrait3d.face.pipeline.FaceResult
    face_index: int | None
    alignment: str
    network_ref: str
    config: Any                                # InversionConfig
    G: nn.Module                               # the generator used for rendering (tuned by PTI when asked)
    ws: torch.Tensor                           # [1, num_ws, w_dim]
    camera: torch.Tensor                       # [1, 25], optimised
    initial_camera: torch.Tensor               # [1, 25]
    initialisation: dict[str, str]
    result: Any                                # InversionResult
    aligned: np.ndarray
    renders: Renders                           # reconstruction, views, depth, orbit, mesh, identity
    timings_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)   # what the user should know (several faces, identity lost)

    def record(self, *, pti_file: str | None, orbit_fps: int) -> dict[str, Any]:
        """The ``result.json`` record (before file-writing timings are added)."""
        face, res, cam = self.face, self.result, camera_record(self.camera)
        return {
            "photo": self.photo,
            "faces_found": face.num_faces,
            "face_index": self.face_index,
            "algorithm": res.algorithm,
            "config": self.config,
            "pti": bool(self.config.pti),
            "generator": pti_file if self.config.pti else None,
            "network": self.network_ref,
            "alignment": self.alignment,
            "initialisation": self.initialisation,
            "image_resolution": int(self.aligned.shape[0]),
            "camera": cam,
            "initial_camera": camera_record(self.initial_camera),
            "face_pipeline_pose": {"yaw_deg": face.pose.yaw_deg, "pitch_deg": face.pose.pitch_deg,
                                   "roll_deg": face.pose.roll_deg,
                                   "reprojection_error_px": face.pose.reprojection_error},
            "novel_views": {n: {"yaw_deg": y, "pitch_deg": cam["pitch_deg"]}
                            for n, y in zip(self.renders.views, NOVEL_YAWS)},
            "psnr_db": psnr(self.renders.reconstruction, self.aligned),
            "identity_cosine_dlib": self.renders.identity,
            "mesh": self.renders.mesh.summary(),
            "orbit": {"frames": int(len(self.renders.orbit)), "fps": orbit_fps},
            "loss_history_tail": res.history[-HISTORY_TAIL:],
            "optimiser_timings_s": res.timings,
            "optimiser_camera_state": res.camera_state,
            "image_loss": res.loss_description,
            "notes": list(self.notes),
        }


def invert_photo(image: np.ndarray, *, name: str = "photo", network: str = "default-3d", algorithm: int = 1,
                 steps: int | None = None, pti: bool = False, pti_steps: int | None = None,
                 pti_novel_identity: float | None = None,
                 encoder_path: Path | None = None, pose_path: Path | None = None, face_index: int | None = None,
                 align: str = "auto", orbit_frames: int = 48, mesh_resolution: int = 128, seed: int | None = None,
                 device: str | torch.device = "cpu", progress: bool = True,
                 G: tuple[nn.Module, str] | None = None, fast: bool = False) -> InversionReport:
    """Invert the face in ``image`` (``uint8 [H, W, 3]``) into an EG3D generator and render the results.

    Args:
        name: how the photo is named in messages and the report.
        network: EG3D checkpoint path or built-in name (ignored when ``G = (generator, reference)`` is given,
            e.g. by a caller that inverts many photos with one loaded generator).
        algorithm: 1, 2 or 3 (:data:`portrait3d.methods.inversion3d.optimize.ALGORITHMS`).
        steps, pti_steps, seed: optimiser settings (``None`` = the configuration's defaults).
        pti: pivotal tuning of (a copy of) the generator after the latent / camera optimisation.
        pti_novel_identity: PTI's novel-view identity weight (``None``: :data:`PTI_NOVEL_IDENTITY`).
        encoder_path / pose_path: ``LatentEncoder`` / ``PoseEstimator`` files for the initial latent / camera
            (else ``w_avg`` / the face pipeline's PnP camera).
        face_index: which face when there are several (0 = largest); required then.
        align: the crop the generator was trained on; ``'auto'`` = ``'default'`` for built-in models, else ``'eg3d'``.
        fast: optimise with bf16 renders and fewer samples per ray (:func:`make_inversion_config`).
    Raises:
        FaceError: no face, ``face_index`` out of range. UsageError: a bad network / encoder / pose estimator.
        CheckpointError: unreadable network. Several faces without ``face_index``: the largest, with a note.
    """
    from portrait3d.face.pipeline import FacePipeline
    from portrait3d.methods.inversion3d.optimize import invert

    for p, what in ((encoder_path, "encoder"), (pose_path, "pose estimator")):
        if p is not None and not Path(p).is_file():
            raise FileNotFoundError(f"{p}: no such {what} file")
    cfg = make_inversion_config(algorithm, steps, pti, pti_steps, seed, fast=fast,
                                pti_novel_identity=pti_novel_identity)
    times: dict[str, float] = {}
    dev = torch.device(device)
    t = time.perf_counter()
    G_in, network_ref = G if G is not None else load_generator(network, dev)
    times["load"] = time.perf_counter() - t
    res_px = int(G_in.img_resolution)
    align = resolve_align(align, network)
    with FacePipeline(style=align, output_size=res_px) as pipe:
        t = time.perf_counter()
        face, aligned, lm = locate_face(pipe, image, name, face_index)
        times["face"] = time.perf_counter() - t
        target = to_tensor(aligned, dev)

        t = time.perf_counter()
        encoder, pose = load_init_modules(G_in, encoder_path, pose_path, dev)
        init_ws, init_camera, init_how = initialise(G_in, target, face.camera, encoder, pose)
        for key, path in (("latent", encoder_path), ("camera", pose_path)):
            if path is not None:
                init_how[key] += f" {path}"
        times["initialise"] = time.perf_counter() - t

        t = time.perf_counter()
        res = invert(G_in, target, init_ws, init_camera, cfg, landmarks=lm, progress=progress)
        times["invert"] = time.perf_counter() - t
        G_out = res.G.eval()
        ws = res.ws.detach().to(dev)
        camera = res.camera.detach().reshape(1, 25).to(dev)

        r = render_outputs(G_out, ws, camera, pipe, aligned, lm, orbit_frames, mesh_resolution, progress, times)
        notes = several_faces_note(face, face_index, name) + pipe.pose_notes(face, name) + identity_notes(r.identity)
    return InversionReport(notes=notes, photo=name, face=face, face_index=face_index, alignment=align,
                           network_ref=network_ref, config=cfg, G=G_out, ws=ws, camera=camera,
                           initial_camera=init_camera, initialisation=init_how, result=res, aligned=aligned,
                           renders=r, timings_s=times)

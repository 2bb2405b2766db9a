"""``portrait3d invert3d`` and ``portrait3d render``: a photo -> an EG3D latent, camera, views, mesh, video.

``invert3d`` (3D GAN inversion with pose optimisation, Ko et al.) writes into one folder:

* ``input_aligned.png``   the photo's face in EG3D's in-the-wild crop, at the generator's resolution;
* ``reconstruction.png``  the inverted latent rendered from the optimised camera;
* ``view_yaw-30.png``, ``view_yaw+30.png``  novel views: head yaw -30 / +30 degrees, keeping the
  optimised pitch, roll, camera distance and intrinsics;
* ``depth.png``           volume-rendered depth of the reconstruction (colour map of ``portrait3d demo``);
* ``mesh.ply``            coloured mesh of the head (:mod:`portrait3d.utils.mesh`);
* ``orbit.mp4``           the head on EG3D's elliptical orbit (as ``portrait3d demo``);
* ``latent.npy``          ``ws`` float32 ``[1, num_ws, w_dim]``;
* ``generator.safetensors``  with PTI only: the tuned generator (:func:`portrait3d.checkpoints.save_network`);
* ``result.json``         algorithm, configuration, timings, cameras, PSNR, identity similarities, loss tail,
  and what ``render`` needs: ``generator`` (the file above) or ``network`` (the checkpoint path or
  built-in name used, when the generator was not tuned). Written last: its presence marks a complete run.

Every image shown (reconstruction, views, orbit) is rendered the same way, with deterministic ray
sampling and constant noise, so ``render`` reproduces them exactly from the folder.

``render`` re-renders a folder written by ``invert3d`` at other yaws / pitches
(``render_yaw+20_pitch-05.png``) or as ``render_orbit.mp4``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from portrait3d.checkpoints.native import atomic_write
from portrait3d.face.io import save_image
from portrait3d.networks.eg3d.camera import camera_from_angles, pose_angles_from_camera
from portrait3d.utils.visualize import to_uint8
from portrait3d.errors import UsageError

__all__ = ["OUTPUTS", "NOVEL_YAWS", "PTI_GENERATOR", "run_invert3d", "run_render", "view_camera", "render_views",
           "render_filename", "psnr", "jsonable", "write_json_report", "load_generator", "load_init_modules",
           "cli_load_networks", "resolve_align", "face_landmarks68", "to_tensor", "initialise",
           "make_inversion_config"]

NOVEL_YAWS = (-30.0, 30.0)
PTI_GENERATOR = "generator.safetensors"
OUTPUTS = ("input_aligned.png", "reconstruction.png", "view_yaw-30.png", "view_yaw+30.png", "depth.png",
           "mesh.ply", "orbit.mp4", "latent.npy", "result.json")
HISTORY_TAIL = 10


# ----------------------------------------------------------------------------- helpers
def view_camera(base: torch.Tensor, yaw_deg: float, pitch_deg: float | None = None) -> torch.Tensor:
    """Camera ``[1, 25]`` at head yaw ``yaw_deg`` (absolute, degrees) on EG3D's look-at sphere.

    Keeps the roll, distance from the origin and intrinsics of ``base`` (``[25]`` or ``[1, 25]``), and its
    pitch unless ``pitch_deg`` is given; looks at EG3D's pivot ``(0, 0, 0.2)``.
    """
    base = base.reshape(-1)[:25].detach().float().cpu()
    _, pitch0, roll0, radius = pose_angles_from_camera(base)
    pitch = float(pitch0 if pitch_deg is None else pitch_deg)
    if not -90 < pitch < 90:
        raise UsageError(f"pitch must lie strictly between -90 and 90 degrees, got {pitch:g}")
    c = camera_from_angles(float(yaw_deg), pitch, radius=float(radius), roll_deg=float(roll0))
    c[16:] = base[16:]
    return c[None]


def _orbit(base: torch.Tensor, frames: int) -> torch.Tensor:
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


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two ``uint8`` images of one shape (``inf`` when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def _fmt_deg(v: float) -> str:
    """``+30``, ``-05``, ``+00``, ``+12.5``: sign, at least two integer digits."""
    if float(v).is_integer():
        return f"{int(v):+03d}"
    return f"{v:+05.1f}" if abs(v) < 10 else f"{v:+.1f}"


def render_filename(yaw: float, pitch: float) -> str:
    """``render_yaw+30_pitch-05.png`` for yaw 30, pitch -5 degrees."""
    return f"render_yaw{_fmt_deg(yaw)}_pitch{_fmt_deg(pitch)}.png"


def jsonable(x: Any) -> Any:
    """Plain JSON types from tensors, numpy values, paths, dataclasses; non-finite floats -> None.

    Dict keys become strings, tuples lists; anything else unknown becomes its ``repr``.
    """
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        x = dataclasses.asdict(x)
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return jsonable(x.item() if x.numel() == 1 and x.ndim == 0 else x.tolist())
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        return jsonable(x.item())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, Path):
        return str(x)
    return repr(x)


def write_json_report(path: Path, obj: Any) -> Path:
    """Write ``obj`` (through :func:`jsonable`, indented, newline-terminated) to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(obj), indent=1) + "\n")
    return path


def _write_json(path: Path, obj: Any, force: bool) -> None:
    text = json.dumps(jsonable(obj), indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"), overwrite=force)


def _write_npy(path: Path, arr: np.ndarray, force: bool) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
            np.save(f, arr)

    atomic_write(path, write, overwrite=force)


def _camera_record(c: torch.Tensor) -> dict[str, Any]:
    c = c.reshape(-1)[:25].detach().float().cpu()
    yaw, pitch, roll, radius = pose_angles_from_camera(c)
    return {"label": [round(float(v), 8) for v in c.tolist()], "yaw_deg": yaw, "pitch_deg": pitch,
            "roll_deg": roll, "radius": radius}


def _check_outputs(out: Path, names: Sequence[str], force: bool, what: str) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    existing = [n for n in names if (out / n).exists()]
    if existing and not force:
        raise FileExistsError(f"{out} already holds {what} output(s) ({', '.join(existing)}); "
                              "pass --force to overwrite")


def load_generator(network: str, device: torch.device | str) -> tuple[nn.Module, str]:
    """``(EG3D generator, reference)`` for a checkpoint path or built-in name.

    The generator is in eval mode with ``requires_grad`` off; the reference (stored in ``result.json``)
    is the built-in name, else the resolved checkpoint path.

    Raises:
        CheckpointError: unreadable checkpoint, or a built-in network that is not installed.
        ValueError: not an EG3D (3D) generator. Both with one-line messages.
    """
    from portrait3d.checkpoints.load import BUILTIN_NETWORKS, load_network
    from portrait3d.checkpoints.safe_pickle import CheckpointError
    from portrait3d.networks.eg3d.triplane import TriPlaneGenerator

    if network in BUILTIN_NETWORKS:
        import portrait3d

        if not (Path(portrait3d.__file__).resolve().parent / BUILTIN_NETWORKS[network]).is_file():
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


def face_landmarks68(face: Any) -> np.ndarray:
    """``[68, 2]`` float64 landmarks of a :class:`~portrait3d.face.pipeline.FacePipeline` result in its aligned crop
    (the aligned landmarks, or the photo's 68 points moved into the crop when those are fewer)."""
    lm = np.asarray(face.aligned.landmarks, np.float64)
    if len(lm) != 68:
        from portrait3d.face.align import apply_transform

        lm = apply_transform(face.aligned.transform, face.landmarks)
    return lm


def to_tensor(img: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """``uint8 [H, W, 3]`` -> float ``[1, 3, H, W]`` in ``[-1, 1]``."""
    return (torch.as_tensor(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 127.5 - 1).to(device)


# ----------------------------------------------------------------------------- initialisation
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


def cli_load_networks(network: str, encoder_path: Path | None, pose_path: Path | None, device: str,
                      threads: int) -> tuple[nn.Module, nn.Module | None, nn.Module | None, torch.device]:
    """For command-line scripts: ``torch.set_num_threads(threads)``, then ``(G, encoder or None, pose
    estimator or None, device)`` (:func:`load_generator`, :func:`load_init_modules`).

    Raises:
        click.ClickException: a load error's one-line message.
    """
    import click

    torch.set_num_threads(threads)
    dev = torch.device(device)
    try:
        G, _ = load_generator(network, dev)
        enc, pose = load_init_modules(G, encoder_path, pose_path, dev)
    except ValueError as e:  # CheckpointError included: one-line messages
        raise click.ClickException(str(e)) from None
    return G, enc, pose, dev


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


def make_inversion_config(algorithm: int, steps: int | None, pti: bool, pti_steps: int | None,
                          seed: int | None) -> Any:
    """:class:`~portrait3d.methods.inversion3d.optimize.InversionConfig`; ``None`` keeps its defaults."""
    from portrait3d.methods.inversion3d.optimize import InversionConfig

    cfg = InversionConfig(algorithm=int(algorithm), pti=bool(pti))
    if steps is not None:
        cfg.steps = int(steps)
    if seed is not None:
        cfg.seed = int(seed)
    if pti and pti_steps is not None:
        cfg.pti_config = dataclasses.replace(cfg.pti_config, steps=int(pti_steps))
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------- identity
class _IdentityMeter:
    """dlib identity cosine between the aligned input and generated images (``None`` where no face is found)."""

    def __init__(self, pipe: Any, reference: np.ndarray, reference_landmarks: np.ndarray) -> None:
        self.pipe, self.reference, self.reference_landmarks = pipe, reference, reference_landmarks
        self._ref: np.ndarray | None = None

    def __call__(self, image: np.ndarray) -> float | None:
        from portrait3d.face.detect import select_face
        from portrait3d.face.errors import FaceError
        from portrait3d.face.identity import cosine_similarity, dlib_descriptor

        try:
            dets = self.pipe.detector.detect(image)
            if not dets:
                return None
            lm = self.pipe.landmarker.landmarks68(image, select_face(dets))
        except FaceError:
            return None
        if self._ref is None:
            self._ref = dlib_descriptor(self.reference, self.reference_landmarks)
        return float(cosine_similarity(self._ref, dlib_descriptor(image, lm)))


# ----------------------------------------------------------------------------- invert3d
def run_invert3d(photo: Path, out: Path, network: str = "default-3d", algorithm: int = 1, steps: int | None = None,
                 pti: bool = False, pti_steps: int | None = None, encoder_path: Path | None = None,
                 pose_path: Path | None = None, face_index: int | None = None, align: str = "auto",
                 force: bool = False,
                 orbit_frames: int = 48, mesh_resolution: int = 128, seed: int | None = None, fps: int = 24,
                 device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Invert the face in ``photo`` into ``network`` and write the files of :data:`OUTPUTS` into ``out``.

    Args:
        photo: a photo with one face (or ``face_index`` to choose one of several, 0 = largest).
        out: output folder.
        network: EG3D checkpoint path or built-in name.
        algorithm: 1, 2 or 3 (see :mod:`portrait3d.methods.inversion3d.optimize`).
        steps, pti_steps, seed: optimiser settings (``None`` = the configuration's defaults).
        pti: pivotal tuning of the generator after the latent / camera optimisation.
        encoder_path: latent encoder (``LatentEncoder`` file) giving the initial ``ws`` (else ``w_avg``).
        pose_path: pose estimator (``PoseEstimator`` file) giving the initial camera (else the face
            pipeline's PnP camera).
        align: the crop the generator was trained on: ``'auto'`` = ``'default'`` for the built-in
            models (trained on portrait3d's default crops), ``'eg3d'`` for other networks (FFHQ EG3D).
        force: overwrite existing outputs (checked before any work).
        orbit_frames, fps: ``orbit.mp4``; mesh_resolution: marching-cubes grid side of ``mesh.ply``.
    Returns:
        The record written to ``result.json``.
    Raises:
        FileExistsError: outputs exist and ``force`` is False.
        FaceError: unreadable photo, no face, ``face_index`` out of range.
        ValueError: several faces without ``face_index``; bad network / encoder / pose estimator.
        CheckpointError: unreadable network.
    """
    from portrait3d.face.errors import FaceError
    from portrait3d.face.io import load_image
    from portrait3d.face.pipeline import FacePipeline
    from portrait3d.utils.visualize import colour_depth
    from portrait3d.methods.inversion3d.optimize import invert
    from portrait3d.utils.mesh import extract_mesh, write_ply
    from portrait3d.utils.video import write_mp4

    t_start = time.perf_counter()
    out, photo = Path(out), Path(photo)
    _check_outputs(out, OUTPUTS + ((PTI_GENERATOR,) if pti else ()), force, "invert3d")
    for p, what in ((encoder_path, "encoder"), (pose_path, "pose estimator")):
        if p is not None and not Path(p).is_file():
            raise FileNotFoundError(f"{p}: no such {what} file")
    cfg = make_inversion_config(algorithm, steps, pti, pti_steps, seed)
    times: dict[str, float] = {}
    image = load_image(photo)
    dev = torch.device(device)
    t = time.perf_counter()
    G, network_ref = load_generator(network, dev)
    times["load"] = time.perf_counter() - t
    res_px = int(G.img_resolution)

    align = resolve_align(align, network)
    with FacePipeline(style=align, output_size=res_px) as pipe:
        t = time.perf_counter()
        try:
            face = pipe(image, face_index=face_index)
        except FaceError as e:
            raise type(e)(f"{photo.name}: {e}") from None
        if face.num_faces > 1 and face_index is None:
            raise UsageError(f"{face.num_faces} faces found in {photo.name}: choose one with --face-index "
                             "(0 = largest)")
        aligned = face.aligned.image
        lm = face_landmarks68(face)
        times["face"] = time.perf_counter() - t
        target = to_tensor(aligned, dev)

        t = time.perf_counter()
        encoder, pose = load_init_modules(G, encoder_path, pose_path, dev)
        init_ws, init_camera, init_how = initialise(G, target, face.camera, encoder, pose)
        for key, path in (("latent", encoder_path), ("camera", pose_path)):
            if path is not None:
                init_how[key] += f" {path}"
        times["initialise"] = time.perf_counter() - t

        t = time.perf_counter()
        res = invert(G, target, init_ws, init_camera, cfg, landmarks=lm, progress=progress)
        times["invert"] = time.perf_counter() - t

        G_out = res.G.eval()
        ws = res.ws.detach().to(dev)
        camera = res.camera.detach().reshape(1, 25).to(dev)

        t = time.perf_counter()
        cams = torch.cat([camera.cpu()] + [view_camera(camera, y) for y in NOVEL_YAWS])
        imgs, depth = render_views(G_out, ws, cams)
        recon, views = imgs[0], {f"view_yaw{_fmt_deg(y)}.png": imgs[1 + i] for i, y in enumerate(NOVEL_YAWS)}
        depth_img = colour_depth(depth[:1], res_px)[0]
        times["views"] = time.perf_counter() - t

        t = time.perf_counter()
        frames, _ = render_views(G_out, ws, _orbit(camera, orbit_frames), progress=progress, desc="orbit video")
        times["orbit"] = time.perf_counter() - t

        t = time.perf_counter()
        mesh = extract_mesh(G_out, ws, resolution=mesh_resolution)
        times["mesh"] = time.perf_counter() - t

        t = time.perf_counter()
        meter = _IdentityMeter(pipe, aligned, lm)
        identity = {"reconstruction.png": meter(recon), **{n: meter(v) for n, v in views.items()}}
        times["identity"] = time.perf_counter() - t

    record: dict[str, Any] = {
        "photo": str(photo.resolve()),
        "faces_found": face.num_faces,
        "face_index": face_index,
        "algorithm": res.algorithm,
        "config": cfg,
        "pti": bool(pti),
        "generator": PTI_GENERATOR if pti else None,
        "network": network_ref,
        "alignment": align,
        "initialisation": init_how,
        "image_resolution": res_px,
        "camera": _camera_record(camera),
        "initial_camera": _camera_record(init_camera),
        "face_pipeline_pose": {"yaw_deg": face.pose.yaw_deg, "pitch_deg": face.pose.pitch_deg,
                               "roll_deg": face.pose.roll_deg,
                               "reprojection_error_px": face.pose.reprojection_error},
        "novel_views": {n: {"yaw_deg": y, "pitch_deg": _camera_record(camera)["pitch_deg"]}
                        for n, y in zip(views, NOVEL_YAWS)},
        "psnr_db": psnr(recon, aligned),
        "identity_cosine_dlib": identity,
        "mesh": mesh.summary(),
        "orbit": {"frames": orbit_frames, "fps": fps},
        "loss_history_tail": res.history[-HISTORY_TAIL:],
        "optimiser_timings_s": res.timings,
        "optimiser_camera_state": res.camera_state,
        "image_loss": res.loss_description,
    }

    t = time.perf_counter()
    if force:  # result.json marks a complete run: never leave an old one beside half-replaced files
        (out / "result.json").unlink(missing_ok=True)
    save_image(out / "input_aligned.png", aligned, overwrite=force)
    save_image(out / "reconstruction.png", recon, overwrite=force)
    for name, img in views.items():
        save_image(out / name, img, overwrite=force)
    save_image(out / "depth.png", depth_img, overwrite=force)
    write_ply(mesh, out / "mesh.ply", overwrite=force)
    write_mp4(frames, out / "orbit.mp4", fps=fps, overwrite=force)
    _write_npy(out / "latent.npy", ws.cpu().float().numpy(), force)
    if pti:
        from portrait3d.checkpoints.native import save_network

        save_network(G_out, out / PTI_GENERATOR, overwrite=force)
    elif force and (out / PTI_GENERATOR).exists():
        (out / PTI_GENERATOR).unlink()  # a stale tuned generator from an earlier --pti run would mislead
    times["write"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_start
    record["timings_s"] = times
    _write_json(out / "result.json", record, force)
    return jsonable(record)


# ----------------------------------------------------------------------------- render
def _load_folder(folder: Path, device: torch.device) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict]:
    """``(generator, ws [1, num_ws, w_dim], camera [1, 25], result.json)`` of an ``invert3d`` folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    rpath = folder / "result.json"
    if not rpath.is_file():
        raise FileNotFoundError(f"{folder} has no result.json: not a folder written by portrait3d invert3d")
    try:
        rec = json.loads(rpath.read_text())
        label = torch.tensor(rec["camera"]["label"], dtype=torch.float32)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError):
        raise UsageError(f"{rpath} is not a result.json written by portrait3d invert3d") from None
    if label.shape != (25,):
        raise UsageError(f"{rpath}: camera label has {label.numel()} values, not 25")
    lpath = folder / "latent.npy"
    if not lpath.is_file():
        raise FileNotFoundError(f"{folder} has no latent.npy")
    try:
        ws = torch.from_numpy(np.load(lpath, allow_pickle=False)).float()
    except (ValueError, OSError, EOFError):
        raise UsageError(f"{lpath} is not a readable .npy array") from None
    if rec.get("generator"):
        gpath = folder / rec["generator"]
        if not gpath.is_file():
            raise FileNotFoundError(f"{gpath}: the tuned generator of this folder is missing")
        G, _ = load_generator(str(gpath), device)
    else:
        G, _ = load_generator(str(rec["network"]), device)
    if ws.ndim != 3 or ws.shape[0] != 1 or tuple(ws.shape[1:]) != (G.num_ws, G.w_dim):
        raise UsageError(f"{lpath} holds latents {list(ws.shape)}; the generator needs [1, {G.num_ws}, {G.w_dim}]")
    return G, ws.to(device), label[None], rec


def run_render(folder: Path, yaws: Sequence[float] = (), pitch: float | None = None, orbit: bool = False,
               force: bool = False, orbit_frames: int = 48, fps: int = 24, device: str = "cpu",
               progress: bool = True) -> list[Path]:
    """Re-render an ``invert3d`` folder: views at ``yaws`` (degrees; yaw 0 when only ``pitch`` is given) and
    ``pitch`` (default: the optimised pitch), and/or ``render_orbit.mp4``.

    Returns:
        The written files.
    Raises:
        ValueError: nothing asked for, or a bad folder; FileExistsError: outputs exist without ``force``.
    """
    from portrait3d.utils.video import write_mp4

    folder = Path(folder)
    yaws = list(dict.fromkeys(float(y) for y in yaws))
    if not yaws and pitch is not None:
        yaws = [0.0]
    if not yaws and not orbit:
        raise UsageError("nothing to render: give --yaw, --pitch and/or --orbit")
    dev = torch.device(device)
    G, ws, base, rec = _load_folder(folder, dev)
    cams = [view_camera(base, y, pitch) for y in yaws]
    name_pitch = pitch if pitch is not None else round(float(pose_angles_from_camera(base[0])[1]), 1)
    names = [render_filename(y, name_pitch) for y in yaws]
    if len(set(names)) != len(names):
        raise UsageError("two --yaw values give the same file name (they differ by less than 0.1 degree)")
    _check_outputs(folder, names + (["render_orbit.mp4"] if orbit else []), force, "render")
    written = []
    if cams:
        imgs, _ = render_views(G, ws, torch.cat(cams), progress=progress)
        for name, img in zip(names, imgs):
            written.append(save_image(folder / name, img, overwrite=force))
    if orbit:
        frames, _ = render_views(G, ws, _orbit(base, orbit_frames), progress=progress, desc="orbit video")
        written.append(write_mp4(frames, folder / "render_orbit.mp4", fps=fps, overwrite=force))
    return written

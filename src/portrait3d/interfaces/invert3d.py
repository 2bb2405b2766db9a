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

import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from portrait3d.errors import UsageError
from portrait3d.face.io import save_image
from portrait3d.methods.inversion3d.pipeline import (
    fmt_deg,
    invert_photo,
    load_generator,
    orbit_cameras_at,
    render_views,
    view_camera,
)
from portrait3d.networks.eg3d.camera import pose_angles_from_camera
from portrait3d.utils.io import jsonable, write_json, write_npy

__all__ = ["OUTPUTS", "PTI_GENERATOR", "run_invert3d", "run_render", "render_filename"]

PTI_GENERATOR = "generator.safetensors"
OUTPUTS = ("input_aligned.png", "reconstruction.png", "view_yaw-30.png", "view_yaw+30.png", "depth.png",
           "mesh.ply", "orbit.mp4", "latent.npy", "result.json")


def render_filename(yaw: float, pitch: float) -> str:
    """``render_yaw+30_pitch-05.png`` for yaw 30, pitch -5 degrees."""
    return f"render_yaw{fmt_deg(yaw)}_pitch{fmt_deg(pitch)}.png"


def _check_outputs(out: Path, names: Sequence[str], force: bool, what: str) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    existing = [n for n in names if (out / n).exists()]
    if existing and not force:
        raise FileExistsError(f"{out} already holds {what} output(s) ({', '.join(existing)}); "
                              "pass --force to overwrite")


def write_renders(out: Path, aligned: np.ndarray, r: Any, fps: int, force: bool) -> None:
    """The image, mesh and video files that ``invert3d`` and ``encode3d`` share, from the aligned photo and a
    :class:`~portrait3d.methods.inversion3d.pipeline.Renders` (each file written atomically)."""
    from portrait3d.utils.mesh import write_ply
    from portrait3d.utils.video import write_mp4

    save_image(out / "input_aligned.png", aligned, overwrite=force)
    save_image(out / "reconstruction.png", r.reconstruction, overwrite=force)
    for name, img in r.views.items():
        save_image(out / name, img, overwrite=force)
    save_image(out / "depth.png", r.depth, overwrite=force)
    write_ply(r.mesh, out / "mesh.ply", overwrite=force)
    write_mp4(r.orbit, out / "orbit.mp4", fps=fps, overwrite=force)


def run_invert3d(photo: Path, out: Path, network: str = "default-3d", algorithm: int = 1, steps: int | None = None,
                 pti: bool = False, pti_steps: int | None = None, encoder_path: Path | None = None,
                 pose_path: Path | None = None, face_index: int | None = None, align: str = "auto",
                 force: bool = False, orbit_frames: int = 48, mesh_resolution: int = 128, seed: int | None = None,
                 fps: int = 24, device: str = "cpu", progress: bool = True, fast: bool = False,
                 pti_novel_identity: float | None = None) -> dict[str, Any]:
    """Invert the face in ``photo`` (:func:`~portrait3d.methods.inversion3d.pipeline.invert_photo`) and write the
    files of :data:`OUTPUTS` into ``out``; returns the ``result.json`` record.

    Raises:
        FileExistsError: outputs exist and ``force`` is False (checked before any work). FaceError, UsageError,
        CheckpointError: as :func:`~portrait3d.methods.inversion3d.pipeline.invert_photo`.
    """
    from portrait3d.face.io import load_image

    t_start = time.perf_counter()
    out, photo = Path(out), Path(photo)
    _check_outputs(out, OUTPUTS + ((PTI_GENERATOR,) if pti else ()), force, "invert3d")
    image = load_image(photo)
    rep = invert_photo(image, name=photo.name, network=network, algorithm=algorithm, steps=steps, pti=pti,
                       pti_steps=pti_steps, encoder_path=encoder_path, pose_path=pose_path, face_index=face_index,
                       align=align, orbit_frames=orbit_frames, mesh_resolution=mesh_resolution, seed=seed,
                       device=device, progress=progress, fast=fast, pti_novel_identity=pti_novel_identity)
    record = rep.record(pti_file=PTI_GENERATOR, orbit_fps=fps)
    record["photo"] = str(photo.resolve())
    times = dict(rep.timings_s)

    t = time.perf_counter()
    if force:  # result.json marks a complete run: never leave an old one beside half-replaced files
        (out / "result.json").unlink(missing_ok=True)
    write_renders(out, rep.aligned, rep.renders, fps, force)
    write_npy(out / "latent.npy", rep.ws.cpu().float().numpy(), overwrite=force)
    if pti:
        from portrait3d.checkpoints.native import save_network

        save_network(rep.G, out / PTI_GENERATOR, overwrite=force)
    elif force and (out / PTI_GENERATOR).exists():
        (out / PTI_GENERATOR).unlink()  # a stale tuned generator from an earlier --pti run would mislead
    times["write"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_start
    record["timings_s"] = times
    write_json(out / "result.json", record, overwrite=force)
    return jsonable(record)


def _load_folder(folder: Path, device: torch.device) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict]:
    """``(generator, latent, camera [1, 25], result.json)`` of an ``invert3d`` or ``encode3d`` folder; the latent is
    ``ws [1, num_ws, w_dim]`` (``latent.npy``) or a W_tri code (``code.npz``, written by ``encode3d``)."""
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
    if not lpath.is_file() and (folder / "code.npz").is_file():
        return _load_code_folder(folder, rec, label, device)
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


def _load_code_folder(folder: Path, rec: dict, label: torch.Tensor, device: torch.device
                      ) -> tuple[nn.Module, Any, torch.Tensor, dict]:
    from portrait3d.networks.eg3d.triplane import WTri

    cpath = folder / "code.npz"
    try:
        with np.load(cpath, allow_pickle=False) as d:
            code = WTri(*(torch.from_numpy(d[k]).float() for k in ("shared", "planes", "sr")))
    except (ValueError, OSError, EOFError, KeyError):
        raise UsageError(f"{cpath} is not a W_tri code written by portrait3d encode3d") from None
    G, _ = load_generator(str(rec["network"]), device)
    k = G.wtri_shared_rows
    if (tuple(code.shared.shape), tuple(code.planes.shape), tuple(code.sr.shape)) != \
            ((1, k, G.w_dim), (1, 3, 3, G.w_dim), (1, G.w_dim)):
        raise UsageError(f"{cpath} does not fit the generator {rec['network']}")
    return G, code.to(device), label[None], rec


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
        frames, _ = render_views(G, ws, orbit_cameras_at(base, orbit_frames), progress=progress, desc="orbit video")
        written.append(write_mp4(frames, folder / "render_orbit.mp4", fps=fps, overwrite=force))
    return written

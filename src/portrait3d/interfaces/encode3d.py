"""``portrait3d encode3d``: a photo -> an EG3D code in one encoder pass (the W_tri encoder of Oh & Jo), with the
views, depth, mesh and video of ``invert3d``.

Writes into one folder the files of ``invert3d`` (:mod:`portrait3d.interfaces.invert3d`): ``input_aligned.png``,
``reconstruction.png``, ``view_yaw-30.png``, ``view_yaw+30.png``, ``depth.png``, ``mesh.ply``, ``orbit.mp4`` and
``result.json`` (stage timings, camera, PSNR, identity), and instead of ``latent.npy`` the code:

* ``code.npz``: a W_tri code (``shared``, ``planes``, ``sr``; :class:`~portrait3d.networks.eg3d.triplane.WTri`),
  or, with ``--refine``, ``latent.npy``: the W+ latent the Ko et al. optimiser refined from it (and, with
  ``--pti``, ``generator.safetensors``).

The camera is the face pipeline's (no camera search: the encoder is trained on those cameras). ``--refine``
starts the optimiser at the encoder's code: its W+ rows, with the three planes' rows averaged (the optimiser
searches W+, where the planes share their rows), and the face pipeline's camera.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from portrait3d.errors import UsageError
from portrait3d.utils.io import atomic_write, jsonable, write_json, write_npy

__all__ = ["OUTPUTS", "WTRI_MODELS", "code_to_ws", "default_encoder_path", "encode_photo", "load_wtri_encoder",
           "run_encode3d", "start_encoder"]

WTRI_MODELS = Path(__file__).resolve().parents[1] / "models" / "wtri"
OUTPUTS = ("input_aligned.png", "reconstruction.png", "view_yaw-30.png", "view_yaw+30.png", "depth.png",
           "mesh.ply", "orbit.mp4", "result.json")


def default_encoder_path(network: str) -> Path:
    """Where the shipped encoder of a built-in network lives (``models/wtri/<network>.safetensors``)."""
    return WTRI_MODELS / f"{network}.safetensors"


def _resolve_encoder(network: str, encoder_path: Path | None) -> Path:
    if encoder_path is not None:
        if not Path(encoder_path).is_file():
            raise FileNotFoundError(f"{encoder_path}: no such encoder file")
        return Path(encoder_path)
    path = default_encoder_path(network)
    if not path.is_file():
        raise UsageError(f"no W_tri encoder ships for {network}; train one (portrait3d train wtri --network "
                         f"{network} ...) and pass --encoder")
    return path


def start_encoder(spec: str, G: Any, device: torch.device | str = "cpu") -> Any:
    """The frozen start encoder of a bootstrapped W_tri encoder (``--bootstrap``): ``spec`` a latent-encoder file
    (``portrait3d train encoder``), or a built-in network name for the encoder shipped with it. Returns it frozen,
    in eval mode: a module called as ``x [N, 3, H, W] -> ws [N, num_ws, w_dim]``.

    Raises:
        UsageError: ``spec`` is neither a file nor a built-in network with a shipped encoder, or its latents do
            not fit ``G``.
    """
    from portrait3d.methods.inversion3d.pipeline import builtin_init_paths, load_init_modules

    path = Path(spec).expanduser()
    if not path.is_file():
        shipped, _ = builtin_init_paths(spec)
        if shipped is None:
            raise UsageError(f"start encoder {spec!r}: neither a latent-encoder file nor a built-in network "
                             f"with a shipped encoder")
        path = shipped
    E, _ = load_init_modules(G, path, None, device)
    return E.eval().requires_grad_(False)


def load_wtri_encoder(path: Path, G: Any, network: str, device: torch.device | str = "cpu") -> Any:
    """The W_tri encoder at ``path``, in eval mode on ``device``, checked against the generator ``G`` (named
    ``network`` in the error: an encoder trained for another generator is refused with a UsageError), with its
    start encoder attached when it was trained bootstrapped (:func:`start_encoder`)."""
    from portrait3d.checkpoints.fingerprint import module_fingerprint
    from portrait3d.methods.wtri.encoder import WTriEncoder

    enc = WTriEncoder.load(path).eval().to(device)
    c = enc.config
    if (c.w_dim, c.num_ws, c.shared_rows) != (G.w_dim, G.num_ws, G.wtri_shared_rows):
        raise UsageError(f"{path} was trained for another generator (W+ {c.num_ws} x {c.w_dim}), not "
                         f"{network} ({G.num_ws} x {G.w_dim})")
    if c.bootstrap:
        start = start_encoder(c.bootstrap, G, device)
        if c.bootstrap_sha256 and module_fingerprint(start) != c.bootstrap_sha256:
            # still usable (a residual refinement of the new start codes), but not what it was trained with
            warnings.warn(f"{path} was trained from other weights of its start encoder {c.bootstrap!r} (changed "
                          f"since); retrain it from the current one", stacklevel=2)
        enc.set_start(start)
    return enc


def encode_photo(enc: Any, G: Any, target: torch.Tensor, camera: torch.Tensor) -> Any:
    """The encoder's last code for the aligned photo ``target [1, 3, R, R]`` seen from ``camera [1, 25]``, in bf16
    autocast on CPU as the encoder was trained (0.45 s per 128 px photo on 2 CPU threads, 0.51 s in fp32)."""
    dev = target.device
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cpu"):
        codes, _ = enc.invert(G, target, camera, keep_images=False, deterministic=True)  # codes only
    return codes[-1]  # float32: the residuals add to the float32 average code


def code_to_ws(code: Any) -> torch.Tensor:
    """W+ rows ``[N, num_ws, w_dim]`` of a W_tri code, the three planes' rows averaged (exact when they agree,
    e.g. for the W+ baseline encoder)."""
    last = code.planes.mean(1)                                  # [N, 3, w_dim]: conv0, conv1, ToRGB of the last block
    return torch.cat([code.shared[:, :-1], last], dim=1)


def run_encode3d(photo: Path, out: Path, network: str = "default-3d", encoder_path: Path | None = None,
                 face_index: int | None = None, align: str = "auto", refine: bool = False,
                 refine_steps: int | None = None, pti: bool = False, force: bool = False, orbit_frames: int = 48,
                 mesh_resolution: int = 128, fps: int = 24, device: str = "cpu",
                 progress: bool = True) -> dict[str, Any]:
    """Encode the face in ``photo`` and write the outputs of the module docstring into ``out``; returns the
    ``result.json`` record (with ``timings_s`` per stage).

    Raises:
        FileExistsError: outputs exist and ``force`` is False (checked before any work). FaceError: no face.
        UsageError / CheckpointError: no encoder for ``network``, an encoder for another generator.
    """
    from portrait3d.face.io import load_image
    from portrait3d.face.pipeline import FacePipeline, several_faces_note
    from portrait3d.interfaces.invert3d import PTI_GENERATOR, _check_outputs, write_renders
    from portrait3d.methods.inversion3d.pipeline import (
        NOVEL_YAWS,
        camera_record,
        identity_notes,
        load_generator,
        locate_face,
        make_inversion_config,
        render_outputs,
        resolve_align,
        to_tensor,
    )
    from portrait3d.metrics.psnr import psnr

    t_start = time.perf_counter()
    out, photo = Path(out), Path(photo)
    code_files = ("latent.npy",) + ((PTI_GENERATOR,) if pti else ()) if refine else ("code.npz",)
    if pti and not refine:
        raise UsageError("--pti tunes the generator after the optimiser: it needs --refine")
    _check_outputs(out, OUTPUTS + code_files, force, "encode3d")
    enc_path = _resolve_encoder(network, encoder_path)
    image = load_image(photo)
    times: dict[str, float] = {}
    dev = torch.device(device)

    t = time.perf_counter()
    G, network_ref = load_generator(network, dev)
    enc = load_wtri_encoder(enc_path, G, network, dev)
    times["load"] = time.perf_counter() - t
    res_px = int(G.img_resolution)
    align = resolve_align(align, network)
    with FacePipeline(style=align, output_size=res_px) as pipe:
        t = time.perf_counter()
        face, aligned, lm = locate_face(pipe, image, photo.name, face_index)
        camera = face.camera.reshape(1, 25).float().to(dev)
        target = to_tensor(aligned, dev)
        times["face"] = time.perf_counter() - t

        t = time.perf_counter()
        latent: Any = encode_photo(enc, G, target, camera)
        times["encode"] = time.perf_counter() - t
        G_out = G
        refined: dict[str, Any] | None = None
        if refine:
            from portrait3d.methods.inversion3d.optimize import invert

            t = time.perf_counter()
            cfg = make_inversion_config(1, refine_steps, pti, None, None, fast=True)
            res = invert(G, target, code_to_ws(latent), camera, cfg, landmarks=lm, progress=progress)
            G_out, latent = res.G.eval(), res.ws.detach()
            camera = res.camera.detach().reshape(1, 25).to(dev)
            refined = {"algorithm": res.algorithm, "steps": cfg.steps, "pti": pti,
                       "loss_history_tail": res.history[-10:]}
            times["refine"] = time.perf_counter() - t

        r = render_outputs(G_out, latent, camera, pipe, aligned, lm, orbit_frames, mesh_resolution, progress, times)
        notes = (several_faces_note(face, face_index, photo.name) + pipe.pose_notes(face, photo.name)
                 + identity_notes(r.identity))
    t = time.perf_counter()
    if force:  # result.json marks a complete run
        (out / "result.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_renders(out, aligned, r, fps, force)
    if refine:
        write_npy(out / "latent.npy", latent.cpu().float().numpy(), overwrite=force)
        if pti:
            from portrait3d.checkpoints.native import save_network

            save_network(G_out, out / PTI_GENERATOR, overwrite=force)
    else:
        parts = {k: v.cpu().float().numpy() for k, v in latent.tensors().items()}

        def write_npz(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to the temporary name
                np.savez(f, **parts)

        atomic_write(out / "code.npz", write_npz, overwrite=force)
    times["write"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_start
    record = {
        "photo": str(photo.resolve()), "faces_found": face.num_faces, "face_index": face_index,
        "network": network_ref, "encoder": str(enc_path.resolve()), "space": enc.config.space,
        "iterations": enc.config.iterations, "alignment": align, "image_resolution": res_px,
        "camera": camera_record(camera), "refined": refined, "generator": PTI_GENERATOR if pti else None,
        "novel_views": {n: {"yaw_deg": y} for n, y in zip(r.views, NOVEL_YAWS)},
        "psnr_db": psnr(r.reconstruction, aligned), "identity_cosine_dlib": r.identity, "mesh": r.mesh.summary(),
        "orbit": {"frames": int(len(r.orbit)), "fps": fps}, "timings_s": times, "notes": notes,
    }
    write_json(out / "result.json", record, overwrite=force)
    return jsonable(record)

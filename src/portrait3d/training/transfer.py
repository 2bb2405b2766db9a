"""Carry a training run to a lent accelerator and back, within its transfer limits.

A lent GPU machine receives the checkout plus at most 64 MiB of carried files, and returns at most
8 files of 16 MiB each. A full snapshot (fp32 networks plus Adam moments) and a full dataset do not
fit, so this module packs both compactly:

* ``pack-data``: ``N`` faces of a built dataset, evenly spaced, as JPEG bytes in one ``.npz`` (no pickle:
  one ``uint8`` byte array, offsets, ``float32`` cameras), about 5 KB a face at 128 px;
  ``unpack-data`` decodes it into a dataset folder that :class:`AlignedFaceDataset` reads.
* ``pack-snapshot``: G, G_ema and D of a StyleGAN2 or EG3D snapshot as float16 safetensors plus the run config
  and counters (JSON). The Adam moments are left behind: with ``beta1 = 0`` the first moment carries
  nothing, and the second re-estimates itself within ~100 steps (``beta2 = 0.99``).
  ``unpack-snapshot`` rebuilds a resumable snapshot folder with fresh optimisers, so a resumed run
  continues from the carried weights (not bit-exactly: the optimiser state and the float16 rounding
  differ).

* ``pack-teacher``: ``N`` latents of a teacher set (:mod:`portrait3d.training.teacher`) with all their views as
  JPEG bytes, cameras, latents and meshes (float16 pixels) in one ``.npz`` (about 21 KB a latent with two turned
  views); ``unpack-teacher`` writes a teacher-set folder back, so an EG3D run keeps its distillation on the device.

``scripts/device_train.sh`` strings these together on the device; the module docstring of that
script says how to call it.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from portrait3d.errors import UsageError

__all__ = ["TRAINERS", "pack_data", "unpack_data", "pack_snapshot", "pack_teacher", "unpack_snapshot",
           "unpack_teacher"]

_NETS = ("G", "G_ema", "D")


def pack_data(root: str | os.PathLike[str], out: str | os.PathLike[str], n: int, quality: int = 90) -> dict[str, Any]:
    """Write ``n`` faces of the built dataset ``root`` (evenly spaced) as JPEGs into ``out`` (``.npz``)."""
    from portrait3d.checkpoints.native import atomic_write

    root = Path(root)
    images = np.load(root / "images.npy", mmap_mode="r")
    labels = json.loads((root / "labels.json").read_text())["labels"]
    count = min(int(n), len(images))
    idx = np.linspace(0, len(images) - 1, count).round().astype(int)
    jpeg, offsets = _jpeg_blobs((images[i] for i in idx), quality)
    arrays = {"jpeg": jpeg, "offsets": offsets, "cameras": np.asarray([labels[i][1] for i in idx], np.float32),
              "resolution": np.array(images.shape[1])}
    atomic_write(Path(out), lambda tmp: np.savez(open(tmp, "wb"), **arrays), overwrite=True)
    return {"faces": count, "bytes": int(offsets[-1]), "quality": quality}


def _jpeg_blobs(images: Any, quality: int) -> tuple[np.ndarray, np.ndarray]:
    """``(bytes uint8, offsets int64 [n + 1])`` of ``uint8 [H, W, 3]`` images stored as JPEGs."""
    from PIL import Image

    blobs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(img)).save(buf, format="JPEG", quality=quality)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
    return np.concatenate(blobs), np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)


def _jpeg_images(jpeg: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(jpeg[a:b].tobytes())).convert("RGB"))
                     for a, b in zip(offsets[:-1], offsets[1:])])


def pack_teacher(root: str | os.PathLike[str], out: str | os.PathLike[str], n: int,
                 quality: int = 90) -> dict[str, Any]:
    """Write ``n`` latents of the teacher set ``root`` (evenly spaced), each with its turned views, into ``out``
    (``.npz``: JPEG bytes of every view, cameras, latents, meshes in float16)."""
    from portrait3d.checkpoints.native import atomic_write
    from portrait3d.training.teacher import TeacherSet

    t = TeacherSet.load(root)
    count = min(int(n), len(t))
    idx = np.linspace(0, len(t) - 1, count).round().astype(int)
    views = t.num_views
    frames = (np.asarray(t.images[i]) if v == 0 else np.asarray(t.view_images[i, v - 1])
              for i in idx for v in range(views))  # latent-major: [count * views]
    jpeg, offsets = _jpeg_blobs(frames, quality)
    arrays = {"jpeg": jpeg, "offsets": offsets, "views": np.array(views), "network": np.array(t.network),
              "cameras": t.cameras[idx].numpy(), "latents": t.latents[idx].numpy(),
              "mesh": t.mesh[idx].numpy().astype(np.float16)}
    if views > 1:
        arrays.update(view_cameras=t.view_cameras[idx].numpy(), view_mesh=t.view_mesh[idx].numpy().astype(np.float16))
    atomic_write(Path(out), lambda tmp: np.savez(open(tmp, "wb"), **arrays), overwrite=True)
    return {"latents": count, "views": views, "bytes": int(offsets[-1])}


def unpack_teacher(packed: str | os.PathLike[str], root: str | os.PathLike[str]) -> int:
    """Write a :func:`pack_teacher` file back as a teacher-set folder that :class:`TeacherSet` loads."""
    from portrait3d.utils.io import write_json, write_npy

    with np.load(packed, allow_pickle=False) as d:
        arrays = {k: d[k] for k in d.files}
    views = int(arrays["views"])
    frames = _jpeg_images(arrays["jpeg"], arrays["offsets"])
    frames = frames.reshape(-1, views, *frames.shape[1:])
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_npy(root / "images.npy", np.ascontiguousarray(frames[:, 0]), overwrite=True)
    write_npy(root / "latents.npy", arrays["latents"].astype(np.float32), overwrite=True)
    write_npy(root / "mesh.npy", arrays["mesh"].astype(np.float32), overwrite=True)
    if views > 1:
        write_npy(root / "view_images.npy", np.ascontiguousarray(frames[:, 1:]), overwrite=True)
        write_npy(root / "view_mesh.npy", arrays["view_mesh"].astype(np.float32), overwrite=True)
        write_npy(root / "view_cameras.npy", arrays["view_cameras"].astype(np.float32), overwrite=True)
    labels = [[f"{i:06d}.png", c.tolist()] for i, c in enumerate(arrays["cameras"])]
    write_json(root / "labels.json", {"labels": labels, "summary": {"network": str(arrays["network"]),
                                                                     "packed_from": str(packed)}}, overwrite=True)
    return len(frames)


def unpack_data(packed: str | os.PathLike[str], root: str | os.PathLike[str]) -> int:
    """Decode a :func:`pack_data` file into a dataset folder (``images.npy``, ``labels.json``)."""
    with np.load(packed, allow_pickle=False) as d:
        jpeg, offsets, cams = d["jpeg"], d["offsets"], d["cameras"]
    images = _jpeg_images(jpeg, offsets)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "images.npy", images)
    labels = [[f"{i:06d}.jpg", c.tolist()] for i, c in enumerate(cams)]
    (root / "labels.json").write_text(json.dumps({"labels": labels, "summary": {"packed_from": str(packed)}}))
    return len(images)


TRAINERS = ("stylegan2", "eg3d")
"""The trainers whose snapshots travel (both share :class:`~portrait3d.training.optim.Networks`)."""


def _trainer_of(snapshot: str | os.PathLike[str]) -> str:
    from portrait3d.training.snapshots import find_snapshot

    trainer = json.loads((find_snapshot(snapshot) / "state.json").read_text()).get("trainer")
    if trainer not in TRAINERS:
        raise UsageError(f"{snapshot}: only {' and '.join(TRAINERS)} snapshots can be packed, not {trainer!r}")
    return trainer


def _build(trainer: str, config: dict[str, Any]) -> tuple[Any, Any]:
    """``(config object, Networks on the CPU)`` of a packed run."""
    if trainer == "stylegan2":
        from portrait3d.training.stylegan2 import StyleGAN2TrainConfig, build_networks

        cfg = StyleGAN2TrainConfig.from_dict(config)
    elif trainer == "eg3d":
        from portrait3d.training.eg3d import EG3DTrainConfig, build_networks

        cfg = EG3DTrainConfig.from_dict(config)
    else:
        raise UsageError(f"only {' and '.join(TRAINERS)} runs can be unpacked, not {trainer!r}")
    return cfg, build_networks(cfg, torch.device("cpu"))


def pack_snapshot(snapshot: str | os.PathLike[str], out: str | os.PathLike[str]) -> list[Path]:
    """Write G, G_ema, D (float16) and ``run.json`` (trainer, config, counters) of a StyleGAN2 or EG3D snapshot
    into ``out``."""
    from safetensors.torch import save_file

    from portrait3d.training.snapshots import read_snapshot, state_with_prefix

    meta, tensors = read_snapshot(snapshot, _trainer_of(snapshot))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in _NETS:
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in state_with_prefix(tensors, name).items()}
        save_file(sd, str(out / f"{name}.safetensors"))
        written.append(out / f"{name}.safetensors")
    run = {k: meta[k] for k in ("trainer", "config", "step", "images_seen", "metrics")}
    run["source"] = meta["folder"]
    (out / "run.json").write_text(json.dumps(run))
    written.append(out / "run.json")
    return written


def unpack_snapshot(packed: str | os.PathLike[str], run_dir: str | os.PathLike[str]) -> Path:
    """Rebuild a resumable snapshot folder (StyleGAN2 or EG3D) in ``run_dir`` from :func:`pack_snapshot` output."""
    from safetensors.torch import load_file

    from portrait3d.checkpoints.native import save_network
    from portrait3d.checkpoints.state import load_state_strict
    from portrait3d.training.optim import Counters
    from portrait3d.training.snapshots import save_training_state

    packed = Path(packed)
    run = json.loads((packed / "run.json").read_text())
    cfg, nets = _build(run["trainer"], run["config"])
    for name in _NETS:
        stored = load_file(str(packed / f"{name}.safetensors"))
        sd = {k: v.float() if v.is_floating_point() else v for k, v in stored.items()}
        load_state_strict(getattr(nets, name), sd, f"packed {name}")
    counters = Counters(int(run["step"]), int(run["images_seen"]), list(run.get("metrics", [])))
    folder = Path(run_dir) / f"snapshot-{counters.step:08d}"
    return save_training_state(folder, run["trainer"], cfg.to_dict(), nets, counters,
                               {"G_ema.safetensors": lambda p: save_network(nets.G_ema, p, overwrite=True)})

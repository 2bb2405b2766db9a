"""Carry a training run to a lent accelerator and back, within its transfer limits.

A lent GPU machine receives the checkout plus at most 64 MiB of carried files, and returns at most
8 files of 16 MiB each. A full snapshot (fp32 networks plus Adam moments) and a full dataset do not
fit, so this module packs both compactly:

* ``pack-data``: ``N`` faces of a built dataset, evenly spaced, as JPEG bytes in one ``.npz`` (no pickle:
  one ``uint8`` byte array, offsets, ``float32`` cameras), about 5 KB a face at 128 px;
  ``unpack-data`` decodes it into a dataset folder that :class:`AlignedFaceDataset` reads.
* ``pack-snapshot``: G, G_ema and D of a snapshot as float16 safetensors plus the run config and
  counters (JSON). The Adam moments are left behind: with ``beta1 = 0`` the first moment carries
  nothing, and the second re-estimates itself within ~100 steps (``beta2 = 0.99``).
  ``unpack-snapshot`` rebuilds a resumable snapshot folder with fresh optimisers, so a resumed run
  continues from the carried weights (not bit-exactly: the optimiser state and the float16 rounding
  differ).

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

__all__ = ["pack_data", "unpack_data", "pack_snapshot", "unpack_snapshot"]

_NETS = ("G", "G_ema", "D")


def pack_data(root: str | os.PathLike[str], out: str | os.PathLike[str], n: int, quality: int = 90) -> dict[str, Any]:
    """Write ``n`` faces of the built dataset ``root`` (evenly spaced) as JPEGs into ``out`` (``.npz``)."""
    from PIL import Image

    from portrait3d.checkpoints.native import atomic_write

    root = Path(root)
    images = np.load(root / "images.npy", mmap_mode="r")
    labels = json.loads((root / "labels.json").read_text())["labels"]
    count = min(int(n), len(images))
    idx = np.linspace(0, len(images) - 1, count).round().astype(int)
    blobs, cams = [], []
    for i in idx:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(images[i])).save(buf, format="JPEG", quality=quality)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
        cams.append(labels[i][1])
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    arrays = {"jpeg": np.concatenate(blobs), "offsets": offsets, "cameras": np.asarray(cams, np.float32),
              "resolution": np.array(images.shape[1])}
    atomic_write(Path(out), lambda tmp: np.savez(open(tmp, "wb"), **arrays), overwrite=True)
    return {"faces": count, "bytes": int(offsets[-1]), "quality": quality}


def unpack_data(packed: str | os.PathLike[str], root: str | os.PathLike[str]) -> int:
    """Decode a :func:`pack_data` file into a dataset folder (``images.npy``, ``labels.json``)."""
    from PIL import Image

    with np.load(packed, allow_pickle=False) as d:
        jpeg, offsets, cams = d["jpeg"], d["offsets"], d["cameras"]
    images = np.stack([np.asarray(Image.open(io.BytesIO(jpeg[a:b].tobytes())).convert("RGB"))
                       for a, b in zip(offsets[:-1], offsets[1:])])
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "images.npy", images)
    labels = [[f"{i:06d}.jpg", c.tolist()] for i, c in enumerate(cams)]
    (root / "labels.json").write_text(json.dumps({"labels": labels, "summary": {"packed_from": str(packed)}}))
    return len(images)


def pack_snapshot(snapshot: str | os.PathLike[str], out: str | os.PathLike[str]) -> list[Path]:
    """Write G, G_ema, D (float16) and ``run.json`` (trainer, config, counters) of a snapshot into ``out``."""
    from safetensors.torch import save_file

    from portrait3d.training.snapshots import read_snapshot, state_with_prefix

    meta, tensors = read_snapshot(snapshot, "stylegan2")
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
    """Rebuild a resumable StyleGAN2 snapshot folder in ``run_dir`` from :func:`pack_snapshot` output."""
    from safetensors.torch import load_file

    from portrait3d.checkpoints.native import save_network
    from portrait3d.checkpoints.state import load_state_strict
    from portrait3d.training.optim import Counters
    from portrait3d.training.snapshots import save_training_state
    from portrait3d.training.stylegan2 import StyleGAN2TrainConfig, build_networks

    packed = Path(packed)
    run = json.loads((packed / "run.json").read_text())
    if run["trainer"] != "stylegan2":
        raise UsageError(f"only StyleGAN2 runs can be unpacked, not {run['trainer']!r}")
    cfg = StyleGAN2TrainConfig.from_dict(run["config"])
    nets = build_networks(cfg, torch.device("cpu"))
    for name in _NETS:
        sd = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(packed / f"{name}.safetensors")).items()}
        load_state_strict(getattr(nets, name), sd, f"packed {name}")
    counters = Counters(int(run["step"]), int(run["images_seen"]), list(run.get("metrics", [])))
    folder = Path(run_dir) / f"snapshot-{counters.step:08d}"
    return save_training_state(folder, "stylegan2", cfg.to_dict(), nets, counters,
                               {"G_ema.safetensors": lambda p: save_network(nets.G_ema, p, overwrite=True)})

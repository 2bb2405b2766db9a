"""Aligned-face datasets for training: built once from photos, cached as one uint8 array + JSON labels.

    portrait3d dataset build ../shared/data/utkface ~/.cache/portrait3d/utkface128

writes ``images.npy`` (``uint8 [N, R, R, 3]``, memory-mapped when read), ``labels.json``
(file names, EG3D 25-d cameras and head poses of the aligned crops, EG3D ``dataset.json``
layout under ``"labels"``) and ``failures.json`` (photos skipped and why). Photos are aligned
with :class:`portrait3d.face.pipeline.FacePipeline` (``style='default'``), the crop the
default models are trained on.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from portrait3d.errors import UsageError

__all__ = ["AlignedFaceDataset", "build_dataset"]


@dataclass
class _Paths:
    root: Path

    @property
    def images(self) -> Path:
        return self.root / "images.npy"

    @property
    def labels(self) -> Path:
        return self.root / "labels.json"


class AlignedFaceDataset(torch.utils.data.Dataset):
    """A built dataset. Items: ``(image float [3, R, R] in [-1, 1], camera float [25])``.

    Args:
        root: folder written by :func:`build_dataset`.
        mirror: also yield every face flipped left-right (camera mirrored too), doubling the set.
        limit: use only the first ``limit`` faces (tests, quick runs).
        resolution: serve the faces at this size, a power-of-two fraction of the stored size (box
            filter, i.e. the mean of each ``k x k`` block); None: the stored size.
    """

    def __init__(self, root: str | os.PathLike[str], mirror: bool = True, limit: int | None = None,
                 resolution: int | None = None) -> None:
        p = _Paths(Path(root))
        if not p.images.exists() or not p.labels.exists():
            raise FileNotFoundError(f"{root} is not a built dataset (no images.npy / labels.json)")
        self.images = np.load(p.images, mmap_mode="r")
        meta = json.loads(p.labels.read_text())
        self.names = [n for n, _ in meta["labels"]]
        self.cameras = torch.tensor([c for _, c in meta["labels"]], dtype=torch.float32)
        n = len(self.names) if limit is None else min(limit, len(self.names))
        self.count = n
        self.mirror = mirror
        self.stored_resolution = int(self.images.shape[1])
        self.resolution = resolution or self.stored_resolution
        factor = self.stored_resolution // self.resolution
        if self.resolution > self.stored_resolution or factor * self.resolution != self.stored_resolution \
                or factor & (factor - 1):
            raise UsageError(f"dataset images are {self.stored_resolution} px; {self.resolution} px is not a "
                             f"power-of-two fraction of that")
        self.factor = factor

    def __len__(self) -> int:
        return self.count * (2 if self.mirror else 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        flip = i >= self.count
        j = i - self.count if flip else i
        img = torch.from_numpy(np.array(self.images[j])).permute(2, 0, 1).float() / 127.5 - 1
        if self.factor > 1:
            img = torch.nn.functional.avg_pool2d(img[None], self.factor)[0]
        cam = self.cameras[j].clone()
        if flip:
            img = img.flip(-1)
            cam = mirror_camera(cam)
        return img, cam

    def all_images_uint8(self, limit: int | None = None) -> np.ndarray:
        """The first ``limit`` (default all) faces as ``uint8 [N, R, R, 3]`` (for FID statistics)."""
        return np.asarray(self.images[: self.count if limit is None else min(limit, self.count)])


def mirror_camera(c: torch.Tensor) -> torch.Tensor:
    """The EG3D label of the left-right mirrored image (as EG3D's dataset mirroring): negate the
    world-x row/column of the rotation and the x translation."""
    m = c[:16].view(4, 4).clone()
    flip = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0]))
    m = flip @ m @ torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0]))
    return torch.cat([m.reshape(16), c[16:]])


def _save_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.asarray(array))


def build_dataset(photos: list[Path], out: Path, resolution: int = 128, detector: str = "mediapipe") -> dict:
    """Align ``photos`` into ``out`` (see module docstring). Returns a summary dict."""
    from tqdm import tqdm

    from portrait3d.checkpoints.native import atomic_write
    from portrait3d.face.errors import FaceError
    from portrait3d.face.pipeline import FacePipeline

    if not 16 <= resolution <= 2048:
        raise UsageError(f"resolution must be between 16 and 2048 px, not {resolution}")
    out.mkdir(parents=True, exist_ok=True)
    need = len(photos) * resolution * resolution * 3
    free = shutil.disk_usage(out).free
    if need > free:
        raise UsageError(f"{out}: {len(photos)} faces at {resolution} px need {need / 2**30:.1f} GiB of disk, "
                         f"{free / 2**30:.1f} GiB are free")
    p = _Paths(out)
    # hidden while it fills, and gone after a kill on the next build: no half-built file is ever visible
    tmp_images = out / ".images.partial.npy"
    (out / "images.partial.npy").unlink(missing_ok=True)  # left by builds before the name was hidden
    arr = np.lib.format.open_memmap(tmp_images, mode="w+", dtype=np.uint8, shape=(len(photos), resolution, resolution, 3))
    labels, poses, failures = [], {}, {}
    n = 0
    with FacePipeline(style="default", output_size=resolution, detector=detector) as pipe:
        for photo in tqdm(photos, desc="aligning", unit="photo", smoothing=0.05):
            try:
                r = pipe(photo)
            except (FaceError, ValueError) as e:
                failures[photo.name] = str(e)
                continue
            arr[n] = r.aligned.image
            labels.append([photo.name, [float(v) for v in r.camera.tolist()]])
            poses[photo.name] = [r.pose.yaw_deg, r.pose.pitch_deg, r.pose.roll_deg]
            n += 1
    arr.flush()
    del arr
    # Keep only the filled rows, then publish atomically. The old labels go first: a kill between the two writes
    # leaves new images without labels (refused as "not a built dataset"), never a mismatched pair.
    full = np.load(tmp_images, mmap_mode="r")
    p.labels.unlink(missing_ok=True)
    atomic_write(p.images, functools.partial(_save_npy, array=full[:n]), overwrite=True)
    del full
    tmp_images.unlink()
    summary = {"photos": len(photos), "aligned": n, "failed": len(failures), "resolution": resolution,
               "style": "default", "detector": detector}
    atomic_write(p.labels, lambda tmp: Path(tmp).write_text(json.dumps({"labels": labels, "poses": poses,
                                                                        "summary": summary})), overwrite=True)
    atomic_write(out / "failures.json", lambda tmp: Path(tmp).write_text(json.dumps(failures, indent=1)),
                 overwrite=True)
    return summary

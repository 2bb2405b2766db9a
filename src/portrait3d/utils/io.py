"""Writing results: every file is written atomically (a reader never sees a half-written file) and an existing
file is replaced only when asked (``overwrite=True``, the commands' ``--force``).

JSON goes through :func:`jsonable`, so tensors, numpy values, paths and dataclasses can be written directly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from portrait3d.checkpoints.native import atomic_write
from portrait3d.errors import UsageError

__all__ = ["check_outputs", "atomic_write", "jsonable", "write_json", "write_npy", "write_text", "save_image"]


def check_outputs(out: str | os.PathLike[str], names: "tuple[str, ...] | list[str]", force: bool) -> None:
    """Refuse before any work when folder ``out`` already holds one of ``names`` and ``force`` is off.

    Raises:
        FileExistsError: ``out`` is a file, or an output exists without ``force``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    clash = [n for n in names if (out / n).exists()]
    if clash and not force:
        more = f" (and {len(clash) - 1} more)" if len(clash) > 1 else ""
        raise FileExistsError(f"{out / clash[0]} already exists{more} (pass --force to overwrite)")


def jsonable(x: Any) -> Any:
    """Plain JSON types from tensors, numpy values, paths, dataclasses; non-finite floats -> None.

    Dict keys become strings, tuples lists; anything else unknown becomes its ``repr``.
    """
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        x = x.to_dict() if hasattr(x, "to_dict") else dataclasses.asdict(x)
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


def write_text(path: str | os.PathLike[str], text: str, *, overwrite: bool = False) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=overwrite)


def write_json(path: str | os.PathLike[str], obj: Any, *, overwrite: bool = False, indent: int | None = 1) -> Path:
    """Write ``obj`` (through :func:`jsonable`) as JSON, newline-terminated, atomically."""
    return write_text(path, json.dumps(jsonable(obj), indent=indent) + "\n", overwrite=overwrite)


def write_npy(path: str | os.PathLike[str], arr: np.ndarray, *, overwrite: bool = False) -> Path:
    """Write a numpy array as ``.npy`` atomically (no pickled objects)."""
    arr = np.asarray(arr)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
            np.save(f, arr, allow_pickle=False)

    return atomic_write(path, write, overwrite=overwrite)


def save_image(
    path: str | os.PathLike[str],
    image: np.ndarray,
    *,
    overwrite: bool = False,
    quality: int = 95,
) -> Path:
    """Write an image atomically (a reader never sees a half-written file).

    Args:
        path: destination; the format follows its extension (``.png``, ``.jpg``, ``.webp``...).
        image: ``uint8`` array ``[H, W, 3]`` (RGB), ``[H, W, 4]`` (RGBA) or ``[H, W]`` (grey).
        overwrite: replace an existing file (else :class:`FileExistsError`).
        quality: JPEG / WebP quality (ignored by lossless formats).

    Returns:
        The written path.
    """
    path = Path(path)
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise UsageError(f"save_image expects uint8 pixels, got {arr.dtype}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise UsageError(f"save_image expects [H, W], [H, W, 3] or [H, W, 4], got {arr.shape}")
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"{path.name}: unknown image extension {path.suffix!r}")
    im = Image.fromarray(np.ascontiguousarray(arr))
    kwargs: dict[str, object] = {}
    if fmt in ("JPEG", "WEBP"):
        kwargs["quality"] = quality
        if fmt == "JPEG" and im.mode == "RGBA":
            im = im.convert("RGB")

    def write(tmp: str) -> None:
        im.save(tmp, format=fmt, **kwargs)

    return atomic_write(path, write, overwrite=overwrite)

"""Sample grids (:func:`save_grid`) and the progress bar with its JSON-lines log (:class:`Progress`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from portrait3d.training.distributed import DistInfo

__all__ = ["save_grid", "Progress"]


def save_grid(path: str | os.PathLike[str], images: torch.Tensor, cols: int | None = None) -> Path:
    """Write ``images [N, 3, H, W]`` in ``[-1, 1]`` as one PNG grid."""
    from portrait3d.face.io import save_image
    from portrait3d.utils.visualize import make_grid, to_uint8

    arr = images if isinstance(images, np.ndarray) else to_uint8(images)
    cols = cols or max(1, int(math.ceil(math.sqrt(len(arr)))))
    return save_image(path, make_grid(arr, cols), overwrite=True)


class Progress:
    """Rank-0 tqdm bar (postfix = current losses) and a JSON-lines log (``log.jsonl``)."""

    def __init__(self, info: DistInfo, total: int, initial: int, log_path: Path | None, enabled: bool = True) -> None:
        self.info = info
        self.log_path = log_path if info.is_main else None
        self.bar = None
        if info.is_main and enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="img", unit_scale=True, dynamic_ncols=True,
                            smoothing=0.1)

    def update(self, n: int, record: dict[str, Any]) -> None:
        if self.bar is not None:
            shown = {k: f"{v:.3g}" for k, v in record.items() if k not in ("step", "kimg", "sec")}
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(n)
        self.log(record)

    def log(self, record: dict[str, Any]) -> None:
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def write(self, msg: str) -> None:
        if not self.info.is_main:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

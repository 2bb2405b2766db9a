"""A content fingerprint of a network's weights, for caches and for models trained on top of another model."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

__all__ = ["module_fingerprint"]


def module_fingerprint(module: nn.Module) -> str:
    """SHA-256 (hex) of ``module``'s parameters and buffers: names, shapes and float32 values, in name order.

    Values are cast to float32 first, so an fp16 file loaded into float32 and the same weights cast back agree; a
    retrained or otherwise changed network gives another fingerprint.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        v = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(v.shape)};".encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()

"""``load_network``: one entry point for every generator checkpoint format we read.

Formats are recognised by content, not by file name:

* NVIDIA network pickles (StyleGAN2-ADA, stylegan3-repo StyleGAN2, EG3D) — read with the
  restricted unpickler (:mod:`.safe_pickle`), never executing their embedded source;
* rosinality ``.pt`` files (``torch.save`` zip or legacy) — read with ``torch.load(weights_only=True)``;
* our ``.safetensors`` + JSON config (:mod:`.native`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from torch import nn

from portrait3d.checkpoints.native import is_native_file, load_native
from portrait3d.checkpoints.nvidia import network_from_stub
from portrait3d.checkpoints.safe_pickle import CheckpointError, safe_load_pickle

__all__ = ["load_network", "BUILTIN_NETWORKS", "builtin_network_path"]

# Networks shipped inside the package: name -> path relative to the package (each folder has a
# MODEL_CARD.md saying how it was trained and how well it does).
BUILTIN_NETWORKS: dict[str, str] = {
    "default-2d": "models/default-2d/generator.safetensors",
    "default-3d": "models/default-3d/generator.safetensors",
}

_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_MAX_BYTES = 8 << 30  # 8 GiB: no generator checkpoint is larger; refuse to slurp anything bigger


def builtin_network_path(name: str | os.PathLike[str]) -> Path | None:
    """The generator file of a built-in network name (whether or not it is installed), ``None`` for other names.
    Files shipped with a built-in network (its editors, lifting, encoders) lie in the same folder."""
    name = str(name)
    return Path(__file__).resolve().parent.parent / BUILTIN_NETWORKS[name] if name in BUILTIN_NETWORKS else None


def _resolve(path: str | os.PathLike[str]) -> Path:
    name = str(path)
    builtin = builtin_network_path(name)
    if builtin is not None:
        return builtin
    p = Path(name).expanduser()
    if not p.exists():
        raise CheckpointError(f"no such checkpoint: {name}")
    if p.is_dir():
        raise CheckpointError(f"{name} is a directory, not a checkpoint file")
    return p


def _load_torch_file(data: bytes) -> nn.Module:
    from portrait3d.checkpoints.rosinality import generator_from_rosinality_file_object

    return generator_from_rosinality_file_object(io.BytesIO(data))


def load_network(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> nn.Module:
    """Load the generator (``G_ema``) stored at ``path`` as an eval-mode ``nn.Module`` on ``device``.

    Args:
        path: a checkpoint file (NVIDIA pickle, rosinality ``.pt``, or our ``.safetensors``) or the
            name of a network shipped with portrait3d.
        device: where to put the network.
    Returns:
        :class:`portrait3d.networks.stylegan2.Generator` or
        :class:`portrait3d.networks.eg3d.triplane.TriPlaneGenerator`, with ``requires_grad`` off.
    Raises:
        CheckpointError: unreadable, unsafe, corrupt or unsupported checkpoint (one-line message).
    """
    p = _resolve(path)
    size = p.stat().st_size
    if size == 0:
        raise CheckpointError(f"{p.name} is empty")
    if size > _MAX_BYTES:
        raise CheckpointError(f"{p.name} is too large to be a generator checkpoint ({size >> 20} MiB)")
    with open(p, "rb") as f:
        head = f.read(16)
    if is_native_file(head):
        net = load_native(p)
    else:
        data = p.read_bytes()
        if data[:2] == b"PK":
            net = _load_torch_file(data)
        elif data[:1] == b"\x80":
            obj = safe_load_pickle(data)
            if obj == _TORCH_LEGACY_MAGIC:
                net = _load_torch_file(data)
            elif isinstance(obj, dict) and "G_ema" in obj:
                net = network_from_stub(obj["G_ema"])
            elif isinstance(obj, dict):
                raise CheckpointError(f"{p.name} is a pickle without a 'G_ema' generator "
                                      f"(keys: {', '.join(map(str, list(obj)[:6]))})")
            else:
                raise CheckpointError(f"{p.name} is a pickle of a {type(obj).__name__}, not a network checkpoint")
        else:
            raise CheckpointError(f"{p.name} is not a checkpoint portrait3d can read (expected an NVIDIA .pkl, "
                                  "a rosinality .pt or a portrait3d .safetensors)")
    return net.to(device)


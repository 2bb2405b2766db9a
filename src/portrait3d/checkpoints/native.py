"""portrait3d's own network format: one ``.safetensors`` file whose metadata holds the JSON config.

safetensors stores raw tensors and a JSON header only, so reading it can never
execute code. The header's ``__metadata__`` carries::

    {"format": "portrait3d-network", "format_version": "1",
     "architecture": "stylegan2" | "eg3d", "config": "<JSON of the typed config dataclass>",
     "extra": "<JSON of renderer constants, e.g. EG3D plane axes>"}
"""

from __future__ import annotations

import json
import os
import tempfile
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

import torch
from torch import nn

from portrait3d.checkpoints.safe_pickle import CheckpointError

__all__ = ["FORMAT", "save_network", "load_native", "is_native_file", "atomic_write", "writer_is_gone",
           "read_safetensors_with_metadata",
           "save_config_module", "load_config_module"]

FORMAT = "portrait3d-network"
FORMAT_VERSION = "1"


def _architecture(net: nn.Module) -> tuple[str, dict[str, Any]]:
    from portrait3d.networks.eg3d.triplane import TriPlaneGenerator
    from portrait3d.networks.stylegan2 import Generator

    if isinstance(net, TriPlaneGenerator):
        return "eg3d", net.config.to_dict()
    if isinstance(net, Generator):
        return "stylegan2", net.config.to_dict()
    raise TypeError(f"cannot save a {type(net).__name__}: only StyleGAN2 and EG3D generators are supported")


def writer_is_gone(pid: str) -> bool:
    """True when ``pid`` (the digits a temporary name carries) names no running process other than this one, so
    what that writer left behind can be deleted; a name that is not a PID, or another user's live process, is
    never judged gone."""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporary files of ``path`` left by a writer that was killed (``.NAME.PID.XXXX.tmp`` whose process no
    longer runs), so a rerun leaves a clean folder."""
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        if writer_is_gone(tmp.name[len(path.name) + 2:].split(".", 1)[0]):
            tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike[str], write: Any, overwrite: bool = False) -> Path:
    """Call ``write(tmp_path)`` then move the file into place, so ``path`` is never half-written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass --force to overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # mkstemp creates 0600, and some writers (safetensors' save_file) recreate the file 0600 themselves:
        # give the finished file ordinary permissions, as any other output
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_safetensors_with_metadata(path: str | os.PathLike[str], expected_format: str, format_version: str,
                                   foreign: str, version_label: str = "format version"
                                   ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file whose ``__metadata__`` names ``expected_format``.

    Only tensors and the JSON header are read, never code.

    Raises:
        CheckpointError: one line, prefixed with the file name: ``not a readable safetensors file (...)``;
            ``foreign`` (the ``format`` entry is not ``expected_format``); ``unsupported {version_label} ...``
            (the ``format_version`` entry is not ``format_version``).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{p.name}: not a readable safetensors file ({msg})") from None
    if meta.get("format") != expected_format:
        raise CheckpointError(f"{p.name}: {foreign}")
    if meta.get("format_version") != format_version:
        raise CheckpointError(f"{p.name}: unsupported {version_label} {meta.get('format_version')!r}")
    return tensors, meta


def save_config_module(module: nn.Module, path: str | os.PathLike[str], file_format: str, overwrite: bool = False,
                       half: bool = False, meta: dict[str, Any] | None = None) -> Path:
    """Write a module whose ``config`` is a :class:`~portrait3d.config.ConfigMixin` dataclass (a method's network:
    an estimator, a RigNet, an encoder, a face model) as safetensors, the config as JSON in the metadata.
    ``half`` stores floating tensors in float16 (shipped weights); :func:`load_config_module` reads them back."""
    from safetensors.torch import save_file

    tensors = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in module.state_dict().items()}
    info = {"format": file_format, "format_version": "1", "config": json.dumps(module.config.to_dict()),
            "meta": json.dumps(meta or {})}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=info), overwrite=overwrite)


def load_config_module(path: str | os.PathLike[str], build: Any, config_type: Any, file_format: str,
                       what: str) -> Any:
    """Read a file written by :func:`save_config_module`: ``build(config_type.from_dict(config))`` loaded with its
    tensors (as float32; integer buffers as stored), in eval mode. Every failure is a one-line
    :class:`CheckpointError` naming ``what``; no code is executed."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no {what} file at {p}")
    tensors, info = read_safetensors_with_metadata(p, file_format, "1", f"not a {what}")
    try:
        module = build(config_type.from_dict(json.loads(info["config"])))
        own = module.state_dict()
        module.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in tensors.items()}, strict=True)
    except (KeyError, RuntimeError, ValueError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p.name}: corrupt {what} ({str(e).strip().splitlines()[0][:120]})") from None
    return module.eval()


def save_network(net: nn.Module, path: str | os.PathLike[str], overwrite: bool = False,
                 storage_dtype: torch.dtype | None = None) -> Path:
    """Write ``net`` (StyleGAN2 ``Generator`` or EG3D ``TriPlaneGenerator``) in our format, atomically.

    ``storage_dtype=torch.float16`` stores the floating-point tensors in half precision (shipped models:
    half the size); :func:`load_native` always returns float32 parameters.
    """
    from safetensors.torch import save_file

    arch, config = _architecture(net)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    if storage_dtype is not None:
        tensors = {k: v.to(storage_dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    extra: dict[str, Any] = {}
    if arch == "eg3d":
        extra["plane_axes"] = net.renderer.plane_axes.tolist()
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": arch,
            "config": json.dumps(config), "extra": json.dumps(extra)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), overwrite=overwrite)


def is_native_file(head: bytes) -> bool:
    """Whether the first bytes look like a safetensors file (8-byte header length, then ``{``)."""
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n < 100_000_000 and head[8:9] == b"{"


def load_native(path: str | os.PathLike[str]) -> nn.Module:
    """Load a network written by :func:`save_network` (eval mode, no grad)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt safetensors file ({str(e)[:100]})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError("safetensors file is not a portrait3d network (no portrait3d metadata)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"unsupported portrait3d network format version {meta.get('format_version')!r}")
    try:
        config = json.loads(meta["config"])
        extra = json.loads(meta.get("extra", "{}"))
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError("portrait3d network has an unreadable config") from None
    arch = meta.get("architecture")
    try:
        if arch == "stylegan2":
            from portrait3d.networks.stylegan2 import Generator, StyleGAN2Config

            net: nn.Module = Generator(StyleGAN2Config.from_dict(config))
        elif arch == "eg3d":
            from portrait3d.networks.eg3d.triplane import EG3DConfig, TriPlaneGenerator

            net = TriPlaneGenerator(EG3DConfig.from_dict(config))
        else:
            raise CheckpointError(f"unknown architecture {arch!r} in portrait3d network")
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"portrait3d network config does not describe a valid {arch} network: {e}") from None
    from portrait3d.checkpoints.state import load_state_strict

    load_state_strict(net, state, f"{arch} network")
    if arch == "eg3d" and "plane_axes" in extra:
        net.renderer.plane_axes.copy_(torch.tensor(extra["plane_axes"], dtype=torch.float32))
    return net.eval().requires_grad_(False)

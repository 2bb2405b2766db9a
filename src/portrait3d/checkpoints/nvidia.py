"""Map NVIDIA network pickles (StyleGAN2-ADA, stylegan3-repo StyleGAN2, EG3D) onto our classes.

The pickle is read by :func:`portrait3d.checkpoints.safe_pickle.safe_load_pickle`
into inert stubs; here we read each stub's constructor arguments
(``_init_kwargs``), build the equivalent network from our own code, and load the
parameters and buffers with ``strict=True`` so any architectural mismatch is an
error rather than a silently wrong network.
"""

from __future__ import annotations

from typing import Any, BinaryIO

import torch
from torch import nn

from portrait3d.checkpoints.safe_pickle import CheckpointError, PersistentStub, PlainStub, safe_load_pickle
from portrait3d.checkpoints.state import load_state_strict
from portrait3d.networks.stylegan2 import Generator, MappingConfig, StyleGAN2Config, SynthesisConfig

__all__ = ["load_nvidia_pickle", "stub_state_dict", "stub_child", "stub_init_kwargs", "network_from_stub",
           "stylegan2_config_from_stub", "triplane_from_stub"]

_GENERATOR_ARGS = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels")
_MAPPING_KEYS = {f for f in MappingConfig.__dataclass_fields__}
_SYNTHESIS_KEYS = {f for f in SynthesisConfig.__dataclass_fields__}


def stub_state_dict(stub: PersistentStub | PlainStub, prefix: str = "") -> dict[str, torch.Tensor]:
    """Collect parameters and persistent buffers of a stub tree under dotted names (as ``state_dict``)."""
    state = stub.state
    out: dict[str, torch.Tensor] = {}
    for name, p in (state.get("_parameters") or {}).items():
        if p is not None:
            out[prefix + name] = _as_tensor(p, prefix + name)
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for name, b in (state.get("_buffers") or {}).items():
        if b is not None and name not in non_persistent:
            out[prefix + name] = _as_tensor(b, prefix + name)
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, (PersistentStub, PlainStub)):
            out.update(stub_state_dict(child, prefix + name + "."))
        elif child is not None:
            raise CheckpointError(f"unexpected object at '{prefix + name}' in the network pickle")
    return out


def _as_tensor(t: Any, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"'{name}' in the network pickle is not a tensor")
    return t.detach()


def stub_child(stub: PersistentStub | PlainStub, name: str) -> Any:
    child = (stub.state.get("_modules") or {}).get(name)
    if child is None:
        raise CheckpointError(f"{stub.class_name} in the pickle has no '{name}' sub-network")
    return child


def stub_init_kwargs(stub: PersistentStub, positional: tuple[str, ...] = ()) -> dict[str, Any]:
    """Constructor arguments recorded by NVIDIA's persistence module, positional ones named."""
    kwargs = stub.state.get("_init_kwargs")
    args = tuple(stub.state.get("_init_args") or ())
    if not isinstance(kwargs, dict) or len(args) > len(positional):
        raise CheckpointError(f"{stub.class_name} in the pickle lacks readable constructor arguments")
    out = dict(zip(positional, args))
    out.update(kwargs)
    return out


def _split_known(kwargs: dict[str, Any], known: set[str], what: str) -> dict[str, Any]:
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise CheckpointError(f"unsupported {what} option(s) in the checkpoint: {', '.join(unknown)}")
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}


def stylegan2_config_from_stub(stub: PersistentStub) -> StyleGAN2Config:
    """Our :class:`StyleGAN2Config` from an official ``Generator`` stub (ADA or stylegan3-repo flavour)."""
    kw = stub_init_kwargs(stub, _GENERATOR_ARGS)
    mapping_kwargs = dict(kw.pop("mapping_kwargs", {}) or {})
    synthesis_kwargs = dict(kw.pop("synthesis_kwargs", {}) or {})  # ADA nests them ...
    for key in list(kw):  # ... the stylegan3/EG3D code passes them flat
        if key not in ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels"):
            synthesis_kwargs[key] = kw.pop(key)
    mapping = stub_child(stub, "mapping")
    # The default w_avg_beta differs between code bases (0.995 ADA, 0.998 stylegan3); read the real one.
    mapping_kwargs.setdefault("w_avg_beta", mapping.state.get("w_avg_beta", 0.995))
    if "synthesis_kwargs" not in stub.state["_init_kwargs"] and "fused_modconv_default" not in synthesis_kwargs:
        synthesis_kwargs["fused_modconv_default"] = True
    try:
        return StyleGAN2Config(
            z_dim=int(kw.pop("z_dim")), c_dim=int(kw.pop("c_dim")), w_dim=int(kw.pop("w_dim")),
            img_resolution=int(kw.pop("img_resolution")), img_channels=int(kw.pop("img_channels")),
            mapping=MappingConfig(**_split_known(mapping_kwargs, _MAPPING_KEYS, "mapping network")),
            synthesis=SynthesisConfig(**_split_known(synthesis_kwargs, _SYNTHESIS_KEYS, "synthesis network")),
        )
    except KeyError as e:
        raise CheckpointError(f"Generator in the pickle lacks the constructor argument {e}") from None


def network_from_stub(stub: Any) -> nn.Module:
    """Build and load our network for a persistent stub (``Generator`` or ``TriPlaneGenerator``)."""
    if not isinstance(stub, PersistentStub):
        raise CheckpointError("the pickle's generator entry is not a network saved by NVIDIA's persistence module")
    if stub.class_name == "Generator":
        if "synthesis" not in (stub.state.get("_modules") or {}) or "mapping" not in stub.state["_modules"]:
            raise CheckpointError("unsupported Generator: expected StyleGAN2 mapping + synthesis networks")
        syn = stub_child(stub, "synthesis")
        if not isinstance(syn, PersistentStub) or syn.class_name != "SynthesisNetwork" or "b4" not in syn.state.get(
                "_modules", {}):
            raise CheckpointError("unsupported Generator (StyleGAN3 and other non-StyleGAN2 synthesis networks "
                                  "are not supported)")
        net: nn.Module = Generator(stylegan2_config_from_stub(stub))
        load_state_strict(net, stub_state_dict(stub), "StyleGAN2 generator")
        return net.eval().requires_grad_(False)
    if stub.class_name == "TriPlaneGenerator":
        return triplane_from_stub(stub)
    raise CheckpointError(f"network class '{stub.class_name}' is not supported "
                          "(StyleGAN2, StyleGAN2-ADA and EG3D TriPlaneGenerator are)")


def triplane_from_stub(stub: PersistentStub) -> nn.Module:
    """Build our :class:`TriPlaneGenerator` from an official pickle's ``TriPlaneGenerator`` stub."""
    from portrait3d.networks.eg3d.triplane import (  # heavy: only when needed
        EG3DConfig,
        RenderingConfig,
        TriPlaneGenerator,
    )

    kw = stub_init_kwargs(stub, ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels"))
    rendering = dict(stub.state.get("rendering_kwargs") or kw.get("rendering_kwargs") or {})
    if not rendering:
        raise CheckpointError("TriPlaneGenerator in the pickle has no rendering_kwargs")
    backbone = stub_child(stub, "backbone")
    bb_cfg = stylegan2_config_from_stub(backbone)
    sr_kwargs = dict(kw.get("sr_kwargs") or {})
    sr_fused = sr_kwargs.pop("fused_modconv_default", True)
    sr_kwargs.pop("channel_base", None)  # ignored by the official SR modules as well
    sr_kwargs.pop("channel_max", None)
    if sr_kwargs:
        raise CheckpointError(f"unsupported super-resolution option(s): {', '.join(sorted(sr_kwargs))}")
    nrr = stub.state.get("neural_rendering_resolution", 64)
    try:
        cfg = EG3DConfig(
            z_dim=int(kw["z_dim"]), c_dim=int(kw["c_dim"]), w_dim=int(kw["w_dim"]),
            img_resolution=int(kw["img_resolution"]), img_channels=int(kw["img_channels"]),
            neural_rendering_resolution=int(nrr), sr_num_fp16_res=int(kw.get("sr_num_fp16_res", 0)),
            mapping=bb_cfg.mapping, backbone=bb_cfg.synthesis, sr_fused_modconv_default=sr_fused,
            rendering=RenderingConfig.from_kwargs(rendering),
            plane_channels=bb_cfg.img_channels // 3, plane_resolution=bb_cfg.img_resolution)
        net = TriPlaneGenerator(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"unsupported EG3D configuration in the pickle: {e}") from None
    load_state_strict(net, stub_state_dict(stub), "EG3D generator")
    axes = stub_child(stub, "renderer").state.get("plane_axes")
    if isinstance(axes, torch.Tensor):
        if axes.shape != net.renderer.plane_axes.shape:
            raise CheckpointError("EG3D renderer plane axes have an unexpected shape")
        net.renderer.plane_axes.copy_(axes)
    return net.eval().requires_grad_(False)


def load_nvidia_pickle(f: BinaryIO | bytes, key: str = "G_ema") -> nn.Module:
    """Load ``key`` (default ``'G_ema'``) of an NVIDIA network pickle as our ``nn.Module``, in eval mode."""
    data = safe_load_pickle(f)
    if not isinstance(data, dict):
        raise CheckpointError("not an NVIDIA network pickle (expected a dict with 'G_ema')")
    if key not in data or data[key] is None:
        raise CheckpointError(f"the network pickle has no '{key}' entry (keys: {', '.join(map(str, data))})")
    return network_from_stub(data[key])

"""The fast training path: bf16 autocast (AMX on CPU), channels_last, ``torch.compile``.

What it changes and what it keeps:

* **Arithmetic.** Convolutions and matmuls run in bfloat16 under :func:`torch.autocast` (on a CPU with
  AMX-BF16 a channels_last bf16 3x3 convolution is ~10x faster than float32). Parameters,
  optimiser state and every loss reduction stay float32: :func:`fp32` casts logits before the loss.
* **Layout.** ``channels_last`` puts the 4-D weights (and so the activations that convolutions
  produce) in NHWC, the layout oneDNN's bf16 kernels want.
* **Fusion.** In bf16 the elementwise ops around each convolution (modulation, demodulation, noise,
  bias, lrelu, clamp) take more time than the convolution. :func:`maybe_compile` hands a module to
  ``torch.compile`` (Inductor, C++ backend), which fuses them. Randomness never sits inside a
  compiled graph: the trainers draw noise and augmentation parameters outside and pass them in, so
  a compiled run draws exactly the numbers an eager run draws.

Double backward (R1, path length) is not supported by compiled graphs; those lazy regularisers run
the eager module in float32 (:meth:`FastPath.regulariser_context`). Resume is bit-exact within one
setting of the path (it is stored in the run config), not across settings.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import nn

__all__ = ["FastPath", "PRECISIONS", "fp32", "maybe_compile", "to_channels_last"]

PRECISIONS = ("fp32", "bf16")
M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class FastPath:
    """How a trainer runs its networks.

    Args:
        precision: ``'fp32'`` (reference) or ``'bf16'`` (autocast; AMX on CPU, tensor cores on CUDA).
        channels_last: NHWC weights and activations.
        compile: ``torch.compile`` the generator's synthesis network.
        compile_d: ``torch.compile`` the discriminator as well. Off by default: measured here, the
            compiled projected discriminator (depthwise convolutions) ran 2x slower than eager bf16.
    """

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    compile_d: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")

    @classmethod
    def fast(cls) -> "FastPath":
        """bf16 + channels_last + compile: the CPU training default."""
        return cls("bf16", True, True, False)

    @property
    def is_reference(self) -> bool:
        return self.precision == "fp32" and not self.channels_last and not self.compile and not self.compile_d

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of a forward pass (a no-op in fp32)."""
        if self.precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def regulariser_context(self, device: torch.device) -> Iterator[None]:
        """Double-backward regularisers run in float32 eager mode (autocast explicitly off)."""
        with torch.autocast(device_type=device.type, enabled=False):
            yield

    def prepare(self, module: M) -> M:
        """Put ``module``'s weights in the path's memory format (in place); returns it."""
        if self.channels_last:
            to_channels_last(module)
        return module

    def wrap_G(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """The generator's ``fn`` compiled when the path compiles the generator, else ``fn``."""
        return maybe_compile(fn, self.compile)

    def wrap_D(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """The discriminator's ``fn`` compiled when the path compiles the discriminator, else ``fn``."""
        return maybe_compile(fn, self.compile_d)


def to_channels_last(module: nn.Module) -> nn.Module:
    """Store every 4-D parameter and buffer of ``module`` in channels_last (values unchanged)."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.ndim == 4:
                t.data = t.data.contiguous(memory_format=torch.channels_last)
    return module


def maybe_compile(fn: Callable[..., Any], enabled: bool = True) -> Callable[..., Any]:
    """``torch.compile(fn)`` with static shapes (each resolution its own graph), or ``fn`` itself."""
    if not enabled:
        return fn
    return torch.compile(fn, dynamic=False)


def fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32 (losses and their reductions are always float32)."""
    return x.float()

"""Optimisation pieces: EMA (:func:`ema_beta`, :func:`ema_update`), lazy-regularisation Adam (:func:`lazy_adam`), one
GAN phase (:func:`optimizer_phase`, :func:`gan_step`), and the :class:`Networks` / :class:`Counters` a trainer holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from portrait3d.training.distributed import DistInfo, all_reduce_grads

__all__ = ["ema_beta", "ema_update", "lazy_adam", "optimizer_phase", "gan_step", "Networks", "Counters"]


def ema_beta(batch: int, ema_kimg: float, rampup: float | None, images_seen: int) -> float:
    """NVIDIA's EMA decay per step: half-life ``ema_kimg`` (capped at ``rampup * images_seen``)."""
    ema_nimg = ema_kimg * 1000
    if rampup is not None:
        ema_nimg = min(ema_nimg, images_seen * rampup)
    return 0.5 ** (batch / max(ema_nimg, 1e-8))


@torch.no_grad()
def ema_update(G_ema: nn.Module, G: nn.Module, beta: float) -> None:
    """``p_ema <- lerp(p, p_ema, beta)`` for parameters; buffers are copied."""
    for p_ema, p in zip(G_ema.parameters(), G.parameters()):
        p_ema.copy_(p.detach().lerp(p_ema, beta))
    for b_ema, b in zip(G_ema.buffers(), G.buffers()):
        b_ema.copy_(b)


def lazy_adam(params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float], eps: float,
              reg_interval: int | None) -> torch.optim.Adam:
    """Adam for lazy regularisation: a regulariser run every ``k`` steps adds a step, so lr and
    betas are rescaled by ``k / (k + 1)`` (StyleGAN2 paper, Appendix B). ``None``: plain Adam."""
    ratio = reg_interval / (reg_interval + 1) if reg_interval else 1.0
    return torch.optim.Adam(params, lr=lr * ratio, betas=(betas[0] ** ratio, betas[1] ** ratio), eps=eps)


def optimizer_phase(module: nn.Module, opt: torch.optim.Optimizer, info: DistInfo,
                    rounds: Sequence[Callable[[], torch.Tensor]], gain: float = 1.0) -> None:
    """One optimiser step of ``module``: backward each round's loss (scaled by ``gain / rounds``),
    average gradients over ranks, step. Only ``module`` gets gradients during the phase."""
    module.requires_grad_(True)
    opt.zero_grad(set_to_none=True)
    for loss_fn in rounds:
        loss = loss_fn()
        (loss * (gain / len(rounds))).backward()
    module.requires_grad_(False)
    all_reduce_grads(module.parameters(), info)
    opt.step()


def gan_step(nets: "Networks", info: DistInfo, step: int, shards: Sequence[Any], parts: Sequence[Any],
             g_main: Callable[[Any], torch.Tensor] | None, g_reg: Callable[[Any], torch.Tensor],
             d_main: Callable[[Any, Any], torch.Tensor] | None, d_reg: Callable[[Any, Any], torch.Tensor], *,
             g_reg_interval: int | None, d_reg_interval: int | None,
             stats: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """One GAN training step as in StyleGAN2-ADA: G main, lazy G regulariser, D main, lazy D
    regulariser (a regulariser runs every ``*_reg_interval`` steps with its loss scaled by the
    interval; ``None`` disables it). ``g_*`` take a shard, ``d_*`` a shard and its real-data part.
    ``d_main=None`` skips the discriminator (a generator trained without one, e.g. by distillation);
    ``g_main=None`` skips both generator phases (a fresh discriminator warming up against a fixed generator).
    Returns the mean of each statistic collected in ``stats`` during the step."""
    if g_main is not None:
        optimizer_phase(nets.G, nets.opt_G, info, [lambda s=s: g_main(s) for s in shards])
    if g_main is not None and g_reg_interval and step % g_reg_interval == 0:
        optimizer_phase(nets.G, nets.opt_G, info, [lambda s=s: g_reg(s) for s in shards], gain=g_reg_interval)
    if d_main is not None:
        optimizer_phase(nets.D, nets.opt_D, info, [lambda s=s, p=p: d_main(s, p) for s, p in zip(shards, parts)])
    if d_main is not None and d_reg_interval and step % d_reg_interval == 0:
        optimizer_phase(nets.D, nets.opt_D, info, [lambda s=s, p=p: d_reg(s, p) for s, p in zip(shards, parts)],
                        gain=d_reg_interval)
    return {k: float(torch.stack(v).mean()) for k, v in stats.items()}


@dataclass
class Networks:
    """Everything a snapshot stores besides counters: nets, optimisers, trainer tensors."""

    G: nn.Module
    D: nn.Module
    G_ema: nn.Module
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. the path-length mean


@dataclass
class Counters:
    step: int = 0
    images_seen: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)

"""The latent regressor φ: latent code -> NRSfM parameters q (Sec. 3.2, eq. 12).

An MLP with three hidden layers of 512 ReLU units, trained with Adam to predict the
**mean-centred** parameters of the rank-one model that eq. 11 fitted to each latent's landmarks:

    L_φ = 1/N Σ_i || S⁻¹ (φ̃(w_i) − (q_i − q̄)) ||²                                       (eq. 12)

``S = diag(std(q))`` puts degrees, scale and shape coefficients on one footing (the paper centres
``q``; we also scale so no component dominates the loss). ``φ(w) = q̄ + S φ̃(w̃)`` with ``w̃`` the
standardised latent; both normalisations are buffers, so :meth:`ParamRegressor.forward` maps raw
latents to raw parameters and is differentiable for the Jacobian edits of eq. 14.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["RegressorConfig", "ParamRegressor", "train_regressor"]


@dataclass
class RegressorConfig:
    """Architecture and optimisation of φ (paper: 3 x 512, ReLU, Adam)."""

    hidden: int = 512
    layers: int = 3
    lr: float = 1e-3
    epochs: int = 60
    batch: int = 256
    weight_decay: float = 0.0
    val_fraction: float = 0.1
    seed: int = 0


class ParamRegressor(nn.Module):
    """``φ: latent [N, in_dim] -> q [N, out_dim]`` with built-in input/output normalisation."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512, layers: int = 3) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.hidden, self.layers = int(in_dim), int(out_dim), int(hidden), int(layers)
        dims = [self.in_dim] + [self.hidden] * self.layers
        mods: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [nn.Linear(a, b), nn.ReLU()]
        mods.append(nn.Linear(dims[-1], self.out_dim))
        self.net = nn.Sequential(*mods)
        self.register_buffer("latent_mean", torch.zeros(self.in_dim))
        self.register_buffer("latent_std", torch.ones(self.in_dim))
        self.register_buffer("q_mean", torch.zeros(self.out_dim))
        self.register_buffer("q_std", torch.ones(self.out_dim))

    def normalised(self, latents: torch.Tensor) -> torch.Tensor:
        """``φ̃``: standardised parameters ``S⁻¹ (q − q̄)`` (the quantity eq. 12 regresses)."""
        return self.net((latents - self.latent_mean) / self.latent_std)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw parameters ``q [N, out_dim]`` of raw latents ``[N, in_dim]``."""
        return self.q_mean + self.q_std * self.normalised(latents)

    def config(self) -> dict[str, int]:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "hidden": self.hidden, "layers": self.layers}


def train_regressor(latents: np.ndarray | torch.Tensor, params: np.ndarray | torch.Tensor,
                    cfg: RegressorConfig | None = None, progress: bool = True,
                    device: torch.device | str = "cpu") -> tuple[ParamRegressor, dict[str, list[float]]]:
    """Fit φ to ``(latents [N, D], params [N, P])`` by eq. 12; returns the net and its loss history.

    ``history`` has per-epoch ``train`` and ``val`` losses (mean squared standardised error on the
    held-out ``val_fraction`` of the pairs); the returned weights are those of the best validation
    epoch (early stopping without stopping).
    """
    from tqdm import tqdm

    cfg = cfg or RegressorConfig()
    x = torch.as_tensor(np.asarray(latents), dtype=torch.float32)
    q = torch.as_tensor(np.asarray(params), dtype=torch.float32)
    if x.ndim != 2 or q.ndim != 2 or len(x) != len(q):
        raise ValueError(f"expected latents [N, D] and params [N, P], got {tuple(x.shape)} and {tuple(q.shape)}")
    if not (torch.isfinite(x).all() and torch.isfinite(q).all()):
        raise ValueError("latents and params must be finite (drop samples without landmarks first)")
    n = len(x)
    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(n, generator=gen)
    n_val = int(round(cfg.val_fraction * n)) if n >= 10 else 0
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    torch.manual_seed(cfg.seed)
    phi = ParamRegressor(x.shape[1], q.shape[1], cfg.hidden, cfg.layers)
    xt, qt = x[tr_idx], q[tr_idx]
    phi.latent_mean.copy_(xt.mean(0))
    phi.latent_std.copy_(xt.std(0).clamp_min(1e-6))
    phi.q_mean.copy_(qt.mean(0))
    phi.q_std.copy_(qt.std(0).clamp_min(1e-6))
    phi.to(device)
    x, q = x.to(device), q.to(device)
    target = (q - phi.q_mean) / phi.q_std
    opt = torch.optim.Adam(phi.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
    hist: dict[str, list[float]] = {"train": [], "val": []}
    best = (math.inf, None)
    steps_per_epoch = max(1, math.ceil(len(tr_idx) / cfg.batch))
    with tqdm(range(cfg.epochs), desc="regressor φ", unit="epoch", disable=not progress) as bar:
        for _ in bar:
            phi.train()
            order = tr_idx[torch.randperm(len(tr_idx), generator=gen)]
            total = 0.0
            for b in range(steps_per_epoch):
                idx = order[b * cfg.batch:(b + 1) * cfg.batch].to(device)
                loss = (phi.normalised(x[idx]) - target[idx]).square().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            sched.step()
            hist["train"].append(total / max(len(tr_idx), 1))
            phi.eval()
            if n_val:
                with torch.no_grad():
                    v = float((phi.normalised(x[val_idx.to(device)]) - target[val_idx.to(device)]).square().mean())
                hist["val"].append(v)
            else:
                v = hist["train"][-1]
            if v < best[0]:
                best = (v, {k: t.detach().clone() for k, t in phi.state_dict().items()})
            bar.set_postfix(train=f"{hist['train'][-1]:.4f}", val=f"{v:.4f}")
    if best[1] is not None:
        phi.load_state_dict(best[1])
    return phi.eval(), hist

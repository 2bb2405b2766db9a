"""Strict state-dict loading with readable errors, shared by every checkpoint reader."""

from __future__ import annotations

import torch
from torch import nn

from portrait3d.checkpoints.safe_pickle import CheckpointError

__all__ = ["load_state_strict"]


def load_state_strict(net: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``net.load_state_dict(state, strict=True)`` with a one-line :class:`CheckpointError` on mismatch."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if wrong:
            parts.append(f"wrong shape {wrong[:3]}{'...' if len(wrong) > 3 else ''}")
        raise CheckpointError(f"{what} weights do not match its architecture: {'; '.join(parts)}")
    net.load_state_dict(state, strict=True)

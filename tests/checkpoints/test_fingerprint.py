"""Weight fingerprints (:mod:`portrait3d.checkpoints.fingerprint`)."""

from __future__ import annotations

import torch
from torch import nn

from portrait3d.checkpoints.fingerprint import module_fingerprint


def test_fingerprint_follows_the_weights_not_their_storage():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    b = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    b.load_state_dict(a.state_dict())
    assert module_fingerprint(a) == module_fingerprint(b) and len(module_fingerprint(a)) == 64
    half = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).half()
    half.load_state_dict(a.half().state_dict())
    a.float()
    assert module_fingerprint(half) == module_fingerprint(a)  # fp16 weights read as float32 agree
    with torch.no_grad():
        b[0].bias[0] += 1e-3
    assert module_fingerprint(b) != module_fingerprint(a)
    b.load_state_dict(a.state_dict())
    b[1].running_mean += 1  # buffers count too
    assert module_fingerprint(b) != module_fingerprint(a)

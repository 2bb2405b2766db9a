"""EG3D tri-plane feature decoder (``OSGDecoder`` of ``training/triplane.py``)."""

from __future__ import annotations

from typing import Any, Dict, Mapping

import torch

from portrait3d.networks.stylegan2 import FullyConnectedLayer

__all__ = ["OSGDecoder"]


class OSGDecoder(torch.nn.Module):
    """Small MLP mapping averaged tri-plane features to colour features and raw density.

    ``net`` = ``[FullyConnectedLayer(n_features, 64), Softplus, FullyConnectedLayer(64, 1 + D)]``
    (equalized learning rate, ``lr_multiplier = options['decoder_lr_mul']``), so the state-dict keys
    are ``net.0.weight``, ``net.0.bias``, ``net.2.weight``, ``net.2.bias`` as in EG3D checkpoints.

    Args:
        n_features: channels per plane ``C`` (32 in EG3D).
        options: ``{'decoder_lr_mul': float, 'decoder_output_dim': D}`` (EG3D: ``D = 32``).
    """

    def __init__(self, n_features: int, options: Mapping[str, Any]) -> None:
        super().__init__()
        self.hidden_dim = 64
        lr_mul = options["decoder_lr_mul"]
        self.net = torch.nn.Sequential(
            FullyConnectedLayer(n_features, self.hidden_dim, lr_multiplier=lr_mul),
            torch.nn.Softplus(),
            FullyConnectedLayer(self.hidden_dim, 1 + options["decoder_output_dim"], lr_multiplier=lr_mul),
        )

    def forward(self, sampled_features: torch.Tensor, ray_directions: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Decode.

        Args:
            sampled_features: ``[N, P, M, C]`` features from the ``P`` planes (averaged over ``P``).
            ray_directions: ``[N, M, 3]`` (unused, as official).

        Returns:
            ``{'rgb': [N, M, D], 'sigma': [N, M, 1]}``; ``rgb`` is ``sigmoid * 1.002 - 0.001``
            (MipNeRF-style widened sigmoid), ``sigma`` is the raw (pre-activation) density.
        """
        x = sampled_features.mean(1)
        n, m, c = x.shape
        x = self.net(x.view(n * m, c)).view(n, m, -1)
        rgb = torch.sigmoid(x[..., 1:]) * (1 + 2 * 0.001) - 0.001
        sigma = x[..., 0:1]
        return {"rgb": rgb, "sigma": sigma}

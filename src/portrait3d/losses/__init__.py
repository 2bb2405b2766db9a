"""Differentiable image losses: perceptual feature distances and face identity.

* :class:`PerceptualLoss` -- EfficientNet-Lite0 (ImageNet) feature distance, LPIPS-style but with
  uniform channel weights: the offline default, **not LPIPS**.
* :class:`LPIPS` -- real LPIPS v0.1 (VGG16) when the user supplies both weight files.
* :func:`perceptual_loss` -- pick one by name; every module has a ``description`` to quote in reports.
* :class:`IdentityLoss` -- ``1 - cos`` of dlib face-ResNet descriptors, chip alignment fixed by
  reference landmarks; :func:`identity_similarity` for reports.
"""

from portrait3d.losses.identity import IdentityLoss, identity_similarity
from portrait3d.losses.perceptual import LPIPS, EfficientNetLite0, PerceptualLoss, perceptual_loss

__all__ = ["LPIPS", "EfficientNetLite0", "IdentityLoss", "PerceptualLoss", "identity_similarity", "perceptual_loss"]

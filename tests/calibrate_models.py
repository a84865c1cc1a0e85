"""Small CNNs for calibration tests: a protected model and a surrogate whose answers depend on the image.

``tiny_models.TinyCNN`` at its random initialization gives nearly the same
logits for every image (no attack can flip them). :class:`SmallCNN` centres
its input and keeps a 4x4 spatial grid before the classifier, so even
untrained its top-1 class varies across the bundled crops and small
perturbations can change it, as with a trained network. Fast on CPU at 32x32.
"""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv + ReLU blocks, 4x4 average pooling, 10 classes; takes ``[B, 3, H, W]`` pixels in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = nn.Linear(8 * 16, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.features((pixels - 0.5) * 4.0)
        return self.head(self.pool(features).flatten(1)) * 4.0


def _seeded(seed: int) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN().eval()


def target_cnn() -> SmallCNN:
    return _seeded(1)


def surrogate_cnn() -> SmallCNN:
    return _seeded(2)

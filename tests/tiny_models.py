"""A small user CNN for export tests: stands in for "a team's own nn.Module" (fast on CPU)."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """Two conv + ReLU blocks, global pooling, 10 classes; takes ``[B, 3, H, W]`` pixels in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(8, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels).mean(dim=(2, 3)))


def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN()

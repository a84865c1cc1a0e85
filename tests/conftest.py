"""Shared fixtures: devices to run on, the bundled model, the bundled photos."""

from __future__ import annotations

import pytest
import torch

#: Every device available here; CUDA joins automatically on a GPU machine, so
#: the same equality tests cover the CUDA code path there.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def bundled_model():
    from detector.models import load_bundled_model

    return load_bundled_model("cpu")


@pytest.fixture(scope="session")
def photo_batch():
    """Four bundled photos as a ``[4, 3, 224, 224]`` pixel batch."""
    from detector.samples import full_photo_samples, to_tensor

    return to_tensor([sample.pixels() for sample in full_photo_samples()[:4]])

"""Model identity hashing for users' own models (issue 21): every dtype and shape, BatchNorm included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detector.models import state_dict_sha256


def test_a_batchnorm_model_hashes_and_the_hash_follows_its_weights():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())  # num_batches_tracked: 0-dim int64
    first = state_dict_sha256(model)
    assert first == state_dict_sha256(model)
    with torch.no_grad():
        model[1].running_mean += 1
    assert state_dict_sha256(model) != first
    model[1].num_batches_tracked += 1  # the 0-dim buffer counts too
    assert len({first, state_dict_sha256(model)}) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8,
                                   torch.uint8, torch.int32, torch.int64, torch.bool, torch.complex64])
@pytest.mark.parametrize("shape", [(), (1,), (3, 2), (2, 1, 2)])
def test_every_dtype_and_shape_hashes_and_differs_by_value(dtype, shape):
    module = nn.Module()
    module.register_buffer("b", torch.zeros(shape, dtype=dtype))
    zeros = state_dict_sha256(module)
    module.b = torch.ones(shape, dtype=dtype)
    assert state_dict_sha256(module) != zeros


def test_hashes_of_ordinary_tensors_did_not_change():
    """Flattening keeps the bytes: an artifact fitted before the fix still matches its model."""
    import hashlib

    module = nn.Linear(2, 3)
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(str(t.dtype).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    assert state_dict_sha256(module) == digest.hexdigest()

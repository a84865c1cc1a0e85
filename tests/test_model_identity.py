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


# --- the model contract (issue 21): a clear error instead of a traceback deep inside calibrate or export ---


class _NHWC(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):  # expects [B, H, W, 3]
        return self.conv(x.permute(0, 3, 1, 2)).mean(dim=(2, 3))


class _Features(nn.Module):  # returns a feature map, not logits
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


def test_the_contract_names_what_a_model_did_instead():
    from detector.models import ModelContractError, check_pixel_contract

    assert check_pixel_contract(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(7)), 16) == 7
    with pytest.raises(ModelContractError, match=r"NCHW.*raised RuntimeError.*declare it with --input-layout"):
        check_pixel_contract(_NHWC(), 16, "model 'x:nhwc'")
    with pytest.raises(ModelContractError, match=r"returned \[2, 4, 14, 14\]"):
        check_pixel_contract(_Features(), 16)


def test_export_refuses_a_model_that_breaks_the_contract(tmp_path, monkeypatch):
    import sys
    import types

    from service.triton.export import ExportError, ModelSource, export_model_repository

    module = types.ModuleType("contract_models")
    module.nhwc = _NHWC
    monkeypatch.setitem(sys.modules, "contract_models", module)
    with pytest.raises(ExportError, match="does not follow the model contract"):
        export_model_repository(tmp_path, model_name="m", source=ModelSource("factory", "contract_models:nhwc"),
                                image_size=32)

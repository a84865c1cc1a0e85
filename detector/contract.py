"""A user's model that wants its input otherwise: NHWC, 0..255, normalized, FP16 (the declared input contract).

advsentry's pixel contract (:data:`detector.models.PIXEL_CONTRACT`) is
``[B, 3, H, W]`` FP32 RGB in [0, 1]: every attack's budget (8/255 is eight
gray levels), every input-space signal and the Triton model's ``pixels``
input are in that space. A model trained on another input is declared with
an :class:`InputContract` (``--input-layout``, ``--input-scale``,
``--input-normalize``, ``--input-dtype`` on ``calibrate run`` and
``export-model``) and wrapped by :class:`ContractAdapter`, which turns
advsentry's pixels into what the model takes. Why an adapter and not a
second pixel space: perturbation sizes, detector signals and calibration
artifacts then mean the same for every model.

The contract is part of the model's identity (its name), so a calibration
fitted through one contract is never served through another; the weights
hash stays that of the user's module alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

LAYOUTS = ("nchw", "nhwc")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: ``--input-normalize imagenet``: torchvision's ImageNet mean and std (on [0, 1] pixels).
IMAGENET_NORMALIZE = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class ContractError(ValueError):
    """An input contract that cannot be declared (unknown layout or dtype, a malformed mean/std)."""


@dataclass(frozen=True)
class InputContract:
    """What the user's module takes: ``normalize((pixels · scale))`` in ``layout`` and ``dtype``.

    ``mean``/``std`` apply after scaling, per channel (so with ``scale=255``
    they are in 0..255 units, as such models usually give them).
    """

    layout: str = "nchw"
    scale: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ContractError(f"input layout {self.layout!r}: expected one of {', '.join(LAYOUTS)}")
        if self.dtype not in DTYPES:
            raise ContractError(f"input dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if not self.scale > 0:
            raise ContractError(f"input scale must be positive, got {self.scale}")
        if (self.mean is None) != (self.std is None):
            raise ContractError("input normalization needs both a mean and a std")
        if self.mean is not None and (len(self.mean) != 3 or len(self.std or ()) != 3 or min(self.std or ()) <= 0):
            raise ContractError(f"input normalization: 3 means and 3 positive stds, got {self.mean} / {self.std}")

    @property
    def is_default(self) -> bool:
        """advsentry's own pixels: no adapter needed."""
        return self == InputContract()

    def describe(self) -> str:
        """Short text for the model's identity and messages, e.g. ``nhwc, x255, normalized, float16``."""
        parts = [self.layout]
        if self.scale != 1.0:
            parts.append(f"x{self.scale:g}")
        if self.mean is not None:
            parts.append("mean " + ",".join(f"{m:g}" for m in self.mean) + " std " + ",".join(f"{s:g}" for s in self.std or ()))
        if self.dtype != "float32":
            parts.append(self.dtype)
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"] = list(self.mean) if self.mean is not None else None
        data["std"] = list(self.std) if self.std is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "InputContract":
        if not data:
            return cls()
        values = dict(data)
        for key in ("mean", "std"):
            if values.get(key) is not None:
                values[key] = tuple(float(v) for v in values[key])
        try:
            return cls(**values)
        except TypeError as error:
            raise ContractError(f"input contract: {error}") from error

    @classmethod
    def parse(cls, layout: str = "nchw", scale: float = 1.0, normalize: str | None = None,
              dtype: str = "float32") -> "InputContract":
        """From the command-line flags; ``normalize`` is ``imagenet`` (in the scaled units) or ``M,M,M/S,S,S``."""
        mean = std = None
        if normalize:
            if normalize == "imagenet":  # torchvision's numbers are for [0, 1]: scaled with the pixels
                mean, std = (tuple(float(scale) * v for v in values) for values in IMAGENET_NORMALIZE)
            else:
                try:
                    means, _, stds = normalize.partition("/")
                    mean = tuple(float(v) for v in means.split(","))
                    std = tuple(float(v) for v in stds.split(","))
                except ValueError as error:
                    raise ContractError(f"--input-normalize {normalize!r}: expected imagenet or M,M,M/S,S,S") from error
        return cls(layout.lower(), float(scale), mean, std, dtype.lower())


class ContractAdapter(nn.Module):
    """advsentry's ``[B, 3, H, W]`` [0, 1] FP32 pixels in, the user's module's input made, FP32 logits out."""

    def __init__(self, model: nn.Module, contract: InputContract) -> None:
        super().__init__()
        self.model = model
        self.contract = contract
        mean = contract.mean if contract.mean is not None else (0.0, 0.0, 0.0)
        std = contract.std if contract.std is not None else (1.0, 1.0, 1.0)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        values = (pixels * self.contract.scale - self.mean) / self.std
        if self.contract.layout == "nhwc":
            values = values.permute(0, 2, 3, 1)
        return self.model(values.to(DTYPES[self.contract.dtype])).float()


def adapt_model(model: nn.Module, contract: InputContract | None) -> nn.Module:
    """``model`` behind a :class:`ContractAdapter`, or itself for advsentry's own contract."""
    if contract is None or contract.is_default:
        return model
    return ContractAdapter(model, contract)


def inner_model(model: nn.Module) -> nn.Module:
    """The user's own module (what the weights hash is of), behind an adapter or not."""
    return model.model if isinstance(model, ContractAdapter) else model


def contract_name(name: str, contract: InputContract | None) -> str:
    """The model identity's name: the factory, plus the contract when it is not advsentry's own."""
    if contract is None or contract.is_default:
        return name
    return f"{name} [{contract.describe()}]"

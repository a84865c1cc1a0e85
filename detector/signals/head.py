"""A small learned detector head on an intermediate feature map (after Metzen et al. 2017).

Metzen et al. attach a small convolutional network to an intermediate layer
of the classifier and train it to tell adversarial from clean inputs. Here
the head is kept to a few thousand weights so it fits in the calibration
artifact and costs nothing next to the model's own forward pass:

    z = (a - channel mean) / channel scale          a = layer output [B, C, H, W]
    h = ReLU(1×1 conv C → hidden)(z)
    s = [mean over H, W of h ; max over H, W of h] · w + b      (one scalar: the logit of "adversarial")

The max pool keeps a locally strong response (a perturbation concentrated in
part of the image); the mean keeps a diffuse one. Trained with Adam on a
class-balanced binary cross-entropy on the development part (weights packed as
float32 in the artifact).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .base import LearnedSignal, SignalContext, SignalError, pack_array, unpack_array


@dataclass(frozen=True)
class HeadParameters:
    """The head's tensors, unpacked from the flat vector in the artifact."""

    mean: torch.Tensor  # [C]
    scale: torch.Tensor  # [C]
    conv_weight: torch.Tensor  # [hidden, C]
    conv_bias: torch.Tensor  # [hidden]
    linear_weight: torch.Tensor  # [2 · hidden]
    linear_bias: torch.Tensor  # []

    @staticmethod
    def size(channels: int, hidden: int) -> int:
        return 2 * channels + hidden * channels + hidden + 2 * hidden + 1

    @classmethod
    def unflatten(cls, flat: torch.Tensor, channels: int, hidden: int) -> "HeadParameters":
        sizes = [channels, channels, hidden * channels, hidden, 2 * hidden, 1]
        mean, scale, conv_w, conv_b, lin_w, lin_b = torch.split(flat, sizes)
        return cls(mean, scale, conv_w.view(hidden, channels), conv_b, lin_w, lin_b[0])

    def flatten(self) -> torch.Tensor:
        return torch.cat([self.mean, self.scale, self.conv_weight.flatten(), self.conv_bias,
                          self.linear_weight, self.linear_bias.reshape(1)])


def head_forward(maps: torch.Tensor, params: HeadParameters) -> torch.Tensor:
    """``[B]`` logits of the head (see the module docstring) for ``[B, C, H, W]`` maps."""
    z = (maps.float() - params.mean.view(1, -1, 1, 1)) / params.scale.view(1, -1, 1, 1)
    hidden = F.relu(torch.einsum("bchw,kc->bkhw", z, params.conv_weight) + params.conv_bias.view(1, -1, 1, 1))
    pooled = torch.cat([hidden.mean(dim=(-2, -1)), hidden.amax(dim=(-2, -1))], dim=1)
    return pooled @ params.linear_weight + params.linear_bias


@dataclass(frozen=True)
class LearnedHead(LearnedSignal):
    """A 1×1-conv + mean/max-pool + linear head on ``layer``'s output (see the module docstring)."""

    layer: str = ""
    channels: int = 0
    hidden: int = 16
    parameters: str = ""  # pack_array of the flat float32 vector (HeadParameters.flatten); "" = template
    kind = "head"

    def __post_init__(self) -> None:
        if not self.layer:
            raise SignalError("head.layer: a module name is required")
        if not isinstance(self.hidden, int) or not 1 <= self.hidden <= 64:
            raise SignalError(f"head.hidden={self.hidden!r}: expected an integer in 1..64")
        if self.parameters:
            expected = HeadParameters.size(self.channels, self.hidden)
            if self.parameter_array.shape != (expected,):
                raise SignalError(f"head.parameters: expected {expected} values for {self.channels} channels and "
                                  f"hidden={self.hidden}, got shape {self.parameter_array.shape}")

    @functools.cached_property
    def parameter_array(self) -> np.ndarray:
        return unpack_array(self.parameters)

    def head_parameters(self, device: torch.device | str = "cpu") -> HeadParameters:
        return HeadParameters.unflatten(torch.as_tensor(self.parameter_array, device=device), self.channels, self.hidden)

    @property
    def fitted(self) -> bool:
        return bool(self.parameters)

    def layers(self) -> set[str]:
        return {self.layer}

    def raw(self, context: SignalContext) -> torch.Tensor:
        maps = context.activations[self.layer]
        if maps.dim() != 4:
            raise SignalError(f"head: layer {self.layer!r} output has shape {tuple(maps.shape)}, expected [B, C, H, W]")
        return maps

    def from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        if raw.shape[1] != self.channels:
            raise SignalError(f"head: layer {self.layer!r} has {raw.shape[1]} channels, the head {self.channels}")
        return head_forward(raw, self.head_parameters(raw.device))

    def fit(self, clean: Any, adversarial: Any, *, adversarial_weight: Any = None, seed: int = 0,
            steps: int = 150, lr: float = 0.01, weight_decay: float = 1e-3, batch: int = 128) -> "LearnedHead":
        """Adam on class-balanced BCE over ``[N, C, H, W]`` clean and ``[M, C, H, W]`` adversarial maps (deterministic per seed)."""
        clean = torch.as_tensor(np.asarray(clean), dtype=torch.float32)
        adversarial = torch.as_tensor(np.asarray(adversarial), dtype=torch.float32)
        channels = clean.shape[1]
        x = torch.cat([clean, adversarial])
        y = torch.cat([torch.zeros(len(clean)), torch.ones(len(adversarial))])
        weight = torch.cat([torch.full((len(clean),), 0.5 / len(clean)),
                            torch.full((len(adversarial),), 0.5 / len(adversarial))])
        if adversarial_weight is not None:
            w = torch.as_tensor(np.asarray(adversarial_weight), dtype=torch.float32)
            weight[len(clean):] = 0.5 * w / w.sum()
        mean = x.mean(dim=(0, 2, 3))
        scale = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
        generator = torch.Generator().manual_seed(seed)
        conv_weight = (torch.randn(self.hidden, channels, generator=generator) / channels**0.5).requires_grad_(True)
        conv_bias = torch.zeros(self.hidden, requires_grad=True)
        linear_weight = (torch.randn(2 * self.hidden, generator=generator) * 0.1).requires_grad_(True)
        linear_bias = torch.zeros((), requires_grad=True)
        optimizer = torch.optim.Adam([conv_weight, conv_bias, linear_weight, linear_bias], lr=lr, weight_decay=weight_decay)
        for _ in range(steps):
            rows = torch.multinomial(weight, min(batch, len(x)), replacement=True, generator=generator)
            params = HeadParameters(mean, scale, conv_weight, conv_bias, linear_weight, linear_bias)
            loss = F.binary_cross_entropy_with_logits(head_forward(x[rows], params), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        flat = HeadParameters(mean, scale, conv_weight, conv_bias, linear_weight, linear_bias).flatten().detach()
        return self.replace(channels=channels, parameters=pack_array(flat.numpy(), "float32"))  # type: ignore[return-value]

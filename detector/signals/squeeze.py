"""Prediction consistency under squeezing (Xu, Evans, Qi 2018, "Feature Squeezing").

A squeezer removes detail a clean photo does not need and an adversarial
perturbation does: fewer bits per colour, or a small median filter. The
signal is the L1 distance between the softmax of the input and of its
squeezed copy; the squeezed copy runs through the model as one more forward
pass of the same batch, inside the same Triton call (an exported model), or
as one more upstream call beside the request's own (black-box mode, the
sidecar squeezes the request's pixels).

The squeezers follow the reference implementation (EvadeML-Zoo) exactly, so
the numbers compare with the paper's: bit depth ``round(x·(2^b-1))/(2^b-1)``,
and ``scipy.ndimage.median_filter(size=k)`` on each channel, whose window for
an even ``k`` covers offsets ``-k//2 .. k-1-k//2``, mirrors the border
(``reflect``: the edge pixel repeated) and takes the element of rank ``k²//2``
(the upper median for an even count). Written in torch, not scipy, so it runs
batched on the model's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from .base import Signal, SignalContext, SignalError

SqueezerKind = Literal["bit_depth", "median"]


def bit_depth(pixels: torch.Tensor, bits: int) -> torch.Tensor:
    levels = 2**bits - 1
    return torch.round(pixels * levels) / levels


def median_filter(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Per-channel ``size×size`` median of ``[B, C, H, W]``, as ``scipy.ndimage.median_filter`` computes it."""
    before, after = size // 2, size - 1 - size // 2
    # scipy's 'reflect' repeats the edge pixel; for a one-pixel pad that is 'replicate'.
    padded = F.pad(pixels, (before, after, before, after), mode="replicate")
    windows = padded.unfold(2, size, 1).unfold(3, size, 1)  # [B, C, H, W, k, k]
    flat = windows.reshape(*windows.shape[:4], size * size)
    return flat.sort(dim=-1).values[..., (size * size) // 2]


@dataclass(frozen=True)
class SqueezeDistance(Signal):
    """L1 distance between the softmax of the input and of its squeezed copy."""

    squeezer: SqueezerKind = "bit_depth"
    bits: int = 5
    size: int = 2
    kind = "squeeze_l1"

    def __post_init__(self) -> None:
        if self.squeezer not in ("bit_depth", "median"):
            raise SignalError(f"squeeze_l1.squeezer={self.squeezer!r}: expected 'bit_depth' or 'median'")
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise SignalError(f"squeeze_l1.bits={self.bits!r}: expected an integer in 1..8")
        if not isinstance(self.size, int) or self.size not in (2, 3):
            raise SignalError(f"squeeze_l1.size={self.size!r}: expected 2 or 3")

    def squeeze(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.squeezer == "bit_depth":
            return bit_depth(pixels, self.bits)
        return median_filter(pixels, self.size)

    @property
    def transform_key(self) -> str:
        """The squeezed copy's name: two signals with the same squeezer share one forward pass (or upstream call)."""
        return f"{self.squeezer}{self.bits if self.squeezer == 'bit_depth' else self.size}"

    def transforms(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        return {self.transform_key: self.squeeze}

    def values(self, context: SignalContext) -> torch.Tensor:
        squeezed = context.cached(
            ("squeezed_softmax", self.transform_key),
            lambda: torch.softmax(context.transformed_logits(self.transform_key, self.squeeze).float(), dim=1),
        )
        return (context.probabilities - squeezed).abs().sum(dim=1)

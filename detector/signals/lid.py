"""Local intrinsic dimensionality of an input's activations (Ma et al. 2018; multiLID, Lorenz et al. 2023).

Adversarial inputs tend to sit in regions of activation space whose local
dimension is higher than that of clean inputs: their neighbourhoods spread in
more directions. The LID maximum-likelihood estimate from the distances
``r_1 ≤ … ≤ r_k`` to the k nearest neighbours in a reference set is

    LID(x) = -( (1/k) Σ_i log(r_i / r_k) )^{-1}

Here x is the global-average-pooled activation ``[C]`` of one layer, and the
reference set is a fixed sample (≤ 256) of clean development inputs' pooled
activations, stored in the calibration artifact as float16, so the exported
Triton model and the sidecar's local path use the same neighbours. One signal
per layer; a detector reads several layers (multi-layer LID) and its combiner
weighs them, which is the role multiLID's classifier plays.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .base import LearnedSignal, SignalContext, SignalError, pack_array, unpack_array

#: Stored reference sets are capped: 256 × C float16 keeps a layer's share of the artifact small.
MAX_REFERENCE = 256


def pooled_activations(activations: torch.Tensor) -> torch.Tensor:
    """``[B, C]``: the global average of ``[B, C, H, W]`` maps (``[B, C]`` passes through)."""
    activations = activations.float()
    return activations.mean(dim=(-2, -1)) if activations.dim() == 4 else activations.reshape(len(activations), -1)


def lid_mle(query: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    """``[B]`` LID estimates of ``query [B, D]`` against ``reference [R, D]`` from the ``k`` nearest neighbours.

    Exact pairwise distances (no matrix-product shortcut, so a query equal to a
    reference row gets distance 0); distances are floored at 1e-12 and the
    mean log-ratio at -1e-12, so equal distances give a large finite value.
    """
    distances = (query[:, None, :] - reference[None, :, :]).pow(2).sum(-1).clamp_min(1e-24).sqrt()  # [B, R]
    nearest = distances.topk(k, dim=1, largest=False).values  # ascending
    log_ratio = torch.log(nearest.clamp_min(1e-12) / nearest[:, -1:].clamp_min(1e-12)).mean(dim=1)
    return -1.0 / log_ratio.clamp_max(-1e-12)


@dataclass(frozen=True)
class LocalIntrinsicDimensionality(LearnedSignal):
    """LID of ``layer``'s pooled activations against a stored clean reference set (see the module docstring)."""

    layer: str = ""
    k: int = 20
    reference: str = ""  # pack_array of [R, C] pooled clean activations (float16); "" = template
    kind = "lid"

    def __post_init__(self) -> None:
        if not self.layer:
            raise SignalError("lid.layer: a module name is required")
        if not isinstance(self.k, int) or self.k < 2:
            raise SignalError(f"lid.k={self.k!r}: expected an integer ≥ 2")
        if self.reference:
            reference = self.reference_array
            if reference.ndim != 2 or not self.k <= len(reference) <= 4 * MAX_REFERENCE:
                raise SignalError(f"lid.reference: expected [R, C] with k ≤ R ≤ {4 * MAX_REFERENCE}, got {reference.shape}")

    @functools.cached_property
    def reference_array(self) -> np.ndarray:
        return unpack_array(self.reference)

    @property
    def fitted(self) -> bool:
        return bool(self.reference)

    def layers(self) -> set[str]:
        return {self.layer}

    def raw(self, context: SignalContext) -> torch.Tensor:
        return pooled_activations(context.activations[self.layer])

    def from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        reference = torch.as_tensor(self.reference_array, device=raw.device)
        if raw.shape[1] != reference.shape[1]:
            raise SignalError(f"lid: layer {self.layer!r} has {raw.shape[1]} channels, the reference {reference.shape[1]}")
        return lid_mle(raw.float(), reference, self.k)

    def fit(self, clean: Any, adversarial: Any = None, *, adversarial_weight: Any = None, seed: int = 0,
            size: int = MAX_REFERENCE) -> "LocalIntrinsicDimensionality":
        """A reference set of ``size`` clean rows drawn at random (adversarials are not used)."""
        clean = np.asarray(clean, dtype=np.float32)
        if len(clean) < self.k:
            raise SignalError(f"lid: {len(clean)} clean inputs for k={self.k}")
        rows = np.random.default_rng(seed).permutation(len(clean))[: min(size, len(clean))]
        return self.replace(reference=pack_array(clean[np.sort(rows)], "float16"))  # type: ignore[return-value]

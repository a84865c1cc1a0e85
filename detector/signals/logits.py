"""Signals read off the logits of the forward pass the model runs anyway: free.

Why they belong beside the entropy: a minimal-perturbation attack (DeepFool,
C&W) stops just across the decision boundary, so its top-1 margin is small
and its softmax flat, exactly where the entropy of the feature response
barely moves; strong budgeted attacks do the opposite (very confident wrong
classes). A combiner weighs both directions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Signal, SignalContext


@dataclass(frozen=True)
class LogitMargin(Signal):
    """Top-1 logit minus the runner-up's logit."""

    kind = "logit_margin"

    def values(self, context: SignalContext) -> torch.Tensor:
        top2 = context.logits.float().topk(2, dim=1).values
        return top2[:, 0] - top2[:, 1]


@dataclass(frozen=True)
class SoftmaxEntropy(Signal):
    """Shannon entropy (bits) of the softmax distribution."""

    kind = "softmax_entropy"

    def values(self, context: SignalContext) -> torch.Tensor:
        log_p = torch.log_softmax(context.logits.float(), dim=1)
        return -(log_p.exp() * log_p).sum(dim=1) / math.log(2.0)

"""A local Lipschitz estimate of a model around an input (Aghdam, Heravi & Puig 2017).

``L(x) = max_i ‖f(x + d_i) − f(x)‖ / ‖d_i‖`` over the probed directions
``d_i``: a lower bound of the local Lipschitz constant on the ball the
directions span. For a linear map ``f(x) = A x`` it is exactly
``max_i ‖A d_i‖ / ‖d_i‖``, the operator norm of ``A`` restricted to the probed
directions (and ``‖A‖₂`` when the top right-singular vector is among them).
Aghdam et al. report it below 1 around most adversarial examples (softmax
outputs) even where the global constant is above 1.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def lipschitz_from_outputs(center: np.ndarray, perturbed: np.ndarray, directions: np.ndarray) -> float:
    """``max_i ‖perturbed_i − center‖ / ‖directions_i‖`` (outputs ``[n, K]``, directions ``[n, ...]``)."""
    deltas = np.linalg.norm(np.asarray(perturbed, dtype=np.float64) - np.asarray(center, dtype=np.float64).reshape(1, -1),
                            axis=1)
    steps = np.linalg.norm(np.asarray(directions, dtype=np.float64).reshape(len(deltas), -1), axis=1)
    if np.any(steps <= 0):
        raise ValueError("probe directions must be non-zero")
    return float(np.max(deltas / steps))


def local_lipschitz(function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                    directions: torch.Tensor) -> float:
    """The estimate for ``function`` (a batch in, ``[B, K]`` out) at one input ``x`` along ``directions``."""
    with torch.no_grad():
        center = function(x.unsqueeze(0))[0]
        perturbed = function(x.unsqueeze(0) + directions)
    return lipschitz_from_outputs(center.double().cpu().numpy(), perturbed.double().cpu().numpy(),
                                  directions.double().cpu().numpy())

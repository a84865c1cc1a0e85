"""Combiners: from a detector's per-map entropies ``[B, F]`` to one score ``[B]``.

The single-map detector is the special case :class:`SingleMap` (score = the
entropy itself, thresholded as in the paper). :class:`LogisticCombiner` is a
fitted linear model over standardized entropies (a *profile* over layers): its
weights stay interpretable (which layer's entropy pushes towards
"adversarial") and it serializes to a few numbers in the calibration artifact.

Why an optional quadratic term per signal: some signals move *both* ways
under attack (the logit margin shrinks under a minimal perturbation and grows
under a strong PGD that makes a confident wrong class), which no linear
weight can express. ``w·z + q·z²`` per standardized signal keeps the model a
handful of numbers, and :meth:`LogisticCombiner.contributions` still says how
much each signal pushed a score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch


class Combiner(Protocol):
    kind: str

    def combine(self, entropies: torch.Tensor) -> torch.Tensor: ...

    def combine_array(self, entropies: np.ndarray) -> np.ndarray: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class SingleMap:
    """Score = the entropy of the one map. Higher = more adversarial."""

    kind: str = "single"

    def combine(self, entropies: torch.Tensor) -> torch.Tensor:
        if entropies.shape[1] != 1:
            raise ValueError(f"SingleMap combines exactly one map, got {entropies.shape[1]}")
        return entropies[:, 0]

    def combine_array(self, entropies: np.ndarray) -> np.ndarray:
        """:meth:`combine` in float64 NumPy: the sidecar's path when Triton computed the entropies."""
        if entropies.ndim != 2 or entropies.shape[1] != 1:
            raise ValueError(f"SingleMap combines exactly one map, got entropies of shape {entropies.shape}")
        return entropies[:, 0].astype(np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}


@dataclass(frozen=True)
class LogisticCombiner:
    """Score = Σ w·z + q·z² + bias, z = (signal - mean) / scale (the logit of P(adversarial)).

    ``quadratic`` is empty for a plain linear combiner (and then not written
    to the artifact, so older artifacts keep their checksum).
    """

    weights: tuple[float, ...]
    bias: float
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    quadratic: tuple[float, ...] = ()
    kind: str = "logistic"

    def __post_init__(self) -> None:
        if self.quadratic and len(self.quadratic) != len(self.weights):
            raise ValueError(f"combiner has {len(self.weights)} weights but {len(self.quadratic)} quadratic weights")

    def combine(self, entropies: torch.Tensor) -> torch.Tensor:
        if entropies.shape[1] != len(self.weights):
            raise ValueError(f"combiner expects {len(self.weights)} maps, got {entropies.shape[1]}")
        as_tensor = lambda values: torch.tensor(values, dtype=entropies.dtype, device=entropies.device)  # noqa: E731
        standardized = (entropies - as_tensor(self.mean)) / as_tensor(self.scale)
        score = standardized @ as_tensor(self.weights) + self.bias
        if self.quadratic:
            score = score + standardized.pow(2) @ as_tensor(self.quadratic)
        return score

    def contributions(self, entropies: np.ndarray) -> np.ndarray:
        """``[B, F]``: each signal's share of the score (the score is their sum plus the bias)."""
        standardized = (np.asarray(entropies, dtype=np.float64) - np.asarray(self.mean)) / np.asarray(self.scale)
        parts = standardized * np.asarray(self.weights)
        if self.quadratic:
            parts = parts + standardized**2 * np.asarray(self.quadratic)
        return parts

    def combine_array(self, entropies: np.ndarray) -> np.ndarray:
        """:meth:`combine` in float64 NumPy (a few microseconds: no torch dispatch on the request path)."""
        if entropies.ndim != 2 or entropies.shape[1] != len(self.weights):
            raise ValueError(f"combiner expects [B, {len(self.weights)}] entropies, got shape {entropies.shape}")
        return self.contributions(entropies).sum(axis=1) + self.bias

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "kind": self.kind,
            "weights": list(self.weights),
            "bias": self.bias,
            "mean": list(self.mean),
            "scale": list(self.scale),
        }
        if self.quadratic:
            document["quadratic"] = list(self.quadratic)
        return document


def combiner_from_dict(data: dict[str, Any]) -> Combiner:
    kind = data.get("kind")
    if kind == "single":
        return SingleMap()
    if kind == "logistic":
        return LogisticCombiner(
            weights=tuple(float(v) for v in data["weights"]),
            bias=float(data["bias"]),
            mean=tuple(float(v) for v in data["mean"]),
            scale=tuple(float(v) for v in data["scale"]),
            quadratic=tuple(float(q) for q in data.get("quadratic", ())),
        )
    raise ValueError(f"unknown combiner kind {kind!r} (expected 'single' or 'logistic')")


def fit_logistic_combiner(
    clean: Any, adversarial: Any, *, c: float = 1.0, quadratic: bool = False, adversarial_weight: Any = None
) -> LogisticCombiner:
    """An L2 logistic regression on standardized entropies, clean ``[N, F]`` vs adversarial ``[M, F]``.

    Classes are weighted as balanced, so the fit does not depend on how many
    adversarials per clean image a job produced; ``adversarial_weight`` ``[M]``
    reweights adversarials within their class (e.g. each attack equally).
    With ``quadratic`` each signal also gets a ``z²`` term. scikit-learn is
    imported here only: the sidecar never fits.
    """
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if len(clean) == 0 or len(adversarial) == 0:
        raise ValueError("fitting a combiner needs clean and adversarial examples")
    x = np.vstack([np.asarray(clean, dtype=np.float64), np.asarray(adversarial, dtype=np.float64)])
    y = np.r_[np.zeros(len(clean)), np.ones(len(adversarial))]
    scaler = StandardScaler().fit(x)
    z = scaler.transform(x)
    design = np.hstack([z, z**2]) if quadratic else z
    weight = np.ones(len(y))
    if adversarial_weight is not None:
        adv_w = np.asarray(adversarial_weight, dtype=np.float64)
        weight[len(clean):] = adv_w / adv_w.mean()
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(design, y, sample_weight=weight)
    features = x.shape[1]
    return LogisticCombiner(
        weights=tuple(float(w) for w in model.coef_[0][:features]),
        bias=float(model.intercept_[0]),
        mean=tuple(float(m) for m in scaler.mean_),
        scale=tuple(float(s) for s in scaler.scale_),
        quadratic=tuple(float(q) for q in model.coef_[0][features:]) if quadratic else (),
    )

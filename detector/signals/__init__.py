"""Named detection signals beside the paper's entropy: one module per signal family.

- :mod:`.base`: the :class:`Signal` interface, the per-batch :class:`SignalContext`, (de)serialization;
- :mod:`.logits`: logit margin, softmax entropy (free);
- :mod:`.squeeze`: Feature Squeezing's prediction consistency (one extra forward per squeezer);
- :mod:`.spectral`: high-frequency share of the input's or a layer's power spectrum;
- :mod:`.residual`: average local spatial entropy of the input's high-pass residual;
- learned signals (parameters fitted on the development part, stored in the artifact):
  :mod:`.lid` (local intrinsic dimensionality of pooled activations against a clean
  reference set), :mod:`.fourier` (binned log spectrum through a fitted linear
  read-out), :mod:`.head` (a small 1×1-conv head on an intermediate feature map).

A detector's features map names to either a :class:`~detector.config.ScoreConfig`
(an entropy of a feature map, the paper's family) or a :class:`Signal`;
:func:`feature_from_dict` reads either from a calibration artifact.
"""

from __future__ import annotations

from typing import Any, Union

from ..config import ScoreConfig
from .base import LearnedSignal, Signal, SignalContext, SignalError, signal_from_dict, signal_kinds
from .fourier import FourierFeatures
from .head import LearnedHead
from .lid import LocalIntrinsicDimensionality
from .logits import LogitMargin, SoftmaxEntropy
from .residual import ResidualEntropy
from .spectral import HighFrequencyEnergy
from .squeeze import SqueezeDistance

#: What a detector's feature can be: an entropy of a feature map, or another signal.
FeatureConfig = Union[ScoreConfig, Signal]


def feature_from_dict(data: dict[str, Any]) -> FeatureConfig:
    """A feature from its artifact form: with a ``"signal"`` key a :class:`Signal`, else a ScoreConfig."""
    if "signal" in data:
        return signal_from_dict(data)
    return ScoreConfig.from_dict(data)


def feature_differences(ours: FeatureConfig, other: FeatureConfig) -> list[str]:
    """Human-readable differences between two features of any kind (empty = same)."""
    if isinstance(ours, ScoreConfig) and isinstance(other, ScoreConfig):
        return ours.differences(other)
    if isinstance(ours, Signal):
        return ours.differences(other)
    return [f"signal: 'entropy' != {getattr(other, 'kind', '?')!r}"]


__all__ = [
    "FeatureConfig",
    "FourierFeatures",
    "HighFrequencyEnergy",
    "LearnedHead",
    "LearnedSignal",
    "LocalIntrinsicDimensionality",
    "LogitMargin",
    "ResidualEntropy",
    "Signal",
    "SignalContext",
    "SignalError",
    "SoftmaxEntropy",
    "SqueezeDistance",
    "feature_differences",
    "feature_from_dict",
    "signal_from_dict",
    "signal_kinds",
]

"""The candidate signals the study measures on the development part.

Three groups, each a named feature a detector can read (a ScoreConfig entropy
or a :class:`detector.signals.Signal`):

- the paper's entropy family: the paper's own map (guided backprop of the
  final conv layer) and the five entropies the first study (9 photos) chose;
- complementary signals: logit statistics (free), Feature Squeezing's
  prediction consistency (one forward pass per squeezer), the high-frequency
  share of the input's and early layers' spectra, the entropy of the input's
  high-pass residual;
- learned signals (fitted on dev, out-of-fold values for the combiner; see
  :mod:`.learned`): multi-layer LID of pooled activations against a clean
  reference set (Ma et al. 2018, Lorenz et al. 2023), binned Fourier spectra
  of the input and early layers through a fitted linear read-out (Harder et
  al. 2021), a small 1×1-conv head on an intermediate map (Metzen et al. 2017);
  all read the forward pass the model runs anyway (no extra pass);
- ``cost``: extra forward passes each needs, so a combination can be held
  to the per-request budget (≤ 4 forward passes in all at batch 16).
"""

from __future__ import annotations

import json
from pathlib import Path

from detector.config import PAPER_CONFIG
from detector.signals import (
    FeatureConfig,
    FourierFeatures,
    HighFrequencyEnergy,
    LearnedHead,
    LocalIntrinsicDimensionality,
    LogitMargin,
    ResidualEntropy,
    SoftmaxEntropy,
    SqueezeDistance,
)
from detector.signals.base import Signal

#: The first study's default (entropies of five maps): kept as a baseline and as candidates.
FIRST_STUDY_ARTIFACT = Path(__file__).resolve().parents[1] / "results" / "detection_study" / "default_detector.json"


def first_study_features() -> dict[str, FeatureConfig]:
    from detector.calibration import CalibrationArtifact

    return dict(CalibrationArtifact.load(FIRST_STUDY_ARTIFACT).features)


def candidates(smoke: bool = False) -> dict[str, FeatureConfig]:
    found: dict[str, FeatureConfig] = {"paper": PAPER_CONFIG, **first_study_features()}
    found.update({
        "logit_margin": LogitMargin(),
        "softmax_entropy": SoftmaxEntropy(),
        "squeeze_bits5": SqueezeDistance("bit_depth", bits=5),
        "squeeze_median2": SqueezeDistance("median", size=2),
        "spectral_input": HighFrequencyEnergy(cutoff=0.5),
        "fourier_input": FourierFeatures(),
    })
    if smoke:  # a handful of dev images: a tiny LID neighbourhood (the head's fit is covered by tests/test_signals_learned.py)
        found["lid_block10"] = LocalIntrinsicDimensionality(layer="net._blocks.10", k=2)
    if not smoke:
        found.update({
            "spectral_stem": HighFrequencyEnergy(layer="net._conv_stem", cutoff=0.5),
            "squeeze_median3": SqueezeDistance("median", size=3),
            "spectral_input_075": HighFrequencyEnergy(cutoff=0.75),
            "spectral_block0": HighFrequencyEnergy(layer="net._blocks.0", cutoff=0.5),
            "residual_entropy_l16": ResidualEntropy(levels=16, patch=3),
            "residual_entropy_l8p5": ResidualEntropy(levels=8, patch=5),
            # learned (issue 11): multi-layer LID, Fourier features, small heads
            **{f"lid_{tag}": LocalIntrinsicDimensionality(layer=layer, k=20)
               for tag, layer in (("block2", "net._blocks.2"), ("block4", "net._blocks.4"),
                                  ("block10", "net._blocks.10"), ("block15", "net._blocks.15"))},
            "fourier_stem": FourierFeatures(layer="net._conv_stem"),
            "fourier_block0": FourierFeatures(layer="net._blocks.0"),
            "head_block4": LearnedHead(layer="net._blocks.4", hidden=16),
            "head_block10": LearnedHead(layer="net._blocks.10", hidden=16),
        })
    return found


#: Layers near the input: a backward pass seeded there costs a fraction of a forward pass.
EARLY_LAYERS = frozenset({"net._conv_stem", "net._blocks.0", "net._blocks.1", "net._blocks.2"})


def extra_forwards(features: dict[str, FeatureConfig]) -> float:
    """Extra cost of a feature set in forward-pass equivalents, beyond the model's own forward.

    A full guided backward (final-conv seed) costs about two forwards; one
    seeded at an early block only runs back through the first layers (about
    0.3); activations, logits and spectra are free; each distinct squeezer is
    one more forward pass.
    """
    cost = 0.0
    seeds = {(c.seed, c.layer) for c in features.values() if not isinstance(c, Signal) and c.response != "activation"}
    for _, layer in seeds:
        cost += 0.3 if layer in EARLY_LAYERS else 2.0
    squeezers = {(c.squeezer, c.bits, c.size) for c in features.values() if isinstance(c, SqueezeDistance)}
    return cost + len(squeezers)


def describe(features: dict[str, FeatureConfig]) -> str:
    return json.dumps({k: v.to_dict() for k, v in features.items()}, sort_keys=True)

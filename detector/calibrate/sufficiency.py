"""Minimum sample sizes: below them a calibration's held-out FPR says next to nothing.

Why these numbers (target FPR ``f``, 5 % by default):

- **held-out clean images >= max(200, ceil(10 / f))**: the held-out split is
  where the threshold's real FPR is *measured*. With 10 expected false
  positives (n = 200 at 5 %) an observed 5 % has the exact (Clopper–Pearson)
  95 % interval [2.4 %, 9.0 %]: it rules out twice the target. At n = 100 it is
  [1.6 %, 11.3 %] and does not; it only gets narrower than ±2 points at
  n ≈ 450 (n = 600: [3.4 %, 7.1 %]).
- **held-out sources >= 20**: images of one source (crops of one photo, one
  corpus collection) are correlated, so the effective sample is nearer the
  number of sources than of images; resampling-based intervals over clusters
  are unreliable with fewer than about 20 clusters.
- **fit clean images >= max(100, ceil(5 / f))** and **fit sources >= 10**:
  the threshold is the (1 - f) quantile of the fit scores; with fewer than 5
  images above it, it is set by one or two outliers.
- **successful adversarials per attack >= 50** (advisory, does not make the
  job insufficient: the threshold does not depend on them): below that, the
  exact 95 % interval of a TPR near 50 % is wider than ±15 points.

The check runs twice: at the start on the *candidates* (an upper bound: the
confidence floor has not been applied yet), and at the end on the images
actually used. ``--min-samples strict`` refuses (exit 2), ``warn`` prints a
loud warning and marks the report, ``off`` only records
``data.sample_size`` in the artifact (which is always written).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from .spec import JobConfigError

MIN_HOLDOUT_IMAGES = 200
MIN_HOLDOUT_SOURCES = 20
MIN_FIT_IMAGES = 100
MIN_FIT_SOURCES = 10
MIN_POSITIVES_PER_ATTACK = 50
#: Expected false positives at the target FPR the held-out / fit split must hold.
HOLDOUT_EXPECTED_FALSE_POSITIVES = 10
FIT_EXPECTED_FALSE_POSITIVES = 5
POLICIES = ("strict", "warn", "off")


class InsufficientSamplesError(JobConfigError):
    """``--min-samples strict`` and too few clean images or sources (the message says what is needed)."""


def required_sizes(target_fpr: float) -> dict[str, int]:
    """The minimums for a threshold at ``target_fpr`` (see the module docstring for why)."""
    return {  # most important first: the held-out split is where the FPR is measured
        "clean_holdout": max(MIN_HOLDOUT_IMAGES, math.ceil(HOLDOUT_EXPECTED_FALSE_POSITIVES / target_fpr - 1e-9)),
        "sources_holdout": MIN_HOLDOUT_SOURCES,
        "clean_fit": max(MIN_FIT_IMAGES, math.ceil(FIT_EXPECTED_FALSE_POSITIVES / target_fpr - 1e-9)),
        "sources_fit": MIN_FIT_SOURCES,
    }


@dataclass
class SampleSize:
    """Counts of one job against the minimums; :meth:`to_dict` is the artifact's ``data.sample_size``."""

    clean_fit: int
    clean_holdout: int
    sources_fit: int
    sources_holdout: int
    target_fpr: float
    adversarial_per_attack: dict[str, int] = field(default_factory=dict)
    stage: str = "result"  # "candidates" (before the confidence floor) or "result"

    @property
    def required(self) -> dict[str, int]:
        return required_sizes(self.target_fpr)

    @property
    def shortfalls(self) -> list[str]:
        """What is below its minimum, as sentences (empty when sufficient)."""
        names = {
            "clean_holdout": "clean held-out images", "sources_holdout": "held-out sources",
            "clean_fit": "clean fit images", "sources_fit": "fit sources",
        }
        return [f"{names[key]}: {getattr(self, key)} < {need} needed"
                for key, need in self.required.items() if getattr(self, key) < need]

    @property
    def sufficient(self) -> bool:
        return not self.shortfalls

    @property
    def weak_attacks(self) -> dict[str, int]:
        return {k: v for k, v in self.adversarial_per_attack.items() if v < MIN_POSITIVES_PER_ATTACK}

    def warning(self) -> str | None:
        """The multi-line warning (``None`` when sufficient); also what the artifact and the report carry."""
        if self.sufficient:
            return None
        upper = " (candidates, before the confidence floor: at most this many will be used)" if self.stage == "candidates" else ""
        lines = [
            f"TOO FEW CLEAN IMAGES for a threshold at target FPR {self.target_fpr:g}{upper}:",
            *[f"  - {s}" for s in self.shortfalls],
            f"The held-out FPR is measured on {self.clean_holdout} image(s) from {self.sources_holdout} source(s); "
            "its interval is wide and the AUC interval may not be meaningful.",
            "Use more clean images from more sources (the real-photo corpus, --images DIR, "
            "a larger --max-images) before putting this threshold in force.",
        ]
        if self.weak_attacks:
            lines.append("Few successful adversarials (TPR intervals wide): "
                         + ", ".join(f"{k} {v}" for k, v in self.weak_attacks.items()))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean_fit": self.clean_fit,
            "clean_holdout": self.clean_holdout,
            "sources_fit": self.sources_fit,
            "sources_holdout": self.sources_holdout,
            "adversarial_per_attack": dict(self.adversarial_per_attack),
            "required": self.required,
            "min_adversarial_per_attack": MIN_POSITIVES_PER_ATTACK,
            "target_fpr": self.target_fpr,
            "sufficient": self.sufficient,
            "shortfalls": self.shortfalls,
            "warning": self.warning(),
        }


def banner(text: str) -> str:
    """The loud stderr form of a warning: framed, every line prefixed."""
    rule = "!" * 78
    return "\n".join([rule, *[f"!! WARNING: {line}" for line in text.splitlines()], rule]) + "\n"


def enforce(size: SampleSize, policy: str, *, stream: TextIO | None = None) -> None:
    """Apply ``--min-samples``: ``strict`` raises, ``warn`` prints the banner on stderr, ``off`` does nothing."""
    if policy not in POLICIES:
        raise JobConfigError(f"--min-samples must be one of {', '.join(POLICIES)}, got {policy!r}")
    text = size.warning()
    if text is None or policy == "off":
        return
    if policy == "strict":
        need = "; ".join(size.shortfalls)
        raise InsufficientSamplesError(
            f"--min-samples strict: too few clean images for a threshold at target FPR {size.target_fpr:g} ({need}). "
            f"Needed: at least {size.required['clean_holdout']} clean held-out images from "
            f"{size.required['sources_holdout']} sources and {size.required['clean_fit']} fit images from "
            f"{size.required['sources_fit']} sources (after the confidence floor); add images (--images, the corpus, "
            "--max-images) or pass --min-samples warn"
        )
    (stream or sys.stderr).write(banner(text))
    (stream or sys.stderr).flush()

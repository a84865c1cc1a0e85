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
- **clean images that set the threshold >= max(100, ceil(5 / f))** and
  **their sources >= 10**: the threshold is the (1 - f) quantile of their
  scores; with fewer than 5 images above it, it is set by one or two
  outliers. They are the *threshold* split's images when something was
  refitted (the fit split's would give a threshold too low: a fitted combiner
  makes its own training rows look clean), and the fit and threshold splits'
  together when nothing was (nothing was fitted on either).
- **fit clean images >= 100** and **fit sources >= 10**, only when something
  is refitted (``--refit-combiner``, ``--refit-signals``): fewer, and the
  combiner and the learned signals' cross-fit by source (5 folds) have next
  to nothing to learn from; the held-out split would show it only as a poor
  AUC.
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


def required_sizes(target_fpr: float, *, refit: bool = False) -> dict[str, int]:
    """The minimums for a threshold at ``target_fpr`` (see the module docstring for why).

    ``clean_threshold`` / ``sources_threshold`` count the images the
    threshold is set on (see :attr:`SampleSize.threshold_rows`); the fit
    split has minimums of its own only when something is ``refit``.
    """
    required = {  # most important first: the held-out split is where the FPR is measured
        "clean_holdout": max(MIN_HOLDOUT_IMAGES, math.ceil(HOLDOUT_EXPECTED_FALSE_POSITIVES / target_fpr - 1e-9)),
        "sources_holdout": MIN_HOLDOUT_SOURCES,
        "clean_threshold": max(MIN_FIT_IMAGES, math.ceil(FIT_EXPECTED_FALSE_POSITIVES / target_fpr - 1e-9)),
        "sources_threshold": MIN_FIT_SOURCES,
    }
    if refit:
        required.update(clean_fit=MIN_FIT_IMAGES, sources_fit=MIN_FIT_SOURCES)
    return required


@dataclass
class SampleSize:
    """Counts of one job against the minimums; :meth:`to_dict` is the artifact's ``data.sample_size``.

    Counts are per split (fit, threshold, held-out; the splits share no
    original, so no source either). The defaults (no threshold split, nothing
    refitted) describe the protocol before the threshold split: the
    threshold set on the fit split.
    """

    clean_fit: int
    clean_holdout: int
    sources_fit: int
    sources_holdout: int
    target_fpr: float
    adversarial_per_attack: dict[str, int] = field(default_factory=dict)
    stage: str = "result"  # "candidates" (before the confidence floor) or "result"
    clean_threshold: int = 0
    sources_threshold: int = 0
    #: something was fitted on the fit split (combiner, learned signals): the threshold is set on the threshold split only
    refit: bool = False
    #: candidates made from originals of several splits, used for nothing
    clean_mixed: int = 0

    @property
    def threshold_splits(self) -> tuple[str, ...]:
        """The splits whose clean images set the threshold."""
        return ("threshold",) if self.refit else ("fit", "threshold")

    @property
    def threshold_rows(self) -> tuple[int, int]:
        """(clean images, sources) the threshold is set on."""
        if self.refit:
            return self.clean_threshold, self.sources_threshold
        return self.clean_fit + self.clean_threshold, self.sources_fit + self.sources_threshold

    def _counts(self) -> dict[str, int]:
        images, sources = self.threshold_rows
        return {"clean_holdout": self.clean_holdout, "sources_holdout": self.sources_holdout, "clean_threshold": images,
                "sources_threshold": sources, "clean_fit": self.clean_fit, "sources_fit": self.sources_fit}

    @property
    def required(self) -> dict[str, int]:
        return required_sizes(self.target_fpr, refit=self.refit)

    @property
    def shortfalls(self) -> list[str]:
        """What is below its minimum, as sentences (empty when sufficient)."""
        on = " + ".join(self.threshold_splits)
        names = {
            "clean_holdout": "clean held-out images", "sources_holdout": "held-out sources",
            "clean_threshold": f"clean images setting the threshold ({on} split)",
            "sources_threshold": f"sources setting the threshold ({on} split)",
            "clean_fit": "clean fit images (refitted on)", "sources_fit": "fit sources (refitted on)",
        }
        counts = self._counts()
        return [f"{names[key]}: {counts[key]} < {need} needed" for key, need in self.required.items() if counts[key] < need]

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
            "Use more clean images from more sources before putting this threshold in force: --images DIR "
            "(your own, one file per original), a larger --max-images, or the real-photo corpus "
            "(real photos from Debian packages: `python -m benchmarks.corpus build`, then calibrate without --images).",
        ]
        if self.weak_attacks:
            lines.append("Few successful adversarials (TPR intervals wide): "
                         + ", ".join(f"{k} {v}" for k, v in self.weak_attacks.items()))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        images, sources = self.threshold_rows
        return {
            "clean_fit": self.clean_fit,
            "clean_threshold": self.clean_threshold,
            "clean_holdout": self.clean_holdout,
            "clean_mixed": self.clean_mixed,
            "sources_fit": self.sources_fit,
            "sources_threshold": self.sources_threshold,
            "sources_holdout": self.sources_holdout,
            "refit": self.refit,
            "threshold_set_on": {"splits": list(self.threshold_splits), "clean": images, "sources": sources},
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
            f"{size.required['sources_holdout']} sources and {size.required['clean_threshold']} images setting the "
            f"threshold ({' + '.join(size.threshold_splits)} split) from {size.required['sources_threshold']} sources"
            + (f", and {size.required['clean_fit']} fit images from {size.required['sources_fit']} sources" if size.refit else "")
            + " (after the confidence floor); add images (--images, the corpus, --max-images) or pass --min-samples warn"
        )
    (stream or sys.stderr).write(banner(text))
    (stream or sys.stderr).flush()

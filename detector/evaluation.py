"""Detection metrics: ROC AUC and TPR at a fixed FPR, with bootstrap confidence intervals.

Conventions (the same in the study, the calibration job and the sidecar):
higher score = more adversarial; a threshold ``t`` flags ``score > t``. The
threshold for a target false-positive rate ``f`` is fitted on clean scores
only: the smallest observed clean score ``t`` with ``mean(clean > t) <= f``,
exactly what a calibration job does with held-out clean data. TPR at that
FPR is the fraction of (successful) adversarial scores above ``t``.

AUC comes from scikit-learn; the bootstrap resamples clean and adversarial
scores independently (stratified), ``n_boot`` times with a fixed seed, and
reports the 2.5 / 97.5 percentiles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

FPR_POINTS: tuple[float, ...] = (0.01, 0.05, 0.10)


def threshold_at_fpr(clean: np.ndarray, fpr: float) -> float:
    """Smallest clean score t with ``mean(clean > t) <= fpr``."""
    clean = np.sort(np.asarray(clean, dtype=np.float64))
    if clean.size == 0:
        raise ValueError("no clean scores")
    allowed = int(np.floor(fpr * clean.size + 1e-9))  # clean scores allowed above t
    return float(clean[clean.size - 1 - allowed]) if allowed < clean.size else float(clean[0] - 1.0)


def tpr_at_fpr(clean: np.ndarray, adversarial: np.ndarray, fpr: float) -> float:
    return float(np.mean(np.asarray(adversarial) > threshold_at_fpr(clean, fpr)))


def auc(clean: np.ndarray, adversarial: np.ndarray) -> float:
    labels = np.r_[np.zeros(len(clean)), np.ones(len(adversarial))]
    return float(roc_auc_score(labels, np.r_[clean, adversarial]))


def roc(clean: np.ndarray, adversarial: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.r_[np.zeros(len(clean)), np.ones(len(adversarial))]
    fpr, tpr, _ = roc_curve(labels, np.r_[clean, adversarial])
    return fpr, tpr


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass(frozen=True)
class DetectionResult:
    """One detector on one attack: counts, AUC and TPR at each FPR point, with 95% intervals."""

    clean: int
    adversarial: int
    auc: Interval
    tpr: dict[str, Interval]  # "0.01" -> TPR at 1% FPR

    def to_dict(self) -> dict:
        return {
            "clean": self.clean,
            "adversarial": self.adversarial,
            "auc": asdict(self.auc),
            "tpr": {key: asdict(value) for key, value in self.tpr.items()},
        }


def evaluate(
    clean: np.ndarray,
    adversarial: np.ndarray,
    *,
    fprs: Sequence[float] = FPR_POINTS,
    n_boot: int = 1000,
    seed: int = 0,
) -> DetectionResult:
    """AUC and TPR@FPR with stratified bootstrap 95% intervals."""
    clean = np.asarray(clean, dtype=np.float64)
    adversarial = np.asarray(adversarial, dtype=np.float64)
    if clean.size == 0 or adversarial.size == 0:
        nan = Interval(float("nan"), float("nan"), float("nan"))
        return DetectionResult(int(clean.size), int(adversarial.size), nan, {f"{f:g}": nan for f in fprs})
    rng = np.random.default_rng(seed)
    boot_auc = np.empty(n_boot)
    boot_tpr = np.empty((n_boot, len(fprs)))
    for b in range(n_boot):
        c = clean[rng.integers(0, clean.size, clean.size)]
        a = adversarial[rng.integers(0, adversarial.size, adversarial.size)]
        boot_auc[b] = auc(c, a)
        boot_tpr[b] = [tpr_at_fpr(c, a, f) for f in fprs]

    def interval(value: float, samples: np.ndarray) -> Interval:
        low, high = np.percentile(samples, [2.5, 97.5])
        return Interval(float(value), float(low), float(high))

    return DetectionResult(
        clean=int(clean.size),
        adversarial=int(adversarial.size),
        auc=interval(auc(clean, adversarial), boot_auc),
        tpr={f"{f:g}": interval(tpr_at_fpr(clean, adversarial, f), boot_tpr[:, i]) for i, f in enumerate(fprs)},
    )

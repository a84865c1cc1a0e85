"""Detection metrics: thresholds at a target FPR, TPR, AUC and bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest

from detector.evaluation import auc, evaluate, threshold_at_fpr, tpr_at_fpr


def test_threshold_keeps_the_false_positive_rate_at_or_below_target():
    clean = np.arange(100, dtype=float)  # 0..99
    t = threshold_at_fpr(clean, 0.05)
    assert t == 94.0 and np.mean(clean > t) == pytest.approx(0.05)
    assert np.mean(clean > threshold_at_fpr(clean, 0.013)) <= 0.013
    assert threshold_at_fpr(clean, 0.0) == 99.0
    assert np.mean(clean > threshold_at_fpr(clean, 1.0)) == 1.0
    with pytest.raises(ValueError):
        threshold_at_fpr(np.array([]), 0.1)


def test_tpr_auc_and_intervals_on_known_distributions():
    clean = np.arange(100, dtype=float)
    adversarial = np.array([50.0, 95.0, 96.0, 200.0])
    assert tpr_at_fpr(clean, adversarial, 0.05) == 0.75
    assert auc(np.zeros(3), np.ones(3)) == 1.0
    assert auc(np.ones(3), np.zeros(3)) == 0.0
    rng = np.random.default_rng(0)
    separated = evaluate(rng.normal(0, 1, 300), rng.normal(3, 1, 300), n_boot=200)
    assert separated.auc.value > 0.95
    assert separated.auc.low <= separated.auc.value <= separated.auc.high
    assert set(separated.tpr) == {"0.01", "0.05", "0.1"}
    assert separated.tpr["0.01"].value <= separated.tpr["0.05"].value <= separated.tpr["0.1"].value
    chance = evaluate(rng.normal(0, 1, 300), rng.normal(0, 1, 300), n_boot=200)
    assert chance.auc.low < 0.5 < chance.auc.high
    assert evaluate(np.arange(5.0), np.arange(5.0), n_boot=10, seed=3) == evaluate(np.arange(5.0), np.arange(5.0), n_boot=10, seed=3)

"""Intervals that say what they really are: exact binomial for rates, cluster bootstrap for AUC.

Why not the image-level bootstrap everywhere: resampling 2 held-out images
gives the interval [0.00, 0.00] for an FPR of 0/2, i.e. a false sense of
precision. Two replacements, each for what it measures:

- a rate counted on n images (held-out FPR at the threshold, TPR at the
  threshold) gets the exact Clopper–Pearson 95 % interval, which is honest
  at any n (0/2 -> [0, 0.84]) and never collapses;
- an AUC gets a bootstrap that resamples whole *sources* (photos, files,
  corpus sources), the unit that is actually independent: crops of one photo
  are near-duplicates, so resampling images pretends there are more
  independent observations than there are. With fewer than
  :data:`MIN_AUC_SOURCES` sources on a side no interval is given at all, only
  the label ``"not meaningful: N sources"``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: An AUC interval needs at least this many sources on each side (clean, adversarial); below, it is not given.
MIN_AUC_SOURCES = 10
CP_METHOD = "Clopper-Pearson exact 95 %"
CLUSTER_METHOD = "bootstrap over sources (cluster), 95 % percentile"


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Exact binomial interval of ``k`` successes in ``n`` trials; ``None`` when ``n == 0``."""
    if n <= 0:
        return None
    from scipy.stats import binomtest

    interval = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return float(interval.low), float(interval.high)


def rate_interval(k: int, n: int) -> dict[str, Any]:
    """``{"value", "low", "high", "k", "n", "method"}`` for ``k`` of ``n`` (value and bounds ``None`` when n is 0)."""
    bounds = clopper_pearson(k, n)
    return {
        "value": (k / n) if n else None,
        "low": bounds[0] if bounds else None,
        "high": bounds[1] if bounds else None,
        "k": int(k),
        "n": int(n),
        "method": CP_METHOD,
    }


def _weighted_auc(clean: np.ndarray, adversarial: np.ndarray, w_clean: np.ndarray, w_adv: np.ndarray) -> np.ndarray:
    """AUC (ties count half) for each row of the weight matrices ``[B, n_clean]``, ``[B, n_adv]``.

    Sorting once and reading cumulative clean weights at each adversarial
    score makes one bootstrap replicate O(n), so 1000 replicates cost little.
    """
    order = np.argsort(clean, kind="stable")
    sorted_clean = clean[order]
    cumulative = np.concatenate([np.zeros((w_clean.shape[0], 1)), np.cumsum(w_clean[:, order], axis=1)], axis=1)
    left = np.searchsorted(sorted_clean, adversarial, side="left")
    right = np.searchsorted(sorted_clean, adversarial, side="right")
    below = cumulative[:, left]
    ties = cumulative[:, right] - below
    numerator = np.sum(w_adv * (below + 0.5 * ties), axis=1)
    denominator = w_clean.sum(axis=1) * w_adv.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return numerator / denominator


def _cluster_weights(groups: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, n]`` weights: how often each observation's source was drawn in each replicate."""
    _, codes = np.unique(groups, return_inverse=True)
    k = int(codes.max()) + 1 if len(codes) else 0
    draws = rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot) if k else np.zeros((n_boot, 0))
    return draws[:, codes].astype(np.float64)


def cluster_auc(
    clean: np.ndarray,
    adversarial: np.ndarray,
    clean_groups: np.ndarray,
    adversarial_groups: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    min_sources: int = MIN_AUC_SOURCES,
) -> dict[str, Any]:
    """AUC of clean vs adversarial scores with a 95 % interval resampled by source on each side.

    Returns ``{"value", "low", "high", "sources_clean", "sources_adversarial",
    "meaningful", "note", "method"}``; with fewer than ``min_sources`` sources
    on either side ``low``/``high`` are ``None`` and ``note`` reads
    ``"not meaningful: N sources"`` (N the smaller side).
    """
    clean = np.asarray(clean, dtype=np.float64)
    adversarial = np.asarray(adversarial, dtype=np.float64)
    clean_groups, adversarial_groups = np.asarray(clean_groups), np.asarray(adversarial_groups)
    k_clean, k_adv = len(np.unique(clean_groups)), len(np.unique(adversarial_groups))
    result: dict[str, Any] = {
        "value": None, "low": None, "high": None, "sources_clean": k_clean, "sources_adversarial": k_adv,
        "meaningful": False, "note": None, "method": CLUSTER_METHOD,
    }
    if clean.size == 0 or adversarial.size == 0:
        result["note"] = "no clean or no adversarial scores"
        return result
    ones = (np.ones((1, clean.size)), np.ones((1, adversarial.size)))
    result["value"] = float(_weighted_auc(clean, adversarial, *ones)[0])
    fewest = min(k_clean, k_adv)
    if fewest < min_sources:
        result["note"] = f"not meaningful: {fewest} sources"
        return result
    rng = np.random.default_rng(seed)
    boots = _weighted_auc(clean, adversarial, _cluster_weights(clean_groups, n_boot, rng),
                          _cluster_weights(adversarial_groups, n_boot, rng))
    low, high = np.nanpercentile(boots, [2.5, 97.5])
    result.update(low=float(low), high=float(high), meaningful=True)
    return result


def cluster_rate(flags: np.ndarray, groups: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """A rate (e.g. an FPR) with a 95 % percentile interval resampled by *source*.

    Inputs of one source (crops, mirror images of one photo) are flagged or
    not together, so an exact binomial interval over images is too narrow for
    "the FPR on new sources"; this one redraws whole sources.
    """
    flags = np.asarray(flags, dtype=np.float64)
    if not len(flags):
        return {"value": None, "low": None, "high": None, "n": 0, "sources": 0, "method": "bootstrap over sources"}
    weights = _cluster_weights(np.asarray(groups), n_boot, np.random.default_rng(seed))
    rates = (weights @ flags) / np.maximum(weights.sum(axis=1), 1)
    low, high = np.percentile(rates, [2.5, 97.5])
    return {"value": float(flags.mean()), "low": float(low), "high": float(high), "n": int(len(flags)),
            "sources": int(len(np.unique(groups))), "method": "bootstrap over sources"}


"""Plain NumPy reference of the average local spatial entropy (tests only).

Written straight from the definition, one patch at a time with an explicit
histogram, so that it shares no code or trick with ``detector.entropy``.
"""

from __future__ import annotations

import numpy as np


def reference_local_entropy(levels: np.ndarray, patch: int, stride: int) -> np.ndarray:
    """``[H, W]`` integer gray levels → ``[H', W']`` patch entropies in bits (valid patches)."""
    height, width = levels.shape
    rows = range(0, height - patch + 1, stride)
    cols = range(0, width - patch + 1, stride)
    out = np.zeros((len(rows), len(cols)))
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            values = levels[top : top + patch, left : left + patch].ravel()
            _, counts = np.unique(values, return_counts=True)
            h = counts / values.size
            out[i, j] = -(h * np.log2(h)).sum()
    return out


def reference_gray_levels(feature: np.ndarray, gray: str, normalize: str, levels: int, percentile: float = 99.0) -> np.ndarray:
    """``[C, H, W]`` float map → integer gray levels, the ScoreConfig way."""
    if gray == "luminance":
        g = 0.299 * feature[0] + 0.587 * feature[1] + 0.114 * feature[2]
    elif gray == "abs_sum":
        g = np.abs(feature).sum(0)
    elif gray == "abs_max":
        g = np.abs(feature).max(0)
    elif gray == "sum":
        g = feature.sum(0)
    elif gray == "mean":
        g = feature.mean(0)
    else:
        g = np.sqrt((feature**2).sum(0))
    # float32 throughout, as the detector computes: a float64 reference would put
    # a few pixels that sit exactly on a level boundary into the neighbouring level.
    g = g.astype(np.float32)
    if normalize == "minmax":
        lo, hi = g.min(), g.max()
    elif normalize == "percentile":
        ordered = np.sort(g, axis=None)
        n = ordered.size
        high_k = min(n, max(1, int(np.ceil(percentile / 100.0 * n))))  # the k-th smallest value
        lo, hi = ordered[n - high_k], ordered[high_k - 1]
        g = np.clip(g, lo, hi)
    elif normalize == "standardize":
        z = (g - g.mean(dtype=np.float32)) / g.std(ddof=1, dtype=np.float32)
        unit = np.clip((z + np.float32(3)) / np.float32(6), 0, 1)
        return np.clip(np.floor(unit * np.float32(levels)), 0, levels - 1).astype(np.int64)
    unit = (g - lo) / (hi - lo) if hi > lo else np.zeros_like(g)
    return np.clip(np.floor(unit * np.float32(levels)), 0, levels - 1).astype(np.int64)


def reference_average_entropy(feature: np.ndarray, *, gray: str, normalize: str, levels: int, patch: int, stride: int) -> float:
    return float(reference_local_entropy(reference_gray_levels(feature, gray, normalize, levels), patch, stride).mean())

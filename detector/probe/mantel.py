"""The Mantel statistic between input-space and output-space distances of a neighbourhood.

Aghdam, Heravi & Puig 2017 ("Explaining adversarial examples by local
properties of CNNs") sample points around an input and correlate the matrix of
their pairwise input distances with the matrix of their pairwise output
distances: a CNN whose output distances follow its input distances has a high
Mantel correlation; they find it low, and lower around adversarial examples.

The statistic and its permutation test come from scikit-bio
(:func:`skbio.stats.distance.mantel`, the maintained reference implementation);
distances from :func:`scipy.spatial.distance.pdist`. scikit-bio is imported
only here, when a probe runs.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import pdist, squareform


def mantel_statistic(x_distances: np.ndarray, y_distances: np.ndarray, *, method: str = "pearson",
                     permutations: int = 0, seed: int = 0) -> tuple[float, float | None]:
    """``(r, p)`` of two square symmetric distance matrices (``p`` is ``None`` without permutations)."""
    from skbio.stats.distance import mantel

    x = np.asarray(x_distances, dtype=np.float64)
    y = np.asarray(y_distances, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2 or x.shape[0] != x.shape[1] or x.shape[0] < 3:
        raise ValueError(f"Mantel needs two equal square matrices of at least 3 points, got {x.shape} and {y.shape}")
    r, p, _ = mantel(x, y, method=method, permutations=permutations, seed=seed)
    return float(r), (None if permutations == 0 or p is None or np.isnan(p) else float(p))


def neighbourhood_mantel(inputs: np.ndarray, outputs: np.ndarray, *, method: str = "pearson",
                         permutations: int = 0, seed: int = 0) -> tuple[float, float | None]:
    """Mantel ``(r, p)`` between Euclidean distances of ``inputs`` ``[m, D]`` and of ``outputs`` ``[m, K]``."""
    a = squareform(pdist(np.asarray(inputs, dtype=np.float64).reshape(len(inputs), -1)))
    b = squareform(pdist(np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)))
    return mantel_statistic(a, b, method=method, permutations=permutations, seed=seed)

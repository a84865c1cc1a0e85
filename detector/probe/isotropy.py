"""Local isotropy and symmetry of a model around an input (Aghdam, Heravi & Puig 2017).

Probe: ``n`` random directions ``d_i`` of equal L2 norm (Gaussian, normalized),
and the output changes ``Δ⁺_i = ‖f(x + d_i) − f(x)‖`` and ``Δ⁻_i = ‖f(x − d_i) − f(x)‖``.

- **isotropy** is measured by the coefficient of variation of all ``2n``
  changes (std / mean): 0 for a model that changes its output equally in every
  direction, large when a few directions dominate;
- **asymmetry** is ``mean_i |Δ⁺_i − Δ⁻_i| / (Δ⁺_i + Δ⁻_i)``: 0 for a model that
  is locally symmetric (e.g. linear) around ``x``, up to 1.

Perturbed inputs are *not* clipped to ``[0, 1]``: clipping would change the
directions' norms and break the ± pairing the measures rely on.
"""

from __future__ import annotations

import numpy as np
import torch


def random_directions(shape: tuple[int, ...], count: int, radius: float, generator: torch.Generator,
                      *, radii: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[count, *shape]`` Gaussian directions scaled to L2 norm ``radius`` (or per-direction ``radii``)."""
    directions = torch.randn((count, *shape), generator=generator, dtype=dtype)
    norms = directions.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = (radii.to(dtype) if radii is not None else torch.full((count,), float(radius), dtype=dtype)) / norms
    return directions * scale.view(-1, *([1] * len(shape)))


def isotropy_symmetry(center: np.ndarray, plus: np.ndarray, minus: np.ndarray) -> dict[str, float]:
    """``{"isotropy_cv", "asymmetry"}`` from outputs ``f(x)`` ``[K]``, ``f(x+d_i)`` and ``f(x-d_i)`` ``[n, K]``."""
    c = np.asarray(center, dtype=np.float64).reshape(1, -1)
    up = np.linalg.norm(np.asarray(plus, dtype=np.float64) - c, axis=1)
    down = np.linalg.norm(np.asarray(minus, dtype=np.float64) - c, axis=1)
    both = np.concatenate([up, down])
    mean = both.mean()
    cv = float(both.std() / mean) if mean > 0 else 0.0
    total = up + down
    asymmetry = float(np.mean(np.where(total > 0, np.abs(up - down) / np.where(total > 0, total, 1.0), 0.0)))
    return {"isotropy_cv": cv, "asymmetry": asymmetry}

"""Run the local-property probes on a batch of images and compare clean with adversarial.

Per input ``x`` one batched forward pass evaluates ``f(x)``, ``f(x ± d_i)`` for
``directions`` random directions of L2 norm ``radius`` (isotropy, symmetry,
Lipschitz) and ``f(x + δ_j)`` for ``neighbours`` points at radii spread
uniformly over ``(0, radius]`` (Mantel: with equal radii all pairwise input
distances would be almost equal in 150k dimensions, leaving nothing to
correlate). Each probe is computed on the logits and on the softmax
probabilities (Aghdam et al. state the Lipschitz result for the latter).

:func:`auc_with_interval` scores one probe as a detection signal: the ROC AUC
of adversarial vs clean values with a percentile bootstrap interval
(resampling clean and adversarial values separately).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .isotropy import isotropy_symmetry, random_directions
from .lipschitz import lipschitz_from_outputs
from .mantel import neighbourhood_mantel

#: Probe values per input, in report order.
PROBES: tuple[str, ...] = (
    "isotropy_cv_logits", "asymmetry_logits", "lipschitz_logits", "mantel_logits",
    "isotropy_cv_softmax", "asymmetry_softmax", "lipschitz_softmax", "mantel_softmax",
)
#: Reported beside the probes as a baseline: a probe that only restates the model's confidence adds
#: nothing to the detector's logit signals (logit margin, softmax entropy).
BASELINES: tuple[str, ...] = ("top1_probability",)
REPORTED: tuple[str, ...] = PROBES + BASELINES


@dataclass(frozen=True)
class ProbeConfig:
    """How the neighbourhood of an input is sampled (recorded in every report)."""

    #: L2 norm of the isotropy/Lipschitz directions and largest neighbour radius, in [0, 1] pixel units
    #: (1.0 is 0.0026 per value over 3×224×224, about 2/3 of one 8-bit gray level)
    radius: float = 1.0
    directions: int = 8
    neighbours: int = 10
    seed: int = 0
    batch_size: int = 64

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _forward(model: nn.Module, batch: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(batch[i : i + batch_size]) for i in range(0, len(batch), batch_size)])


def probe_one(model: nn.Module, x: torch.Tensor, config: ProbeConfig = ProbeConfig(),
              generator: torch.Generator | None = None) -> dict[str, float]:
    """All :data:`PROBES` (and the :data:`BASELINES`) for one input ``[3, H, W]``."""
    generator = generator or torch.Generator().manual_seed(config.seed)
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    shape = tuple(x.shape)
    directions = random_directions(shape, config.directions, config.radius, generator)
    radii = config.radius * torch.arange(1, config.neighbours + 1, dtype=torch.float32) / config.neighbours
    offsets = random_directions(shape, config.neighbours, config.radius, generator, radii=radii)
    x = x.detach().float().cpu()
    batch = torch.cat([x.unsqueeze(0), x + directions, x - directions, x + offsets]).to(device)
    logits = _forward(model, batch, config.batch_size).double().cpu()
    n = config.directions
    values: dict[str, float] = {}
    for space, outputs in (("logits", logits), ("softmax", torch.softmax(logits, dim=1))):
        out = outputs.numpy()
        center, plus, minus, around = out[0], out[1 : 1 + n], out[1 + n : 1 + 2 * n], out[1 + 2 * n :]
        shape_stats = isotropy_symmetry(center, plus, minus)
        values[f"isotropy_cv_{space}"] = shape_stats["isotropy_cv"]
        values[f"asymmetry_{space}"] = shape_stats["asymmetry"]
        values[f"lipschitz_{space}"] = lipschitz_from_outputs(
            center, np.concatenate([plus, minus]), torch.cat([directions, -directions]).numpy())
        points = torch.cat([torch.zeros(1, *shape), offsets]).flatten(1).double().numpy()
        values[f"mantel_{space}"] = neighbourhood_mantel(points, np.concatenate([center[None], around]))[0]
    values["top1_probability"] = float(torch.softmax(logits[0], dim=0).max())
    return {name: values[name] for name in REPORTED}


def probe_images(model: nn.Module, pixels: torch.Tensor, config: ProbeConfig = ProbeConfig()) -> list[dict[str, float]]:
    """:func:`probe_one` for every input of ``[N, 3, H, W]`` (one seeded generator: reproducible)."""
    generator = torch.Generator().manual_seed(config.seed)
    return [probe_one(model, pixels[i], config, generator) for i in range(len(pixels))]


def auc_with_interval(clean: Any, adversarial: Any, *, resamples: int = 1000, seed: int = 0,
                      level: float = 0.95) -> dict[str, float | None]:
    """ROC AUC (adversarial = positive, higher value = more adversarial) and a bootstrap interval.

    ``AUC < 0.5`` means the probe is *lower* on adversarials; ``separation``
    is ``max(AUC, 1 − AUC)``, what a detector using the probe in the better
    direction would get.
    """
    from sklearn.metrics import roc_auc_score

    c = np.asarray(clean, dtype=np.float64)
    a = np.asarray(adversarial, dtype=np.float64)
    c, a = c[np.isfinite(c)], a[np.isfinite(a)]
    if len(c) < 2 or len(a) < 2:
        return {"auc": None, "low": None, "high": None, "separation": None, "clean": len(c), "adversarial": len(a)}

    def auc(cs: np.ndarray, advs: np.ndarray) -> float:
        return float(roc_auc_score(np.r_[np.zeros(len(cs)), np.ones(len(advs))], np.r_[cs, advs]))

    rng = np.random.default_rng(seed)
    draws = [auc(rng.choice(c, len(c)), rng.choice(a, len(a))) for _ in range(resamples)]
    tail = (1.0 - level) / 2.0
    value = auc(c, a)
    return {"auc": value, "low": float(np.quantile(draws, tail)), "high": float(np.quantile(draws, 1 - tail)),
            "separation": max(value, 1.0 - value), "clean": len(c), "adversarial": len(a)}


def summarize(values: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per probe (and baseline): median, quartiles, mean and count."""
    summary = {}
    for name in REPORTED:
        column = np.array([v[name] for v in values if np.isfinite(v[name])], dtype=np.float64)
        if len(column) == 0:
            summary[name] = {"n": 0}
            continue
        q1, median, q3 = np.quantile(column, [0.25, 0.5, 0.75])
        summary[name] = {"n": int(len(column)), "median": float(median), "q1": float(q1), "q3": float(q3),
                         "mean": float(column.mean())}
    return summary


def confidence_correlation(values: list[dict[str, float]]) -> dict[str, float | None]:
    """Spearman correlation of every probe with the top-1 probability over ``values`` (clean and adversarial).

    Near ±1: the probe mostly restates the model's confidence.
    """
    from scipy.stats import spearmanr

    confidence = np.array([v["top1_probability"] for v in values], dtype=np.float64)
    result: dict[str, float | None] = {}
    for name in PROBES:
        column = np.array([v[name] for v in values], dtype=np.float64)
        keep = np.isfinite(column) & np.isfinite(confidence)
        result[name] = float(spearmanr(column[keep], confidence[keep])[0]) if keep.sum() > 2 else None
    return result

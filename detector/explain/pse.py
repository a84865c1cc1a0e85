"""Promotion–suppression analysis of an adversarial example (Xu et al. 2019).

Xu, Liu, Zhao, Chen, Lin, Wang, "Interpreting adversarial examples by
activation promotion and suppression" (arXiv 1904.02057): a perturbation that
turns the true class ``t`` into the adversarial class ``a`` does so mainly by
*suppressing* ``t``, mainly by *promoting* ``a``, or by both in similar measure.

The rule advsentry applies (stated on every explanation page):

- logits are first **centred** (their mean over classes subtracted), because a
  uniform shift of all logits changes no probability and is neither promotion
  nor suppression (``centre=False`` uses raw logits);
- suppression ``S = max(0, -(z_t(x') - z_t(x)))``, promotion
  ``P = max(0, z_a(x') - z_a(x))``, promotion share ``P / (P + S)``;
- share ≥ ``dominance`` (default 2/3, i.e. at least twice the other effect) →
  **promotion-dominated**; share ≤ 1 − ``dominance`` → **suppression-dominated**;
  otherwise **balanced**; ``a == t`` → **no label change**; ``P + S = 0`` →
  **neither** (the label moved through other classes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: Default share of the larger effect for a "dominated" category (2/3: at least twice the other).
DEFAULT_DOMINANCE = 2.0 / 3.0

CATEGORIES = ("suppression-dominated", "promotion-dominated", "balanced", "no label change", "neither")


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def pse_rule(dominance: float = DEFAULT_DOMINANCE, centre: bool = True) -> str:
    """The category rule in words, with its thresholds (for reports)."""
    low = 1.0 - dominance
    return (
        f"{'centred ' if centre else ''}logits z; suppression S = max(0, -Δz_true), promotion "
        f"P = max(0, Δz_adv), share = P/(P+S); share ≥ {dominance:.3f} → promotion-dominated, "
        f"share ≤ {low:.3f} → suppression-dominated, otherwise balanced; "
        "same top-1 class → no label change; P+S = 0 → neither"
    )


@dataclass(frozen=True)
class PromotionSuppression:
    """One clean/adversarial pair's promotion–suppression numbers and category."""

    true_class: int
    adversarial_class: int
    delta_true_logit: float
    delta_adversarial_logit: float
    p_true_reference: float
    p_true_input: float
    p_adversarial_reference: float
    p_adversarial_input: float
    suppression: float
    promotion: float
    promotion_share: float | None
    category: str
    rule: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def categorize(delta_true: float, delta_adversarial: float, *, dominance: float = DEFAULT_DOMINANCE,
               same_class: bool = False) -> tuple[str, float, float, float | None]:
    """``(category, suppression, promotion, promotion share)`` of the two logit changes."""
    if not 0.5 < dominance <= 1.0:
        raise ValueError(f"dominance={dominance}: expected a share in (0.5, 1]")
    suppression = max(0.0, -float(delta_true))
    promotion = max(0.0, float(delta_adversarial))
    if same_class:
        return "no label change", suppression, promotion, None
    total = suppression + promotion
    if total <= 0.0:
        return "neither", suppression, promotion, None
    share = promotion / total
    if share >= dominance:
        category = "promotion-dominated"
    elif share <= 1.0 - dominance:
        category = "suppression-dominated"
    else:
        category = "balanced"
    return category, suppression, promotion, share


def promotion_suppression(reference_logits: Any, input_logits: Any, *, true_class: int | None = None,
                          adversarial_class: int | None = None, dominance: float = DEFAULT_DOMINANCE,
                          centre: bool = True) -> PromotionSuppression:
    """Analyse one pair of logit vectors ``[num_classes]``: reference (clean) and input (suspect).

    ``true_class`` defaults to the reference's top-1, ``adversarial_class`` to the input's.
    """
    ref = np.asarray(reference_logits, dtype=np.float64).reshape(-1)
    adv = np.asarray(input_logits, dtype=np.float64).reshape(-1)
    if ref.shape != adv.shape:
        raise ValueError(f"logit vectors differ in shape: {ref.shape} vs {adv.shape}")
    t = int(ref.argmax()) if true_class is None else int(true_class)
    a = int(adv.argmax()) if adversarial_class is None else int(adversarial_class)
    zr, za = (ref - ref.mean(), adv - adv.mean()) if centre else (ref, adv)
    delta_t, delta_a = float(za[t] - zr[t]), float(za[a] - zr[a])
    category, s, p, share = categorize(delta_t, delta_a, dominance=dominance, same_class=t == a)
    pr, pa = _softmax(ref), _softmax(adv)
    return PromotionSuppression(
        t, a, delta_t, delta_a, float(pr[t]), float(pa[t]), float(pr[a]), float(pa[a]), s, p, share, category,
        pse_rule(dominance, centre),
    )

"""The attack sets of the study: attack, parameters, and how many clean images each may use.

Cheap attacks run on every clean image; expensive ones (many gradient steps or
many model queries on a 2-core CPU) on the first ``cap`` images of each part.
All adversarials are quantized to 8 bits, as real uploaded images are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AttackSet:
    name: str
    attack: str
    params: dict[str, Any] = field(default_factory=dict)
    cap: int | None = None  # clean images per part (None = all)
    label: str = ""


FULL_SUITE: tuple[AttackSet, ...] = (
    AttackSet("fgsm_2", "fgsm", {"eps": 2 / 255}, label="FGSM ε=2/255"),
    AttackSet("fgsm_8", "fgsm", {"eps": 8 / 255}, label="FGSM ε=8/255"),
    AttackSet("pgd_linf_2", "pgd_linf", {"eps": 2 / 255, "alpha": 0.5 / 255, "steps": 10}, label="PGD L∞ ε=2/255"),
    AttackSet("gradient_l2", "gradient_l2", {"eps": 2.0}, label="gradient (L2 step ε=2.0)"),
    AttackSet("deepfool", "deepfool", {"steps": 50, "overshoot": 0.02, "candidates": 10}, cap=60, label="DeepFool"),
    AttackSet("cw_l2", "cw_l2", {"binary_search_steps": 3, "max_iter": 10}, cap=24, label="C&W L2"),
    AttackSet("one_pixel", "one_pixel", {"popsize": 40, "max_iter": 5}, cap=8, label="one-pixel (DE)"),
    AttackSet("boundary", "boundary", {"max_iter": 25, "num_trial": 10, "sample_size": 10, "init_size": 50}, cap=6, label="boundary"),
)

SMOKE_SUITE: tuple[AttackSet, ...] = (
    AttackSet("fgsm_8", "fgsm", {"eps": 8 / 255}, label="FGSM ε=8/255"),
    AttackSet("pgd_linf_2", "pgd_linf", {"eps": 2 / 255, "alpha": 1 / 255, "steps": 2}, label="PGD L∞ ε=2/255"),
)

#: Attacks the generalization experiment trains on; it is tested on all the others.
SEEN_ATTACKS: tuple[str, ...] = ("fgsm_2", "fgsm_8", "pgd_linf_2")

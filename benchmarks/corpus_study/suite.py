"""The attack sets of the corpus study, and which of them the combiner may see.

Every attack runs on the bundled EfficientNet-Lite0 except the transfer sets,
crafted on EfficientNet-Lite1 (a surrogate: black box without probing) and
only then shown to Lite0. All adversarials are quantized to 8 bits and only
successful ones are positives. ``cap`` bounds the clean images per part for
attacks that cost many passes or queries on a 2-core CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..detection_study.suite import AttackSet as StudyAttackSet


@dataclass(frozen=True)
class AttackSet(StudyAttackSet):
    surrogate: str | None = None  # craft on this model, evaluate on the bundled one (transfer)
    paper: bool = False  # one of the paper's five attacks


FULL_SUITE: tuple[AttackSet, ...] = (
    AttackSet("fgsm_2", "fgsm", {"eps": 2 / 255}, cap=160, label="FGSM ε=2/255", paper=True),
    AttackSet("fgsm_8", "fgsm", {"eps": 8 / 255}, cap=160, label="FGSM ε=8/255", paper=True),
    AttackSet("gradient_l2", "gradient_l2", {"eps": 2.0}, cap=160, label="gradient (L2 step 2.0)", paper=True),
    AttackSet("pgd_linf_2", "pgd_linf", {"eps": 2 / 255, "alpha": 0.5 / 255, "steps": 10}, cap=60, label="PGD L∞ ε=2/255"),
    AttackSet("pgd_linf_4", "pgd_linf", {"eps": 4 / 255, "alpha": 1 / 255, "steps": 10}, cap=60, label="PGD L∞ ε=4/255"),
    AttackSet("deepfool", "deepfool", {"steps": 50, "overshoot": 0.02, "candidates": 10}, cap=40, label="DeepFool", paper=True),
    AttackSet("cw_l2", "cw_l2", {"binary_search_steps": 3, "max_iter": 10}, cap=16, label="C&W L2"),
    AttackSet("square", "square", {"eps": 8 / 255, "n_queries": 300}, cap=30, label="Square (black box, ≤300 queries)"),
    AttackSet("transfer_lite1", "pgd_linf", {"eps": 8 / 255, "alpha": 2 / 255, "steps": 10}, cap=60,
              label="transfer: PGD 8/255 on Lite1", surrogate="efficientnet-lite1"),
    AttackSet("one_pixel", "one_pixel", {"popsize": 40, "max_iter": 5}, cap=8, label="one-pixel (DE)", paper=True),
    AttackSet("boundary", "boundary", {"max_iter": 25, "num_trial": 10, "sample_size": 10, "init_size": 50}, cap=6,
              label="boundary", paper=True),
)

SMOKE_SUITE: tuple[AttackSet, ...] = (
    AttackSet("fgsm_8", "fgsm", {"eps": 8 / 255}, cap=160, label="FGSM ε=8/255", paper=True),
    AttackSet("pgd_linf_2", "pgd_linf", {"eps": 2 / 255, "alpha": 1 / 255, "steps": 2}, label="PGD L∞ ε=2/255"),
)

#: The combiner is fitted on these only; every other attack is reported as unseen.
SEEN_ATTACKS: tuple[str, ...] = ("fgsm_2", "fgsm_8", "pgd_linf_2", "deepfool")

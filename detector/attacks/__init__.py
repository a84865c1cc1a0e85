"""Attack generators that produce adversarial examples to calibrate the detector.

``ATTACKS`` maps each attack's ``name`` to its class; ``make_attack`` builds
one by name. Every attack takes ``[0, 1]`` pixel tensors and returns an
:class:`AttackResult`. Library imports (torchattacks, ART, scipy) happen only
when an attack runs, so importing this package stays cheap for the sidecar.
See ``README.md`` here for the per-attack table.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from detector.attacks.base import Attack, AttackResult, Family, RawAdversarial
from detector.attacks.decision import Boundary, HopSkipJump
from detector.attacks.fooling import FoolingCPPN, FoolingDirect
from detector.attacks.gradient import FGSM, PGDL2, CarliniWagnerL2, DeepFool, GradientL2, PGDLinf
from detector.attacks.query import PredictFn, QueryModel
from detector.attacks.score import OnePixel, Square
from detector.attacks.universal import Universal

ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls
    for cls in (
        # the paper's five
        FGSM,
        GradientL2,
        OnePixel,
        DeepFool,
        Boundary,
        # further scenarios
        PGDLinf,
        PGDL2,
        CarliniWagnerL2,
        HopSkipJump,
        Square,
        Universal,
        FoolingDirect,
        FoolingCPPN,
    )
}

PAPER_ATTACKS: tuple[str, ...] = ("fgsm", "gradient_l2", "one_pixel", "deepfool", "boundary")


def make_attack(name: str, model: nn.Module | QueryModel | PredictFn, **params: Any) -> Attack:
    """Build attack ``name``; ``params`` are ``seed``, ``quantize``, ``targeted`` and the attack's own."""
    try:
        cls = ATTACKS[name]
    except KeyError:
        raise KeyError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}") from None
    return cls(model, **params)


__all__ = [
    "ATTACKS",
    "PAPER_ATTACKS",
    "Attack",
    "AttackResult",
    "Family",
    "QueryModel",
    "RawAdversarial",
    "make_attack",
]

"""Universal adversarial perturbation (Moosavi-Dezfooli et al. 2017): one perturbation for many images.

ART's ``UniversalPerturbation`` (untargeted; inner attack DeepFool by default)
and ``TargetedUniversalPerturbation`` (targeted; inner attack FGSM) fit the
perturbation; :meth:`Universal.fit` runs them on one batch and keeps the
result in :attr:`Universal.perturbation`, and calling the attack adds it to
any other batch, which is the point of a universal perturbation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from detector.attacks.base import Attack, RawAdversarial
from detector.attacks.common import isolated_rng
from detector.attacks.query import PredictFn, QueryModel, art_pytorch


class Universal(Attack):
    """Universal perturbation, fitted once (``fit``) and applied to every later batch.

    Params: ``eps`` (10/255, the budget of the original paper), ``norm``
    ("linf" or "l2"; "linf"), ``attacker`` (inner ART attack: "deepfool"
    untargeted, "fgsm" targeted), ``attacker_params`` (dict; by
    default quiet, targeted when the attack is, FGSM steps of ``eps``), ``delta`` (0.2: stop when the fooling rate on the
    fitting batch reaches 1 - delta), ``max_iter`` (5 passes over the batch),
    ``batch_size`` (32). Calling the attack before ``fit`` fits on that batch.
    """

    name = "universal"
    family = "universal"
    library = "art.attacks.evasion.UniversalPerturbation / TargetedUniversalPerturbation"
    norm = "linf"
    defaults = {
        "eps": 10 / 255,
        "norm": "linf",
        "attacker": None,
        "attacker_params": None,
        "delta": 0.2,
        "max_iter": 5,
        "batch_size": 32,
    }

    def __init__(self, model: nn.Module | QueryModel | PredictFn, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        norm = str(self.params["norm"]).lower()
        if norm not in ("linf", "l2"):
            raise ValueError(f"universal: norm must be 'linf' or 'l2', got {norm!r}")
        self.norm = norm
        if self.params["attacker"] is None:
            self.params["attacker"] = "fgsm" if self.targeted else "deepfool"
        self.perturbation: Tensor | None = None
        self.fooling_rate: float | None = None

    def fit(self, images: Tensor, labels: Tensor, target_labels: Tensor | None = None) -> Tensor:
        """Fit the universal perturbation on ``images``; returns it (shape [1, C, H, W])."""
        images, labels, targets = self._check(images, labels, target_labels)
        nb_classes = int(self.query_model.predict(images[:1], count=False).shape[1])
        classifier = art_pytorch(self.module, tuple(images.shape[1:]), nb_classes, images.device)
        attack = self._art_attack(classifier, targeted=targets is not None)
        wanted = (targets if targets is not None else labels).cpu().numpy()
        one_hot = np.eye(nb_classes, dtype=np.float32)[wanted]
        with isolated_rng(self.seed, images.device):
            attack.generate(images.detach().cpu().numpy().astype(np.float32), y=one_hot)
        self.perturbation = torch.from_numpy(np.asarray(attack.noise, dtype=np.float32)).to(images.device)
        self.fooling_rate = float(attack.fooling_rate)
        return self.perturbation

    def _art_attack(self, classifier: Any, targeted: bool) -> Any:
        from art.attacks.evasion import TargetedUniversalPerturbation, UniversalPerturbation

        p = self.params
        attacker_params = self._attacker_params(targeted)
        common = dict(
            attacker=str(p["attacker"]),
            attacker_params=attacker_params,
            delta=float(p["delta"]),
            max_iter=int(p["max_iter"]),
            eps=float(p["eps"]),
            norm=np.inf if self.norm == "linf" else 2,
        )
        if targeted:
            return TargetedUniversalPerturbation(classifier, **common)
        return UniversalPerturbation(classifier, batch_size=int(p["batch_size"]), verbose=False, **common)

    def _attacker_params(self, targeted: bool) -> dict[str, Any]:
        """Inner-attack settings: quiet, targeted when we are, steps no larger than the budget."""
        p = self.params
        if p["attacker_params"] is not None:
            return dict(p["attacker_params"])
        if p["attacker"] == "deepfool":
            return {"verbose": False, "epsilon": 0.02}
        if p["attacker"] == "fgsm":
            return {"eps": float(p["eps"]), "targeted": targeted, "norm": np.inf if self.norm == "linf" else 2}
        return {"targeted": True} if targeted else {}

    def _run(self, images: Tensor, labels: Tensor, targets: Tensor | None) -> RawAdversarial:
        if self.perturbation is None:
            self.fit(images, labels, targets)
        assert self.perturbation is not None
        if self.perturbation.shape[1:] != images.shape[1:]:
            raise ValueError(f"perturbation fitted for {tuple(self.perturbation.shape[1:])}, images are {tuple(images.shape[1:])}")
        adversarial = (images + self.perturbation.to(images.device)).clamp(0.0, 1.0)
        return RawAdversarial(adversarial, info={"fooling_rate_on_fit": self.fooling_rate})

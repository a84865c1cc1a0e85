"""The ``Attack`` base class and the ``AttackResult`` every attack returns.

One small subclass per attack (torchattacks / Foolbox style). The base class
owns everything that must be identical across attacks so that adversarial sets
are comparable when they calibrate the detector: input checks, clean and final
predictions, 8-bit quantization, success, perturbation norms, query counts
and the metadata written next to the images.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from detector.attacks.common import perturbation_norms, quantize
from detector.attacks.query import PredictFn, QueryModel, as_query_model

Family = Literal["white_box", "black_box_probing", "universal", "fooling"]


@dataclass
class AttackResult:
    """What one attack call produced, evaluated on the *final* (possibly quantized) images.

    ``success``: prediction != label (untargeted) or == target (targeted, fooling).
    ``norms``: ``linf``/``l2``/``l0`` of adversarial - clean in pixel space
    (empty for fooling images, which have no clean counterpart).
    ``queries``: model queries per image for query-based attacks, else None.
    ``confidence``: softmax probability of ``labels_after``.
    ``target_confidence``: softmax probability of the target class
    (targeted attacks and fooling images), else None.
    ``attack``: name, family, library, params, seed, quantize, targeted.

    With ``quantize`` the adversarials lie on the 8-bit grid. Budgeted attacks
    are rounded inside their budget (:func:`~detector.attacks.common.quantize`);
    minimal-perturbation attacks (no budget: DeepFool, C&W, Boundary,
    HopSkipJump) lengthen a perturbation that rounding undid until it
    survives (:meth:`Attack._survive_rounding`).
    """

    adversarial: Tensor
    success: Tensor
    norms: dict[str, Tensor]
    labels_before: Tensor
    labels_after: Tensor
    queries: Tensor | None = None
    confidence: Tensor | None = None
    target_labels: Tensor | None = None
    target_confidence: Tensor | None = None
    attack: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        return float(self.success.float().mean()) if self.success.numel() else 0.0


@dataclass
class RawAdversarial:
    """What a subclass's ``_run`` hands back to the base class."""

    adversarial: Tensor
    queries: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Attack(abc.ABC):
    """Base of all attack generators.

    ``model`` is an ``nn.Module`` taking ``[0, 1]`` RGB pixels (white-box
    attacks need it), or a :class:`QueryModel` / plain ``predict`` callable
    (enough for query-based attacks, which only ever call predictions).
    Unknown keyword parameters are an error, so a typo never silently falls
    back to a default.
    """

    name: ClassVar[str]
    family: ClassVar[Family]
    library: ClassVar[str]
    supports_targeted: ClassVar[bool] = True
    needs_gradients: ClassVar[bool] = True
    # Norm whose budget is ``params["eps"]`` ('linf' | 'l2'), 'l0' for pixel
    # attacks, None for minimal-perturbation attacks without a budget.
    norm: str | None = None
    # Fooling images: ``labels`` *are* the wanted classes.
    labels_are_targets: ClassVar[bool] = False
    defaults: ClassVar[Mapping[str, Any]] = {}

    def __init__(
        self,
        model: nn.Module | QueryModel | PredictFn,
        *,
        seed: int = 0,
        quantize: bool = False,
        targeted: bool = False,
        **params: Any,
    ):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise TypeError(f"{self.name}: unknown parameter(s) {unknown}; known: {sorted(self.defaults)}")
        if targeted and not self.supports_targeted:
            raise ValueError(f"{self.name} has no targeted variant")
        self.module: nn.Module | None = model if isinstance(model, nn.Module) else None
        if self.needs_gradients and self.module is None:
            raise TypeError(f"{self.name} is a white-box attack and needs an nn.Module, not prediction access")
        self.query_model = as_query_model(model)
        self.seed = int(seed)
        self.quantize = bool(quantize)
        self.targeted = bool(targeted) or self.labels_are_targets
        self.params: dict[str, Any] = {**self.defaults, **params}

    @property
    def budget(self) -> float | None:
        """The norm budget (``eps``) when the attack has one."""
        return float(self.params["eps"]) if self.norm in ("linf", "l2") and "eps" in self.params else None

    def describe(self) -> dict[str, Any]:
        """Metadata recorded with every adversarial set."""
        return {
            "name": self.name,
            "family": self.family,
            "library": self.library,
            "norm": self.norm,
            "params": dict(self.params),
            "seed": self.seed,
            "quantize": self.quantize,
            "targeted": self.targeted,
        }

    def __call__(self, images: Tensor, labels: Tensor, target_labels: Tensor | None = None) -> AttackResult:
        images, labels, targets = self._check(images, labels, target_labels)
        clean_logits = self.query_model.predict(images, count=False)
        raw = self._run(images, labels, targets)
        adversarial = raw.adversarial.detach().to(images.device, torch.float32).clamp(0.0, 1.0)
        if self.quantize and self.norm is None and self.family != "fooling":
            adversarial, extra = self._survive_rounding(images, adversarial, labels, targets)
            if raw.queries is not None:
                raw.queries = raw.queries.to(images.device) + extra
        elif self.quantize:
            adversarial = quantize(adversarial, images, self.norm, self.budget)
        return self._evaluate(images, adversarial, clean_logits, labels, targets, raw)

    def _hits(self, images: Tensor, labels: Tensor, targets: Tensor | None) -> Tensor:
        predicted = self.query_model(images).argmax(dim=1)
        return predicted == targets if targets is not None else predicted != labels

    def _survive_rounding(
        self, images: Tensor, adversarial: Tensor, labels: Tensor, targets: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """8-bit rounding for minimal-perturbation attacks (no budget): returns (images, extra queries).

        Their perturbations sit just past the decision boundary, often below
        one gray level, so plain rounding undoes many of them. For every
        adversarial that rounding undoes, the perturbation is lengthened by
        sqrt(2) per try (up to 2^10) until its 8-bit image is adversarial,
        one batched query per try; images never fixed keep plain rounding.
        The queries are counted, as they are real queries to the model.
        """
        extra = torch.zeros(images.shape[0], device=images.device)
        rounded = quantize(adversarial, images)
        result = rounded.clone()
        delta = adversarial - images
        todo = self._hits(adversarial, labels, targets)
        extra += 1
        for exponent in range(1, 22):
            index = todo.nonzero().flatten()
            if index.numel() == 0:
                break
            ok = self._hits(result[index], labels[index], None if targets is None else targets[index])
            extra[index] += 1
            todo[index[ok]] = False
            still = index[~ok]
            if still.numel() == 0 or exponent == 21:
                break
            scaled = (images[still] + 2.0 ** (exponent / 2) * delta[still]).clamp(0.0, 1.0)
            result[still] = quantize(scaled, images[still])
        result[todo] = rounded[todo]
        return result, extra

    def _check(self, images: Tensor, labels: Tensor, target_labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor [B, C, H, W], got {tuple(images.shape)} {images.dtype}")
        if images.numel() and (images.min() < -1e-6 or images.max() > 1 + 1e-6):
            raise ValueError("images must be pixels in [0, 1]")
        # Libraries call .view() on gradients shaped like the input (torchattacks'
        # PGDL2 fails on the channels-last tensors to_tensor() produces).
        images = images.contiguous()
        labels = torch.as_tensor(labels, device=images.device).long().view(-1)
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {images.shape[0]} images")
        if self.labels_are_targets:
            return images, labels, labels
        if not self.targeted:
            return images, labels, None
        if target_labels is None:
            raise ValueError(f"targeted {self.name} needs target_labels")
        targets = torch.as_tensor(target_labels, device=images.device).long().view(-1)
        if targets.shape != labels.shape:
            raise ValueError("target_labels must have one entry per image")
        return images, labels, targets

    def _evaluate(
        self,
        images: Tensor,
        adversarial: Tensor,
        clean_logits: Tensor,
        labels: Tensor,
        targets: Tensor | None,
        raw: RawAdversarial,
    ) -> AttackResult:
        probabilities = self.query_model.predict(adversarial, count=False).softmax(dim=1)
        confidence, labels_after = probabilities.max(dim=1)
        if targets is not None:
            success = labels_after == targets
            target_confidence = probabilities.gather(1, targets[:, None]).squeeze(1)
        else:
            success = labels_after != labels
            target_confidence = None
        norms = {} if self.family == "fooling" else perturbation_norms(adversarial, images)
        return AttackResult(
            adversarial=adversarial,
            success=success,
            norms=norms,
            labels_before=clean_logits.argmax(dim=1),
            labels_after=labels_after,
            queries=raw.queries.to(images.device) if raw.queries is not None else None,
            confidence=confidence,
            target_labels=targets,
            target_confidence=target_confidence,
            attack=self.describe(),
            info=raw.info,
        )

    @abc.abstractmethod
    def _run(self, images: Tensor, labels: Tensor, targets: Tensor | None) -> RawAdversarial:
        """Craft adversarials for ``images``; ``targets`` is None unless targeted."""

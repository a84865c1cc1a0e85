"""One input's explanation: score and signal shares, paper map, CAMs, promotion–suppression.

:func:`explain_input` computes everything an explanation page shows (the page
itself is :mod:`detector.explain.page`), so the CLI, the capture replay
(``advsentry explain --capture``) and tests share one code path. The score is
computed exactly as :meth:`detector.Detector.score` does (same maps, same
combiner), which is what lets a captured request's score be reproduced.

Without a clean reference the promotion–suppression analysis runs against an
*estimate*: a 3×3 median-filtered copy of the input (Feature Squeezing's
denoiser; Xu, Evans, Qi 2018), which removes much of a small perturbation but
is not the clean image. Every output labels which of the two was used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import PAPER_CONFIG, ScoreConfig
from ..detector import Detector
from ..features import extract_maps
from ..signals.squeeze import median_filter
from .cam import ClassMaps, class_activation_maps
from .pse import DEFAULT_DOMINANCE, PromotionSuppression, promotion_suppression

#: Name of the paper's map (guided backprop of the final conv layer) drawn on every page.
PAPER_MAP = "feature_response (paper)"
#: Median window of the estimated reference when no clean image is given.
ESTIMATE_MEDIAN = 3


@dataclass
class Explanation:
    """Everything on one explanation page (tensors for figures, numbers for the page and JSON)."""

    pixels: torch.Tensor  # [3, H, W]
    logits: np.ndarray  # [num_classes]
    class_names: tuple[str, ...]
    score: float
    threshold: float | None
    calibration_id: str | None
    signals: dict[str, float]
    contributions: dict[str, float] | None
    bias: float | None
    maps: dict[str, torch.Tensor]  # name -> [C, H, W] (paper map + the detector's own entropy maps)
    map_configs: dict[str, Any]
    cam: ClassMaps  # top-1 and runner-up of the input
    reference: torch.Tensor  # [3, H, W]
    reference_kind: str  # "given" | "estimate"
    reference_logits: np.ndarray
    pse: PromotionSuppression
    #: CAMs of (true class, adversarial class) on the input [0] and the reference [1]: [2, 2, h, w]
    pse_cams: torch.Tensor
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def adversarial(self) -> bool | None:
        from detector.detector import exceeds

        return None if self.threshold is None else bool(exceeds(np.asarray(self.score), self.threshold))

    def top(self, k: int = 5, logits: np.ndarray | None = None) -> list[tuple[str, int, float]]:
        z = self.logits if logits is None else logits
        p = np.exp(z - z.max())
        p /= p.sum()
        order = np.argsort(-p)[:k]
        return [(self.class_names[i], int(i), float(p[i])) for i in order]

    def to_dict(self) -> dict[str, Any]:
        """The numbers of the page (no tensors), for ``explanation.json``."""
        cam_classes = [int(c) for c in self.cam.classes[0]]
        return {
            "score": self.score,
            "threshold": self.threshold,
            "adversarial": self.adversarial,
            "calibration": self.calibration_id,
            "signals": self.signals,
            "contributions": self.contributions,
            "bias": self.bias,
            "top5": [{"label": n, "class_index": i, "probability": p} for n, i, p in self.top()],
            "cam": {"method": self.cam.method, "layer": self.cam.layer,
                    "classes": cam_classes, "labels": [self.class_names[c] for c in cam_classes]},
            "reference": self.reference_kind,
            "reference_top5": [{"label": n, "class_index": i, "probability": p}
                               for n, i, p in self.top(5, self.reference_logits)],
            "promotion_suppression": self.pse.to_dict(),
            "source": self.source,
        }


def estimated_reference(pixels: torch.Tensor) -> torch.Tensor:
    """The stand-in for a clean image: a 3×3 median-filtered copy of ``[3, H, W]`` pixels."""
    return median_filter(pixels.unsqueeze(0), ESTIMATE_MEDIAN)[0]


def explain_input(detector: Detector, pixels: torch.Tensor, reference: torch.Tensor | None = None, *,
                  dominance: float = DEFAULT_DOMINANCE, source: dict[str, Any] | None = None) -> Explanation:
    """Explain one input ``[3, H, W]`` (``[0, 1]`` RGB) with ``detector`` (which needs its model)."""
    from ..models import imagenet_class_names

    model = detector._model()
    x = pixels.detach().to(detector.device).float().unsqueeze(0)
    maps, logits = detector.maps_and_logits(x)
    values = detector.entropies(maps)
    score = float(detector.combiner.combine(values)[0])
    names = list(detector.features)
    signals = {name: float(values[0, i]) for i, name in enumerate(names)}
    contributions = None
    if hasattr(detector.combiner, "contributions"):
        shares = detector.combiner.contributions(values.cpu().numpy())[0]
        contributions = {name: float(shares[i]) for i, name in enumerate(names)}
    # The paper's map is drawn even when the detector scores other signals (the default does).
    shown = {name: maps[name][0].detach().cpu() for name, c in detector.features.items() if isinstance(c, ScoreConfig)}
    configs: dict[str, Any] = {name: detector.features[name] for name in shown}
    if not any(c == PAPER_CONFIG for c in configs.values()):
        paper, _ = extract_maps(model, x, {PAPER_MAP: PAPER_CONFIG})
        shown = {PAPER_MAP: paper[PAPER_MAP][0].detach().cpu(), **shown}
        configs = {PAPER_MAP: PAPER_CONFIG, **configs}

    cam = class_activation_maps(model, x, top=2)
    if reference is None:
        ref, kind = estimated_reference(x[0]), "estimate"
    else:
        ref, kind = reference.detach().to(detector.device).float(), "given"
    with torch.no_grad():
        ref_logits = model(ref.unsqueeze(0))
    logits_np = logits[0].detach().cpu().double().numpy()
    ref_np = ref_logits[0].detach().cpu().double().numpy()
    pse = promotion_suppression(ref_np, logits_np, dominance=dominance)
    pair = torch.tensor([[pse.true_class, pse.adversarial_class]])
    both = torch.cat([x, ref.unsqueeze(0)])
    pse_cam = class_activation_maps(model, both, pair.repeat(2, 1), method=cam.method if cam.method == "grad-cam" else "auto")
    return Explanation(
        pixels=x[0].cpu(), logits=logits_np, class_names=imagenet_class_names() if len(logits_np) == 1000
        else tuple(str(i) for i in range(len(logits_np))),
        score=score, threshold=detector.threshold, calibration_id=detector.calibration_id,
        signals=signals, contributions=contributions, bias=getattr(detector.combiner, "bias", None),
        maps=shown, map_configs=configs, cam=cam, reference=ref.cpu(), reference_kind=kind,
        reference_logits=ref_np, pse=pse, pse_cams=pse_cam.maps.cpu(), source=dict(source or {}),
    )

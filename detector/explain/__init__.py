"""Explanations of a verdict: signal shares, CAM, promotion–suppression (issue 14).

- :mod:`.cam`: class activation maps (exact CAM for a GAP → linear head, else Grad-CAM);
- :mod:`.pse`: the promotion–suppression category of a clean/adversarial pair (Xu et al. 2019);
- :mod:`.analysis`: everything one input's page shows, computed in one place;
- :mod:`.page`: the PNGs and the self-contained HTML page.
"""

from .analysis import Explanation, estimated_reference, explain_input
from .cam import ClassMaps, class_activation_maps, grad_cam
from .page import write_explanation
from .pse import DEFAULT_DOMINANCE, PromotionSuppression, categorize, promotion_suppression, pse_rule

__all__ = [
    "ClassMaps", "DEFAULT_DOMINANCE", "Explanation", "PromotionSuppression", "categorize", "class_activation_maps",
    "estimated_reference", "explain_input", "grad_cam", "promotion_suppression", "pse_rule", "write_explanation",
]

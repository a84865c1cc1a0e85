"""Policies: what happens to a scored response (annotate, reject, shadow).

Pure functions over a ``ModelInferResponse`` and the scores of its inputs, so
they are the same for the proxy, the stream handler and the library
interceptor. A request carrying several inputs (batch dimension) is one
response: it is flagged when any of its inputs is, ``advsentry_score`` is the
highest score, and ``advsentry_scores`` lists every input's score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .settings import Policy

PARAM_SCORE = "advsentry_score"
PARAM_SCORES = "advsentry_scores"
PARAM_ADVERSARIAL = "advsentry_adversarial"
PARAM_THRESHOLD = "advsentry_threshold"
PARAM_CALIBRATION = "advsentry_calibration"
PARAM_ERROR = "advsentry_error"
TRAILER_SCORE = "advsentry-score"
TRAILER_THRESHOLD = "advsentry-threshold"


@dataclass(frozen=True)
class Assessment:
    """Scores of one request's inputs and the verdict of the threshold in force."""

    scores: np.ndarray
    threshold: float | None
    calibration_id: str | None

    @property
    def flags(self) -> np.ndarray:
        if self.threshold is None:
            return np.zeros(self.scores.shape, dtype=bool)
        return self.scores > self.threshold

    @property
    def adversarial(self) -> bool:
        return bool(self.flags.any())

    @property
    def verdict(self) -> str:
        if self.threshold is None:
            return "no_threshold"
        return "adversarial" if self.adversarial else "clean"

    @property
    def max_score(self) -> float:
        return float(self.scores.max()) if self.scores.size else float("nan")


class PolicyRejection(Exception):
    """``reject`` policy: the request is answered PERMISSION_DENIED, with the score in trailers."""

    def __init__(self, assessment: Assessment) -> None:
        self.assessment = assessment
        flagged = np.flatnonzero(assessment.flags).tolist()
        where = f" (inputs {flagged} of {assessment.scores.size})" if assessment.scores.size > 1 else ""
        super().__init__(
            f"advsentry: input flagged as adversarial{where}: score {assessment.max_score:.6f} "
            f"> threshold {assessment.threshold:.6f} (calibration {assessment.calibration_id or 'none'})"
        )

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return (
            (TRAILER_SCORE, f"{self.assessment.max_score:.6f}"),
            (TRAILER_THRESHOLD, f"{self.assessment.threshold:.6f}"),
        )


def annotate(response, assessment: Assessment) -> None:
    """Add the advsentry_* response parameters (in place)."""
    params = response.parameters
    params[PARAM_SCORE].double_param = assessment.max_score
    if assessment.scores.size > 1:
        params[PARAM_SCORES].string_param = ",".join(f"{s:.6f}" for s in assessment.scores)
    params[PARAM_ADVERSARIAL].bool_param = assessment.adversarial
    if assessment.threshold is not None and math.isfinite(assessment.threshold):
        params[PARAM_THRESHOLD].double_param = float(assessment.threshold)
    params[PARAM_CALIBRATION].string_param = assessment.calibration_id or "none"


def apply_policy(policy: Policy, response, assessment: Assessment) -> str:
    """Apply ``policy`` to ``response`` in place; returns the outcome label for metrics.

    Raises :class:`PolicyRejection` for a flagged request under ``reject``.
    """
    if policy is Policy.shadow:
        return "shadowed"
    if policy is Policy.reject and assessment.adversarial:
        raise PolicyRejection(assessment)
    annotate(response, assessment)
    return "annotated"

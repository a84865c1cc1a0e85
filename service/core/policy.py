"""Policies: what happens to a scored response (annotate, reject, shadow).

Pure functions over a ``ModelInferResponse`` and the scores of its inputs, so
they are the same for the proxy, the stream handler and the library
interceptor. A request carrying several inputs (batch dimension) is one
response: it is flagged when any of its inputs is, ``advsentry_score`` is the
highest score, and ``advsentry_scores`` lists every input's score.

Disclosure (issue 13) decides what of this the client sees, because a score
is an oracle an attacker can minimize query by query:

- ``none``: no ``advsentry_*`` parameter; a rejection says only "rejected by
  advsentry (request id ...)";
- ``verdict`` (default): booleans (``advsentry_adversarial``,
  ``advsentry_invalid_input``, hooks' flags), the non-numeric
  ``advsentry_error`` and ``advsentry_calibration`` (an identifier of the
  detector in force, constant across inputs, so no oracle; clients and
  operators use it to tie a verdict to a detector version); a rejection adds
  which batch items were flagged;
- ``score``: also ``advsentry_score``, ``advsentry_scores``,
  ``advsentry_threshold`` and the ``advsentry-score``/``advsentry-threshold``
  trailers of a rejection. Trusted callers always get this level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from detector.detector import exceeds

from ..hooks.base import ClientIdentity
from ..settings import Disclosure, Policy, Settings

PARAM_SCORE = "advsentry_score"
PARAM_SCORES = "advsentry_scores"
PARAM_ADVERSARIAL = "advsentry_adversarial"
PARAM_THRESHOLD = "advsentry_threshold"
PARAM_CALIBRATION = "advsentry_calibration"
PARAM_ERROR = "advsentry_error"
PARAM_INVALID_INPUT = "advsentry_invalid_input"
TRAILER_SCORE = "advsentry-score"
TRAILER_THRESHOLD = "advsentry-threshold"


@dataclass(frozen=True)
class Assessment:
    """Scores of one request's inputs and the verdict of the threshold in force."""

    scores: np.ndarray
    threshold: float | None
    calibration_id: str | None
    #: ``[B]`` batch items that carried NaN/Inf (let through by annotate/shadow): flagged
    #: whatever their score, since a detector cannot vouch for a non-finite input
    invalid: np.ndarray | None = None

    @property
    def flags(self) -> np.ndarray:
        flags = np.asarray(exceeds(self.scores, self.threshold))
        if self.invalid is not None and self.invalid.shape == flags.shape:
            flags = flags | self.invalid
        return flags

    @property
    def invalid_input(self) -> bool:
        return bool(self.invalid is not None and self.invalid.any())

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
    """``reject`` policy: the request is answered PERMISSION_DENIED.

    The message names the request id (to find the full detail in logs and
    traces); the score and threshold are in it, and in trailers, only at
    ``score`` disclosure.
    """

    def __init__(self, assessment: Assessment, disclosure: Disclosure = Disclosure.verdict,
                 request_id: str = "") -> None:
        self.assessment = assessment
        self.disclosure = disclosure
        self.request_id = request_id
        message = f"rejected by advsentry (request id {request_id or 'none'})"
        if disclosure is not Disclosure.none:
            flagged = np.flatnonzero(assessment.flags).tolist()
            where = f" (inputs {flagged} of {assessment.scores.size})" if assessment.scores.size > 1 else ""
            reason = "input is not finite" if assessment.invalid_input else "input flagged as adversarial"
            message += f": {reason}{where}"
        if disclosure is Disclosure.score:
            threshold = assessment.threshold if assessment.threshold is not None else float("nan")
            message += (f": score {assessment.max_score:.6f} > threshold {threshold:.6f} "
                        f"(calibration {assessment.calibration_id or 'none'})")
        super().__init__(message)

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        if self.disclosure is not Disclosure.score:
            return ()
        threshold = self.assessment.threshold if self.assessment.threshold is not None else float("nan")
        return (
            (TRAILER_SCORE, f"{self.assessment.max_score:.6f}"),
            (TRAILER_THRESHOLD, f"{threshold:.6f}"),
        )


def disclosure_for(settings: Settings, client: ClientIdentity, model: str | None = None) -> Disclosure:
    """What ``client`` may learn about ``model``'s verdicts: the one place disclosure is decided.

    Trusted callers (``trusted_clients``, ``trusted_metadata``) always get
    ``score``; everyone else the model's disclosure (``models.<m>.disclosure``),
    else the global one. ``model=None``: the global one (DetectorService's
    access check before it knows which model is asked).
    """
    if client.trusted:
        return Disclosure.score
    return settings.disclosure if model is None else settings.disclosure_for(model)


def annotate(response, assessment: Assessment, disclosure: Disclosure = Disclosure.verdict) -> None:
    """Add the advsentry_* response parameters that ``disclosure`` allows (in place)."""
    if disclosure is Disclosure.none:
        return
    params = response.parameters
    params[PARAM_ADVERSARIAL].bool_param = assessment.adversarial
    if assessment.invalid_input:
        params[PARAM_INVALID_INPUT].bool_param = True
    params[PARAM_CALIBRATION].string_param = assessment.calibration_id or "none"
    if disclosure is not Disclosure.score:
        return
    params[PARAM_SCORE].double_param = assessment.max_score
    if assessment.scores.size > 1:
        params[PARAM_SCORES].string_param = ",".join(f"{s:.6f}" for s in assessment.scores)
    if assessment.threshold is not None and math.isfinite(assessment.threshold):
        params[PARAM_THRESHOLD].double_param = float(assessment.threshold)


def disclosed(parameters: dict[str, str | float | bool], disclosure: Disclosure) -> dict[str, str | float | bool]:
    """The hooks' response parameters ``disclosure`` lets through: booleans at verdict, all at score."""
    if disclosure is Disclosure.score:
        return dict(parameters)
    if disclosure is Disclosure.verdict:
        return {key: value for key, value in parameters.items() if isinstance(value, bool)}
    return {}


def apply_policy(policy: Policy, response, assessment: Assessment,
                 disclosure: Disclosure = Disclosure.verdict, request_id: str = "") -> str:
    """Apply ``policy`` to ``response`` in place; returns the outcome label for metrics.

    Raises :class:`PolicyRejection` for a flagged request under ``reject``.
    """
    if policy is Policy.shadow:
        return "shadowed"
    if policy is Policy.reject and assessment.adversarial:
        raise PolicyRejection(assessment, disclosure, request_id)
    annotate(response, assessment, disclosure)
    return "annotated"

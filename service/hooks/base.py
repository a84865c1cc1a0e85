"""Request hooks: the extension points of the interception path, and what they see.

Stateful features that need every request (load shedding, the traffic score
sketch, probing detection, the capture ring) are each one :class:`RequestHook`
in its own module, so the request handler in ``service/core/inference.py`` stays a
few named steps and never grows a branch per feature:

- ``extra_outputs(model)``: Triton outputs the hook needs (added to the request,
  stripped before the client sees the response), e.g. a probing embedding;
- ``admit(ctx)``: before anything is sent upstream; may refuse with a
  :class:`~service.core.inference.RequestError` (RESOURCE_EXHAUSTED, PERMISSION_DENIED);
- ``observe(scored)``: after scoring; returns response parameters to add (the
  disclosure policy decides which reach the client). It must not block: hand
  slow work to a bounded queue. An exception is logged and counted, never
  returned to the client;
- ``release(ctx)``: in ``finally`` for every admitted request.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ClientIdentity:
    """Who sent a request, as far as the sidecar can tell.

    ``key`` is what per-client state (probing history, in-flight limits) is
    keyed by; ``source`` says where it came from (``mtls`` subject, a configured
    ``metadata`` key, or the TCP ``peer`` address); ``trusted`` callers may see
    scores (see the disclosure setting).
    """

    key: str
    source: str = "peer"
    trusted: bool = False


ANONYMOUS = ClientIdentity("unknown", "none", False)


@dataclass
class RequestContext:
    """One intercepted request, before it is sent upstream."""

    model: str
    version: str
    client: ClientIdentity = ANONYMOUS
    metadata: Sequence[tuple[str, str | bytes]] = ()
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ScoredRequest:
    """A request after scoring: what hooks may record or act on."""

    context: RequestContext
    scores: np.ndarray
    threshold: float | None
    calibration_id: str | None
    flags: np.ndarray
    #: ``[B, F]`` floats the combiner consumed (Triton-computed signals); None on the maps path
    signals: np.ndarray | None
    signal_names: tuple[str, ...]
    #: outputs hooks asked for through ``extra_outputs`` (copies, safe to keep)
    extra_outputs: Mapping[str, np.ndarray]
    #: decodes the request's input tensors (name -> array); call only when pixels are needed
    inputs: Callable[[], dict[str, np.ndarray]]
    #: the request carried NaN/Inf values that the policy let through
    invalid_input: bool = False


class RequestHook:
    """Base class of request hooks; every method is optional (no-op here)."""

    #: short name used in logs and in the ``advsentry_hook_errors_total`` metric
    name: str = "hook"

    def extra_outputs(self, model: str) -> tuple[str, ...]:
        return ()

    async def admit(self, ctx: RequestContext) -> None:
        return None

    def observe(self, scored: ScoredRequest) -> dict[str, str | float | bool]:
        return {}

    def release(self, ctx: RequestContext) -> None:
        return None

    async def close(self) -> None:
        """Flush and stop background work (called when the sidecar stops)."""
        return None

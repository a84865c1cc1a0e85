"""Load shedding: a bound on intercepted requests in flight, per process and per client.

Beyond a bound a request is refused at once with ``RESOURCE_EXHAUSTED``
(counted in ``advsentry_shed_requests_total{reason}``) instead of queueing
until its deadline expires, so an overload (or one client flooding) degrades
into fast, retryable refusals while the admitted requests keep their latency.

It is a :class:`~service.hooks.base.RequestHook`: ``admit`` counts a request in,
``release`` (always called once ``admit`` succeeded) counts it out. Only
intercepted requests of protected models pass through hooks: pass-through
RPCs (metadata, health, unprotected models) are not counted. Each message of
a ``ModelStreamInfer`` stream counts while it is in flight. The event loop is
single-threaded, so plain integers need no lock.
"""

from __future__ import annotations

from collections import defaultdict

import grpc

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..metrics import SidecarMetrics
from ..settings import Settings
from .base import RequestContext, RequestHook


class LoadShedding(RequestHook):
    """Refuses requests beyond ``max_in_flight`` (process) or ``max_in_flight_per_client`` (0: no limit)."""

    name = "shedding"

    def __init__(self, max_in_flight: int, max_in_flight_per_client: int, metrics: SidecarMetrics) -> None:
        self.max_in_flight = max_in_flight
        self.max_per_client = max_in_flight_per_client
        self.metrics = metrics.part(SheddingMetrics)
        self.in_flight = 0
        self.per_client: dict[str, int] = defaultdict(int)

    async def admit(self, ctx: RequestContext) -> None:
        from ..core.requests import RequestError  # inference imports observe; avoid the cycle at import time

        key = ctx.client.key
        if self.max_in_flight and self.in_flight >= self.max_in_flight:
            self.metrics.shed.labels("process").inc()
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"advsentry: overloaded, {self.in_flight} requests in flight in this sidecar "
                f"(max_in_flight={self.max_in_flight}); retry later",
            )
        if self.max_per_client and self.per_client.get(key, 0) >= self.max_per_client:
            self.metrics.shed.labels("client").inc()
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"advsentry: client {key} has {self.per_client[key]} requests in flight "
                f"(max_in_flight_per_client={self.max_per_client}); retry later",
            )
        self.in_flight += 1
        self.per_client[key] += 1
        self.metrics.shed_in_flight.set(self.in_flight)

    def release(self, ctx: RequestContext) -> None:
        key = ctx.client.key
        self.in_flight = max(0, self.in_flight - 1)
        left = self.per_client.get(key, 0) - 1
        if left > 0:
            self.per_client[key] = left
        else:  # no entry per idle client: the table stays as small as the clients in flight
            self.per_client.pop(key, None)
        self.metrics.shed_in_flight.set(self.in_flight)


def shedding_hook_from_settings(settings: Settings, metrics: SidecarMetrics) -> LoadShedding | None:
    """The load-shedding hook, or None when both limits are 0 (off)."""
    if not settings.max_in_flight and not settings.max_in_flight_per_client:
        return None
    return LoadShedding(settings.max_in_flight, settings.max_in_flight_per_client, metrics)


class SheddingMetrics:
    """The load-shedding series (registered by :meth:`service.metrics.SidecarMetrics.part`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.shed = Counter(
            "advsentry_shed_requests",
            "Intercepted requests refused with RESOURCE_EXHAUSTED by load shedding, by limit "
            "(process|client).",
            ("reason",), registry=registry,
        )
        for reason in ("process", "client"):
            self.shed.labels(reason)
        self.shed_in_flight = Gauge(
            "advsentry_admitted_in_flight", "Intercepted requests admitted by load shedding and not yet done.",
            registry=registry,
        )


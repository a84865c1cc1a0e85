"""gRPC health checking (``grpc.health.v1``) that mirrors the upstream Triton's readiness.

The sidecar is only useful while Triton is: a load balancer or Kubernetes probe
asking the sidecar should hear NOT_SERVING when Triton is not ready. A
background task polls ``ServerReady`` every ``poll_s`` seconds and sets the
overall status ("") and each served service's status; on shutdown everything
goes NOT_SERVING first, so probes drain traffic before the listener closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from grpc_health.v1 import health, health_pb2

LOGGER = logging.getLogger(__name__)


class UpstreamHealth:
    """Owns the health servicer and the polling task."""

    def __init__(self, services: Sequence[str], ready: Callable[[], Awaitable[bool]], *,
                 poll_s: float = 2.0, on_change: Callable[[bool], None] | None = None) -> None:
        self.servicer = health.aio.HealthServicer()
        self.services = ("", *services)
        self._ready = ready
        self.poll_s = poll_s
        self._on_change = on_change
        self._task: asyncio.Task | None = None
        self.upstream_ready: bool | None = None

    async def _set(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in self.services:
            await self.servicer.set(service, status)

    async def check_once(self) -> bool:
        ready = await self._ready()
        if ready != self.upstream_ready:
            LOGGER.info("upstream Triton is %s", "ready" if ready else "NOT ready")
            self.upstream_ready = ready
            await self._set(ready)
            if self._on_change is not None:
                self._on_change(ready)
        return ready

    async def _poll(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:  # noqa: BLE001 - the poller must survive
                LOGGER.exception("health poll failed")
            await asyncio.sleep(self.poll_s)

    async def start(self) -> None:
        await self.check_once()
        self._task = asyncio.ensure_future(self._poll())

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.servicer.enter_graceful_shutdown()

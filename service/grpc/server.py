"""Assemble the sidecar: gRPC server, upstream, detectors, batcher, metrics, health, reflection.

:class:`Sidecar` is what ``advsentry serve`` runs and what the end-to-end tests
start in-process. Shutdown order matters for draining: health goes NOT_SERVING,
the server stops accepting calls and gives in-flight ones ``grace`` seconds,
and only then are the batcher and the upstream channel closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace

from detector import ModelIdentity

from ..core.pipeline import build_core
from ..health import UpstreamHealth
from ..metrics import SidecarMetrics
from ..settings import Settings
from ..tls import server_tls_from, upstream_tls_from
from ..upstream import Upstream, channel_options
from .proxy import SERVICE, InferenceProxy

LOGGER = logging.getLogger(__name__)


class Sidecar:
    """One running sidecar in the current event loop."""

    def __init__(
        self,
        settings: Settings,
        *,
        upstream: str | None = None,
        model_identity: Mapping[str, ModelIdentity] | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        metrics: SidecarMetrics | None = None,
    ) -> None:
        address = upstream or settings.upstream
        if not address:
            raise ValueError("the sidecar needs an upstream Triton address")
        self.settings = settings
        self.upstream_address = address
        self.model_identity = dict(model_identity or {})
        self.tracer_provider = tracer_provider
        self.metrics = metrics or SidecarMetrics()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task] = []
        self._metrics_http = None

    async def start(self) -> "Sidecar":
        s = self.settings
        # TLS (issue 13): both sides read their files now, so a bad file fails the start with a clear TlsError.
        self.server_tls = server_tls_from(s)
        self.upstream = Upstream(
            self.upstream_address,
            max_message_bytes=s.max_message_bytes,
            tls=upstream_tls_from(s),
            tls_reload_interval_s=s.tls_reload_interval_s,
            swap_grace_s=s.upstream_timeout_s,
        )
        self.core = build_core(
            s,
            metadata_lookup=self.upstream.model_spec,
            metrics=self.metrics,
            upstream_name=self.upstream_address,
            model_identity=self.model_identity,
            tracer_provider=self.tracer_provider,
        )
        self.registry, self.batcher = self.core.registry, self.core.batcher
        self.proxy = InferenceProxy(
            self.core, self.upstream.channel, upstream_timeout_s=s.upstream_timeout_s, metrics=self.metrics
        )
        self._server = grpc.aio.server(options=channel_options(s.max_message_bytes))
        self._server.add_generic_rpc_handlers((self.proxy.generic_handler(),))
        services = [SERVICE]
        try:
            from .detector_api import DETECTOR_SERVICE, add_detector_service

            add_detector_service(self._server, self)
            services.append(DETECTOR_SERVICE)
        except ImportError:  # pragma: no cover - generated stubs missing
            LOGGER.warning("advsentry DetectorService stubs not available; own API disabled")
        self.health = UpstreamHealth(
            services,
            self.upstream.ready,
            poll_s=s.health_poll_s,
            on_change=lambda ready: self.metrics.upstream_up.set(1 if ready else 0),
        )
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self._server)
        reflection.enable_server_reflection(
            (*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )
        if self.server_tls is not None:  # TLS only: plaintext connections are refused
            self.port = self._server.add_secure_port(f"{s.host}:{s.port}", self.server_tls.credentials())
        else:
            self.port = self._server.add_insecure_port(f"{s.host}:{s.port}")
        if self.port == 0:
            raise OSError(f"cannot bind the gRPC listener on {s.host}:{s.port}")
        await self._server.start()
        await self.health.start()
        if s.metrics_port > 0:
            self._metrics_http, _ = self.metrics.serve(s.metrics_port, s.metrics_host)
            self.metrics_port = int(self._metrics_http.server_port)
        self._tasks.append(asyncio.ensure_future(self.registry.watch(s.calibration_poll_s)))
        self._tasks.append(asyncio.ensure_future(self.upstream.watch()))  # upstream TLS files (no-op without TLS)
        if self.server_tls is not None:
            self._tasks.append(asyncio.ensure_future(self.server_tls.watch()))
        LOGGER.info(
            "advsentry sidecar on %s:%s -> Triton %s (metrics on :%s, policy %s)",
            s.host, self.port, self.upstream_address, self.metrics_port, s.policy.value,
        )
        try:
            self.protection_modes = await self.announce_models()
        except Exception:  # a calibration that cannot serve its model: do not serve at all
            await self.stop(0)
            raise
        return self

    async def announce_models(self) -> dict[str, str]:
        """Log how every model the upstream serves (and every listed one) is protected; published as a metric.

        Raises ``CalibrationError`` for a model whose identity the sidecar
        knows (the bundled model, an exported model of ``--model-repository``)
        and whose calibration does not match it: served, it would never get a
        verdict.
        """
        from detector import CalibrationError

        from ..core.requests import RequestError

        modes: dict[str, str] = {}
        for name in sorted({*await self.upstream.model_names(), *self.settings.models}):
            try:
                protection, _, mode = await self.core.resolve_protection(name, "")
            except CalibrationError as error:
                if name in self.model_identity:  # a calibration fitted for other weights than the model served
                    raise CalibrationError(f"model {name!r}: {error}") from error
                modes[name] = "calibration_error"
                LOGGER.error("model %s: its calibration cannot be loaded: %s", name, error)
                continue
            except RequestError as error:  # metadata unreadable: the first request will say why
                modes[name] = "unknown"
                LOGGER.warning("model %s: cannot read its metadata now: %s", name, error.message)
                continue
            modes[name] = mode
            detail = "" if protection is None else (
                f", calibration {protection.detector.calibration_id or 'none'}, policy {protection.policy.value}")
            LOGGER.info("model %s: %s%s", name, {
                "signals": "protected, Triton computes the signals", "maps": "protected, the sidecar scores the maps",
                "blackbox": "protected in black-box mode, the sidecar computes the signals from its logits and inputs",
                "unservable": "PROTECTED BUT UNSERVABLE: its outputs serve neither the signals nor the maps of its "
                              "calibration, every request is counted unscored",
                "unprotected": "not protected",
            }.get(mode, mode) + detail)
        return modes

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls, let in-flight ones finish within ``grace`` seconds."""
        grace = self.settings.shutdown_grace_s if grace is None else grace
        if self._server is None:
            return
        await self.health.shutdown()
        await self._server.stop(grace)
        for task in self._tasks:
            task.cancel()
        await self.core.close()  # the batcher, then the hooks' persisted state (sketches, capture ring)
        await self.upstream.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._server = None

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

"""OpenTelemetry tracing: one span per intercepted request, children for upstream and scoring.

Off by default: without ``OTEL_*`` configuration the global no-op tracer is
used and spans cost next to nothing. :func:`configure_tracing` installs an SDK
``TracerProvider`` with an OTLP exporter when the standard variables ask for
one (``OTEL_TRACES_EXPORTER=otlp`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; ``OTEL_SDK_DISABLED=true`` wins).
Tests pass their own provider (with an in-memory exporter) to the sidecar
instead of touching the process-global one.

The W3C ``traceparent`` of the upstream span is injected into the upstream
call's gRPC metadata, and an incoming ``traceparent`` from the client becomes
the parent of the request span, so a trace runs client → sidecar → Triton.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

LOGGER = logging.getLogger(__name__)
TRACER_NAME = "advsentry"
_PROPAGATOR = TraceContextTextMapPropagator()


def otlp_requested(environ: dict[str, str] | None = None) -> bool:
    """Whether the standard ``OTEL_*`` variables ask for OTLP trace export."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporters = {part.strip() for part in env.get("OTEL_TRACES_EXPORTER", "").split(",") if part.strip()}
    if "none" in exporters:
        return False
    return "otlp" in exporters or bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure_tracing(service_name: str = "advsentry") -> trace.TracerProvider | None:
    """Install an SDK provider with a batching OTLP/gRPC exporter if the env asks for it."""
    if not otlp_requested():
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # endpoint etc. from OTEL_* env
    trace.set_tracer_provider(provider)
    LOGGER.info("OpenTelemetry OTLP trace export enabled")
    return provider


def get_tracer(provider: trace.TracerProvider | None = None) -> trace.Tracer:
    return (provider or trace.get_tracer_provider()).get_tracer(TRACER_NAME)


def extract_parent(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context | None:
    """The client's trace context from its gRPC metadata (``traceparent``/``tracestate``), if any."""
    carrier = {key.lower(): value for key, value in (metadata or ()) if isinstance(value, str)}
    if "traceparent" not in carrier:
        return None
    return _PROPAGATOR.extract(carrier)


def inject_metadata(metadata: Sequence[tuple[str, str | bytes]] = ()) -> list[tuple[str, str | bytes]]:
    """``metadata`` without any old trace headers, plus the current span's W3C headers."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    kept = [(key, value) for key, value in metadata if key.lower() not in ("traceparent", "tracestate")]
    return kept + sorted(carrier.items())

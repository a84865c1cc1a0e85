"""Prometheus metrics of the sidecar, on their own HTTP port.

One :class:`SidecarMetrics` owns one ``CollectorRegistry`` (not the global one),
so several sidecars in one process (tests, the library interceptor inside a
team's server) do not collide. Names follow Prometheus conventions: base units
in the name (``_seconds``), ``_total`` for counters, ``_info`` for info gauges;
every per-request series is labelled by ``model`` and ``version``.
"""

from __future__ import annotations

import datetime as _dt

from collections.abc import Callable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.exposition import generate_latest

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Single-map scores are entropies in bits (0 .. log2(patch²) ≈ 3.17 for 3x3);
# combined (logistic) scores are logits. Fine buckets in [0, 4], coarse outside.
_SCORE_BUCKETS = (-8.0, -4.0, -2.0, -1.0, 0.0, *[round(0.25 * i, 2) for i in range(1, 17)], 6.0, 8.0, 16.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)

Part = TypeVar("Part")

LABELS = ("model", "version")
#: Why a protected model's request left without a verdict: scoring raised; the model does not serve the
#: detector's signals or maps; its calibration could not be loaded; the detector has no threshold.
UNSCORED_REASONS = ("scoring_error", "outputs_missing", "calibration_error", "no_threshold")


class SidecarMetrics:
    """All advsentry series; methods are called by the interception core and the batcher."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "advsentry_requests",
            "Intercepted inference requests by verdict (clean|adversarial|unscored) and outcome "
            "(forwarded|annotated|rejected|shadowed|failed).",
            (*LABELS, "verdict", "outcome", "policy"),
            registry=r,
        )
        self.inputs = Counter(
            "advsentry_inputs",
            "Scored inputs (batch items) by verdict.",
            (*LABELS, "verdict"),
            registry=r,
        )
        self.score = Histogram("advsentry_score", "Detector score per input.", LABELS, buckets=_SCORE_BUCKETS, registry=r)
        self.threshold = Gauge("advsentry_threshold", "Decision threshold in force (NaN: none).", LABELS, registry=r)
        self.calibration = Gauge(
            "advsentry_calibration_info",
            "Calibration artifact in force (value 1).",
            (*LABELS, "calibration_id", "source"),
            registry=r,
        )
        self.calibration_created = Gauge(
            "advsentry_calibration_created_timestamp_seconds",
            "Creation time (Unix seconds) of the calibration artifact in force; absent when none is.",
            LABELS,
            registry=r,
        )
        self.calibration_reloads = Counter(
            "advsentry_calibration_reloads",
            "Calibration file reload attempts by result (loaded|refused).",
            ("result",),
            registry=r,
        )
        # Both results exist from the start (value 0), so increase()/rate() in alerts
        # see the first refusal instead of a series that appears with value 1.
        for result in ("loaded", "refused"):
            self.calibration_reloads.labels(result)
        self.calibration_reload_failures = Counter(
            "advsentry_calibration_reload_failures",
            "Calibration reloads refused because a model could not use the new file, by model and reason "
            "(invalid_artifact|model_mismatch|outputs_missing); the calibration in force keeps serving. "
            "model=\"*\": no model was bound to the file yet.",
            ("model", "reason"), registry=r,
        )
        self.unscored = Counter(
            "advsentry_unscored_requests",
            "Requests for a protected model answered or refused without a verdict, by model and reason "
            "(scoring_error|outputs_missing|calibration_error|no_threshold). Fail-open answers are counted here too.",
            ("model", "reason"), registry=r,
        )
        self.protection_mode = Gauge(
            "advsentry_model_protection",
            "How each model seen is protected (1 for its mode): signals (Triton computes them) | maps (scored here) | "
            "blackbox (signals computed here from its logits and the request's pixels) | "
            "unservable (protected, its outputs serve neither: counted unscored) | calibration_error | unprotected.",
            ("model", "mode"), registry=r,
        )
        self.unprotected = Counter(
            "advsentry_unprotected_requests",
            "Intercepted requests forwarded unscored because their model is not protected (not listed under "
            "models, and under protect_all not exported by advsentry).",
            ("model",), registry=r,
        )
        self.transformed_copies = Counter(
            "advsentry_transformed_copies",
            "Black-box mode: extra upstream calls carrying transformed copies of a request's pixels (Feature "
            "Squeezing's squeezed copies), by model; each costs the model one more forward pass of the batch.",
            ("model",), registry=r,
        )
        self.upstream_latency = Histogram(
            "advsentry_upstream_latency_seconds", "Time in the upstream Triton call.", LABELS,
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.scoring_latency = Histogram(
            "advsentry_scoring_latency_seconds",
            "Time from a request's maps entering the batcher to its scores (queueing + detector).",
            LABELS, buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.overhead_latency = Histogram(
            "advsentry_proxy_overhead_seconds",
            "Request time not spent upstream or scoring (validation, decoding, policy, rewriting).",
            LABELS, buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.request_latency = Histogram(
            "advsentry_request_duration_seconds", "End-to-end time of an intercepted request.", LABELS,
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "advsentry_batch_size",
            "Inputs scored per detector call (one request's inputs when Triton computed the entropies).", ("model",),
            buckets=_BATCH_BUCKETS, registry=r,
        )
        self.batch_requests = Histogram(
            "advsentry_batch_requests", "Requests merged into one detector call (1 when scored inline).", ("model",),
            buckets=_BATCH_BUCKETS, registry=r,
        )
        self.detector_latency = Histogram(
            "advsentry_detector_call_seconds", "Duration of one detector call (batched maps, or inline combine).",
            ("model",),
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.errors = Counter(
            "advsentry_errors", "Requests answered with a non-OK gRPC status, by code.", (*LABELS, "code"), registry=r
        )
        self.in_flight = Gauge("advsentry_in_flight_requests", "Intercepted requests in progress.", LABELS, registry=r)
        self.passthrough = Counter(
            "advsentry_passthrough_requests", "RPCs forwarded unchanged, by method and gRPC code.", ("method", "code"),
            registry=r,
        )
        self.upstream_up = Gauge("advsentry_upstream_ready", "1 when the upstream Triton reports ready.", registry=r)
        self.hook_errors = Counter(
            "advsentry_hook_errors",
            "Exceptions raised by a request hook's observe() (logged; the request is served anyway).",
            ("hook",), registry=r,
        )
        # --- disclosure & load shedding (issue 13) ---
        self.invalid_inputs = Counter(
            "advsentry_invalid_inputs",
            "Inputs (batch items) carrying NaN/Inf values, by policy (reject refuses the request; annotate and "
            "shadow forward it, flagged).",
            (*LABELS, "policy"), registry=r,
        )
        self._parts: dict[type, object] = {}
        for part in _hook_metric_parts():  # declared at start: every series exists (at 0) for alerts and panels
            self.part(part)

    def part(self, factory: "Callable[[CollectorRegistry], Part]") -> "Part":
        """The metrics one part (a request hook) defines for itself, registered here the first time they are asked for.

        Why: each hook module owns its series (names, help, labels) next to the
        code that updates them; the sidecar's registry holds them all.
        """
        if factory not in self._parts:
            self._parts[factory] = factory(self.registry)
        return self._parts[factory]  # type: ignore[return-value]

    def declare_model(self, model: str) -> None:
        """Create a protected model's failure series at 0, so alerts on increase() see their first event."""
        from .core.detectors import RELOAD_FAILURE_REASONS

        for reason in RELOAD_FAILURE_REASONS:
            self.calibration_reload_failures.labels(model, reason)
        for reason in UNSCORED_REASONS:
            self.unscored.labels(model, reason)

    def observe_detector_call(self, model: str, inputs: int, requests: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(inputs)
        self.batch_requests.labels(model).observe(requests)
        self.detector_latency.labels(model).observe(seconds)

    def set_calibration(self, model: str, version: str, calibration_id: str | None, source: str,
                        threshold: float | None, created_at: str | None = None) -> None:
        """Replace the calibration info series of a model (only the one in force has value 1).

        ``created_at`` is the artifact's ``created_at`` (``YYYY-MM-DDTHH:MM:SSZ``);
        it feeds the calibration-age alert, so an unparsable or missing value
        removes the series rather than publishing a wrong age.
        """
        for labels in list(self.calibration._metrics):  # noqa: SLF001 - prometheus_client has no public "remove all"
            if labels[0] == model and labels[1] == version:
                self.calibration.remove(*labels)
        self.calibration.labels(model, version, calibration_id or "none", source).set(1)
        self.threshold.labels(model, version).set(float("nan") if threshold is None else threshold)
        created = _parse_timestamp(created_at)
        if created is None:
            if (model, version) in self.calibration_created._metrics:  # noqa: SLF001
                self.calibration_created.remove(model, version)
        else:
            self.calibration_created.labels(model, version).set(created)

    def exposition(self) -> bytes:
        """The text exposition format (what /metrics serves)."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "0.0.0.0"):
        """Start the /metrics HTTP server in a daemon thread; returns (server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)


def _parse_timestamp(value: str | None) -> float | None:
    """Unix seconds of an artifact's ``created_at`` (UTC, ``Z`` suffix), or ``None``."""
    if not value:
        return None
    try:
        parsed = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=_dt.timezone.utc)
    return parsed.timestamp()


def _hook_metric_parts() -> list[type]:
    """The metrics classes of the request hooks (``service/hooks/``), imported late: the hooks import this module."""
    from .hooks.capture import CaptureMetrics
    from .hooks.probing import ProbingMetrics
    from .hooks.shedding import SheddingMetrics
    from .hooks.traffic import TrafficMetrics

    return [SheddingMetrics, CaptureMetrics, ProbingMetrics, TrafficMetrics]

"""The one function that assembles the interception pipeline: detectors, batching, policy, disclosure, hooks.

``advsentry serve`` (:class:`service.grpc.server.Sidecar`), the library
interceptor (:func:`service.grpc.interceptor.build_interceptor`) and the
DetectorService (which shares the sidecar's core) all score through the
:class:`InferenceCore` this builds, so a rule added here holds on every entry
point: the same detector snapshots and hot reload, the same micro-batcher, the
same request hooks (load shedding, probing, traffic sketch, capture), the same
disclosure and unscored accounting.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import trace

from detector import ModelIdentity

from ..hooks.base import RequestHook
from ..metrics import SidecarMetrics
from ..settings import Settings
from .batching import MicroBatcher
from .detectors import BatchKey, DetectorRegistry, score_batch
from .inference import InferenceCore
from .requests import MetadataLookup


def detector_registry(settings: Settings, metrics: SidecarMetrics,
                      model_identity: Mapping[str, ModelIdentity] | None = None) -> DetectorRegistry:
    """The calibrations of ``settings``: the global one and each model's, checked against known model weights."""
    return DetectorRegistry(
        default_calibration=settings.calibration,
        per_model_calibration={m: p.calibration for m, p in settings.models.items() if p.calibration},
        per_model_outputs={m: p.feature_outputs for m, p in settings.models.items() if p.feature_outputs},
        model_identity=dict(model_identity or {}),
        device=settings.device,
        metrics=metrics,
    )


def micro_batcher(settings: Settings, metrics: SidecarMetrics) -> MicroBatcher:
    """Scores concurrent requests' maps in one detector call; only requests holding one snapshot share a batch."""

    def observe(key: BatchKey, inputs: int, requests: int, seconds: float) -> None:
        metrics.observe_detector_call(key.model, inputs, requests, seconds)

    return MicroBatcher(score_batch, max_batch_size=settings.max_batch_size,
                        max_batch_delay_ms=settings.max_batch_delay_ms, observer=observe)


def build_core(
    settings: Settings,
    *,
    metadata_lookup: MetadataLookup,
    metrics: SidecarMetrics | None = None,
    upstream_name: str = "upstream",
    model_identity: Mapping[str, ModelIdentity] | None = None,
    tracer_provider: trace.TracerProvider | None = None,
    hooks: list[RequestHook] | None = None,
) -> InferenceCore:
    """The interception core for ``settings``; ``hooks=None``: the hooks the settings turn on."""
    from ..hooks.registry import request_hooks

    metrics = metrics or SidecarMetrics()
    return InferenceCore(
        settings=settings,
        registry=detector_registry(settings, metrics, model_identity),
        batcher=micro_batcher(settings, metrics),
        metrics=metrics,
        metadata_lookup=metadata_lookup,
        upstream_name=upstream_name,
        tracer_provider=tracer_provider,
        hooks=request_hooks(settings, metrics) if hooks is None else hooks,
    )

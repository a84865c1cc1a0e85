"""advsentry's own ``advsentry.v1.DetectorService`` (proto/advsentry/v1/detector.proto).

Thin: a Detect on inputs is :meth:`InferenceCore.assess` (the same steps as a
proxied ModelInfer: metadata lookup, admission and the other hooks, upstream
inference with internal metadata stripped, micro-batched scoring by one
detector snapshot), a Detect on precomputed maps is
:meth:`InferenceCore.assess_maps`; so a Detect call is scored in the same
batches, by the same detector and hooks as proxied traffic. A Detect that gets
no verdict answers an error (never a score without a detector). DetectStream
answers through :func:`service.grpc.streams.ordered_responses` (ordered,
bounded, dropped on cancel).

Access (issue 13): ``Detect`` exists to return scores, so it is the oracle
the disclosure setting guards against. With ``disclosure: score`` anyone who
can reach the port may call it; with ``verdict`` or ``none`` (the default is
``verdict``) ``Detect``/``DetectStream`` answer PERMISSION_DENIED unless the
caller is trusted (``trusted_clients``/``trusted_metadata``, resolved as for
inference), and ``GetStatus`` omits thresholds for untrusted callers.
``detector_api: false`` turns the whole service off (UNIMPLEMENTED).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from detector import CalibrationError

from .._proto.advsentry.v1 import detector_pb2, detector_pb2_grpc
from ..clients import client_of
from ..core.policy import disclosure_for
from ..core.requests import RequestError
from ..settings import Disclosure
from .streams import ordered_responses

LOGGER = logging.getLogger(__name__)
DETECTOR_SERVICE = detector_pb2.DESCRIPTOR.services_by_name["DetectorService"].full_name


def _map_array(tensor: detector_pb2.Tensor) -> np.ndarray:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    if tensor.datatype != "FP32":
        raise RequestError(invalid, f"feature map {tensor.name!r}: datatype {tensor.datatype!r}, expected FP32")
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) not in (2, 3, 4) or any(d <= 0 for d in shape):
        raise RequestError(invalid, f"feature map {tensor.name!r}: shape {list(shape)}, "
                                    "expected [B,C,H,W] or [B,H,W] (a map) or [B,1] (a signal's value)")
    needed = int(np.prod(shape)) * 4
    if len(tensor.raw_contents) != needed:
        raise RequestError(invalid, f"feature map {tensor.name!r}: {len(tensor.raw_contents)} bytes, shape needs {needed}")
    array = np.frombuffer(tensor.raw_contents, dtype="<f4").reshape(shape)
    if not np.isfinite(array).all():
        raise RequestError(invalid, f"feature map {tensor.name!r}: contains NaN or infinite values")
    return array


class DetectorApi(detector_pb2_grpc.DetectorServiceServicer):
    def __init__(self, sidecar) -> None:
        self.sidecar = sidecar

    def _may_see_scores(self, context, model_name: str | None = None) -> bool:
        settings = self.sidecar.settings
        return disclosure_for(settings, client_of(context, settings), model_name) is Disclosure.score

    async def _check_access(self, context, model_name: str | None = None) -> None:
        """UNIMPLEMENTED when disabled; PERMISSION_DENIED for untrusted callers unless disclosure is score."""
        if not self.sidecar.settings.detector_api:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                "advsentry DetectorService is disabled on this sidecar (detector_api=false)")
        if not self._may_see_scores(context, model_name):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "advsentry DetectorService returns scores: only trusted callers may use it "
                                "(disclosure is not 'score'; see trusted_clients / trusted_metadata)")

    def _upstream(self, context):
        """The upstream ModelInfer for a Detect on inputs (the core strips internal metadata before it)."""
        async def call(request, metadata):
            return await self.sidecar.upstream.stub.ModelInfer(request, metadata=tuple(metadata),
                                                               timeout=self._timeout(context))

        return call

    async def _detect(self, request: detector_pb2.DetectRequest, context) -> detector_pb2.DetectResponse:
        if not request.model_name:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "model_name is required (it selects the detector)")
        if bool(request.feature_maps) == bool(request.inputs):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "give either feature_maps or inputs (exactly one)")
        core = self.sidecar.core
        metadata = tuple(context.invocation_metadata() or ())
        client = client_of(context, self.sidecar.settings)
        if request.feature_maps:
            names = [t.name for t in request.feature_maps]
            if len(set(names)) != len(names):
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"feature_maps names repeat: {names}")
            maps = {t.name: _map_array(t) for t in request.feature_maps}
            assessment, detector = await core.assess_maps(request.model_name, request.model_version, maps,
                                                          metadata, client)
        else:
            infer = service_pb2.ModelInferRequest(model_name=request.model_name,
                                                  model_version=request.model_version, id=request.id)
            for tensor in request.inputs:
                infer.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
                infer.raw_input_contents.append(tensor.raw_contents)
            assessment, detector = await core.assess(infer, self._upstream(context), metadata, client)
        reply = detector_pb2.DetectResponse(id=request.id, model_name=request.model_name,
                                            calibration_id=detector.calibration_id or "")
        if assessment.threshold is not None:
            reply.threshold = float(assessment.threshold)
        for score, flag in zip(assessment.scores, assessment.flags):
            reply.verdicts.add(score=float(score), adversarial=bool(flag))
        return reply

    def _timeout(self, context) -> float:
        remaining = context.time_remaining()
        limit = self.sidecar.settings.upstream_timeout_s
        return limit if remaining is None else max(0.001, min(limit, remaining))

    async def Detect(self, request, context):  # noqa: N802 - gRPC method name
        await self._check_access(context, request.model_name or None)
        try:
            return await self._detect(request, context)
        except RequestError as error:
            await context.abort(error.code, error.message)

    async def DetectStream(self, request_iterator: AsyncIterator, context):  # noqa: N802
        await self._check_access(context)  # per-model overrides: the global disclosure decides for a stream

        async def one(request) -> detector_pb2.DetectResponse:
            try:
                return await self._detect(request, context)
            except RequestError as error:
                return detector_pb2.DetectResponse(id=request.id, model_name=request.model_name,
                                                   error_message=error.message, error_code=error.code.name)
            except Exception as error:  # noqa: BLE001 - one bad message must not end the stream
                LOGGER.exception("DetectStream message failed")
                return detector_pb2.DetectResponse(id=request.id, error_message=str(error), error_code="INTERNAL")

        async for reply in ordered_responses(request_iterator, one, self.sidecar.settings.stream_max_in_flight):
            yield reply

    async def GetStatus(self, request, context):  # noqa: N802
        sidecar = self.sidecar
        settings = sidecar.settings
        if not settings.detector_api:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                "advsentry DetectorService is disabled on this sidecar (detector_api=false)")
        reply = detector_pb2.GetStatusResponse(
            upstream=sidecar.upstream_address,
            upstream_ready=bool(sidecar.health.upstream_ready),
            default_policy=settings.policy.value,
            scoring_failure=settings.scoring_failure_for("").value,  # explicit, else the global policy's
            max_batch_size=settings.max_batch_size,
            max_batch_delay_ms=settings.max_batch_delay_ms,
        )
        names = {d.model for d in sidecar.registry.known()} | set(settings.models)
        for name in sorted(names):
            try:
                model_detector = sidecar.registry.get(name)
            except CalibrationError as error:
                reply.models.add(model_name=name, calibration_source=f"error: {error}")
                continue
            status = reply.models.add(
                model_name=name,
                feature_outputs=list(model_detector.feature_outputs),
                calibration_id=model_detector.calibration_id or "",
                calibration_source=model_detector.calibration_source or "",
                score_config_json=json.dumps(
                    {k: v.to_dict() for k, v in model_detector.detector.features.items()}, sort_keys=True),
                policy=settings.policy_for(name).value,
            )
            if model_detector.threshold is not None and self._may_see_scores(context, name):
                status.threshold = float(model_detector.threshold)
            _traffic_status(sidecar, model_detector, status, self._may_see_scores(context, name))  # issue 12
        for metric in sidecar.metrics.registry.collect():
            if metric.name in ("advsentry_requests", "advsentry_errors", "advsentry_calibration_reloads",
                               "advsentry_inputs"):
                for sample in metric.samples:
                    if sample.name.endswith("_total"):
                        labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                        reply.counters[f"{sample.name}{{{labels}}}"] = sample.value
        return reply

    async def GetTrafficState(self, request, context):  # noqa: N802 - traffic calibration (issue 12)
        await self._check_access(context, request.model_name or None)  # the sketches are score distributions
        hook = _traffic_hook(self.sidecar)
        if hook is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "the traffic sketch is off on this sidecar (traffic_sketch=false)")
        return detector_pb2.GetTrafficStateResponse(state_json=hook.state_json(request.model_name or None))


# --- traffic calibration (issue 12) ---
def _traffic_hook(sidecar):  # type: ignore[no-untyped-def]
    from ..hooks.traffic import TrafficHook

    return next((hook for hook in sidecar.core.hooks if isinstance(hook, TrafficHook)), None)


def _traffic_status(sidecar, model_detector, status, may_see_scores: bool) -> None:  # type: ignore[no-untyped-def]
    """Traffic count, window and target FPR; the traffic-implied FPR only for callers who may see thresholds."""
    calibration = model_detector.detector.calibration
    if calibration is not None and calibration.target_fpr is not None:
        status.target_fpr = float(calibration.target_fpr)
    hook = _traffic_hook(sidecar)
    if hook is None:
        return
    summary = hook.summary(model_detector.model, model_detector.calibration_id, model_detector.threshold)
    status.traffic_count = summary.count
    status.traffic_first_seen = summary.first_seen or 0.0
    status.traffic_last_seen = summary.last_seen or 0.0
    if summary.implied_fpr is not None and may_see_scores:
        status.traffic_implied_fpr = summary.implied_fpr


def add_detector_service(server: grpc.aio.Server, sidecar) -> None:
    detector_pb2_grpc.add_DetectorServiceServicer_to_server(DetectorApi(sidecar), server)

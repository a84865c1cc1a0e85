"""Integrity (issue 20): no path of routine operation stops scoring silently, nothing internal goes upstream.

Against a real Triton (the bundled model, exported as ``advsentry serve`` does)
and real in-process sidecars; where what the upstream receives matters, a real
recording gRPC hop (:class:`e2e_triton.RecordingTap`) sits between the sidecar
and Triton.
"""

from __future__ import annotations

import shutil
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from e2e_triton import MODEL, RecordingTap, RunningSidecar, infer_input, make_settings, outputs, photo_pixels, wait_for

pytestmark = pytest.mark.slow

SECRET_KEY, SECRET = "x-advsentry-key", "s3cret-value"
INTERNAL_KEY = "x-internal-route"


def _calibration(path, threshold: float):
    """An artifact of the default detector for the bundled model with ``threshold`` (-1000: flags everything)."""
    from detector import DEFAULT_COMBINER, DEFAULT_FEATURES, CalibrationArtifact
    from detector.models import bundled_identity

    CalibrationArtifact.create(threshold, DEFAULT_FEATURES, bundled_identity(), combiner=DEFAULT_COMBINER).save(path)
    return path


def _sidecar(upstream: str, **overrides) -> RunningSidecar:
    from detector.models import bundled_identity

    return RunningSidecar(make_settings(upstream=upstream, **overrides), model_identity={MODEL: bundled_identity()})


def _sample(running: RunningSidecar, name: str, **labels) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (e.g. every version of a model)."""
    return sum(sample.value for metric in running.sidecar.metrics.registry.collect() for sample in metric.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def _params(result) -> dict:
    return {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in result.get_response().parameters.items()}


def _request(pixels: np.ndarray, request_id: str = "") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=MODEL, id=request_id)
    request.inputs.add(name="pixels", datatype="FP32", shape=list(pixels.shape))
    request.raw_input_contents.append(np.ascontiguousarray(pixels, dtype="<f4").tobytes())
    request.outputs.add(name="logits")
    return request


def _detect_request(pixels: np.ndarray, request_id: str = ""):
    from service._proto.advsentry.v1 import detector_pb2

    request = detector_pb2.DetectRequest(id=request_id, model_name=MODEL)
    request.inputs.add(name="pixels", datatype="FP32", shape=list(pixels.shape),
                       raw_contents=np.ascontiguousarray(pixels, dtype="<f4").tobytes())
    return request


def _verdict(client, policy: str) -> str:
    """What one flagged request gives under ``policy``: 'flagged <calibration>', 'rejected', or 'shadowed'."""
    try:
        result = client.infer(MODEL, [infer_input(photo_pixels(1))], outputs=outputs("logits"))
    except InferenceServerException as error:
        assert "PERMISSION_DENIED" in str(error.status()), error
        return "rejected"
    params = _params(result)
    if policy == "shadow":
        assert not params
        return "shadowed"
    assert params["advsentry_adversarial"] is True, params
    return f"flagged {params['advsentry_calibration']}"


# --- 1. hot reload fails closed -----------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["annotate", "reject", "shadow"])
def test_a_reload_the_model_cannot_serve_is_refused_and_the_old_calibration_keeps_scoring(triton, tmp_path, policy):
    """issue 20 item 1: fixed-signals over the watched file, the model does not serve its signals."""
    from detector.detector import NAMED_ARTIFACTS

    live = _calibration(tmp_path / "live.json", -1000.0)  # every input flagged: a verdict shows under each policy
    running = _sidecar(triton.grpc_address, policy=policy, calibration=live, calibration_poll_s=0.1)
    try:
        client = grpcclient.InferenceServerClient(running.address)
        before = _verdict(client, policy)
        shutil.copyfile(NAMED_ARTIFACTS["fixed-signals"], live)
        assert wait_for(lambda: _sample(running, "advsentry_calibration_reload_failures_total",
                                        model=MODEL, reason="outputs_missing") == 1), running.sidecar.metrics.exposition()
        assert _sample(running, "advsentry_calibration_reloads_total", result="refused") == 1
        after = [_verdict(client, policy) for _ in range(2)]
        assert after == [before, before]  # same verdict, same calibration id in force
        counted = _sample(running, "advsentry_requests_total", model=MODEL, verdict="adversarial",
                           outcome={"annotate": "annotated", "reject": "rejected", "shadow": "shadowed"}[policy],
                           policy=policy)
        assert counted == 3  # every request scored and counted
        assert sum(_sample(running, "advsentry_unscored_requests_total", model=MODEL, reason=r)
                   for r in ("scoring_error", "outputs_missing", "calibration_error", "no_threshold")) == 0
    finally:
        running.stop()


@pytest.mark.parametrize("policy", ["annotate", "reject"])
def test_a_protected_model_that_cannot_be_scored_is_counted_and_refused_or_flagged(triton, policy):
    """No request of a protected model leaves without a verdict uncounted; under reject it never reaches the model."""
    tap = RecordingTap(triton.grpc_address)
    running = _sidecar(tap.address, policy=policy, models={MODEL: {"calibration": "fixed-signals"}})
    try:
        assert running.sidecar.protection_modes == {MODEL: "unservable"}  # said at start-up, and as a metric
        assert _sample(running, "advsentry_model_protection", model=MODEL, mode="unservable") == 1
        client = grpcclient.InferenceServerClient(running.address)
        if policy == "reject":  # scoring_failure unset: closed under reject
            with pytest.raises(InferenceServerException) as refused:
                client.infer(MODEL, [infer_input(photo_pixels(1))], outputs=outputs("logits"))
            assert "FAILED_PRECONDITION" in str(refused.value.status()) and "no verdict" in refused.value.message()
            assert "ModelInfer" not in tap.methods()
            outcome = "failed"
        else:
            params = _params(client.infer(MODEL, [infer_input(photo_pixels(1))], outputs=outputs("logits")))
            assert "does not serve the outputs" in params["advsentry_error"] and "advsentry_adversarial" not in params
            outcome = "forwarded"
        assert _sample(running, "advsentry_unscored_requests_total", model=MODEL, reason="outputs_missing") == 1
        assert _sample(running, "advsentry_requests_total", model=MODEL, verdict="unscored", outcome=outcome,
                       policy=policy) == 1
    finally:
        running.stop()
        tap.stop()


# --- 2. no trusted-caller secret, no internal metadata upstream ---------------------------------------


def test_trusted_caller_secret_and_internal_metadata_never_reach_upstream(triton):
    from service._proto.advsentry.v1 import detector_pb2_grpc

    tap = RecordingTap(triton.grpc_address)
    running = _sidecar(tap.address, trusted_metadata=[f"{SECRET_KEY}={SECRET}"], strip_metadata=[INTERNAL_KEY.upper()])
    headers = {SECRET_KEY: SECRET, INTERNAL_KEY: "blue", "x-request-tag": "kept"}
    try:
        client = grpcclient.InferenceServerClient(running.address)
        result = client.infer(MODEL, [infer_input(photo_pixels(1))], outputs=outputs("logits"), headers=headers)
        assert "advsentry_score" in _params(result)  # the secret still makes the caller trusted
        client.get_model_metadata(MODEL, headers=headers)  # pass-through RPCs
        assert client.is_model_ready(MODEL, headers=headers)
        channel = grpc.insecure_channel(running.address)
        metadata = tuple(headers.items())
        stream = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            iter([_request(photo_pixels(1), "s1")]), metadata=metadata)
        assert [r.error_message for r in stream] == [""]
        reply = detector_pb2_grpc.DetectorServiceStub(channel).Detect(_detect_request(photo_pixels(1)), metadata=metadata)
        assert len(reply.verdicts) == 1
        seen = {method for method, _, _ in tap.calls}
        assert {"ModelInfer", "ModelMetadata", "ModelReady"} <= seen
        for method, sent, _ in tap.calls:
            assert SECRET_KEY not in sent and INTERNAL_KEY not in sent and SECRET not in sent.values(), (method, sent)
        tagged = [method for method, sent, _ in tap.calls if sent.get("x-request-tag") == "kept"]
        assert tagged.count("ModelInfer") == 3 and "ModelMetadata" in tagged  # other metadata still forwarded
    finally:
        running.stop()
        tap.stop()


# --- 3. streams end with their caller and run the hooks -----------------------------------------------


def _cancelled_stream(open_stream, messages, tap: RecordingTap) -> tuple[float, int]:
    """Open a stream of ``messages``, read one answer, cancel; returns (cancel time, ModelInfer calls by then)."""
    call = open_stream(iter(messages))
    next(call)
    call.cancel()
    cancelled_at = time.monotonic()
    sent = tap.methods().count("ModelInfer")
    time.sleep(3.0)  # far longer than the tap's delay: anything still queued would have gone upstream by now
    return cancelled_at, sent


@pytest.mark.parametrize("api", ["ModelStreamInfer", "DetectStream"])
def test_a_cancelled_stream_sends_nothing_more_upstream(triton, api):
    from service._proto.advsentry.v1 import detector_pb2_grpc

    tap = RecordingTap(triton.grpc_address, infer_delay_s=1.0)
    running = _sidecar(tap.address, stream_max_in_flight=2, disclosure="score")
    try:
        channel = grpc.insecure_channel(running.address)
        if api == "ModelStreamInfer":
            open_stream = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer
            messages = [_request(photo_pixels(1), str(i)) for i in range(30)]
        else:
            open_stream = detector_pb2_grpc.DetectorServiceStub(channel).DetectStream
            messages = [_detect_request(photo_pixels(1), str(i)) for i in range(30)]
        cancelled_at, _ = _cancelled_stream(open_stream, messages, tap)
        starts = [t for method, _, t in tap.calls if method == "ModelInfer"]
        # bounded: never more than stream_max_in_flight messages of the stream upstream at once (30 were sent)
        assert tap.most_infer_in_flight <= 2 and 1 <= len(starts) < 30, (tap.most_infer_in_flight, starts)
        # none after the cancel (0.5 s for the cancel to reach the sidecar on a loaded machine; a queued
        # message would have started when a slot freed, after the tap's 1 s delay)
        assert all(t < cancelled_at + 0.5 for t in starts), [round(t - cancelled_at, 3) for t in starts]
    finally:
        running.stop()
        tap.stop()


def test_stream_messages_run_the_same_hooks_as_model_infer(triton):
    """The traffic sketch (a hook) sees ModelInfer, ModelStreamInfer and DetectStream messages alike."""
    from service._proto.advsentry.v1 import detector_pb2_grpc

    running = _sidecar(triton.grpc_address, disclosure="score")
    try:
        channel = grpc.insecure_channel(running.address)
        client = grpcclient.InferenceServerClient(running.address)
        client.infer(MODEL, [infer_input(photo_pixels(1))], outputs=outputs("logits"))
        answers = list(service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            iter([_request(photo_pixels(i), str(i)) for i in range(3)])))
        replies = list(detector_pb2_grpc.DetectorServiceStub(channel).DetectStream(
            iter([_detect_request(photo_pixels(i), str(i)) for i in range(2)])))
        assert [a.error_message for a in answers] == [""] * 3 and [r.error_message for r in replies] == [""] * 2
        assert _sample(running, "advsentry_traffic_scores_total", model=MODEL) == 6
    finally:
        running.stop()


def test_a_model_first_seen_after_a_refused_reload_gets_the_calibration_in_force(tmp_path):
    """Not the refused file on disk: a refusal keeps one calibration in force for every model, old and new."""
    from detector import Detector
    from detector.detector import NAMED_ARTIFACTS
    from service.core.detectors import DetectorRegistry

    live = tmp_path / "live.json"
    shutil.copyfile(NAMED_ARTIFACTS["default"], live)
    registry = DetectorRegistry(default_calibration=live)
    default = Detector.named("default")
    outputs = {"logits", default.entropy_output}  # a model exported for the default detector only
    in_force = registry.get("first", outputs=outputs).calibration_id
    shutil.copyfile(NAMED_ARTIFACTS["fixed-signals"], live)
    events = registry.check_reload()
    assert len(events) == 1 and events[0].startswith("refused") and "outputs_missing" in events[0]
    assert registry.get("second", outputs=outputs).calibration_id == in_force == default.calibration_id

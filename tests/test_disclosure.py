"""Disclosure control, trusted callers and the non-finite-input policy (issue 13), end to end.

unmodified tritonclient / raw gRPC stubs -> in-process sidecar -> real tritonserver
on the bundled EfficientNet-Lite0. What a client learns is checked on the wire:
the default (``verdict``) and ``none`` leak no score or threshold (parameters,
rejection messages, trailers, the DetectorService), ``score`` and trusted
callers see them, hooks' parameters go through the same filter, and NaN/Inf
inputs are the policy's decision (reject refuses; annotate and shadow forward
and flag them).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from e2e_triton import MODEL, RunningSidecar, fgsm_pixels, infer_input, make_settings, outputs, photo_pixels

pytestmark = pytest.mark.slow

SECRET_HEADER = ("x-advsentry-key", "let-me-see-scores")
NUMERIC = ("advsentry_score", "advsentry_scores", "advsentry_threshold")


@pytest.fixture(scope="module")
def photos():
    """A clean photo and an FGSM-perturbed copy (8-bit, eps 2/255)."""
    return photo_pixels(1), fgsm_pixels(photo_pixels(1))


def _start(triton, **settings) -> RunningSidecar:
    from detector.models import bundled_identity

    return RunningSidecar(make_settings(upstream=triton.grpc_address, **settings),
                          model_identity={MODEL: bundled_identity()})


def _params(result) -> dict:
    response = result.get_response() if hasattr(result, "get_response") else result
    return {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in response.parameters.items()}


@pytest.fixture(scope="module")
def calibration(triton, photos, tmp_path_factory) -> Path:
    """A threshold between the clean and the FGSM photo's scores (read through a disclosure=score sidecar)."""
    from detector import DEFAULT_COMBINER, DEFAULT_FEATURES, CalibrationArtifact
    from detector.models import bundled_identity

    running = _start(triton, disclosure="score")
    try:
        client = grpcclient.InferenceServerClient(running.address)
        scores = [_params(client.infer(MODEL, [infer_input(p)], outputs=outputs("logits")))["advsentry_score"]
                  for p in photos]
    finally:
        running.stop()
    assert scores[1] > scores[0], scores
    path = tmp_path_factory.mktemp("cal") / "calibration.json"
    CalibrationArtifact.create(sum(scores) / 2, DEFAULT_FEATURES, bundled_identity(),
                               combiner=DEFAULT_COMBINER).save(path)
    return path


def _raw_request(pixels) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=MODEL, id="raw")
    request.inputs.add(name="pixels", datatype="FP32", shape=list(pixels.shape))
    request.outputs.add(name="logits")
    request.raw_input_contents.append(np.ascontiguousarray(pixels, dtype=np.float32).tobytes())
    return request


def _rejected(address: str, pixels, metadata=()) -> grpc.RpcError:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(_raw_request(pixels), metadata=metadata, timeout=60)
    return caught.value


def test_default_disclosure_is_verdict_and_leaks_no_number(triton, photos, calibration):
    clean, adversarial = photos
    running = _start(triton, calibration=calibration)  # policy annotate, disclosure default
    try:
        client = grpcclient.InferenceServerClient(running.address)
        ok, flagged = (_params(client.infer(MODEL, [infer_input(p)], outputs=outputs("logits"))) for p in photos)
        assert ok["advsentry_adversarial"] is False and flagged["advsentry_adversarial"] is True
        assert set(ok) == set(flagged) == {"advsentry_adversarial", "advsentry_calibration"}
        assert flagged["advsentry_calibration"].startswith("cal-")
        batch = _params(client.infer(MODEL, [infer_input(np.concatenate([clean, adversarial]))],
                                     outputs=outputs("logits")))
        assert set(batch) == {"advsentry_adversarial", "advsentry_calibration"} and batch["advsentry_adversarial"]
        # streams follow the same rule
        import queue

        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer(MODEL, [infer_input(adversarial)], request_id="s", outputs=outputs("logits"))
        result, error = answers.get(timeout=60)
        client.stop_stream()
        assert error is None and set(_params(result)) == {"advsentry_adversarial", "advsentry_calibration"}
    finally:
        running.stop()


def test_none_says_nothing_but_reject_still_rejects(triton, photos, calibration):
    clean, adversarial = photos
    for policy in ("annotate", "reject"):
        running = _start(triton, calibration=calibration, policy=policy, disclosure="none")
        try:
            client = grpcclient.InferenceServerClient(running.address)
            assert _params(client.infer(MODEL, [infer_input(clean)], outputs=outputs("logits"))) == {}
            if policy == "annotate":
                flagged = client.infer(MODEL, [infer_input(adversarial)], outputs=outputs("logits"))
                assert _params(flagged) == {} and flagged.as_numpy("logits").shape == (1, 1000)
            else:
                error = _rejected(running.address, adversarial)
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED
                assert re.fullmatch(r"rejected by advsentry \(request id [0-9a-f]{32}\)", error.details())
                assert not dict(error.trailing_metadata() or ())
        finally:
            running.stop()


def test_rejection_names_request_id_not_score_and_logs_the_detail(triton, photos, calibration, caplog):
    _, adversarial = photos
    caplog.set_level(logging.INFO, logger="service.core.inference")
    running = _start(triton, calibration=calibration, policy="reject")
    try:
        error = _rejected(running.address, adversarial)
        details = error.details()
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        match = re.match(r"rejected by advsentry \(request id ([0-9a-f]{32})\): input flagged as adversarial$", details)
        assert match, details
        assert "score" not in details and "threshold" not in details and not re.search(r"\d\.\d", details)
        trailers = dict(error.trailing_metadata() or ())
        assert "advsentry-score" not in trailers and "advsentry-threshold" not in trailers
        logged = [r.getMessage() for r in caplog.records if match.group(1) in r.getMessage()]
        assert logged and "scores" in logged[0] and "threshold" in logged[0], caplog.text
    finally:
        running.stop()


def test_score_disclosure_and_trusted_callers_see_scores(triton, photos, calibration):
    clean, adversarial = photos
    running = _start(triton, calibration=calibration, policy="reject", client_id_metadata_key="x-client-id",
                     trusted_clients=["metadata:ops"], trusted_metadata=["=".join(SECRET_HEADER)])
    try:
        client = grpcclient.InferenceServerClient(running.address)
        for headers in ({SECRET_HEADER[0]: SECRET_HEADER[1]}, {"x-client-id": "ops"}):
            params = _params(client.infer(MODEL, [infer_input(clean)], outputs=outputs("logits"), headers=headers))
            assert set(NUMERIC[::2]) <= set(params), headers
            error = _rejected(running.address, adversarial, metadata=tuple(headers.items()))
            assert "score" in error.details() and "threshold" in error.details()
            assert "advsentry-score" in dict(error.trailing_metadata())
        # a wrong secret or another client id is an untrusted caller
        for headers in ({SECRET_HEADER[0]: "guess"}, {"x-client-id": "app"}, {}):
            params = _params(client.infer(MODEL, [infer_input(clean)], outputs=outputs("logits"), headers=headers))
            assert not set(NUMERIC) & set(params), headers
            assert "advsentry-score" not in dict(_rejected(running.address, adversarial,
                                                           tuple(headers.items())).trailing_metadata() or ())
    finally:
        running.stop()
    running = _start(triton, calibration=calibration, disclosure="score")
    try:
        client = grpcclient.InferenceServerClient(running.address)
        params = _params(client.infer(MODEL, [infer_input(np.concatenate([clean, adversarial]))],
                                      outputs=outputs("logits")))
        assert set(NUMERIC) <= set(params) and params["advsentry_adversarial"] is True
    finally:
        running.stop()


def test_hook_parameters_go_through_the_disclosure_filter(triton, photos):
    from service.hooks.base import RequestHook

    class Flagging(RequestHook):
        name = "test-flagging"

        def observe(self, scored):
            return {"advsentry_test_flag": True, "advsentry_test_distance": 0.125, "advsentry_test_note": "near"}

    expected = {"none": set(), "verdict": {"advsentry_test_flag"},
                "score": {"advsentry_test_flag", "advsentry_test_distance", "advsentry_test_note"}}
    for disclosure, keys in expected.items():
        running = _start(triton, disclosure=disclosure)
        running.sidecar.core.hooks.append(Flagging())
        try:
            client = grpcclient.InferenceServerClient(running.address)
            params = _params(client.infer(MODEL, [infer_input(photos[0])], outputs=outputs("logits")))
            assert {k for k in params if k.startswith("advsentry_test")} == keys, disclosure
        finally:
            running.stop()


def test_detector_service_is_for_trusted_callers_unless_scores_are_disclosed(triton):
    from service._proto.advsentry.v1 import detector_pb2, detector_pb2_grpc

    pixels = np.ascontiguousarray(photo_pixels(1))
    request = detector_pb2.DetectRequest(id="x", model_name=MODEL)
    request.inputs.add(name="pixels", datatype="FP32", shape=list(pixels.shape), raw_contents=pixels.tobytes())
    from detector import DEFAULT_ARTIFACT_PATH

    running = _start(triton, calibration=DEFAULT_ARTIFACT_PATH, trusted_metadata=["=".join(SECRET_HEADER)])
    try:
        stub = detector_pb2_grpc.DetectorServiceStub(grpc.insecure_channel(running.address))
        with pytest.raises(grpc.RpcError) as caught:
            stub.Detect(request, timeout=60)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED and "trusted" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.DetectStream(iter([request]), timeout=60))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        reply = stub.Detect(request, metadata=(SECRET_HEADER,), timeout=60)
        assert len(reply.verdicts) == 1 and reply.HasField("threshold")
        status = stub.GetStatus(detector_pb2.GetStatusRequest(), timeout=30)
        assert status.models and not any(m.HasField("threshold") for m in status.models)
        trusted = stub.GetStatus(detector_pb2.GetStatusRequest(), metadata=(SECRET_HEADER,), timeout=30)
        assert any(m.HasField("threshold") for m in trusted.models)
    finally:
        running.stop()
    running = _start(triton, detector_api=False, disclosure="score")
    try:
        stub = detector_pb2_grpc.DetectorServiceStub(grpc.insecure_channel(running.address))
        for call in (lambda: stub.Detect(request, timeout=60),
                     lambda: stub.GetStatus(detector_pb2.GetStatusRequest(), timeout=30)):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED and "detector_api" in caught.value.details()
    finally:
        running.stop()


# --- non-finite inputs: the policy decides ---------------------------------------------------------


def _invalid_count(running, policy: str) -> float:
    total = 0.0
    for line in running.sidecar.metrics.exposition().decode().splitlines():
        if line.startswith("advsentry_invalid_inputs_total{") and f'policy="{policy}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_non_finite_inputs_are_the_policys_decision(triton, calibration):
    nan = photo_pixels(1).copy()
    nan[0, 0, 0, 0] = np.nan
    nan[0, 1, 5, 5] = np.inf
    clean = photo_pixels(1)
    # reject: refused before upstream, with a clear message, and counted
    running = _start(triton, calibration=calibration, policy="reject")
    try:
        client = grpcclient.InferenceServerClient(running.address)
        with pytest.raises(InferenceServerException) as caught:
            client.infer(MODEL, [infer_input(nan)], outputs=outputs("logits"))
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "2 value(s) are NaN or infinite" in caught.value.message() and "policy reject" in caught.value.message()
        assert _invalid_count(running, "reject") == 1
    finally:
        running.stop()
    # annotate: forwarded, flagged adversarial and invalid (only the bad batch item is counted)
    running = _start(triton, calibration=calibration, policy="annotate")
    try:
        client = grpcclient.InferenceServerClient(running.address)
        result = client.infer(MODEL, [infer_input(nan)], outputs=outputs("logits"))
        assert result.as_numpy("logits").shape == (1, 1000)
        params = _params(result)
        assert params["advsentry_invalid_input"] is True and params["advsentry_adversarial"] is True
        assert not set(NUMERIC) & set(params)
        batch = _params(client.infer(MODEL, [infer_input(np.concatenate([clean, nan]))], outputs=outputs("logits")))
        assert batch["advsentry_invalid_input"] is True and batch["advsentry_adversarial"] is True
        assert "advsentry_invalid_input" not in _params(client.infer(MODEL, [infer_input(clean)],
                                                                     outputs=outputs("logits")))
        assert _invalid_count(running, "annotate") == 2
    finally:
        running.stop()
    # shadow: forwarded untouched, counted
    running = _start(triton, calibration=calibration, policy="shadow")
    try:
        result = grpcclient.InferenceServerClient(running.address).infer(MODEL, [infer_input(nan)],
                                                                          outputs=outputs("logits"))
        assert result.as_numpy("logits").shape == (1, 1000) and _params(result) == {}
        assert _invalid_count(running, "shadow") == 1
    finally:
        running.stop()

"""Sidecar units without Triton: micro-batching, request validation, output stripping, policy,
settings precedence, tracing switches and stub staleness."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from service.core.batching import MicroBatcher
from service.core.requests import ModelSpec, RequestError, TensorSpec, output_array, strip_outputs, validate_request
from service.core.policy import Assessment, PolicyRejection, apply_policy
from service.settings import Policy, load_settings


def _run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_one_detector_call_and_keep_their_scores():
    calls: list[int] = []

    def score(key, maps):
        calls.append(maps["m"].shape[0])
        time.sleep(0.01)
        return maps["m"].reshape(maps["m"].shape[0], -1).sum(axis=1)

    async def main():
        batcher = MicroBatcher(score, max_batch_size=8, max_batch_delay_ms=50)
        arrays = [np.full((1, 2, 2), i, np.float32) for i in range(8)]
        results = await asyncio.gather(*(batcher.score(("m",), {"m": a}) for a in arrays))
        await batcher.close()
        return results

    results = _run(main())
    assert [float(r[0]) for r in results] == [4.0 * i for i in range(8)]
    assert calls == [8]  # one full batch, scored without waiting for the delay


def test_batches_are_bounded_by_size_and_delay_and_split_by_key():
    sizes: list[tuple] = []

    def score(key, maps):
        sizes.append((key, maps["m"].shape[0]))
        return np.zeros(maps["m"].shape[0])

    async def main():
        batcher = MicroBatcher(score, max_batch_size=4, max_batch_delay_ms=5)
        jobs = [batcher.score(("a",), {"m": np.zeros((1, 1))}) for _ in range(6)]
        jobs += [batcher.score(("b",), {"m": np.zeros((3, 1))})]
        started = time.perf_counter()
        await asyncio.gather(*jobs)
        lone = time.perf_counter()
        await batcher.score(("a",), {"m": np.zeros((1, 1))})
        waited = time.perf_counter() - lone
        await batcher.close()
        return waited

    waited = _run(main())
    assert all(size <= 4 for _, size in sizes)
    assert sum(size for key, size in sizes if key == ("a",)) == 7
    assert (("b",), 3) in sizes
    assert waited < 0.5  # a lone request waits about the delay, not forever


def test_a_batch_waits_only_for_requests_still_on_their_way():
    sizes: list[int] = []

    def score(key, maps):
        sizes.append(maps["m"].shape[0])
        return np.zeros(maps["m"].shape[0])

    async def main():
        batcher = MicroBatcher(score, max_batch_size=8, max_batch_delay_ms=2000)
        started = time.perf_counter()
        await batcher.score(("k",), {"m": np.zeros((1, 1))})
        lone = time.perf_counter() - started  # nothing upstream: scored at once, not after the delay

        async def on_its_way():
            with batcher.incoming():  # as InferenceCore wraps the upstream call
                await asyncio.sleep(0.05)
            return await batcher.score(("k",), {"m": np.zeros((1, 1))})

        started = time.perf_counter()
        await asyncio.gather(on_its_way(), batcher.score(("k",), {"m": np.zeros((1, 1))}))
        pair = time.perf_counter() - started
        await batcher.close()
        return lone, pair

    lone, pair = _run(main())
    assert lone < 1.0 and pair < 1.0  # far below the 2 s delay
    assert sizes == [1, 2]  # the second batch waited for the request that was on its way


def test_scoring_errors_reach_every_waiter():
    def score(key, maps):
        raise RuntimeError("detector exploded")

    async def main():
        batcher = MicroBatcher(score, max_batch_size=4, max_batch_delay_ms=1)
        results = await asyncio.gather(*(batcher.score(("k",), {"m": np.zeros((1, 1))}) for _ in range(3)),
                                       return_exceptions=True)
        await batcher.close()
        return results

    assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in _run(main()))


SPEC = ModelSpec("m", "1", {"pixels": TensorSpec("FP32", (-1, 3, 2, 2))}, {"logits": TensorSpec("FP32", (-1, 5))})


def _request(values: np.ndarray, name="pixels", datatype="FP32", shape=None):
    request = service_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name=name, datatype=datatype, shape=list(shape or values.shape))
    request.raw_input_contents.append(values.tobytes())
    return request


@pytest.mark.parametrize(
    "request_, fragment",
    [
        (_request(np.zeros((1, 3, 2, 2), np.float32), name="image"), "missing input"),
        (_request(np.zeros((1, 3, 2, 2), np.float64), datatype="FP64"), "expects FP32"),
        (_request(np.zeros((1, 3, 4, 1), np.float32)), "does not match"),
        (_request(np.zeros((1, 3, 2, 1), np.float32), shape=[1, 3, 2, 2]), "needs 48 bytes"),
        (_request(np.array([np.nan] + [0.0] * 11, np.float32).reshape(1, 3, 2, 2)), "NaN or infinite"),
        (_request(np.array([0.0] * 11 + [-np.inf], np.float32).reshape(1, 3, 2, 2)), "1 value(s) are NaN or infinite"),
        (_request(np.array([np.inf, -np.inf] + [1.0] * 10, np.float32).reshape(1, 3, 2, 2)), "2 value(s)"),
    ],
)
def test_validation_names_what_is_wrong(request_, fragment):
    with pytest.raises(RequestError) as caught:
        validate_request(request_, SPEC)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and fragment in caught.value.message


def test_valid_request_returns_batch_size_and_strip_keeps_raw_contents_aligned():
    assert validate_request(_request(np.zeros((2, 3, 2, 2), np.float32)), SPEC) == 2
    # Largest finite values: the float64 fast check must not call them infinite.
    assert validate_request(_request(np.full((1, 3, 2, 2), np.finfo(np.float32).max, np.float32)), SPEC) == 1
    fp64 = ModelSpec("m", "1", {"pixels": TensorSpec("FP64", (-1, 3, 2, 2))}, {})
    huge = np.full((1, 3, 2, 2), np.finfo(np.float64).max)  # their float64 sum overflows; they are still finite
    assert validate_request(_request(huge, datatype="FP64"), fp64) == 1
    response = service_pb2.ModelInferResponse()
    for name, value in (("logits", 1.0), ("feature_response", 2.0), ("other", 3.0)):
        response.outputs.add(name=name, datatype="FP32", shape=[1, 2])
        response.raw_output_contents.append(np.full((1, 2), value, np.float32).tobytes())
    np.testing.assert_array_equal(output_array(response, "feature_response"), [[2.0, 2.0]])
    strip_outputs(response, {"feature_response"})
    assert [o.name for o in response.outputs] == ["logits", "other"]
    np.testing.assert_array_equal(output_array(response, "other"), [[3.0, 3.0]])


def test_policies():
    from service.settings import Disclosure

    flagged = Assessment(np.array([1.0, 3.0]), 2.0, "cal-x")
    response = service_pb2.ModelInferResponse()
    assert apply_policy(Policy.shadow, response, flagged) == "shadowed" and not response.parameters
    assert apply_policy(Policy.annotate, response, flagged, Disclosure.score) == "annotated"
    assert response.parameters["advsentry_adversarial"].bool_param is True
    assert response.parameters["advsentry_score"].double_param == 3.0
    assert response.parameters["advsentry_scores"].string_param == "1.000000,3.000000"
    with pytest.raises(PolicyRejection) as caught:
        apply_policy(Policy.reject, service_pb2.ModelInferResponse(), flagged, Disclosure.score, "rid1")
    assert "inputs [1] of 2" in str(caught.value) and "threshold 2.000000" in str(caught.value)
    assert "rejected by advsentry (request id rid1)" in str(caught.value)
    assert dict(caught.value.trailing_metadata)["advsentry-score"] == "3.000000"
    clean = Assessment(np.array([1.0]), 2.0, "cal-x")
    assert apply_policy(Policy.reject, service_pb2.ModelInferResponse(), clean) == "annotated"


def test_disclosure_levels_and_rejection_text():
    """verdict (the default): flags and the calibration id only; none: nothing; rejections without numbers."""
    from service.core.policy import disclosed
    from service.settings import Disclosure

    flagged = Assessment(np.array([1.0, 3.0]), 2.0, "cal-x")
    verdict = service_pb2.ModelInferResponse()
    apply_policy(Policy.annotate, verdict, flagged)
    assert set(verdict.parameters) == {"advsentry_adversarial", "advsentry_calibration"}
    nothing = service_pb2.ModelInferResponse()
    apply_policy(Policy.annotate, nothing, flagged, Disclosure.none)
    assert not nothing.parameters
    for disclosure in (Disclosure.verdict, Disclosure.none):
        with pytest.raises(PolicyRejection) as caught:
            apply_policy(Policy.reject, service_pb2.ModelInferResponse(), flagged, disclosure, "abc")
        text = str(caught.value)
        assert text.startswith("rejected by advsentry (request id abc)")
        assert "3.0" not in text and "2.0" not in text and "score" not in text and "threshold" not in text
        assert caught.value.trailing_metadata == ()
    hook = {"advsentry_probing": True, "advsentry_probe_distance": 0.25, "advsentry_note": "x"}
    assert disclosed(hook, Disclosure.score) == hook
    assert disclosed(hook, Disclosure.verdict) == {"advsentry_probing": True}
    assert disclosed(hook, Disclosure.none) == {}
    # non-finite batch items are flagged whatever their score
    invalid = Assessment(np.array([np.nan, 0.5]), 2.0, "cal-x", np.array([True, False]))
    assert invalid.flags.tolist() == [True, False] and invalid.verdict == "adversarial"
    response = service_pb2.ModelInferResponse()
    apply_policy(Policy.annotate, response, invalid)
    assert response.parameters["advsentry_invalid_input"].bool_param is True


def test_trusted_callers():
    from service.clients import resolve_client
    from service.settings import Settings

    settings = Settings(trusted_clients=["mtls:ops"], trusted_metadata=["x-advsentry-key=s3cret"],
                        client_id_metadata_key="x-client-id")
    ops = resolve_client(settings, peer="ipv4:10.0.0.1:5", auth_context={"x509_common_name": [b"ops"]}, metadata=())
    assert ops.key == "mtls:ops" and ops.trusted
    other = resolve_client(settings, peer="ipv4:10.0.0.1:5", auth_context={"x509_common_name": [b"app"]}, metadata=())
    assert not other.trusted
    secret = resolve_client(settings, peer="ipv4:10.0.0.1:5", auth_context=None,
                            metadata=(("X-Advsentry-Key", b"s3cret"), ("x-client-id", "a")))
    assert secret.trusted and secret.key == "metadata:a"
    for wrong in ("s3cre", "s3cret ", "S3CRET", ""):
        assert not resolve_client(settings, peer=None, auth_context=None,
                                  metadata=(("x-advsentry-key", wrong),)).trusted
    with pytest.raises(ValueError):
        Settings(trusted_metadata=["x-advsentry-key"])


def test_settings_precedence_flags_env_yaml(tmp_path, monkeypatch):
    config = tmp_path / "advsentry.yaml"
    config.write_text("port: 9001\nmetrics_port: 9002\nmax_batch_size: 4\nmodels:\n  resnet:\n"
                      "    feature_outputs: [a, b]\n    policy: shadow\n")
    monkeypatch.setenv("ADVSENTRY_METRICS_PORT", "9102")
    monkeypatch.setenv("ADVSENTRY_MAX_BATCH_SIZE", "6")
    settings = load_settings(config, max_batch_size=12, port=None)
    assert (settings.port, settings.metrics_port, settings.max_batch_size) == (9001, 9102, 12)
    assert settings.models["resnet"].feature_outputs == ("a", "b") and settings.policy_for("resnet") is Policy.shadow
    assert settings.policy_for("other") is Policy.annotate
    with pytest.raises(ValueError, match="needs a calibration"):
        load_settings(policy="reject")
    with pytest.raises(ValueError, match="HOST:PORT"):
        load_settings(upstream="no-port")


def test_otlp_is_off_by_default_and_follows_otel_env():
    from service.tracing import otlp_requested

    assert not otlp_requested({})
    assert otlp_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert otlp_requested({"OTEL_TRACES_EXPORTER": "otlp"})
    assert not otlp_requested({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"})


def test_generated_proto_stubs_are_up_to_date():
    from service.protogen import stale_files

    assert stale_files() == [], "run: python -m service.protogen"


def test_exporter_refuses_torchscript_factories(tmp_path):
    import torch

    from service.triton.export import ExportError, ModelSource, export_model_repository

    with pytest.raises(ExportError, match="TorchScript"):
        export_model_repository(tmp_path, source=ModelSource("factory", "test_service_units:_scripted"))
    assert torch is not None


def _scripted():
    import torch

    return torch.jit.script(torch.nn.ReLU())


def test_exported_config_declares_each_feature_maps_real_shape(tmp_path):
    """Guided responses are shaped like the input, activation maps like their layer."""
    from detector import ScoreConfig
    from service.triton.export import ModelSource, export_model_repository

    features = {
        "feature_response": ScoreConfig(),
        "early_activations": ScoreConfig(response="activation", layer="features.1", gray="mean"),
    }
    model_dir = export_model_repository(
        tmp_path, model_name="tiny", source=ModelSource("factory", "tiny_models:tiny_cnn"), features=features, image_size=32
    )
    config = (model_dir / "config.pbtxt").read_text()
    assert 'name: "logits" data_type: TYPE_FP32 dims: [ 10 ]' in config
    assert 'name: "feature_response" data_type: TYPE_FP32 dims: [ 3, 32, 32 ]' in config
    assert 'name: "early_activations" data_type: TYPE_FP32 dims: [ 8, 32, 32 ]' in config
    assert 'string_value: "feature_response,early_activations"' in config


def test_a_request_naming_no_outputs_gets_the_models_own_and_the_detectors_hidden():
    """No outputs = "all" to Triton: the sidecar names the model's outputs, never the detector's."""
    from service.core.detectors import ModelDetector
    from service.core.requests import add_detector_outputs

    from detector import Detector

    detector = Detector.default()
    model_detector = ModelDetector("m", detector, {n: n for n in detector.feature_outputs}, None)
    ours = {*model_detector.feature_outputs, model_detector.entropy_output}
    stale = "advsentry_entropy_0123456789abcdef"  # exported for another calibration
    spec = ModelSpec("m", "1", {"pixels": TensorSpec("FP32", (-1, 3, 2, 2))}, {
        "logits": TensorSpec("FP32", (-1, 5)), "embedding": TensorSpec("FP32", (-1, 8)),
        "advsentry_embedding": TensorSpec("FP32", (-1, 64)),  # probing (issue 12): never named unasked
        detector.entropy_output: TensorSpec("FP32", (-1, 5)), stale: TensorSpec("FP32", (-1, 5)),
        **{name: TensorSpec("FP32", (-1, 1, 4, 4)) for name in detector.feature_outputs}})
    request = _request(np.zeros((1, 3, 2, 2), np.float32))
    hidden = add_detector_outputs(request, spec, ours, (detector.entropy_output,))
    assert [o.name for o in request.outputs] == ["logits", "embedding", detector.entropy_output]
    assert hidden == {detector.entropy_output}
    # Named outputs are kept; only what the sidecar added is hidden again.
    request = _request(np.zeros((1, 3, 2, 2), np.float32))
    request.outputs.add().name = "logits"
    hidden = add_detector_outputs(request, spec, ours, detector.feature_outputs)
    assert [o.name for o in request.outputs] == ["logits", *detector.feature_outputs]
    assert hidden == set(detector.feature_outputs)
    # Unknown model outputs (no metadata): Triton sends all, every detector output is removed.
    request = _request(np.zeros((1, 3, 2, 2), np.float32))
    assert add_detector_outputs(request, None, ours, (detector.entropy_output,)) == {
        *detector.feature_outputs, detector.entropy_output, "advsentry_embedding"}  # probing embedding (issue 12)
    assert not request.outputs


def test_non_finite_inputs_allowed_and_located_per_batch_item():
    from service.core.requests import non_finite_items

    values = np.zeros((3, 3, 2, 2), np.float32)
    values[1, 2, 1, 1] = np.nan
    request = _request(values)
    with pytest.raises(RequestError):
        validate_request(request, SPEC)
    assert validate_request(request, SPEC, allow_non_finite=True) == 3
    assert non_finite_items(request, 3).tolist() == [False, True, False]
    assert non_finite_items(_request(np.zeros((2, 3, 2, 2), np.float32)), 2) is None

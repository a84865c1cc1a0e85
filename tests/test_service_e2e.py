"""End-to-end: unmodified tritonclient → advsentry sidecar → real tritonserver (nvidia-pytriton's binary).

One Triton per module, on a repository written by the exporter: the bundled
EfficientNet-Lite0, a user's small CNN exported through ``advsentry
export-model --factory`` and an unprotected plain model. Sidecars are started
in-process per scenario (cheap) with different settings.
"""

from __future__ import annotations

import json
import queue
import textwrap
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from e2e_triton import (
    MODEL,
    RunningSidecar,
    export_bundled,
    fgsm_pixels,
    infer_input,
    make_settings,
    outputs,
    photo_pixels,
    wait_for,
)

pytestmark = pytest.mark.slow

TESTS_DIR = Path(__file__).resolve().parent

PLAIN_CONFIG = """
name: "plain"
backend: "python"
max_batch_size: 4
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""
PLAIN_MODEL = '''
import triton_python_backend_utils as pb_utils
class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy() * 2)])
                for r in requests]
'''


def write_calibration(path: Path, threshold: float) -> Path:
    from detector import DEFAULT_COMBINER, DEFAULT_FEATURES, CalibrationArtifact
    from detector.models import bundled_identity

    CalibrationArtifact.create(threshold, DEFAULT_FEATURES, bundled_identity(), combiner=DEFAULT_COMBINER).save(path)
    return path


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    from typer.testing import CliRunner

    from service.commands import export_model

    import typer

    repo = export_bundled(tmp_path_factory.mktemp("repo"))
    app = typer.Typer()
    export_model.register(app)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(app, ["export-model", "--out", str(repo), "--name", "tiny",
                                      "--factory", "tiny_models:tiny_cnn", "--max-batch-size", "4"],
                                env={"PYTHONPATH": str(TESTS_DIR)})
    assert result.exit_code == 0, result.output
    (repo / "plain" / "1").mkdir(parents=True)
    (repo / "plain" / "config.pbtxt").write_text(PLAIN_CONFIG)
    (repo / "plain" / "1" / "model.py").write_text(textwrap.dedent(PLAIN_MODEL))
    return repo


@pytest.fixture(scope="module")
def triton(repository):
    from service.triton.server import TritonServer

    server = TritonServer(repository, env={"ADVSENTRY_PYTHONPATH": str(TESTS_DIR)})
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sidecar(triton):
    from detector.models import bundled_identity

    # disclosure=score: these tests read the score (what the default hides is tests/test_disclosure.py's)
    running = RunningSidecar(make_settings(upstream=triton.grpc_address, metrics_port=_free_port(),
                                           disclosure="score"),
                             model_identity={MODEL: bundled_identity()})
    yield running
    running.stop()


@pytest.fixture(scope="module")
def photos():
    """A clean photo and an FGSM-perturbed copy (8-bit, eps 2/255, changes the top-1 class)."""
    return photo_pixels(1), fgsm_pixels(photo_pixels(1))


def _free_port() -> int:
    from service.triton.server import free_port

    return free_port()


def _score(client, pixels) -> float:
    result = client.infer(MODEL, [infer_input(pixels)], outputs=outputs("logits"))
    return result.get_response().parameters["advsentry_score"].double_param


def _params(result) -> dict:
    out = {}
    for key, value in result.get_response().parameters.items():
        out[key] = getattr(value, value.WhichOneof("parameter_choice"))
    return out


@pytest.fixture(scope="module")
def scores(sidecar, photos):
    client = grpcclient.InferenceServerClient(sidecar.address)
    clean, adversarial = photos
    return _score(client, clean), _score(client, adversarial)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory, scores) -> Path:
    clean, adversarial = scores
    assert adversarial > clean, "the detector must score the FGSM photo above the clean one"
    return write_calibration(tmp_path_factory.mktemp("cal") / "calibration.json", (clean + adversarial) / 2)


def _sidecar_with(triton, **settings) -> RunningSidecar:
    from detector.models import bundled_identity

    settings.setdefault("disclosure", "score")  # these tests read scores and thresholds

    return RunningSidecar(make_settings(upstream=triton.grpc_address, **settings),
                          model_identity={MODEL: bundled_identity()})


# --- unary --------------------------------------------------------------------------------------


def test_unary_classifies_and_annotates_and_strips_feature_output(sidecar, triton):
    from detector.models import imagenet_class_names

    client = grpcclient.InferenceServerClient(sidecar.address)
    result = client.infer(MODEL, [infer_input(photo_pixels(1))], outputs=outputs("logits"))
    assert "cat" in imagenet_class_names()[int(result.as_numpy("logits").argmax())]
    params = _params(result)
    assert set(params) >= {"advsentry_score", "advsentry_adversarial", "advsentry_calibration"}
    assert params["advsentry_adversarial"] is False and params["advsentry_calibration"] == "none"
    assert [o.name for o in result.get_response().outputs] == ["logits"]

    direct = grpcclient.InferenceServerClient(triton.grpc_address)
    expected = direct.infer(MODEL, [infer_input(photo_pixels(1))], outputs=outputs("logits"))
    np.testing.assert_array_equal(result.as_numpy("logits"), expected.as_numpy("logits"))

    # No requested outputs = "all outputs" for Triton; the sidecar still strips its own.
    everything = client.infer(MODEL, [infer_input(photo_pixels(1))])
    assert [o.name for o in everything.get_response().outputs] == ["logits"]
    # Asked for explicitly, a feature map is kept (and equals Triton's own answer).
    from detector import DEFAULT_FEATURES

    first_map = next(iter(DEFAULT_FEATURES))
    both = client.infer(MODEL, [infer_input(photo_pixels(1))], outputs=outputs("logits", first_map))
    assert sorted(o.name for o in both.get_response().outputs) == sorted(["logits", first_map])
    reference = direct.infer(MODEL, [infer_input(photo_pixels(1))], outputs=outputs(first_map)).as_numpy(first_map)
    np.testing.assert_allclose(both.as_numpy(first_map), reference, rtol=1e-5, atol=1e-6)


def test_policies_on_clean_and_perturbed_photo(triton, photos, calibration, scores):
    clean, adversarial = photos
    for policy in ("annotate", "reject", "shadow"):
        running = _sidecar_with(triton, calibration=calibration, policy=policy)
        try:
            client = grpcclient.InferenceServerClient(running.address)
            ok = client.infer(MODEL, [infer_input(clean)], outputs=outputs("logits"))
            if policy == "shadow":
                assert _params(ok) == {}
            else:
                params = _params(ok)
                assert params["advsentry_adversarial"] is False
                assert params["advsentry_threshold"] == pytest.approx(sum(scores) / 2)
                assert params["advsentry_calibration"].startswith("cal-")
            if policy == "reject":
                with pytest.raises(InferenceServerException) as caught:
                    client.infer(MODEL, [infer_input(adversarial)], outputs=outputs("logits"))
                assert caught.value.status() == "StatusCode.PERMISSION_DENIED"
                assert "score" in caught.value.message() and "threshold" in caught.value.message()
                # Trailing metadata carries the score (raw stub to read trailers).
                stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(running.address))
                request = _raw_request(adversarial)
                with pytest.raises(grpc.RpcError) as raw:
                    stub.ModelInfer(request)
                trailers = dict(raw.value.trailing_metadata())
                assert float(trailers["advsentry-score"]) == pytest.approx(scores[1], abs=1e-5)
            else:
                flagged = client.infer(MODEL, [infer_input(adversarial)], outputs=outputs("logits"))
                assert flagged.as_numpy("logits").shape == (1, 1000)
                if policy == "annotate":
                    assert _params(flagged)["advsentry_adversarial"] is True
                    assert _params(flagged)["advsentry_score"] == pytest.approx(scores[1], abs=1e-6)
                else:
                    assert _params(flagged) == {}
            text = running.sidecar.metrics.exposition().decode()
            verdict = 'verdict="adversarial"'
            outcome = {"annotate": "annotated", "reject": "rejected", "shadow": "shadowed"}[policy]
            assert any(verdict in line and f'outcome="{outcome}"' in line and line.endswith(" 1.0" if policy != "reject" else " 2.0")
                       for line in text.splitlines() if line.startswith("advsentry_requests_total"))
        finally:
            running.stop()


def _raw_request(pixels, model=MODEL, outputs_=("logits",)):
    request = service_pb2.ModelInferRequest(model_name=model, id="raw")
    tensor = request.inputs.add(name="pixels", datatype="FP32", shape=list(pixels.shape))
    del tensor
    for name in outputs_:
        request.outputs.add(name=name)
    request.raw_input_contents.append(np.ascontiguousarray(pixels, dtype=np.float32).tobytes())
    return request


def test_shadow_response_is_byte_identical_to_direct(triton, calibration):
    running = _sidecar_with(triton, calibration=calibration, policy="shadow")
    try:
        request = _raw_request(photo_pixels(1))
        via = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(running.address)).ModelInfer(request)
        direct = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(triton.grpc_address)).ModelInfer(
            _raw_request(photo_pixels(1)))
        assert via.SerializeToString(deterministic=True) == direct.SerializeToString(deterministic=True)
    finally:
        running.stop()


# --- streaming ----------------------------------------------------------------------------------


def test_stream_answers_in_order_and_survives_a_bad_message(sidecar):
    client = grpcclient.InferenceServerClient(sidecar.address)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    good = photo_pixels(1)
    bad = np.ascontiguousarray(good[:, :, :112])  # wrong shape (NaN is forwarded under annotate, see test_disclosure)
    plan = [("a", good), ("b", bad), ("c", photo_pixels(0)), ("d", good)]
    for request_id, pixels in plan:
        client.async_stream_infer(MODEL, [infer_input(pixels)], request_id=request_id, outputs=outputs("logits"))
    got = [answers.get(timeout=60) for _ in plan]
    client.stop_stream()
    assert answers.empty()
    assert got[1][0] is None and "does not match" in str(got[1][1])
    ok = [result for result, error in got if error is None]
    assert [r.get_response().id for r in ok] == ["a", "c", "d"]
    for result in ok:
        assert "advsentry_score" in result.get_response().parameters
        assert [o.name for o in result.get_response().outputs] == ["logits"]


# --- pass-through -------------------------------------------------------------------------------


def test_passthrough_rpcs_identical_to_direct(sidecar, triton):
    via = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(sidecar.address))
    direct = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(triton.grpc_address))
    calls = [
        ("ServerLive", service_pb2.ServerLiveRequest()),
        ("ServerReady", service_pb2.ServerReadyRequest()),
        ("ServerMetadata", service_pb2.ServerMetadataRequest()),
        ("ModelReady", service_pb2.ModelReadyRequest(name=MODEL)),
        ("ModelMetadata", service_pb2.ModelMetadataRequest(name=MODEL)),
        ("ModelConfig", service_pb2.ModelConfigRequest(name="tiny")),
        ("RepositoryIndex", service_pb2.RepositoryIndexRequest()),
        ("SystemSharedMemoryStatus", service_pb2.SystemSharedMemoryStatusRequest()),
        ("CudaSharedMemoryStatus", service_pb2.CudaSharedMemoryStatusRequest()),
        ("ModelMetadata", service_pb2.ModelMetadataRequest(name="no-such-model")),
        ("ModelConfig", service_pb2.ModelConfigRequest(name=MODEL, version="7")),
    ]
    for method, request in calls:
        outcomes = []
        for stub in (via, direct):
            try:
                outcomes.append(("ok", getattr(stub, method)(request, timeout=10).SerializeToString(deterministic=True)))
            except grpc.RpcError as error:
                outcomes.append((error.code(), error.details()))
        assert outcomes[0] == outcomes[1], method
    # Unprotected models pass through untouched (no parameters added).
    client = grpcclient.InferenceServerClient(sidecar.address)
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.arange(4, dtype=np.float32)[None])
    before = sidecar.sidecar.metrics.registry.get_sample_value("advsentry_unprotected_requests_total",
                                                                {"model": "plain"}) or 0
    result = client.infer("plain", [x])
    np.testing.assert_array_equal(result.as_numpy("y"), [[0, 2, 4, 6]])
    assert not result.get_response().parameters
    # ... but never silently: counted, and listed as unprotected at start-up (issue 21)
    assert sidecar.sidecar.metrics.registry.get_sample_value("advsentry_unprotected_requests_total",
                                                             {"model": "plain"}) == before + 1


def test_start_up_lists_every_model_and_how_it_is_protected(sidecar):
    assert sidecar.sidecar.protection_modes == {MODEL: "signals", "tiny": "signals", "plain": "unprotected"}
    registry = sidecar.sidecar.metrics.registry
    for model, mode in sidecar.sidecar.protection_modes.items():
        assert registry.get_sample_value("advsentry_model_protection", {"model": model, "mode": mode}) == 1


def test_user_model_exported_with_factory_is_protected(sidecar):
    client = grpcclient.InferenceServerClient(sidecar.address)
    result = client.infer("tiny", [infer_input(photo_pixels(2))], outputs=outputs("logits"))
    assert result.as_numpy("logits").shape == (1, 10)
    assert np.isfinite(_params(result)["advsentry_score"])


# --- bad input ----------------------------------------------------------------------------------


def _bad_requests():
    good = np.ascontiguousarray(photo_pixels(1))
    raw = good.tobytes()

    def request(**changes):
        r = service_pb2.ModelInferRequest(model_name=changes.get("model", MODEL))
        for name, datatype, shape in changes.get("inputs", [("pixels", "FP32", [1, 3, 224, 224])]):
            r.inputs.add(name=name, datatype=datatype, shape=shape)
        for blob in changes.get("raw", [raw]):
            r.raw_input_contents.append(blob)
        return r

    return [
        ("unknown model", request(model="nope"), grpc.StatusCode.NOT_FOUND, "unknown model"),
        ("missing input", request(inputs=[], raw=[]), grpc.StatusCode.INVALID_ARGUMENT, "missing input"),
        ("extra input", request(inputs=[("pixels", "FP32", [1, 3, 224, 224]), ("extra", "FP32", [1])],
                                raw=[raw, b"\0\0\0\0"]), grpc.StatusCode.INVALID_ARGUMENT, "unexpected input"),
        ("wrong datatype", request(inputs=[("pixels", "FP64", [1, 3, 224, 224])], raw=[raw + raw]),
         grpc.StatusCode.INVALID_ARGUMENT, "expects FP32"),
        ("wrong shape", request(inputs=[("pixels", "FP32", [1, 3, 112, 448])]),
         grpc.StatusCode.INVALID_ARGUMENT, "does not match"),
        ("byte size", request(raw=[raw[:-4]]), grpc.StatusCode.INVALID_ARGUMENT, "needs 602112 bytes"),
        ("batch too large", request(inputs=[("pixels", "FP32", [9, 3, 224, 224])], raw=[raw * 9]),
         grpc.StatusCode.INVALID_ARGUMENT, "batch"),
    ]


def test_bad_input_table(sidecar):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(sidecar.address))
    for name, request, code, fragment in _bad_requests():
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=30)
        assert caught.value.code() == code, (name, caught.value.details())
        assert fragment.lower() in caught.value.details().lower(), (name, caught.value.details())


def test_oversize_message_and_upstream_timeout(triton):
    running = _sidecar_with(triton, max_message_bytes=64 * 1024, upstream_timeout_s=0.05)
    try:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(running.address))
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(_raw_request(photo_pixels(1)), timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        small = service_pb2.ModelInferRequest(model_name="tiny")
        small.inputs.add(name="pixels", datatype="FP32", shape=[1, 3, 64, 64])
        small.raw_input_contents.append(np.zeros((1, 3, 64, 64), np.float32).tobytes())
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(small, timeout=30)  # tiny is exported for 224x224: shape check first
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        running.stop()
    running = _sidecar_with(triton, upstream_timeout_s=0.001)
    try:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(running.address))
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(_raw_request(photo_pixels(1)), timeout=30)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "did not answer" in caught.value.details()
    finally:
        running.stop()


# --- metrics, batching, health, reflection --------------------------------------------------------


def _counter(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_scrape_counts_traffic_and_batches_concurrent_requests(sidecar):
    from concurrent.futures import ThreadPoolExecutor

    url = f"http://127.0.0.1:{sidecar.sidecar.metrics_port}/metrics"
    before = urllib.request.urlopen(url, timeout=10).read().decode()
    pixels = photo_pixels(1)

    def one(_):
        client = grpcclient.InferenceServerClient(sidecar.address)
        return client.infer(MODEL, [infer_input(pixels)], outputs=outputs("logits"))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert all("advsentry_score" in r.get_response().parameters for r in results)
    after = urllib.request.urlopen(url, timeout=10).read().decode()
    labels = {"model": MODEL, "version": "1"}
    delta = lambda name, **extra: _counter(after, name, **labels, **extra) - _counter(before, name, **labels, **extra)  # noqa: E731
    assert delta("advsentry_requests_total", outcome="annotated") == 8
    assert delta("advsentry_inputs_total") == 8
    assert delta("advsentry_score_count") == 8
    assert delta("advsentry_upstream_latency_seconds_count") == 8
    assert delta("advsentry_scoring_latency_seconds_count") == 8
    assert delta("advsentry_proxy_overhead_seconds_count") == 8
    # The exported model computes the entropies in Triton: one inline detector call per request.
    batched = _counter(after, "advsentry_batch_size_sum", model=MODEL) - _counter(before, "advsentry_batch_size_sum", model=MODEL)
    calls = _counter(after, "advsentry_batch_size_count", model=MODEL) - _counter(before, "advsentry_batch_size_count", model=MODEL)
    assert batched == 8 and calls == 8
    assert "advsentry_in_flight_requests{" in after
    assert _counter(after, "advsentry_in_flight_requests", model=MODEL) == 0
    assert "advsentry_calibration_info{" in after and "advsentry_threshold{" in after
    assert _counter(after, "advsentry_upstream_ready") == 1


def test_entropies_computed_in_triton_equal_the_sidecars_own(sidecar, triton, photos):
    """Exported models serve the per-map entropies; the sidecar reads those instead of the maps.

    Same numbers both ways: Triton's entropy output equals ``Detector.entropies``
    of the maps in the same answer, and a sidecar forced to fetch the maps
    (``entropy_in=sidecar``, micro-batched) gives the same scores as the
    default one that reads the entropies.
    """
    import torch
    from concurrent.futures import ThreadPoolExecutor

    from detector import Detector

    detector = Detector.default()
    clean, adversarial = photos
    direct = grpcclient.InferenceServerClient(triton.grpc_address)
    answer = direct.infer(MODEL, [infer_input(np.concatenate([clean, adversarial]))],
                          outputs=outputs(*detector.feature_outputs, detector.entropy_output))
    in_triton = answer.as_numpy(detector.entropy_output)
    assert in_triton.shape == (2, len(detector.feature_outputs))
    maps = {name: torch.from_numpy(answer.as_numpy(name).copy()) for name in detector.feature_outputs}
    np.testing.assert_allclose(in_triton, detector.entropies(maps).numpy(), rtol=1e-6, atol=1e-6)

    maps_sidecar = _sidecar_with(triton, entropy_in="sidecar", metrics_port=_free_port())
    try:
        auto = grpcclient.InferenceServerClient(sidecar.address)
        here = grpcclient.InferenceServerClient(maps_sidecar.address)
        for pixels in (clean, adversarial):
            np.testing.assert_allclose(_score(here, pixels), _score(auto, pixels), rtol=1e-5, atol=1e-5)
        # Asked for by name, the entropy output reaches the client (the sidecar strips only what it added).
        kept = auto.infer(MODEL, [infer_input(clean)], outputs=outputs("logits", detector.entropy_output))
        assert sorted(o.name for o in kept.get_response().outputs) == sorted(["logits", detector.entropy_output])
        # The maps path batches concurrent requests in the sidecar.
        url = f"http://127.0.0.1:{maps_sidecar.sidecar.metrics_port}/metrics"
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: _score(grpcclient.InferenceServerClient(maps_sidecar.address), clean), range(8)))
        metrics = urllib.request.urlopen(url, timeout=10).read().decode()
        assert _counter(metrics, "advsentry_batch_size_sum", model=MODEL) == 10
        assert 1 <= _counter(metrics, "advsentry_batch_requests_count", model=MODEL) <= 10
        assert _counter(metrics, "advsentry_batch_requests_sum", model=MODEL) == 10
    finally:
        maps_sidecar.stop()


def test_health_and_reflection(sidecar):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(sidecar.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


# --- calibration hot reload -------------------------------------------------------------------------


def test_calibration_hot_reload_and_bad_file_refused(triton, tmp_path, scores, calibration):
    path = tmp_path / "live.json"
    path.write_text(calibration.read_text())
    running = _sidecar_with(triton, calibration=path, calibration_poll_s=0.1)
    try:
        client = grpcclient.InferenceServerClient(running.address)
        first = _params(client.infer(MODEL, [infer_input(photo_pixels(1))], outputs=outputs("logits")))
        write_calibration(path, -1000.0)  # below any score: everything is flagged
        assert wait_for(lambda: _counter(running.sidecar.metrics.exposition().decode(),
                                         "advsentry_calibration_reloads_total", result="loaded") == 1)
        second = _params(client.infer(MODEL, [infer_input(photo_pixels(1))], outputs=outputs("logits")))
        assert first["advsentry_adversarial"] is False and second["advsentry_adversarial"] is True
        assert second["advsentry_threshold"] == -1000.0 and second["advsentry_calibration"] != first["advsentry_calibration"]
        document = json.loads(path.read_text())
        document["threshold"] = 99.0  # tampered: checksum no longer matches
        path.write_text(json.dumps(document))
        assert wait_for(lambda: _counter(running.sidecar.metrics.exposition().decode(),
                                         "advsentry_calibration_reloads_total", result="refused") == 1)
        third = _params(client.infer(MODEL, [infer_input(photo_pixels(1))], outputs=outputs("logits")))
        assert third["advsentry_threshold"] == -1000.0
    finally:
        running.stop()

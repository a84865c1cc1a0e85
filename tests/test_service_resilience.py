"""End-to-end resilience and tracing: traceparent reaches upstream, draining, upstream killed mid-stream.

Its own Triton (module fixture), because the last test kills it.
"""

from __future__ import annotations

import queue
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from e2e_triton import MODEL, LoopThread, RunningSidecar, infer_input, start_team_server, make_settings, outputs, photo_pixels

pytestmark = pytest.mark.slow


class RecordingProxy:
    """A byte-level gRPC forwarder that records the metadata of every call it forwards."""

    def __init__(self, target: str) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.loop = LoopThread()
        self.port = self.loop.run(self._start(target))

    async def _start(self, target: str) -> int:
        channel = grpc.aio.insecure_channel(target)
        proxy = self

        class Forward(grpc.GenericRpcHandler):
            def service(self, details):
                method = details.method

                async def unary(request: bytes, context) -> bytes:
                    proxy.calls.append((method, dict(context.invocation_metadata())))
                    return await channel.unary_unary(method)(request)

                return grpc.unary_unary_rpc_method_handler(unary)

        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((Forward(),))
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def stop(self) -> None:
        self.loop.run(self.server.stop(0))
        self.loop.close()


def test_spans_parent_child_and_traceparent_sent_upstream(triton):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    recorder = RecordingProxy(triton.grpc_address)
    running = RunningSidecar(make_settings(upstream=f"127.0.0.1:{recorder.port}"), tracer_provider=provider)
    try:
        client = grpcclient.InferenceServerClient(running.address)
        client.infer(MODEL, [infer_input(photo_pixels(1))], outputs=outputs("logits"))
    finally:
        running.stop()
        recorder.stop()
    spans = {span.name: span for span in exporter.get_finished_spans()}
    root, upstream, score = spans["advsentry.ModelInfer"], spans["advsentry.upstream"], spans["advsentry.score"]
    assert root.parent is None
    assert upstream.parent.span_id == root.context.span_id and score.parent.span_id == root.context.span_id
    assert len({root.context.trace_id, upstream.context.trace_id, score.context.trace_id}) == 1
    infers = [meta for method, meta in recorder.calls if method.endswith("/ModelInfer")]
    assert len(infers) == 1
    version, trace_id, span_id, flags = infers[0]["traceparent"].split("-")
    assert version == "00" and int(trace_id, 16) == root.context.trace_id
    assert int(span_id, 16) == upstream.context.span_id  # the upstream call's own span is the parent
    assert root.attributes["advsentry.verdict"] == "no_threshold"


def test_graceful_shutdown_drains_in_flight_call(triton):
    running = RunningSidecar(make_settings(upstream=triton.grpc_address, disclosure="score"))
    client = grpcclient.InferenceServerClient(running.address)
    result: dict = {}

    def call() -> None:
        try:
            result["ok"] = client.infer(MODEL, [infer_input(photo_pixels(1))], outputs=outputs("logits"))
        except Exception as error:  # noqa: BLE001
            result["error"] = error

    worker = threading.Thread(target=call)
    worker.start()
    time.sleep(0.15)  # the call is in flight (guided backprop takes far longer on CPU)
    running.stop(grace=30)
    worker.join(30)
    assert "ok" in result, result.get("error")
    assert "advsentry_score" in result["ok"].get_response().parameters


def test_detector_service_detect_stream_and_status(triton):
    from service._proto.advsentry.v1 import detector_pb2, detector_pb2_grpc

    running = RunningSidecar(make_settings(upstream=triton.grpc_address, disclosure="score"))
    try:
        stub = detector_pb2_grpc.DetectorServiceStub(grpc.insecure_channel(running.address))
        pixels = np.ascontiguousarray(photo_pixels(1))
        request = detector_pb2.DetectRequest(id="x", model_name=MODEL)
        request.inputs.add(name="pixels", datatype="FP32", shape=list(pixels.shape), raw_contents=pixels.tobytes())
        reply = stub.Detect(request, timeout=60)
        assert reply.id == "x" and len(reply.verdicts) == 1 and not reply.HasField("threshold")
        proxied = grpcclient.InferenceServerClient(running.address).infer(
            MODEL, [infer_input(pixels)], outputs=outputs("logits"))
        assert reply.verdicts[0].score == pytest.approx(
            proxied.get_response().parameters["advsentry_score"].double_param, abs=1e-9)
        # Maps scored directly; a bad message in a stream does not end it.
        from detector import DEFAULT_FEATURES

        names = list(DEFAULT_FEATURES)
        upstream_maps = grpcclient.InferenceServerClient(triton.grpc_address).infer(
            MODEL, [infer_input(pixels)], outputs=outputs(*names))
        direct = detector_pb2.DetectRequest(id="maps", model_name=MODEL)
        for name in names:
            maps = np.ascontiguousarray(upstream_maps.as_numpy(name))
            direct.feature_maps.add(name=name, datatype="FP32", shape=list(maps.shape), raw_contents=maps.tobytes())
        broken = detector_pb2.DetectRequest(id="broken", model_name=MODEL)
        broken.CopyFrom(direct)
        broken.id = "broken"
        broken.feature_maps[0].raw_contents += b"1234"  # four bytes more than the shape says
        replies = list(stub.DetectStream(iter([direct, broken, request]), timeout=60))
        assert [r.id for r in replies] == ["maps", "broken", "x"]
        assert replies[0].verdicts[0].score == pytest.approx(reply.verdicts[0].score, abs=1e-9)
        assert replies[1].error_code == "INVALID_ARGUMENT" and "bytes" in replies[1].error_message
        with pytest.raises(grpc.RpcError) as caught:
            stub.Detect(detector_pb2.DetectRequest(model_name=MODEL), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = stub.GetStatus(detector_pb2.GetStatusRequest(), timeout=10)
        assert status.upstream_ready and status.default_policy == "annotate"
        assert [m.model_name for m in status.models] == [MODEL]
        assert list(status.models[0].feature_outputs) == names
        assert any(key.startswith("advsentry_requests_total") for key in status.counters)
    finally:
        running.stop()


def test_library_interceptor_protects_a_teams_own_server(triton, tmp_path):
    """A team's own KServe-v2 grpc.aio server (here: one that forwards to Triton) with the interceptor."""
    from service.grpc.interceptor import build_interceptor
    from service.settings import Settings

    from test_service_e2e import write_calibration

    calibration = write_calibration(tmp_path / "cal.json", -1000.0)  # below any score: flags everything
    interceptor = build_interceptor(Settings(models={MODEL: {}}, calibration=calibration, policy="reject", disclosure="score"))
    loop = LoopThread()

    server, port = start_team_server(loop, interceptor, triton.grpc_address)
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        with pytest.raises(Exception) as caught:
            client.infer(MODEL, [infer_input(photo_pixels(1))], outputs=outputs("logits"))
        assert "PERMISSION_DENIED" in str(caught.value.status()) and "threshold -1000.000000" in caught.value.message()
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer(MODEL, [infer_input(photo_pixels(1))], request_id="s1", outputs=outputs("logits"))
        result, error = answers.get(timeout=60)
        client.stop_stream()
        assert result is None and "PERMISSION_DENIED" in str(error)
    finally:
        loop.run(server.stop(0))
        loop.run(interceptor.close())
        loop.close()


def test_upstream_killed_mid_stream_gives_clean_errors_no_hang(triton):
    running = RunningSidecar(make_settings(upstream=triton.grpc_address, upstream_timeout_s=20))
    try:
        client = grpcclient.InferenceServerClient(running.address)
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        pixels = photo_pixels(1)
        client.async_stream_infer(MODEL, [infer_input(pixels)], request_id="before", outputs=outputs("logits"))
        first = answers.get(timeout=60)
        assert first[1] is None and first[0].get_response().id == "before"
        for index in range(3):
            client.async_stream_infer(MODEL, [infer_input(pixels)], request_id=f"during-{index}", outputs=outputs("logits"))
        time.sleep(0.05)
        triton.kill()
        for index in range(2):
            client.async_stream_infer(MODEL, [infer_input(pixels)], request_id=f"after-{index}", outputs=outputs("logits"))
        got = [answers.get(timeout=30) for _ in range(5)]  # every message answered, none hangs
        errors = [str(error) for result, error in got if error is not None]
        assert errors, "messages sent after the kill must fail"
        assert all("UNAVAILABLE" in e or "unavailable" in e for e in errors), errors
        client.stop_stream()
        assert answers.empty()
        with pytest.raises(Exception) as caught:
            client.infer(MODEL, [infer_input(pixels)], outputs=outputs("logits"), client_timeout=30)
        assert "unavailable" in str(caught.value).lower()
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(running.address))
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.2)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        running.stop()

"""Load shedding (issue 13), end to end: beyond ``max_in_flight`` / ``max_in_flight_per_client`` the
sidecar answers RESOURCE_EXHAUSTED at once instead of queueing.

A real tritonserver serves ``slow``: a Python-backend model that sleeps for
as many seconds as its input says and serves the default detector's entropy
output (constant signals), so the sidecar protects and scores it like any
exported model. Slow calls hold their in-flight slots while the test probes
the limits with fast ones.
"""

from __future__ import annotations

import queue
import textwrap
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from e2e_triton import RunningSidecar, make_settings, wait_for

pytestmark = pytest.mark.slow

SLOW_MODEL = '''
import time
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            time.sleep(float(x.max()))
            signals = np.zeros((x.shape[0], {signals}), np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", x.copy()),
                                                         pb_utils.Tensor("{entropy}", signals)]))
        return responses
'''
SLOW_CONFIG = '''
name: "slow"
backend: "python"
max_batch_size: 8
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 1 ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 1 ] }},
         {{ name: "{entropy}" data_type: TYPE_FP32 dims: [ {signals} ] }} ]
instance_group [ {{ count: 4 kind: KIND_CPU }} ]
'''
HOLD_S = 3.0  # how long a slow call holds its slot


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    from detector import Detector
    from service.triton.server import TritonServer

    detector = Detector.default()
    fields = {"entropy": detector.entropy_output, "signals": len(detector.feature_outputs)}
    repo = tmp_path_factory.mktemp("repo")
    (repo / "slow" / "1").mkdir(parents=True)
    (repo / "slow" / "config.pbtxt").write_text(SLOW_CONFIG.format(**fields))
    (repo / "slow" / "1" / "model.py").write_text(textwrap.dedent(SLOW_MODEL.format(**fields)))
    server = TritonServer(repo)
    server.start()
    yield server
    server.stop()


def _request(seconds: float, request_id: str = "") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="slow", id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 1])
    request.outputs.add(name="y")
    request.raw_input_contents.append(np.array([[seconds]], np.float32).tobytes())
    return request


def _counter(running: RunningSidecar, name: str, **labels: str) -> float:
    total = 0.0
    for line in running.sidecar.metrics.exposition().decode().splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _shedder(running: RunningSidecar):
    from service.hooks.shedding import LoadShedding

    return next(hook for hook in running.sidecar.core.hooks if isinstance(hook, LoadShedding))


def test_per_client_limit_refuses_at_once_and_other_clients_are_served(triton):
    running = RunningSidecar(make_settings(upstream=triton.grpc_address, max_in_flight=0, max_in_flight_per_client=2,
                                           client_id_metadata_key="x-client-id"))
    try:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(running.address))
        a = (("x-client-id", "a"),)
        held = [stub.ModelInfer.future(_request(HOLD_S), metadata=a, timeout=60) for _ in range(2)]
        shedder = _shedder(running)
        assert wait_for(lambda: shedder.in_flight == 2, timeout=30)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(_request(0.0), metadata=a, timeout=60)
        assert time.monotonic() - started < HOLD_S  # refused without waiting for a slot
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "client metadata:a" in caught.value.details() and "max_in_flight_per_client=2" in caught.value.details()
        # another client is served meanwhile, and so are pass-through RPCs (not counted)
        other = stub.ModelInfer(_request(0.0), metadata=(("x-client-id", "b"),), timeout=60)
        assert np.frombuffer(other.raw_output_contents[0], np.float32).tolist() == [0.0]
        assert stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="slow"), metadata=a, timeout=10).name == "slow"
        assert [f.result().model_name for f in held] == ["slow", "slow"]
        assert _counter(running, "advsentry_shed_requests_total", reason="client") == 1
        assert _counter(running, "advsentry_shed_requests_total", reason="process") == 0
        # slots come back: client a is served again, and nothing is left in flight
        assert stub.ModelInfer(_request(0.0), metadata=a, timeout=60).model_name == "slow"
        assert shedder.in_flight == 0 and not shedder.per_client
        assert _counter(running, "advsentry_admitted_in_flight") == 0
        assert _counter(running, "advsentry_in_flight_requests", model="slow") == 0
    finally:
        running.stop()


def test_process_limit_and_stream_messages_count_while_in_flight(triton):
    running = RunningSidecar(make_settings(upstream=triton.grpc_address, max_in_flight=2, max_in_flight_per_client=0))
    try:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(running.address))
        shedder = _shedder(running)
        # a stream: two slow messages hold both slots, a third message is refused in the stream,
        # and the stream goes on (a later message is served once the slots are back)
        client = grpcclient.InferenceServerClient(running.address)
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        x = grpcclient.InferInput("x", [1, 1], "FP32")
        for request_id, seconds in (("s1", HOLD_S), ("s2", HOLD_S)):
            x.set_data_from_numpy(np.array([[seconds]], np.float32))
            client.async_stream_infer("slow", [x], request_id=request_id)
        assert wait_for(lambda: shedder.in_flight == 2, timeout=30)
        with pytest.raises(grpc.RpcError) as caught:  # a unary call from anyone: the process is full
            stub.ModelInfer(_request(0.0), timeout=60)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_in_flight=2" in caught.value.details()
        x.set_data_from_numpy(np.array([[0.0]], np.float32))
        client.async_stream_infer("slow", [x], request_id="s3")
        got = [answers.get(timeout=60) for _ in range(3)]
        refused = [error for result, error in got if error is not None]
        assert len(refused) == 1 and "RESOURCE_EXHAUSTED" in str(refused[0])
        assert sorted(r.get_response().id for r, e in got if e is None) == ["s1", "s2"]
        client.async_stream_infer("slow", [x], request_id="s4")
        result, error = answers.get(timeout=60)
        client.stop_stream()
        assert error is None and result.get_response().id == "s4"
        assert _counter(running, "advsentry_shed_requests_total", reason="process") == 2
        assert shedder.in_flight == 0 and _counter(running, "advsentry_admitted_in_flight") == 0
    finally:
        running.stop()


def test_limits_off_admit_everything(triton):
    from service.hooks.registry import request_hooks
    from service.metrics import SidecarMetrics
    from service.hooks.shedding import LoadShedding

    settings = make_settings(upstream=triton.grpc_address, max_in_flight=0, max_in_flight_per_client=0)
    assert not any(isinstance(h, LoadShedding) for h in request_hooks(settings, SidecarMetrics()))

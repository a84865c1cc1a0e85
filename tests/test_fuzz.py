"""Fuzzing through a real sidecar and a real Triton: bad bytes, structured and mutated requests, streams.

One Triton per module (the fuzz repository of ``benchmarks/fuzz.py``: a
protected model the sidecar validates and scores, an unprotected one it
forwards unvalidated) and one ``advsentry serve`` child process in front of
it. Requests go as raw bytes (``request_serializer=None``), so undecodable
messages reach the sidecar exactly as sent. The generators are the
benchmark's (``benchmarks.fuzz``: Hypothesis strategies), derandomized so CI
sees the same few thousand cases every run; ``python -m benchmarks.fuzz``
sends 100,000.

Rules checked on every call: the status is an acceptable answer to a client's
mistake (never ``UNKNOWN`` or ``INTERNAL``), no call runs past its deadline,
every stream message is answered exactly once, in order, carrying its
request's id, and a bad message does not end its stream. After the fuzzing:
the sidecar process is alive, health is ``SERVING`` and a valid request is
served and annotated.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from tritonclient.grpc import service_pb2

from benchmarks.fuzz import (
    PLAIN,
    PROTECTED,
    FuzzClient,
    sidecar_args,
    serving,
    stream_payloads,
    unary_payloads,
    valid_request,
    write_fuzz_repository,
)

pytestmark = pytest.mark.slow

#: Derandomized (the same cases every run), no example database, no per-example deadline
#: (a call's own deadline is the hang check); shrinking stays on so a failure is minimal.
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
UNARY_CASES = 2000
STREAM_CASES = 400  # 1-6 messages each (about 1,400 messages)

UNDECODABLE = {
    "garbage": b"\xff\xff\xff\xff",
    "length past the end": b"\x0a\xff\x01identity",
    "invalid UTF-8 in model_name": b"\x0a\x02\xc3\x28",
    "bad wire type": b"\x0f\x01",
    "truncated valid request": valid_request(PROTECTED).SerializeToString()[:-100],
}


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    from service.triton.server import TritonServer

    server = TritonServer(write_fuzz_repository(tmp_path_factory.mktemp("fuzz-repo")))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sidecar(triton):
    from benchmarks.common import SidecarProcess

    with SidecarProcess(triton.grpc_address, args=sidecar_args()) as process:
        yield process


@pytest.fixture(scope="module")
def client(sidecar):
    fuzz_client = FuzzClient(sidecar.address, timeout_s=10.0)
    yield fuzz_client
    fuzz_client.close()


def _assert_alive(sidecar, triton) -> None:
    assert sidecar.process.poll() is None, f"sidecar exited:\n{sidecar.log_tail()}"
    assert triton.is_alive(), f"Triton died:\n{triton.log_tail()}"
    assert serving(sidecar.address) == ""


@pytest.mark.parametrize("name", sorted(UNDECODABLE))
def test_undecodable_request_is_invalid_argument(client, name):
    outcome = client.unary(UNDECODABLE[name])
    assert outcome.code == "INVALID_ARGUMENT", outcome
    assert "not a valid inference.ModelInferRequest" in outcome.details


def test_undecodable_stream_message_is_answered_in_the_stream(client):
    payloads = [valid_request(PROTECTED, request_id="before").SerializeToString(), UNDECODABLE["garbage"],
                valid_request(PLAIN, request_id="after").SerializeToString()]
    outcomes, final = client.stream(payloads)
    assert final.code == "OK", final  # the stream goes on and ends normally
    assert [o.code for o in outcomes] == ["OK", "INVALID_ARGUMENT", "OK"], outcomes
    assert not any(o.problem for o in outcomes), outcomes  # ids "before", "" and "after", in order
    assert "ModelStreamInfer message is not a valid inference.ModelInferRequest" in outcomes[1].details


def test_library_interceptor_answers_undecodable_bytes_with_invalid_argument(triton):
    """A team's own grpc.aio server with the interceptor: same status for bad bytes, same stream rule."""
    from detector.detector import DEFAULT_ARTIFACT_PATH
    from e2e_triton import LoopThread, start_team_server
    from service.grpc.interceptor import build_interceptor
    from service.settings import Settings

    interceptor = build_interceptor(Settings(models={PROTECTED: {}}, calibration=DEFAULT_ARTIFACT_PATH))
    loop = LoopThread()

    server, port = start_team_server(loop, interceptor, triton.grpc_address)
    team = FuzzClient(f"127.0.0.1:{port}")
    try:
        outcome = team.unary(UNDECODABLE["garbage"])
        assert outcome.code == "INVALID_ARGUMENT" and "not a valid inference.ModelInferRequest" in outcome.details
        payloads = [UNDECODABLE["invalid UTF-8 in model_name"],
                    valid_request(PROTECTED, request_id="after").SerializeToString()]
        outcomes, final = team.stream(payloads)
        assert final.code == "OK" and [o.code for o in outcomes] == ["INVALID_ARGUMENT", "OK"], (outcomes, final)
        assert not any(o.problem for o in outcomes), outcomes
    finally:
        team.close()
        loop.run(server.stop(0))
        loop.run(interceptor.close())
        loop.close()


@settings(FUZZ, max_examples=UNARY_CASES)
@given(payload=unary_payloads())
def test_fuzzed_unary_requests_get_client_error_statuses(client, payload):
    outcome = client.unary(payload)
    assert not outcome.problem, (outcome, payload[:200])


@settings(FUZZ, max_examples=STREAM_CASES)
@given(payloads=stream_payloads())
def test_fuzzed_streams_answer_every_message_once_in_order(client, payloads):
    outcomes, final = client.stream(payloads)
    assert not final.problem, final
    assert len(outcomes) == len(payloads)
    problems = [(index, o) for index, o in enumerate(outcomes) if o.problem]
    assert not problems, (problems, [p[:120] for p in payloads])


def test_still_serving_after_fuzzing(sidecar, triton, client):
    """Last in the module: the process survived, health is SERVING, a valid request is served and annotated."""
    _assert_alive(sidecar, triton)
    reply = client._unary(valid_request(PROTECTED, request_id="last").SerializeToString(), timeout=10)
    response = service_pb2.ModelInferResponse.FromString(reply)
    assert response.id == "last" and response.outputs[0].name == "logits"

"""Fuzzing the sidecar's KServe-v2 entry points: generators, the target, and the 100,000-request run.

What lives here and why: the Hypothesis strategies (structured
``ModelInferRequest`` messages, raw byte mutations of valid serialized
requests, and ModelStreamInfer message sequences mixing both) and the code
that sends them, as raw bytes, through a real ``advsentry serve`` process in
front of a real Triton. ``tests/test_fuzz.py`` runs a few thousand of these
cases in the suite; this module's CLI runs 100,000 (``--cases``) in chunks and
writes counts by status code, crashes and hangs to
``benchmarks/results/fuzz.json``. The two share every generator, so what CI
checks is what the big run measured.

The Triton repository holds two cheap Python-backend models, so that tens of
thousands of valid requests cost little: ``identity`` (protected: it serves
the default detector's entropy output, so the sidecar validates requests
against its metadata, scores and annotates) and ``plain`` (unprotected: the
sidecar forwards it unvalidated, so Triton's own answers to malformed but
decodable requests are seen too). Random model names exercise the unknown-model
path. The protected path's validation is metadata-driven, so it is the same code
the bundled EfficientNet-Lite0 goes through.

Verdict per call: the gRPC status code (or the ``[StatusCode.X]`` prefix of a
stream message's ``error_message``). Client mistakes must never be answered
``UNKNOWN`` or ``INTERNAL`` (``CLIENT_ERROR_CODES`` are the acceptable ones);
a call past its deadline is a hang; the sidecar process exiting is a crash.
Every stream message must be answered exactly once, in order, with the id of
the request it answers (empty when the bytes did not decode).

    python -m benchmarks.fuzz                    # 100,000 cases, resumable, writes results/fuzz.json
    python -m benchmarks.fuzz --cases 20000      # fewer
    python -m benchmarks.fuzz --smoke            # seconds; used by the test suite
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

SERVICE = "/inference.GRPCInferenceService"
PROTECTED = "identity"
PROTECTED_INPUT = "pixels"
PROTECTED_ITEM_SHAPE = (3, 16, 16)
PLAIN = "plain"
PLAIN_INPUT = "x"
PLAIN_ITEM_SHAPE = (4,)
MAX_BATCH = 4

#: Statuses that are a correct answer to a client's mistake (or to a request the
#: policy refuses). UNAVAILABLE / DEADLINE_EXCEEDED are not: Triton is up throughout.
CLIENT_ERROR_CODES = frozenset({"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "PERMISSION_DENIED",
                                "RESOURCE_EXHAUSTED", "OUT_OF_RANGE", "UNIMPLEMENTED"})
HANG_CODES = frozenset({"DEADLINE_EXCEEDED"})

PLAIN_CONFIG = f"""
name: "{PLAIN}"
backend: "python"
max_batch_size: {MAX_BATCH}
input [ {{ name: "{PLAIN_INPUT}" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 4 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""
PLAIN_MODEL = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy() * 2)])
                for r in requests]
'''

DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BF16", "BYTES")
_ITEMSIZE = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
             "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}
KNOWN_PARAMETERS = ("priority", "timeout", "sequence_id", "sequence_start", "sequence_end", "binary_data_output",
                    "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset", "classification",
                    "binary_data", "binary_data_size", "triton_enable_empty_final_response", "headers",
                    "advsentry_score")
HUGE_DIMS = (0, 1, 2**31 - 1, 2**31, 2**32 + 4, 2**62, 2**63 - 1, -1, -2, -(2**63))
#: Raw contents larger than this are never generated (shapes with huge dims get short contents).
MAX_RAW_BYTES = 256 * 1024


def write_fuzz_repository(out: Path) -> Path:
    """A Triton repository with the protected ``identity`` model and the unprotected ``plain`` one."""
    from benchmarks.common import write_identity_repository
    from detector import Detector

    detector = Detector.default()
    write_identity_repository(out, detector.feature_outputs, name=PROTECTED, size=PROTECTED_ITEM_SHAPE[-1],
                              max_batch_size=MAX_BATCH, entropy_output=detector.entropy_output)
    (out / PLAIN / "1").mkdir(parents=True, exist_ok=True)
    (out / PLAIN / "config.pbtxt").write_text(PLAIN_CONFIG)
    (out / PLAIN / "1" / "model.py").write_text(PLAIN_MODEL)
    return out


def sidecar_args() -> tuple[str, ...]:
    """``advsentry serve`` flags for the fuzz target: the shipped default detector, policy annotate."""
    from detector.detector import DEFAULT_ARTIFACT_PATH

    return ("--policy", "annotate", "--calibration", str(DEFAULT_ARTIFACT_PATH))


# -- valid requests (the seeds of byte mutation, and the "still serving" check) -------------------
def valid_request(model: str = PROTECTED, batch: int = 1, request_id: str = "", typed: bool = False,
                  value_seed: int = 0) -> service_pb2.ModelInferRequest:
    """A request the model accepts: raw contents (or typed ``fp32_contents``), the model's own output named."""
    name, item, output = ((PROTECTED_INPUT, PROTECTED_ITEM_SHAPE, "logits") if model == PROTECTED
                          else (PLAIN_INPUT, PLAIN_ITEM_SHAPE, "y"))
    values = np.random.default_rng(value_seed).random((batch, *item), dtype=np.float32)
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    tensor = request.inputs.add(name=name, datatype="FP32", shape=list(values.shape))
    if typed:
        tensor.contents.fp32_contents.extend(values.ravel().tolist())
    else:
        request.raw_input_contents.append(values.tobytes())
    request.outputs.add(name=output)
    return request


def seed_messages() -> list[bytes]:
    """Valid serialized requests that byte mutation starts from."""
    from detector import Detector

    seeds = [valid_request(PROTECTED), valid_request(PROTECTED, batch=2, request_id="seed-2"),
             valid_request(PLAIN), valid_request(PLAIN, batch=3, typed=True, request_id="typed"),
             valid_request(PROTECTED, typed=True)]
    annotated = valid_request(PROTECTED, request_id="with-parameters")
    annotated.model_version = "1"
    annotated.parameters["priority"].int64_param = 1
    annotated.outputs.add(name=Detector.default().entropy_output)
    annotated.inputs[0].parameters["binary_data_size"].int64_param = 3072
    seeds.append(annotated)
    return [message.SerializeToString() for message in seeds]


# -- structured generation ------------------------------------------------------------------------
_short_text = st.text(max_size=24)
_names = st.one_of(st.sampled_from([PROTECTED, PROTECTED, PLAIN, "", "efficientnet-lite0", "identity ", "IDENTITY",
                                    "../identity", "identity\x00", "x" * 4096]), _short_text)
_versions = st.one_of(st.just(""), st.sampled_from(["1", "2", "0", "-1", "01", "1.0", "99999999999999999999"]),
                      _short_text)
_datatypes = st.one_of(st.sampled_from(DATATYPES), st.sampled_from(["", "fp32", "FP8", "FP32 "]), _short_text)


def _parameter_value(draw, value: service_pb2.InferParameter) -> None:
    kind = draw(st.sampled_from(["bool", "int64", "string", "double", "uint64", "unset"]))
    if kind == "bool":
        value.bool_param = draw(st.booleans())
    elif kind == "int64":
        value.int64_param = draw(st.one_of(st.integers(-5, 5000), st.integers(-(2**63), 2**63 - 1)))
    elif kind == "string":
        value.string_param = draw(_short_text)
    elif kind == "double":
        value.double_param = draw(st.floats(allow_nan=True, allow_infinity=True))
    elif kind == "uint64":
        value.uint64_param = draw(st.integers(0, 2**64 - 1))


def _parameters(draw, target, max_size: int = 3) -> None:
    for _ in range(draw(st.integers(0, max_size))):
        key = draw(st.one_of(st.sampled_from(KNOWN_PARAMETERS), _short_text))
        _parameter_value(draw, target[key])


def _shape(draw, model: str) -> list[int]:
    item = PROTECTED_ITEM_SHAPE if model == PROTECTED else PLAIN_ITEM_SHAPE
    kind = draw(st.sampled_from(["valid", "valid", "valid", "small", "huge", "empty"]))
    if kind == "valid":
        return [draw(st.integers(0, MAX_BATCH + 2)), *item]
    if kind == "small":
        return draw(st.lists(st.integers(-3, 20), max_size=6))
    if kind == "huge":
        return draw(st.lists(st.one_of(st.sampled_from(HUGE_DIMS), st.integers(-3, 20)), min_size=1, max_size=5))
    return []


def _fill(draw, count: int, datatype: str) -> np.ndarray:
    """``count`` values of ``datatype`` (float kinds may be NaN / Inf / huge)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["random", "zeros", "nan", "inf", "-inf", "mixed", "huge"]))
    values = rng.random(count) if kind in ("random", "mixed") else np.zeros(count)
    if count and kind == "nan":
        values[:] = np.nan
    elif count and kind in ("inf", "-inf"):
        values[:] = np.inf if kind == "inf" else -np.inf
    elif count and kind == "mixed":
        values[rng.integers(0, count, size=max(1, count // 7))] = rng.choice([np.nan, np.inf, -np.inf, 1e38])
    elif kind == "huge":
        values[:] = 1e300
    dtype = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}.get(datatype)
    if dtype is None:
        return rng.integers(0, 256, size=count * _ITEMSIZE.get(datatype, 4), dtype=np.uint8)
    with np.errstate(over="ignore", invalid="ignore"):
        return values.astype(dtype)


def _add_input(draw, request: service_pb2.ModelInferRequest, model: str, raw: bool) -> None:
    expected = PROTECTED_INPUT if model == PROTECTED else PLAIN_INPUT
    name = draw(st.one_of(st.just(expected), st.just(expected), st.sampled_from(["pixels", "x", ""]), _short_text))
    datatype = draw(st.one_of(st.just("FP32"), st.just("FP32"), _datatypes))
    shape = _shape(draw, model)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    if draw(st.integers(0, 4)) == 0:
        _parameters(draw, tensor.parameters, 2)
    elements = math.prod(shape) if shape and all(d >= 0 for d in shape) else 0
    itemsize = _ITEMSIZE.get(datatype, 4)
    exact = elements * itemsize
    if raw:
        mode = draw(st.sampled_from(["exact", "exact", "exact", "short", "long", "empty", "odd"]))
        if mode == "exact" and exact <= MAX_RAW_BYTES:
            size = exact
        elif mode == "long":
            size = min(exact, MAX_RAW_BYTES) + draw(st.integers(1, 64))
        elif mode == "odd":
            size = draw(st.integers(1, 4099))
        elif mode == "empty":
            size = 0
        else:
            size = max(0, min(exact, MAX_RAW_BYTES) - draw(st.integers(1, 64)))
        data = _fill(draw, size // itemsize + 1, datatype).tobytes()[:size]
        request.raw_input_contents.append(data.ljust(size, b"\0"))
        return
    mode = draw(st.sampled_from(["exact", "mismatched", "wrong_field", "none"]))
    count = min(elements, 4096) if mode == "exact" else draw(st.integers(0, 64))
    if mode == "none":
        return
    field_name = draw(st.sampled_from(["fp32_contents", "fp64_contents", "int_contents", "int64_contents",
                                       "uint_contents", "uint64_contents", "bool_contents", "bytes_contents"])) \
        if mode == "wrong_field" else {"FP64": "fp64_contents", "INT64": "int64_contents", "BOOL": "bool_contents",
                                       "BYTES": "bytes_contents", "UINT64": "uint64_contents"}.get(datatype, "fp32_contents")
    values = getattr(tensor.contents, field_name)
    if field_name in ("fp32_contents", "fp64_contents"):
        values.extend(_fill(draw, count, "FP64").astype(np.float64).tolist())
    elif field_name == "bool_contents":
        values.extend([bool(i % 2) for i in range(count)])
    elif field_name == "bytes_contents":
        values.extend([bytes([i % 256]) * (i % 5) for i in range(count)])
    elif field_name.startswith("uint"):
        values.extend([i * 3 for i in range(count)])
    else:
        values.extend([i - count // 2 for i in range(count)])


@st.composite
def infer_requests(draw) -> service_pb2.ModelInferRequest:
    """Structured ``ModelInferRequest`` messages: mostly near-valid for the two models, some nonsense."""
    model = draw(_names)
    request = service_pb2.ModelInferRequest(model_name=model, model_version=draw(_versions), id=draw(_short_text))
    raw = draw(st.booleans() | st.just(True))
    for _ in range(draw(st.sampled_from([1, 1, 1, 1, 0, 2, 3]))):
        _add_input(draw, request, model, raw)
    if raw and request.raw_input_contents and draw(st.integers(0, 9)) == 0:  # contents count not matching inputs
        if draw(st.booleans()):
            request.raw_input_contents.append(b"\0" * 16)
        else:
            del request.raw_input_contents[-1]
    if draw(st.integers(0, 3)) == 0:
        _parameters(draw, request.parameters)
    from detector import Detector

    detector = Detector.default()
    output_names = st.one_of(st.sampled_from(["logits", "y", detector.entropy_output, *detector.feature_outputs]),
                             _short_text)
    for _ in range(draw(st.sampled_from([0, 1, 1, 2, 4]))):
        output = request.outputs.add(name=draw(output_names))
        if draw(st.integers(0, 4)) == 0:
            _parameters(draw, output.parameters, 2)
    return request


MUTATIONS = ("flip", "truncate", "insert", "delete", "overwrite", "duplicate", "append_field", "varint")


@st.composite
def mutated_requests(draw, seeds: Sequence[bytes] | None = None) -> bytes:
    """A valid serialized request with 1-4 byte-level mutations (bit flips, truncation, insertion, …)."""
    data = bytearray(draw(st.sampled_from(list(seeds or _seeds()))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(MUTATIONS))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        # Bias positions towards the header: raw contents are the last field, and flips inside
        # them only change pixel values (still worth some, so not excluded).
        if draw(st.booleans()):
            at = at % min(len(data) or 1, 96)
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "overwrite" and data:
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at:at + len(chunk)] = chunk
        elif op == "duplicate":
            data[at:at] = data[at:at + draw(st.integers(1, 32))]
        elif op == "append_field":  # a random field number / wire type, then some bytes
            data += bytes([draw(st.integers(0, 255))]) + draw(st.binary(max_size=12))
        elif op == "varint" and data:  # an over-long or huge varint where a length may be
            data[at:at + 1] = draw(st.sampled_from([b"\xff" * 10, b"\xff\xff\xff\xff\x0f", b"\x80" * 11, b"\x00"]))
    return bytes(data)


_SEEDS: list[bytes] = []


def _seeds() -> list[bytes]:
    if not _SEEDS:
        _SEEDS.extend(seed_messages())
    return _SEEDS


def unary_payloads() -> st.SearchStrategy[bytes]:
    """One ModelInfer request's bytes: structured (serialized), a mutated valid request, or random bytes."""
    return st.one_of(infer_requests().map(lambda r: r.SerializeToString()), mutated_requests(),
                     st.binary(max_size=64))


def stream_payloads() -> st.SearchStrategy[list[bytes]]:
    """A ModelStreamInfer conversation: 1-6 messages, valid ones (with ids) among bad ones."""
    valid = st.integers(0, 10**6).map(
        lambda i: valid_request(PLAIN if i % 2 else PROTECTED, request_id=f"ok-{i}", value_seed=i).SerializeToString())
    return st.lists(st.one_of(valid, unary_payloads()), min_size=1, max_size=6)


# -- sending ---------------------------------------------------------------------------------------
_STATUS_PREFIX = re.compile(r"^\[StatusCode\.([A-Z_]+)\]")


def expected_id(payload: bytes) -> str:
    """The id a stream answer must carry: the request's, or empty when the bytes do not decode."""
    try:
        return service_pb2.ModelInferRequest.FromString(payload).id
    except Exception:  # noqa: BLE001
        return ""


@dataclass
class Outcome:
    """One call or stream message: its status code name and details, and whether it broke a rule."""

    code: str
    details: str = ""
    seconds: float = 0.0
    problem: str = ""  # non-empty: a rule was broken (disallowed code, wrong id, missing answer, …)


class FuzzClient:
    """Raw-bytes unary and streaming calls to a sidecar (``request_serializer=None``)."""

    def __init__(self, address: str, timeout_s: float = 10.0) -> None:
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20),
                                                               ("grpc.max_receive_message_length", 64 << 20)])
        self.timeout_s = timeout_s
        self._unary = self.channel.unary_unary(f"{SERVICE}/ModelInfer")
        self._stream = self.channel.stream_stream(
            f"{SERVICE}/ModelStreamInfer", response_deserializer=service_pb2.ModelStreamInferResponse.FromString)

    def close(self) -> None:
        self.channel.close()

    def unary(self, payload: bytes) -> Outcome:
        start = time.perf_counter()
        try:
            reply = self._unary(payload, timeout=self.timeout_s)
            outcome = Outcome("OK")
            service_pb2.ModelInferResponse.FromString(reply)
        except grpc.RpcError as error:
            outcome = Outcome(error.code().name, error.details() or "")
        outcome.seconds = time.perf_counter() - start
        outcome.problem = judge(outcome)
        return outcome

    def stream(self, payloads: Sequence[bytes]) -> tuple[list[Outcome], Outcome]:
        """Per-message outcomes (one per payload, in order) and the stream's own final status."""
        start = time.perf_counter()
        answers: list[service_pb2.ModelStreamInferResponse] = []
        try:
            for answer in self._stream(iter(payloads), timeout=self.timeout_s * max(1, len(payloads))):
                answers.append(answer)
            final = Outcome("OK")
        except grpc.RpcError as error:
            final = Outcome(error.code().name, error.details() or "")
        final.seconds = time.perf_counter() - start
        final.problem = "" if final.code == "OK" else f"stream ended with {final.code}: {final.details[:200]}"
        outcomes = []
        for index, payload in enumerate(payloads):
            if index >= len(answers):
                outcomes.append(Outcome("NO_ANSWER", problem="message not answered"))
                continue
            answer = answers[index]
            if answer.error_message:
                match = _STATUS_PREFIX.match(answer.error_message)
                outcome = Outcome(match.group(1) if match else "UNPARSED", answer.error_message)
            else:
                outcome = Outcome("OK")
            outcome.problem = judge(outcome)
            want = expected_id(payload)
            if not outcome.problem and answer.infer_response.id != want:
                outcome.problem = f"answer id {answer.infer_response.id!r} for request id {want!r}"
            outcomes.append(outcome)
        if len(answers) > len(payloads):
            final.problem = final.problem or f"{len(answers)} answers to {len(payloads)} messages"
        return outcomes, final


def judge(outcome: Outcome) -> str:
    """Empty when the status is an acceptable answer to a (possibly bad) request."""
    if outcome.code in HANG_CODES:
        return f"hang: {outcome.code}"
    if outcome.code not in CLIENT_ERROR_CODES:
        return f"{outcome.code}: {outcome.details[:300]}"
    return ""


def serving(address: str, timeout_s: float = 10.0) -> str:
    """Empty if health is SERVING and a valid request succeeds through the sidecar, else what failed."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                               timeout=timeout_s).status
        except grpc.RpcError as error:
            return f"health check failed: {error.code().name}"
        if status != health_pb2.HealthCheckResponse.SERVING:
            return f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
        call = channel.unary_unary(f"{SERVICE}/ModelInfer",
                                   response_deserializer=service_pb2.ModelInferResponse.FromString)
        try:
            reply = call(valid_request(PROTECTED, request_id="check").SerializeToString(), timeout=timeout_s)
        except grpc.RpcError as error:
            return f"valid request failed: {error.code().name}: {error.details()}"
        if not any(key.startswith("advsentry") for key in reply.parameters):
            return "valid request answered without advsentry's annotation"
    return ""


# -- the benchmark run -----------------------------------------------------------------------------
@dataclass
class Tally:
    """Counts of one run (or chunk), mergeable; ``examples`` keeps the first few broken rules."""

    requests: int = 0
    unary: int = 0
    streams: int = 0
    stream_messages: int = 0
    codes: Counter = field(default_factory=Counter)
    problems: int = 0
    hangs: int = 0
    crashes: int = 0
    upstream_crashes: int = 0
    not_serving_checks: int = 0
    max_call_s: float = 0.0
    seconds: float = 0.0
    examples: list[dict[str, str]] = field(default_factory=list)

    def add(self, outcome: Outcome, kind: str, payload: bytes) -> None:
        self.codes[outcome.code] += 1
        self.max_call_s = max(self.max_call_s, outcome.seconds)
        if outcome.code in HANG_CODES:
            self.hangs += 1
        if outcome.problem:
            self.problems += 1
            if len(self.examples) < 20:
                self.examples.append({"kind": kind, "problem": outcome.problem, "payload_hex": payload[:256].hex()})

    def merge(self, other: dict[str, Any]) -> None:
        for key in ("requests", "unary", "streams", "stream_messages", "problems", "hangs", "crashes",
                    "upstream_crashes", "not_serving_checks"):
            setattr(self, key, getattr(self, key) + int(other.get(key, 0)))
        self.codes.update(other.get("codes", {}))
        self.max_call_s = max(self.max_call_s, float(other.get("max_call_s", 0.0)))
        self.seconds += float(other.get("seconds", 0.0))
        self.examples.extend(other.get("examples", [])[: max(0, 20 - len(self.examples))])

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "unary": self.unary, "streams": self.streams,
                "stream_messages": self.stream_messages, "codes": dict(sorted(self.codes.items())),
                "problems": self.problems, "hangs": self.hangs, "crashes": self.crashes,
                "upstream_crashes": self.upstream_crashes, "not_serving_checks": self.not_serving_checks,
                "max_call_s": round(self.max_call_s, 4), "seconds": round(self.seconds, 2),
                "examples": self.examples}


def run_cases(client: FuzzClient, cases: int, chunk_seed: int, tally: Tally, stream_percent: int = 10) -> None:
    """Send ``cases`` requests (stream messages count one each) drawn by Hypothesis from ``chunk_seed``.

    ``stream_percent`` of the examples are streams of 1-6 messages, the rest unary calls.
    """
    budget = [cases]

    def make(chunk_seed: int):
        @seed(chunk_seed)
        @settings(max_examples=cases, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def one(data) -> None:
            # Draws never depend on outside state (Hypothesis checks that), only what is sent does.
            if data.draw(st.integers(0, 99)) < stream_percent:
                payloads = data.draw(stream_payloads())
                if budget[0] <= 0:
                    return
                payloads = payloads[: budget[0]]
                outcomes, final = client.stream(payloads)
                tally.streams += 1
                tally.stream_messages += len(payloads)
                for payload, outcome in zip(payloads, outcomes):
                    tally.add(outcome, "stream", payload)
                if final.problem:
                    tally.add(final, "stream-end", b"".join(payloads))
                budget[0] -= len(payloads)
                tally.requests += len(payloads)
            else:
                payload = data.draw(unary_payloads())
                if budget[0] <= 0:
                    return
                tally.add(client.unary(payload), "unary", payload)
                tally.unary += 1
                tally.requests += 1
                budget[0] -= 1

        return one

    while budget[0] > 0:  # Hypothesis may stop a little early; draw again from a derived seed
        before = budget[0]
        make(chunk_seed)()
        if budget[0] == before:
            break
        chunk_seed += 1_000_003


def run(total: int, chunk: int, out: Path, fresh: bool = False, timeout_s: float = 10.0,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """The resumable benchmark: chunks of ``chunk`` cases, the JSON rewritten after each one."""
    import tempfile

    from benchmarks.common import SidecarProcess, load_average, machine, process_rss_mib
    from service.triton.server import TritonServer

    state: dict[str, Any] = {}
    if out.exists() and not fresh:
        state = json.loads(out.read_text())
        if state.get("target_cases") != total or state.get("chunk") != chunk:
            state = {}
    done_chunks = set(state.get("chunks_done", []))
    tally = Tally()
    tally.merge(state.get("totals", {}))
    chunks = math.ceil(total / chunk)
    with tempfile.TemporaryDirectory() as tmp:
        repo = write_fuzz_repository(Path(tmp))
        with TritonServer(repo) as triton:
            sidecar = SidecarProcess(triton.grpc_address, args=sidecar_args()).__enter__()
            try:
                rss_start = process_rss_mib(sidecar.pid)
                client = FuzzClient(sidecar.address, timeout_s)
                for index in range(chunks):
                    if index in done_chunks:
                        continue
                    part = Tally()
                    started = time.monotonic()
                    run_cases(client, min(chunk, total - index * chunk), 7919 * (index + 1), part)
                    part.seconds = time.monotonic() - started
                    if sidecar.process.poll() is not None:
                        part.crashes += 1
                        log(f"sidecar exited with {sidecar.process.returncode}:\n{sidecar.log_tail()}")
                        sidecar = SidecarProcess(triton.grpc_address, args=sidecar_args()).__enter__()
                        client = FuzzClient(sidecar.address, timeout_s)
                    if not triton.is_alive():
                        part.upstream_crashes += 1
                        raise RuntimeError(f"Triton died during chunk {index}:\n{triton.log_tail()}")
                    problem = serving(sidecar.address)
                    if problem:
                        part.not_serving_checks += 1
                        log(f"after chunk {index}: {problem}")
                    tally.merge(part.to_json())
                    done_chunks.add(index)
                    state = {
                        "target_cases": total, "chunk": chunk, "chunks_done": sorted(done_chunks),
                        "complete": len(done_chunks) == chunks, "totals": tally.to_json(),
                        "requests_per_s": round(tally.requests / tally.seconds, 1) if tally.seconds else None,
                        "sidecar_rss_mib": {"start_of_last_session": round(rss_start, 1),
                                            "now": round(process_rss_mib(sidecar.pid), 1)},
                        "client_timeout_s": timeout_s, "allowed_codes": sorted(CLIENT_ERROR_CODES),
                        "machine": machine(), "load_average": load_average(),
                        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    }
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(state, indent=2) + "\n")
                    log(f"chunk {index + 1}/{chunks}: {part.requests} requests in {part.seconds:.1f}s, "
                        f"problems {part.problems}, codes {dict(part.codes)}")
                client.close()
            finally:
                sidecar.__exit__()
    return state


def main(argv: list[str] | None = None) -> None:
    from benchmarks.common import RESULTS_DIR

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100_000, help="requests to send (stream messages count one each)")
    parser.add_argument("--chunk", type=int, default=5_000, help="cases per resumable chunk")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-call deadline; a call past it is a hang")
    parser.add_argument("--fresh", action="store_true", help="ignore a partial earlier run")
    parser.add_argument("--smoke", action="store_true", help="a few hundred cases (seconds)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.smoke:
        args.cases, args.chunk = 300, 150
    name = "fuzz_smoke.json" if args.smoke else "fuzz.json"
    state = run(args.cases, args.chunk, args.results_dir / name, fresh=args.fresh or args.smoke, timeout_s=args.timeout)
    totals = state["totals"]
    print(json.dumps({k: totals[k] for k in ("requests", "codes", "problems", "hangs", "crashes", "seconds")}, indent=2))


if __name__ == "__main__":
    main()

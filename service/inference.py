"""Interception core: one KServe-v2 inference request in, one response (or a status) out.

Transport-agnostic: it takes the request message and an async callable that
performs the upstream inference, so the proxy servicer (unary and streaming)
and the library interceptor share every rule:

1. find the model's protection (explicit per-model settings, or auto: the
   model's outputs include the detector's feature outputs);
2. validate the request against the model's metadata (inputs, datatypes,
   shapes, raw byte sizes, NaN/Inf) so bad input gets a precise
   INVALID_ARGUMENT instead of a model error;
3. add the detector's outputs to the requested outputs (in place; raw input
   bytes are never decoded or re-encoded): the per-map entropies when Triton
   computes them (``advsentry export-model`` models), else the feature maps;
4. call upstream, map its errors to statuses with a message naming the cause;
5. score: entropies through the combiner inline (a few floats), or maps
   through the micro-batcher (zero-copy views of the raw output bytes);
6. apply the policy and strip outputs the client did not ask for.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
from opentelemetry import trace

from detector import CalibrationError
from detector.detector import ENTROPY_OUTPUT_PREFIX

from .batching import MicroBatcher
from .detectors import DetectorRegistry, ModelDetector
from .metrics import SidecarMetrics
from .policy import PARAM_ERROR, Assessment, PolicyRejection, apply_policy
from .settings import EntropyIn, Policy, ScoringFailure, Settings
from .tracing import extract_parent, get_tracer, inject_metadata

LOGGER = logging.getLogger(__name__)

#: KServe-v2 datatype -> numpy dtype (little-endian, as on the wire). BYTES has no fixed size.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}

UpstreamCall = Callable[[object, Sequence[tuple[str, str | bytes]]], Awaitable[object]]


class RequestError(Exception):
    """A request answered with a non-OK gRPC status; ``message`` says what is wrong."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 trailing_metadata: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailing_metadata = trailing_metadata


@dataclass(frozen=True)
class TensorSpec:
    datatype: str
    shape: tuple[int, ...]  # -1 = any


@dataclass(frozen=True)
class ModelSpec:
    """What validation needs from the model's metadata (shapes include the batch dim if batching)."""

    name: str
    version: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    @classmethod
    def from_metadata(cls, metadata) -> "ModelSpec":
        def table(tensors) -> dict[str, TensorSpec]:
            return {t.name: TensorSpec(t.datatype, tuple(int(d) for d in t.shape)) for t in tensors}

        version = metadata.versions[-1] if metadata.versions else ""
        return cls(metadata.name, version, table(metadata.inputs), table(metadata.outputs))


MetadataLookup = Callable[[str, str], Awaitable["ModelSpec | None"]]


def _describe_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _input_array(request, index: int, tensor) -> np.ndarray | None:
    """A read-only view of input ``index``'s values, or ``None`` if not inspectable (shm, BYTES)."""
    if "shared_memory_region" in tensor.parameters:
        return None
    dtype = DTYPES.get(tensor.datatype)
    if dtype is None:
        return None
    if request.raw_input_contents:
        return np.frombuffer(request.raw_input_contents[index], dtype=dtype)
    field_name = _CONTENTS_FIELD.get(tensor.datatype)
    if field_name is None:
        return None
    return np.asarray(getattr(tensor.contents, field_name))


def validate_request(request, spec: ModelSpec | None) -> int:
    """Check a request against its model; returns the batch size (first dim). Raises RequestError."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    model = request.model_name
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise RequestError(
            invalid,
            f"model {model!r}: {len(request.inputs)} input(s) declared but {len(request.raw_input_contents)} "
            "raw_input_contents given (they must match one to one)",
        )
    names = [t.name for t in request.inputs]
    if len(set(names)) != len(names):
        raise RequestError(invalid, f"model {model!r}: duplicate input name(s) in {names}")
    if spec is not None:
        missing = sorted(set(spec.inputs) - set(names))
        extra = sorted(set(names) - set(spec.inputs))
        if missing:
            raise RequestError(invalid, f"model {model!r}: missing input(s) {missing}; expected {sorted(spec.inputs)}")
        if extra:
            raise RequestError(invalid, f"model {model!r}: unexpected input(s) {extra}; expected {sorted(spec.inputs)}")
    batch = 1
    for index, tensor in enumerate(request.inputs):
        shape = tuple(int(d) for d in tensor.shape)
        if any(d < 0 for d in shape):
            raise RequestError(invalid, f"input {tensor.name!r}: negative dimension in shape {_describe_shape(shape)}")
        if spec is not None:
            expected = spec.inputs[tensor.name]
            if tensor.datatype != expected.datatype:
                raise RequestError(
                    invalid,
                    f"input {tensor.name!r}: datatype {tensor.datatype or '(empty)'} but model {model!r} "
                    f"expects {expected.datatype}",
                )
            if len(shape) != len(expected.shape) or any(
                e >= 0 and e != d for e, d in zip(expected.shape, shape)
            ):
                raise RequestError(
                    invalid,
                    f"input {tensor.name!r}: shape {_describe_shape(shape)} does not match model {model!r} "
                    f"shape {_describe_shape(expected.shape)} (-1 = any)",
                )
        if shape:
            batch = shape[0]
        dtype = DTYPES.get(tensor.datatype)
        if "shared_memory_region" in tensor.parameters:
            continue
        if dtype is not None and request.raw_input_contents:
            expected_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            actual = len(request.raw_input_contents[index])
            if actual != expected_bytes:
                raise RequestError(
                    invalid,
                    f"input {tensor.name!r}: raw contents are {actual} bytes but shape {_describe_shape(shape)} "
                    f"of {tensor.datatype} needs {expected_bytes} bytes",
                )
        if dtype is not None and dtype.kind == "f":
            values = _input_array(request, index, tensor)
            # One float64 sum propagates any NaN/Inf and cannot overflow for float16/32 inputs,
            # so the clean case costs one reduction; the exact count (which also rules out a
            # finite FP64 sum that overflowed) is taken only when the sum is not finite.
            if values is not None and values.size and not math.isfinite(values.sum(dtype=np.float64)):
                bad = int(values.size - np.isfinite(values).sum())
                if bad:
                    raise RequestError(
                        invalid, f"input {tensor.name!r}: {bad} value(s) are NaN or infinite; inputs must be finite"
                    )
    return batch


def output_array(response, name: str) -> np.ndarray:
    """A zero-copy FP32 view of output ``name`` of a response, shaped as declared."""
    for index, tensor in enumerate(response.outputs):
        if tensor.name != name:
            continue
        if tensor.datatype != "FP32":
            raise ValueError(f"feature output {name!r} is {tensor.datatype}, expected FP32")
        shape = tuple(int(d) for d in tensor.shape)
        if index < len(response.raw_output_contents):
            values = np.frombuffer(response.raw_output_contents[index], dtype="<f4")
        else:
            values = np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
        return values.reshape(shape)
    raise KeyError(f"upstream response has no output {name!r}")


def strip_outputs(response, names: set[str]) -> None:
    """Remove outputs (and their raw contents) in place."""
    for index in reversed(range(len(response.outputs))):
        if response.outputs[index].name in names:
            del response.outputs[index]
            if index < len(response.raw_output_contents):
                del response.raw_output_contents[index]


def _add_detector_outputs(request, spec: ModelSpec | None, detector: ModelDetector,
                          needed: Sequence[str]) -> set[str]:
    """Ask upstream for ``needed`` (in place); returns the outputs to strip from the answer.

    A request naming no outputs means "all outputs" to Triton. The sidecar
    then names the model's own outputs explicitly, so Triton does not serialize
    detector outputs nobody reads (five maps when the entropies suffice), and
    the client still gets exactly the model's outputs without the detector's.
    """
    ours = {*detector.feature_outputs, detector.entropy_output}
    if request.outputs:
        requested = {o.name for o in request.outputs}
        for name in needed:
            if name not in requested:
                request.outputs.add().name = name
        return set(needed) - requested
    if spec is None:  # outputs unknown: Triton sends everything, the detector's are removed
        return ours
    for name in spec.outputs:  # entropy outputs for other calibrations are detector outputs too
        if name not in ours and not name.startswith(ENTROPY_OUTPUT_PREFIX):
            request.outputs.add().name = name
    for name in needed:
        request.outputs.add().name = name
    return set(needed)


def _upstream_error(error: grpc.aio.AioRpcError, upstream: str, timeout: float | None) -> RequestError:
    code = error.code()
    details = error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return RequestError(code, f"upstream Triton {upstream} unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        limit = f" after {timeout:.3g}s" if timeout else ""
        return RequestError(code, f"upstream Triton {upstream} did not answer{limit}: {details}")
    return RequestError(code, details)  # Triton's own status and message, unchanged


@dataclass
class Protection:
    detector: ModelDetector
    policy: Policy
    #: set when Triton computes the entropies (one small output instead of the maps)
    entropy_output: str | None = None


@dataclass
class InferenceCore:
    """The interception rules; see the module docstring."""

    settings: Settings
    registry: DetectorRegistry
    batcher: MicroBatcher
    metrics: SidecarMetrics
    metadata_lookup: MetadataLookup
    upstream_name: str = "upstream"
    tracer_provider: trace.TracerProvider | None = None
    _tracer: trace.Tracer = field(init=False)

    def __post_init__(self) -> None:
        self._tracer = get_tracer(self.tracer_provider)

    async def protection(self, model: str, version: str) -> tuple[Protection | None, ModelSpec | None]:
        explicit = self.settings.protection_for(model)
        if explicit is None and not self.settings.protect_all:
            return None, None
        spec = await self.metadata_lookup(model, version)
        outputs = set(spec.outputs) if spec is not None else set()
        serves_default = (set(self.registry.default_feature_outputs()) <= outputs
                          or self.registry.default_entropy_output() in outputs)
        # Models that expose the generic map but not the default's are scored by the
        # model-agnostic detector (a user's own model before it has a calibration).
        generic = spec is not None and not serves_default and (
            set(self.registry.generic_feature_outputs()) <= outputs
            or self.registry.generic_entropy_output() in outputs
        )
        if explicit is None:
            if spec is None:
                return None, None
            if not generic and not serves_default:
                return None, spec
        try:
            detector = self.registry.get(model, generic=generic)
        except CalibrationError as error:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"model {model!r}: {error}") from error
        # The model's own entropies are used only under the name derived from this
        # detector's map configs, so a model exported for other maps falls back to maps.
        entropy_output = None
        if detector.entropy_output in outputs and (
            self.settings.entropy_in is EntropyIn.auto or not set(detector.feature_outputs) <= outputs
        ):
            entropy_output = detector.entropy_output
        return Protection(detector, self.settings.policy_for(model), entropy_output), spec

    async def infer(self, request, upstream: UpstreamCall, metadata: Sequence[tuple[str, str | bytes]] = ()):
        """Serve one ModelInfer request (mutated in place). Raises :class:`RequestError`."""
        parent = extract_parent(metadata)
        with self._tracer.start_as_current_span(
            "advsentry.ModelInfer", context=parent, kind=trace.SpanKind.SERVER
        ) as span:
            span.set_attribute("advsentry.model", request.model_name)
            span.set_attribute("advsentry.model_version", request.model_version)
            try:
                return await self._infer(request, upstream, metadata, span)
            except RequestError as error:
                span.set_status(trace.Status(trace.StatusCode.ERROR, error.message))
                span.set_attribute("rpc.grpc.status_code", error.code.value[0])
                raise

    async def _call_upstream(self, request, upstream: UpstreamCall, metadata) -> object:
        with self._tracer.start_as_current_span("advsentry.upstream", kind=trace.SpanKind.CLIENT) as span:
            span.set_attribute("rpc.system", "grpc")
            span.set_attribute("rpc.method", "ModelInfer")
            span.set_attribute("server.address", self.upstream_name)
            try:
                return await upstream(request, inject_metadata(metadata))
            except grpc.aio.AioRpcError as error:
                span.set_status(trace.Status(trace.StatusCode.ERROR, error.details() or ""))
                raise _upstream_error(error, self.upstream_name, self.settings.upstream_timeout_s) from None

    async def _infer(self, request, upstream: UpstreamCall, metadata, span):
        started = time.perf_counter()
        model, version = request.model_name, request.model_version
        protection, spec = await self.protection(model, version)
        if protection is None:
            span.set_attribute("advsentry.protected", False)
            return await self._call_upstream(request, upstream, metadata)
        span.set_attribute("advsentry.protected", True)
        span.set_attribute("advsentry.policy", protection.policy.value)
        span.set_attribute("advsentry.entropy_in", "triton" if protection.entropy_output else "sidecar")
        labels = (model, version)
        self.metrics.in_flight.labels(*labels).inc()
        upstream_s = scoring_s = 0.0
        try:
            validate_request(request, spec)
            entropy_output = protection.entropy_output
            feature_outputs = (entropy_output,) if entropy_output else protection.detector.feature_outputs
            hidden = _add_detector_outputs(request, spec, protection.detector, feature_outputs)
            t0 = time.perf_counter()
            try:
                if entropy_output:  # scored inline: nothing for the batcher to wait for
                    response = await self._call_upstream(request, upstream, metadata)
                else:
                    with self.batcher.incoming():  # lets the batcher wait for this request, and only while needed
                        response = await self._call_upstream(request, upstream, metadata)
            finally:
                upstream_s = time.perf_counter() - t0
            version = response.model_version or version
            labels = (model, version)
            self.metrics.upstream_latency.labels(*labels).observe(upstream_s)
            t1 = time.perf_counter()
            assessment: Assessment | None = None
            with self._tracer.start_as_current_span("advsentry.score") as score_span:
                try:
                    if entropy_output:
                        t2 = time.perf_counter()
                        scores = protection.detector.score_entropies(output_array(response, entropy_output))
                        self.metrics.observe_detector_call(model, int(scores.size), 1, time.perf_counter() - t2)
                    else:
                        maps = {name: output_array(response, name) for name in feature_outputs}
                        key = (model, tuple((name, maps[name].shape[1:]) for name in feature_outputs))
                        scores = await self.batcher.score(key, maps)
                    assessment = Assessment(scores, protection.detector.threshold, protection.detector.calibration_id)
                    score_span.set_attribute("advsentry.score", assessment.max_score)
                    score_span.set_attribute("advsentry.adversarial", assessment.adversarial)
                    score_span.set_attribute("advsentry.batch_items", int(scores.size))
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # noqa: BLE001 - scoring failure is a policy decision
                    score_span.record_exception(error)
                    score_span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
                    scoring_error = f"{type(error).__name__}: {error}"
                    LOGGER.warning("scoring failed for model %s: %s", model, scoring_error)
                finally:
                    scoring_s = time.perf_counter() - t1
                    self.metrics.scoring_latency.labels(*labels).observe(scoring_s)
            strip_outputs(response, hidden)
            if assessment is None:
                if self.settings.scoring_failure is ScoringFailure.closed:
                    self.metrics.requests.labels(model, version, "unscored", "failed", protection.policy.value).inc()
                    raise RequestError(
                        grpc.StatusCode.INTERNAL,
                        f"advsentry: could not score the feature response of model {model!r} "
                        f"({scoring_error}); scoring_failure=closed withholds the output",
                    )
                if protection.policy is not Policy.shadow:
                    response.parameters[PARAM_ERROR].string_param = scoring_error
                self.metrics.requests.labels(model, version, "unscored", "forwarded", protection.policy.value).inc()
                return response
            for value in assessment.scores:
                self.metrics.score.labels(*labels).observe(float(value) if math.isfinite(value) else -1e9)
            for flag in assessment.flags:
                self.metrics.inputs.labels(model, version, "adversarial" if flag else "clean").inc()
            span.set_attribute("advsentry.verdict", assessment.verdict)
            try:
                outcome = apply_policy(protection.policy, response, assessment)
            except PolicyRejection as rejection:
                self.metrics.requests.labels(model, version, assessment.verdict, "rejected", protection.policy.value).inc()
                raise RequestError(
                    grpc.StatusCode.PERMISSION_DENIED, str(rejection), rejection.trailing_metadata
                ) from None
            self.metrics.requests.labels(model, version, assessment.verdict, outcome, protection.policy.value).inc()
            return response
        except RequestError as error:
            self.metrics.errors.labels(model, version, error.code.name).inc()
            raise
        finally:
            total = time.perf_counter() - started
            self.metrics.in_flight.labels(model, request.model_version).dec()
            self.metrics.request_latency.labels(*labels).observe(total)
            self.metrics.overhead_latency.labels(*labels).observe(max(0.0, total - upstream_s - scoring_s))

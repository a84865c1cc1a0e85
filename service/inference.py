"""Interception core: one KServe-v2 inference request in, one response (or a status) out.

Transport-agnostic: it takes the request message and an async callable that
performs the upstream inference, so the proxy servicer (unary and streaming)
and the library interceptor share every rule:

1. find the model's protection (explicit per-model settings, or auto: the
   model's outputs include the detector's feature outputs);
2. admit: request hooks (``service/observe.py``) may refuse it first (load
   shedding, a probing client's cool-down);
3. validate the request against the model's metadata (inputs, datatypes,
   shapes, raw byte sizes) so bad input gets a precise INVALID_ARGUMENT
   instead of a model error; NaN/Inf values are the policy's decision:
   ``reject`` refuses them (INVALID_ARGUMENT), ``annotate`` and ``shadow``
   forward them and flag those batch items as adversarial (a detector
   cannot vouch for a non-finite input) with ``advsentry_invalid_input``;
4. add the detector's outputs (and hooks' outputs, e.g. an embedding) to the
   requested outputs (in place; raw input bytes are never decoded or
   re-encoded): the per-signal floats when Triton computes them
   (``advsentry export-model`` models), else the feature maps;
5. call upstream, map its errors to statuses with a message naming the cause;
6. score: signals through the combiner inline (a few floats), or maps
   through the micro-batcher (zero-copy views of the raw output bytes);
7. observe: hooks see the scored request (traffic sketch, probing, capture);
8. apply the policy and strip outputs the client did not ask for; what the
   client learns (verdict, score) is the disclosure policy's
   (``service/policy.py``); the full detail goes to metrics, the span and a
   log line with the request id.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace

import grpc
import numpy as np
from opentelemetry import trace

from detector import CalibrationError
from detector.detector import ENTROPY_OUTPUT_PREFIX
from detector.embedding import EMBEDDING_OUTPUT

from .batching import MicroBatcher
from .detectors import DetectorRegistry, ModelDetector
from .metrics import SidecarMetrics
from .observe import ANONYMOUS, ClientIdentity, RequestContext, RequestHook, ScoredRequest
from .policy import PARAM_ERROR, PARAM_INVALID_INPUT, Assessment, PolicyRejection, apply_policy, disclosed
from .settings import Disclosure, EntropyIn, Policy, ScoringFailure, Settings
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


def validate_request(request, spec: ModelSpec | None, *, allow_non_finite: bool = False) -> int:
    """Check a request against its model; returns the batch size (first dim). Raises RequestError.

    NaN/Inf values are refused unless ``allow_non_finite`` (the annotate and
    shadow policies forward them; :func:`non_finite_items` finds them).
    """
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
        if dtype is not None and dtype.kind == "f" and not allow_non_finite:
            values = _input_array(request, index, tensor)
            # One float64 sum propagates any NaN/Inf and cannot overflow for float16/32 inputs,
            # so the clean case costs one reduction; the exact count (which also rules out a
            # finite FP64 sum that overflowed) is taken only when the sum is not finite.
            if values is not None and values.size and not math.isfinite(values.sum(dtype=np.float64)):
                bad = int(values.size - np.isfinite(values).sum())
                if bad:
                    raise RequestError(
                        invalid, f"input {tensor.name!r}: {bad} value(s) are NaN or infinite; inputs must be finite "
                        "(policy reject refuses them; annotate and shadow forward and flag them)"
                    )
    return batch


def non_finite_items(request, batch: int) -> np.ndarray | None:
    """``[batch]`` booleans: which batch items carry a NaN/Inf input value; None when all are finite.

    Same fast path as :func:`validate_request`: one float64 sum per float
    input, the per-item count only when that sum is not finite.
    """
    items: np.ndarray | None = None
    for index, tensor in enumerate(request.inputs):
        dtype = DTYPES.get(tensor.datatype)
        if dtype is None or dtype.kind != "f":
            continue
        values = _input_array(request, index, tensor)
        if values is None or not values.size or math.isfinite(values.sum(dtype=np.float64)):
            continue
        bad = ~np.isfinite(values)
        if not bad.any():
            continue
        if items is None:
            items = np.zeros(max(batch, 1), dtype=bool)
        if batch > 0 and bad.size % batch == 0:
            items |= bad.reshape(batch, -1).any(axis=1)
        else:  # no batch dimension to split on: the whole request
            items[:] = True
    return items


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
    """Ask upstream for ``needed`` (the detector's and hooks' outputs, in place); returns the outputs to strip.

    A request naming no outputs means "all outputs" to Triton. The sidecar
    then names the model's own outputs explicitly, so Triton does not serialize
    detector outputs nobody reads (five maps when the entropies suffice), and
    the client still gets exactly the model's outputs without the detector's.
    """
    ours = {*detector.feature_outputs, detector.entropy_output, EMBEDDING_OUTPUT}
    if request.outputs:
        requested = {o.name for o in request.outputs}
        for name in needed:
            if name not in requested:
                request.outputs.add().name = name
        return set(needed) - requested
    if spec is None:  # outputs unknown: Triton sends everything, the detector's are removed
        return ours
    for name in spec.outputs:  # entropy outputs for other calibrations are detector outputs too
        if name not in ours and name not in needed and not name.startswith(ENTROPY_OUTPUT_PREFIX) \
                and name != EMBEDDING_OUTPUT:  # the probing embedding (issue 12) only when asked for
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
    #: stateful per-request features, each one module (see ``service/observe.py``)
    hooks: list[RequestHook] = field(default_factory=list)
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

    async def infer(self, request, upstream: UpstreamCall, metadata: Sequence[tuple[str, str | bytes]] = (),
                    client: ClientIdentity = ANONYMOUS):
        """Serve one ModelInfer request (mutated in place). Raises :class:`RequestError`."""
        parent = extract_parent(metadata)
        with self._tracer.start_as_current_span(
            "advsentry.ModelInfer", context=parent, kind=trace.SpanKind.SERVER
        ) as span:
            span.set_attribute("advsentry.model", request.model_name)
            span.set_attribute("advsentry.model_version", request.model_version)
            ctx = RequestContext(request.model_name, request.model_version, client, tuple(metadata))
            trace_id = span.get_span_context().trace_id
            if trace_id:  # one id for logs, traces and the capture ring
                ctx.request_id = f"{trace_id:032x}"
            try:
                return await self._infer(request, upstream, ctx, span)
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

    async def _infer(self, request, upstream: UpstreamCall, ctx: RequestContext, span):
        """The named steps: protect?, admit, validate, ask for outputs, forward, score, observe, decide."""
        protection, spec = await self.protection(ctx.model, ctx.version)
        if protection is None:
            span.set_attribute("advsentry.protected", False)
            return await self._call_upstream(request, upstream, ctx.metadata)
        span.set_attribute("advsentry.protected", True)
        span.set_attribute("advsentry.policy", protection.policy.value)
        span.set_attribute("advsentry.entropy_in", "triton" if protection.entropy_output else "sidecar")
        timing = _Timing()
        labels = (ctx.model, ctx.version)
        self.metrics.in_flight.labels(*labels).inc()
        admitted: list[RequestHook] = []
        try:
            await self._admit(ctx, admitted)
            invalid = self._validate(request, spec, protection, labels, span)
            feature_outputs, hook_outputs, hidden = self._request_outputs(request, spec, protection)
            response = await self._forward(request, upstream, ctx, protection, timing)
            version = response.model_version or ctx.version
            labels = (ctx.model, version)
            self.metrics.upstream_latency.labels(*labels).observe(timing.upstream_s)
            assessment, signals, scoring_error = await self._score(response, protection, feature_outputs, labels,
                                                                   timing)
            extras = {name: np.array(output_array(response, name)) for name in hook_outputs}
            strip_outputs(response, hidden)
            if assessment is None:
                return self._unscored(response, protection, labels, scoring_error, invalid)
            if invalid is not None:
                assessment = replace(assessment, invalid=invalid)
            self._count(assessment, labels)
            span.set_attribute("advsentry.verdict", assessment.verdict)
            parameters = self._observe(ScoredRequest(
                ctx, assessment.scores, assessment.threshold, assessment.calibration_id, assessment.flags,
                signals, tuple(protection.detector.output_to_map.values()), extras,
                lambda: input_arrays(request), invalid is not None,
            ))
            return self._decide(response, protection, assessment, parameters, labels, ctx, span)
        except RequestError as error:
            self.metrics.errors.labels(*labels, error.code.name).inc()
            raise
        finally:
            for hook in admitted:
                hook.release(ctx)
            total = time.perf_counter() - timing.started
            self.metrics.in_flight.labels(ctx.model, ctx.version).dec()
            self.metrics.request_latency.labels(*labels).observe(total)
            self.metrics.overhead_latency.labels(*labels).observe(
                max(0.0, total - timing.upstream_s - timing.scoring_s))

    async def _admit(self, ctx: RequestContext, admitted: list[RequestHook]) -> None:
        """Every hook may refuse before upstream (load shedding, probing cool-down)."""
        for hook in self.hooks:
            await hook.admit(ctx)
            admitted.append(hook)

    def _request_outputs(self, request, spec: ModelSpec | None,
                         protection: Protection) -> tuple[tuple[str, ...], tuple[str, ...], set[str]]:
        """Add the detector's (and hooks') outputs; returns (feature outputs, hook outputs, outputs to strip)."""
        entropy_output = protection.entropy_output
        feature_outputs = (entropy_output,) if entropy_output else protection.detector.feature_outputs
        available = set(spec.outputs) if spec is not None else set()
        hook_outputs = tuple(dict.fromkeys(
            name for hook in self.hooks for name in hook.extra_outputs(request.model_name)
            if name in available and name not in feature_outputs
        ))
        hidden = _add_detector_outputs(request, spec, protection.detector, (*feature_outputs, *hook_outputs))
        return feature_outputs, hook_outputs, hidden

    async def _forward(self, request, upstream: UpstreamCall, ctx: RequestContext, protection: Protection,
                       timing: "_Timing"):
        t0 = time.perf_counter()
        try:
            if protection.entropy_output:  # scored inline: nothing for the batcher to wait for
                return await self._call_upstream(request, upstream, ctx.metadata)
            with self.batcher.incoming():  # lets the batcher wait for this request, and only while needed
                return await self._call_upstream(request, upstream, ctx.metadata)
        finally:
            timing.upstream_s = time.perf_counter() - t0

    async def _score(self, response, protection: Protection, feature_outputs: tuple[str, ...], labels,
                     timing: "_Timing") -> tuple[Assessment | None, np.ndarray | None, str]:
        """Scores of the response's inputs; a failure is returned (a policy decision), not raised."""
        t1 = time.perf_counter()
        model = labels[0]
        with self._tracer.start_as_current_span("advsentry.score") as score_span:
            try:
                signals = None
                if protection.entropy_output:
                    t2 = time.perf_counter()
                    signals = np.array(output_array(response, protection.entropy_output))
                    scores = protection.detector.score_entropies(signals)
                    self.metrics.observe_detector_call(model, int(scores.size), 1, time.perf_counter() - t2)
                else:
                    maps = {name: output_array(response, name) for name in feature_outputs}
                    key = (model, tuple((name, maps[name].shape[1:]) for name in feature_outputs))
                    scores = await self.batcher.score(key, maps)
                assessment = Assessment(scores, protection.detector.threshold, protection.detector.calibration_id)
                score_span.set_attribute("advsentry.score", assessment.max_score)
                score_span.set_attribute("advsentry.adversarial", assessment.adversarial)
                score_span.set_attribute("advsentry.batch_items", int(scores.size))
                return assessment, signals, ""
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - scoring failure is a policy decision
                score_span.record_exception(error)
                score_span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
                scoring_error = f"{type(error).__name__}: {error}"
                LOGGER.warning("scoring failed for model %s: %s", model, scoring_error)
                return None, None, scoring_error
            finally:
                timing.scoring_s = time.perf_counter() - t1
                self.metrics.scoring_latency.labels(*labels).observe(timing.scoring_s)

    def _validate(self, request, spec: ModelSpec | None, protection: Protection, labels,
                  span) -> np.ndarray | None:
        """Validate; NaN/Inf is the policy's decision. Returns the non-finite batch items (None: all finite)."""
        if protection.policy is Policy.reject:
            try:
                validate_request(request, spec)
                return None
            except RequestError as error:
                if "NaN or infinite" in error.message:  # counted in batch items, as under annotate/shadow
                    shape = request.inputs[0].shape if request.inputs else ()
                    items = non_finite_items(request, int(shape[0]) if shape else 1)
                    bad = int(items.sum()) if items is not None else 1
                    self.metrics.invalid_inputs.labels(*labels, protection.policy.value).inc(bad)
                raise
        batch = validate_request(request, spec, allow_non_finite=True)
        invalid = non_finite_items(request, batch)
        if invalid is not None:
            self.metrics.invalid_inputs.labels(*labels, protection.policy.value).inc(int(invalid.sum()))
            span.set_attribute("advsentry.invalid_input", True)
        return invalid

    def _disclosure(self, ctx: RequestContext) -> Disclosure:
        """What this caller may learn: trusted callers get scores, others the model's setting."""
        return Disclosure.score if ctx.client.trusted else self.settings.disclosure_for(ctx.model)

    def _unscored(self, response, protection: Protection, labels, scoring_error: str,
                  invalid: np.ndarray | None = None):
        """No score: forward flagged with the error (fail open) or withhold the output (fail closed)."""
        if self.settings.scoring_failure is ScoringFailure.closed:
            self.metrics.requests.labels(*labels, "unscored", "failed", protection.policy.value).inc()
            raise RequestError(
                grpc.StatusCode.INTERNAL,
                f"advsentry: could not score the feature response of model {labels[0]!r} "
                f"({scoring_error}); scoring_failure=closed withholds the output",
            )
        # A non-numeric flag, so every disclosure but none may carry it (the detail is in the log line).
        if protection.policy is not Policy.shadow and self.settings.disclosure_for(labels[0]) is not Disclosure.none:
            response.parameters[PARAM_ERROR].string_param = scoring_error
            if invalid is not None:
                response.parameters[PARAM_INVALID_INPUT].bool_param = True
        self.metrics.requests.labels(*labels, "unscored", "forwarded", protection.policy.value).inc()
        return response

    def _count(self, assessment: Assessment, labels) -> None:
        for value in assessment.scores:
            self.metrics.score.labels(*labels).observe(float(value) if math.isfinite(value) else -1e9)
        for flag in assessment.flags:
            self.metrics.inputs.labels(*labels, "adversarial" if flag else "clean").inc()

    def _observe(self, scored: ScoredRequest) -> dict[str, str | float | bool]:
        """Hand the scored request to every hook; a failing hook is logged and counted, never raised."""
        parameters: dict[str, str | float | bool] = {}
        for hook in self.hooks:
            try:
                parameters.update(hook.observe(scored) or {})
            except Exception:  # noqa: BLE001 - a hook must never fail a request
                LOGGER.exception("request hook %s failed", hook.name)
                self.metrics.hook_errors.labels(hook.name).inc()
        return parameters

    def _decide(self, response, protection: Protection, assessment: Assessment,
                parameters: dict[str, str | float | bool], labels, ctx: RequestContext, span):
        """Apply the policy with the caller's disclosure; hooks' parameters go through the same filter."""
        disclosure = self._disclosure(ctx)
        span.set_attribute("advsentry.request_id", ctx.request_id)
        span.set_attribute("advsentry.disclosure", disclosure.value)
        if assessment.threshold is not None:
            span.set_attribute("advsentry.threshold", float(assessment.threshold))
        try:
            outcome = apply_policy(protection.policy, response, assessment, disclosure, ctx.request_id)
        except PolicyRejection as rejection:
            self.metrics.requests.labels(*labels, assessment.verdict, "rejected", protection.policy.value).inc()
            LOGGER.info("request %s (model %s, client %s) rejected: scores %s, threshold %s, calibration %s%s",
                        ctx.request_id, labels[0], ctx.client.key, _scores_text(assessment), assessment.threshold,
                        assessment.calibration_id, ", non-finite input" if assessment.invalid_input else "")
            raise RequestError(
                grpc.StatusCode.PERMISSION_DENIED, str(rejection), rejection.trailing_metadata
            ) from None
        if outcome == "annotated":
            set_parameters(response, disclosed(parameters, disclosure))
        if LOGGER.isEnabledFor(logging.DEBUG):
            LOGGER.debug("request %s (model %s, client %s) %s: scores %s, threshold %s, disclosure %s",
                         ctx.request_id, labels[0], ctx.client.key, assessment.verdict, _scores_text(assessment),
                         assessment.threshold, disclosure.value)
        self.metrics.requests.labels(*labels, assessment.verdict, outcome, protection.policy.value).inc()
        return response


def _scores_text(assessment: Assessment) -> str:
    return ",".join(f"{float(s):.6f}" for s in assessment.scores)


@dataclass
class _Timing:
    started: float = field(default_factory=time.perf_counter)
    upstream_s: float = 0.0
    scoring_s: float = 0.0


def set_parameters(message, parameters: dict[str, str | float | bool]) -> None:
    """Write ``parameters`` into a message's ``parameters`` map with the matching InferParameter field."""
    for key, value in parameters.items():
        if isinstance(value, bool):
            message.parameters[key].bool_param = value
        elif isinstance(value, int):
            message.parameters[key].int64_param = value
        elif isinstance(value, float):
            message.parameters[key].double_param = value
        else:
            message.parameters[key].string_param = str(value)


def input_arrays(request) -> dict[str, np.ndarray]:
    """Copies of a request's decodable input tensors, shaped as declared (shm and BYTES inputs skipped)."""
    arrays = {}
    for index, tensor in enumerate(request.inputs):
        values = _input_array(request, index, tensor)
        if values is not None:
            arrays[tensor.name] = np.array(values).reshape([int(d) for d in tensor.shape])
    return arrays

"""Interception core: one KServe-v2 inference request in, one response (or a status) out.

Transport-agnostic: it takes the request message and an async callable that
performs the upstream inference, so the proxy (unary and streaming), the
DetectorService and the library interceptor share every rule:

1. find the model's protection: explicit per-model settings, or auto (a model
   advsentry exported, or one already protected); a protected model keeps one
   detector *snapshot* for the whole request (see ``service/core/detectors.py``);
2. admit: request hooks (``service/hooks/``) may refuse it first (load
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
5. call upstream (internal metadata such as the trusted-caller secret is
   stripped first), map its errors to statuses with a message naming the cause;
   in black-box mode with Feature Squeezing, the squeezed copies of the
   request go upstream at the same time (``service/core/copies.py``);
6. score: signals through the combiner inline (a few floats), or maps
   through the micro-batcher (zero-copy views of the raw output bytes);
7. observe: hooks see the scored request (traffic sketch, probing, capture);
8. finish: apply the policy and strip outputs the client did not ask for
   (ModelInfer), or return the verdict (DetectorService). What the client
   learns is the disclosure policy's (``service/core/policy.py``); the full
   detail goes to metrics, the span and a log line with the request id.

A protected request that leaves without a verdict is never silent: it is
counted in ``advsentry_unscored_requests_total{model,reason}``, logged, and
then either refused (``scoring_failure=closed``, the default under
``reject``) or forwarded with ``advsentry_error`` (``open``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import numpy as np
from opentelemetry import trace

from detector import CalibrationError

from ..clients import forwarded_metadata
from ..hooks.base import ANONYMOUS, ClientIdentity, RequestContext, RequestHook, ScoredRequest
from ..metrics import SidecarMetrics
from ..settings import Disclosure, EntropyIn, Policy, ScoringFailure, Settings
from ..tracing import extract_parent, get_tracer, inject_metadata
from .batching import MicroBatcher
from .copies import request_pixels, transformed_logits
from .detectors import (
    BLACKBOX_PIXELS,
    LOGITS_OUTPUT,
    TRANSFORMED_PREFIX,
    BatchKey,
    DetectorRegistry,
    ModelDetector,
    Serving,
    advsentry_outputs,
)
from .policy import PARAM_ERROR, PARAM_INVALID_INPUT, Assessment, PolicyRejection, apply_policy, disclosed, disclosure_for
from .requests import (
    MetadataLookup,
    ModelSpec,
    RequestError,
    UpstreamCall,
    add_detector_outputs,
    input_arrays,
    non_finite_items,
    output_array,
    set_parameters,
    strip_outputs,
    validate_request,
)

LOGGER = logging.getLogger("service.core.inference")

#: How a model is protected (``advsentry_model_protection{mode}``, the start-up listing): Triton computes the
#: detector's signals; the sidecar scores its maps; the sidecar computes black-box signals from its logits and the
#: request's pixels; protected but its outputs serve none of these (every request counted
#: unscored); its calibration cannot be loaded; not protected (not listed, and not exported by advsentry).
PROTECTION_MODES = ("signals", "maps", "blackbox", "unservable", "calibration_error", "unprotected")

#: Seconds between two log lines of the same (model, reason) of unscored requests (the counter counts all).
UNSCORED_LOG_INTERVAL_S = 30.0


def _upstream_error(error: grpc.aio.AioRpcError, upstream: str, timeout: float | None) -> RequestError:
    code = error.code()
    details = error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return RequestError(code, f"upstream Triton {upstream} unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        limit = f" after {timeout:.3g}s" if timeout else ""
        return RequestError(code, f"upstream Triton {upstream} did not answer{limit}: {details}")
    return RequestError(code, details)  # Triton's own status and message, unchanged


@dataclass(frozen=True)
class Protection:
    """How one request of a protected model is scored: one detector snapshot, its serving, the policy."""

    detector: ModelDetector
    policy: Policy
    #: None: the model does not serve this detector's signals or maps (answered unscored, counted)
    serving: Serving | None
    scoring_failure: ScoringFailure

    @property
    def entropy_output(self) -> str | None:
        """The signals output when Triton computes the signals (one small output instead of the maps)."""
        return self.serving.signals if self.serving is not None else None


class Unscored(Exception):
    """A protected request that cannot get a verdict; ``reason`` is a label of ``advsentry_unscored_requests_total``."""

    def __init__(self, reason: str, message: str, code: grpc.StatusCode = grpc.StatusCode.INTERNAL) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.code = code


#: What a finished request becomes: the policy's response (ModelInfer) or the verdict itself (DetectorService).
Finish = Callable[["Outcome"], Any]


@dataclass
class Outcome:
    """Everything known about a scored request when it is finished."""

    response: Any
    protection: Protection
    assessment: Assessment
    parameters: dict[str, str | float | bool]
    labels: tuple[str, str]
    ctx: RequestContext
    span: Any


class _LogLimiter:
    """At most one log line per key and interval, saying how many were not logged in between."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def allow(self, key: tuple[str, str]) -> int | None:
        """None: stay quiet; else the number of events suppressed since the last line."""
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-math.inf, 0))
        if now - last < self.interval_s:
            self._last[key] = (last, suppressed + 1)
            return None
        self._last[key] = (now, 0)
        return suppressed


@dataclass
class InferenceCore:
    """The interception rules; see the module docstring. Built by :func:`service.core.pipeline.build_core`."""

    settings: Settings
    registry: DetectorRegistry
    batcher: MicroBatcher
    metrics: SidecarMetrics
    metadata_lookup: MetadataLookup
    upstream_name: str = "upstream"
    tracer_provider: trace.TracerProvider | None = None
    #: stateful per-request features, each one module (see ``service/hooks/``)
    hooks: list[RequestHook] = field(default_factory=list)
    _tracer: trace.Tracer = field(init=False)
    _log_limiter: _LogLimiter = field(init=False)
    _modes: dict[str, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._tracer = get_tracer(self.tracer_provider)
        self._log_limiter = _LogLimiter(UNSCORED_LOG_INTERVAL_S)

    async def close(self) -> None:
        """Stop the micro-batcher, then let every hook flush its persisted state (sketches, capture ring)."""
        await self.batcher.close()
        for hook in self.hooks:
            try:
                await hook.close()
            except Exception:  # noqa: BLE001 - stopping must finish
                LOGGER.exception("request hook %s failed to close", hook.name)

    # ---- protection ---------------------------------------------------------------------------

    def _auto_protected(self, model: str, outputs: set[str] | None) -> bool:
        """``protect_all``: a model already protected stays so; a new one when advsentry exported it."""
        if any(d.model == model for d in self.registry.known()):
            return True
        return outputs is not None and advsentry_outputs(outputs)

    async def protection(self, model: str, version: str, *, required: bool = False
                         ) -> tuple[Protection | None, ModelSpec | None]:
        """The model's protection (None: not protected) and metadata. ``required``: protect whatever the settings say.

        Raises :class:`RequestError` (FAILED_PRECONDITION) when the model's
        calibration cannot be loaded; that request is counted unscored.
        """
        try:
            protection, spec, _ = await self.resolve_protection(model, version, required=required)
        except CalibrationError as error:
            self._count_unscored(model, "calibration_error", str(error))
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"model {model!r}: {error}") from error
        return protection, spec

    async def resolve_protection(self, model: str, version: str, *, required: bool = False
                                 ) -> tuple[Protection | None, ModelSpec | None, str]:
        """:meth:`protection` without counting, plus its mode (see :data:`PROTECTION_MODES`); publishes the mode.

        Raises ``CalibrationError`` when the model's calibration cannot be loaded.
        """
        explicit = self.settings.protection_for(model)
        spec = None
        if required or explicit is not None or self.settings.protect_all:
            spec = await self.metadata_lookup(model, version)
        outputs = set(spec.outputs) if spec is not None else None
        if not required and explicit is None and (not self.settings.protect_all
                                                  or not self._auto_protected(model, outputs)):
            if spec is not None:  # only models the upstream has: a client's made-up names never become series
                self._publish_mode(model, "unprotected")
            return None, spec, "unprotected"
        if required and explicit is None and spec is None:  # DetectorService: no detector for a model that is not there
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"model {model!r} is not available upstream")
        try:
            detector = self.registry.get(model, outputs=outputs)
        except CalibrationError:
            self._publish_mode(model, "calibration_error")
            raise
        known = outputs if outputs is not None else self.registry.known_outputs(model)
        serving = detector.serving(known, prefer_signals=self.settings.entropy_in is EntropyIn.auto)
        # DetectorService (required) exists to return a verdict: without one it always answers an error
        failure = ScoringFailure.closed if required else self.settings.scoring_failure_for(model)
        mode = "unservable" if serving is None else serving.kind
        if not required:
            self._publish_mode(model, mode)
        return Protection(detector, self.settings.policy_for(model), serving, failure), spec, mode

    def _publish_mode(self, model: str, mode: str) -> None:
        """``advsentry_model_protection{model,mode}``: one series at 1 per model, the mode last seen."""
        previous = self._modes.get(model)
        if previous == mode:
            return
        if previous is not None:
            self.metrics.protection_mode.labels(model, previous).set(0)
        self.metrics.protection_mode.labels(model, mode).set(1)
        self._modes[model] = mode
        if mode == "unprotected" and self.settings.protect_all:
            LOGGER.warning("model %s is not protected: it serves none of advsentry's outputs (export it with "
                           "`advsentry export-model`, or list it under models: to protect it); its requests are "
                           "forwarded unscored and counted in advsentry_unprotected_requests_total", model)

    # ---- entry points ---------------------------------------------------------------------------

    async def infer(self, request, upstream: UpstreamCall, metadata: Sequence[tuple[str, str | bytes]] = (),
                    client: ClientIdentity = ANONYMOUS):
        """Serve one ModelInfer request (mutated in place): the policy's response. Raises :class:`RequestError`."""
        return await self._run("advsentry.ModelInfer", request, upstream, metadata, client, self._decide)

    async def assess(self, request, upstream: UpstreamCall, metadata: Sequence[tuple[str, str | bytes]] = (),
                     client: ClientIdentity = ANONYMOUS) -> tuple[Assessment, ModelDetector]:
        """DetectorService.Detect on inputs: the same steps as :meth:`infer`, the verdict returned, no policy applied."""
        return await self._run("advsentry.Detect", request, upstream, metadata, client, self._verdict, required=True)

    async def assess_maps(self, model: str, version: str, maps: Mapping[str, np.ndarray],
                          metadata: Sequence[tuple[str, str | bytes]] = (), client: ClientIdentity = ANONYMOUS,
                          ) -> tuple[Assessment, ModelDetector]:
        """DetectorService.Detect on precomputed feature maps: admission, scoring and hooks as for any request."""
        with self._tracer.start_as_current_span("advsentry.Detect", context=extract_parent(metadata),
                                                kind=trace.SpanKind.SERVER) as span:
            ctx = self._context(model, version, client, metadata, span)
            protection, _ = await self.protection(model, version, required=True)
            assert protection is not None
            wanted = set(protection.detector.feature_outputs)
            if set(maps) != wanted:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"feature_maps must be exactly {sorted(wanted)}, got {sorted(maps)}")
            admitted: list[RequestHook] = []
            try:
                await self._admit(ctx, admitted)
                try:
                    scores = await self.batcher.score(self._batch_key(protection, maps), maps)
                except ValueError as error:
                    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
                detector = protection.detector
                assessment = Assessment(scores, detector.threshold, detector.calibration_id)
                self._count(assessment, (model, version))
                self._observe(ScoredRequest(ctx, assessment.scores, assessment.threshold, assessment.calibration_id,
                                            assessment.flags, None, tuple(detector.output_to_map.values()), {},
                                            dict))
                return assessment, detector
            finally:
                for hook in admitted:
                    hook.release(ctx)

    # ---- the steps ------------------------------------------------------------------------------

    def _context(self, model: str, version: str, client: ClientIdentity, metadata, span) -> RequestContext:
        span.set_attribute("advsentry.model", model)
        span.set_attribute("advsentry.model_version", version)
        ctx = RequestContext(model, version, client, tuple(metadata))
        trace_id = span.get_span_context().trace_id
        if trace_id:  # one id for logs, traces and the capture ring
            ctx.request_id = f"{trace_id:032x}"
        return ctx

    async def _run(self, name: str, request, upstream: UpstreamCall, metadata, client: ClientIdentity,
                   finish: Finish, *, required: bool = False):
        with self._tracer.start_as_current_span(name, context=extract_parent(metadata),
                                                kind=trace.SpanKind.SERVER) as span:
            ctx = self._context(request.model_name, request.model_version, client, metadata, span)
            try:
                return await self._infer(request, upstream, ctx, span, finish, required)
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
                return await upstream(request, inject_metadata(forwarded_metadata(self.settings, metadata)))
            except grpc.aio.AioRpcError as error:
                span.set_status(trace.Status(trace.StatusCode.ERROR, error.details() or ""))
                raise _upstream_error(error, self.upstream_name, self.settings.upstream_timeout_s) from None

    async def _infer(self, request, upstream: UpstreamCall, ctx: RequestContext, span, finish: Finish,
                     required: bool):
        """The named steps: protect?, admit, validate, ask for outputs, forward, score, observe, finish."""
        protection, spec = await self.protection(ctx.model, ctx.version, required=required)
        if protection is None:
            span.set_attribute("advsentry.protected", False)
            if spec is not None:  # a model the upstream has (a made-up name gets Triton's NOT_FOUND, no series)
                self.metrics.unprotected.labels(ctx.model).inc()
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
            if protection.serving is None:
                return await self._unservable(request, upstream, ctx, spec, protection, labels, invalid)
            feature_outputs, hook_outputs, hidden = self._request_outputs(request, spec, protection)
            response, transformed = await self._forward(request, upstream, ctx, protection, timing)
            labels = (ctx.model, response.model_version or ctx.version)
            self.metrics.upstream_latency.labels(*labels).observe(timing.upstream_s)
            try:
                assessment, signals = await self._score(response, protection, feature_outputs, labels, timing,
                                                        request, transformed)
            except Unscored as unscored:
                strip_outputs(response, hidden)
                return self._unscored(response, protection, labels, unscored, invalid)
            extras = {name: np.array(output_array(response, name)) for name in hook_outputs}
            strip_outputs(response, hidden)
            if invalid is not None:
                assessment = replace(assessment, invalid=invalid)
            self._count(assessment, labels)
            span.set_attribute("advsentry.verdict", assessment.verdict)
            parameters = self._observe(ScoredRequest(
                ctx, assessment.scores, assessment.threshold, assessment.calibration_id, assessment.flags,
                signals, tuple(protection.detector.output_to_map.values()), extras,
                lambda: input_arrays(request), invalid is not None,
            ))
            return finish(Outcome(response, protection, assessment, parameters, labels, ctx, span))
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
        assert protection.serving is not None
        feature_outputs = protection.serving.outputs
        available = set(spec.outputs) if spec is not None else set()
        hook_outputs = tuple(dict.fromkeys(
            name for hook in self.hooks for name in hook.extra_outputs(request.model_name)
            if name in available and name not in feature_outputs
        ))
        detector = protection.detector
        hidden = add_detector_outputs(request, spec, {*detector.feature_outputs, detector.entropy_output},
                                      (*feature_outputs, *hook_outputs))
        return feature_outputs, hook_outputs, hidden

    async def _forward(self, request, upstream: UpstreamCall, ctx: RequestContext, protection: Protection,
                       timing: "_Timing") -> tuple[object, "dict[str, np.ndarray] | Exception | None"]:
        """The upstream response, and in black-box mode the logits of the transformed copies (or why they failed).

        The copies (Feature Squeezing's squeezed inputs) go upstream at the same
        time as the request; a failed copy is the scoring's business (unscored),
        a failed request cancels the copies.
        """
        t0 = time.perf_counter()
        copies = self._send_copies(request, upstream, ctx, protection)
        try:
            if protection.entropy_output:  # scored inline: nothing for the batcher to wait for
                return await self._call_upstream(request, upstream, ctx.metadata), None
            with self.batcher.incoming():  # lets the batcher wait for this request, and only while needed
                response = await self._call_upstream(request, upstream, ctx.metadata)
                return response, (await copies if copies is not None else None)
        except BaseException:
            if copies is not None:
                copies.cancel()
                await asyncio.gather(copies, return_exceptions=True)
            raise
        finally:
            timing.upstream_s = time.perf_counter() - t0

    def _send_copies(self, request, upstream: UpstreamCall, ctx: RequestContext,
                     protection: Protection) -> "asyncio.Future | None":
        """Black-box mode with signals on transformed copies: their upstream calls, started now (a task)."""
        serving = protection.serving
        if serving is None or serving.kind != "blackbox":
            return None
        transforms = protection.detector.detector.outside_transforms()
        if not transforms:
            return None
        self.metrics.transformed_copies.labels(ctx.model).inc(len(transforms))

        async def logits() -> "dict[str, np.ndarray] | Exception":
            try:
                return await transformed_logits(request, transforms,
                                                lambda copy: self._call_upstream(copy, upstream, ctx.metadata))
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - the request is then unscored, not failed
                return error

        return asyncio.ensure_future(logits())

    @staticmethod
    def _batch_key(protection: Protection, maps: Mapping[str, np.ndarray]) -> BatchKey:
        """Only requests holding the same detector snapshot (and map shapes) share a batch."""
        return BatchKey(protection.detector, tuple((name, tuple(maps[name].shape[1:])) for name in maps))

    async def _score(self, response, protection: Protection, feature_outputs: tuple[str, ...], labels,
                     timing: "_Timing", request=None,
                     transformed: "dict[str, np.ndarray] | Exception | None" = None) -> tuple[Assessment, np.ndarray | None]:
        """Scores of the response's inputs by the request's snapshot; a failure raises :class:`Unscored`."""
        t1 = time.perf_counter()
        model = labels[0]
        detector = protection.detector
        with self._tracer.start_as_current_span("advsentry.score") as score_span:
            try:
                signals = None
                if protection.entropy_output:
                    t2 = time.perf_counter()
                    signals = np.array(output_array(response, protection.entropy_output))
                    scores = detector.score_entropies(signals)
                    self.metrics.observe_detector_call(model, int(scores.size), 1, time.perf_counter() - t2)
                elif protection.serving is not None and protection.serving.kind == "blackbox":
                    if isinstance(transformed, Exception):
                        raise RuntimeError(f"an upstream call of a transformed copy failed: {transformed}")
                    maps = {LOGITS_OUTPUT: output_array(response, LOGITS_OUTPUT), BLACKBOX_PIXELS: request_pixels(request),
                            **{TRANSFORMED_PREFIX + key: values for key, values in (transformed or {}).items()}}
                    scores = await self.batcher.score(self._batch_key(protection, maps), maps)
                else:
                    maps = {name: output_array(response, name) for name in feature_outputs}
                    scores = await self.batcher.score(self._batch_key(protection, maps), maps)
                assessment = Assessment(scores, detector.threshold, detector.calibration_id)
                score_span.set_attribute("advsentry.score", assessment.max_score)
                score_span.set_attribute("advsentry.adversarial", assessment.adversarial)
                score_span.set_attribute("advsentry.batch_items", int(scores.size))
                return assessment, signals
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - scoring failure is a policy decision
                score_span.record_exception(error)
                score_span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
                raise Unscored("scoring_error", f"{type(error).__name__}: {error}") from error
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

    # ---- no verdict: counted, logged, then refused or forwarded flagged -------------------------

    def _count_unscored(self, model: str, reason: str, message: str) -> None:
        self.metrics.unscored.labels(model, reason).inc()
        suppressed = self._log_limiter.allow((model, reason))
        if suppressed is not None:
            more = f" ({suppressed} more since the last line)" if suppressed else ""
            level = logging.WARNING if reason == "no_threshold" else logging.ERROR  # scored, nothing can be flagged
            LOGGER.log(level, "request for protected model %s left without a verdict (%s): %s%s",
                       model, reason, message, more)

    async def _unservable(self, request, upstream: UpstreamCall, ctx: RequestContext, spec: ModelSpec | None,
                          protection: Protection, labels, invalid: np.ndarray | None):
        """The model does not serve the detector in force: refuse before upstream (closed), or forward flagged (open)."""
        detector = protection.detector
        unscored = Unscored(
            "outputs_missing",
            f"model {ctx.model!r} does not serve the outputs of calibration {detector.calibration_id or 'none'}: "
            f"it needs {detector.missing_outputs()}",
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        if protection.scoring_failure is ScoringFailure.closed:
            return self._unscored(None, protection, labels, unscored, invalid)
        # Forward what the client asked for, never other calibrations' outputs it did not name.
        hidden = add_detector_outputs(request, spec, {*detector.feature_outputs, detector.entropy_output}, ())
        response = await self._call_upstream(request, upstream, ctx.metadata)
        strip_outputs(response, hidden)
        return self._unscored(response, protection, labels, unscored, invalid)

    def _unscored(self, response, protection: Protection, labels, unscored: Unscored,
                  invalid: np.ndarray | None = None):
        """No verdict: count and log it; refuse (closed) or forward with ``advsentry_error`` (open)."""
        model = labels[0]
        self._count_unscored(model, unscored.reason, unscored.message)
        if protection.scoring_failure is ScoringFailure.closed or response is None:
            self.metrics.requests.labels(*labels, "unscored", "failed", protection.policy.value).inc()
            raise RequestError(
                unscored.code,
                f"advsentry: no verdict for model {model!r} ({unscored.message}); "
                "scoring_failure=closed withholds the output",
            )
        # A non-numeric flag, so every disclosure but none may carry it (the detail is in the log line).
        if protection.policy is not Policy.shadow and self.settings.disclosure_for(model) is not Disclosure.none:
            response.parameters[PARAM_ERROR].string_param = unscored.message
            if invalid is not None:
                response.parameters[PARAM_INVALID_INPUT].bool_param = True
        self.metrics.requests.labels(*labels, "unscored", "forwarded", protection.policy.value).inc()
        return response

    # ---- after scoring --------------------------------------------------------------------------

    def _count(self, assessment: Assessment, labels) -> None:
        for value in assessment.scores:
            self.metrics.score.labels(*labels).observe(float(value) if math.isfinite(value) else -1e9)
        for flag in assessment.flags:
            self.metrics.inputs.labels(*labels, "adversarial" if flag else "clean").inc()
        if assessment.threshold is None:  # scored, but no threshold to turn the score into a verdict
            self._count_unscored(labels[0], "no_threshold", "its calibration has no threshold (calibrate it)")

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

    def _verdict(self, outcome: Outcome) -> tuple[Assessment, ModelDetector]:
        """DetectorService: the verdict itself (its caller may see scores; no policy applies)."""
        return outcome.assessment, outcome.protection.detector

    def _decide(self, outcome: Outcome):
        """Apply the policy with the caller's disclosure; hooks' parameters go through the same filter."""
        response, protection, assessment = outcome.response, outcome.protection, outcome.assessment
        labels, ctx, span = outcome.labels, outcome.ctx, outcome.span
        disclosure = disclosure_for(self.settings, ctx.client, ctx.model)
        span.set_attribute("advsentry.request_id", ctx.request_id)
        span.set_attribute("advsentry.disclosure", disclosure.value)
        if assessment.threshold is not None:
            span.set_attribute("advsentry.threshold", float(assessment.threshold))
        try:
            result = apply_policy(protection.policy, response, assessment, disclosure, ctx.request_id)
        except PolicyRejection as rejection:
            self.metrics.requests.labels(*labels, assessment.verdict, "rejected", protection.policy.value).inc()
            LOGGER.info("request %s (model %s, client %s) rejected: scores %s, threshold %s, calibration %s%s",
                        ctx.request_id, labels[0], ctx.client.key, _scores_text(assessment), assessment.threshold,
                        assessment.calibration_id, ", non-finite input" if assessment.invalid_input else "")
            raise RequestError(
                grpc.StatusCode.PERMISSION_DENIED, str(rejection), rejection.trailing_metadata
            ) from None
        if result == "annotated":
            set_parameters(response, disclosed(outcome.parameters, disclosure))
        if LOGGER.isEnabledFor(logging.DEBUG):
            LOGGER.debug("request %s (model %s, client %s) %s: scores %s, threshold %s, disclosure %s",
                         ctx.request_id, labels[0], ctx.client.key, assessment.verdict, _scores_text(assessment),
                         assessment.threshold, disclosure.value)
        self.metrics.requests.labels(*labels, assessment.verdict, result, protection.policy.value).inc()
        return response


def _scores_text(assessment: Assessment) -> str:
    return ",".join(f"{float(s):.6f}" for s in assessment.scores)


@dataclass
class _Timing:
    started: float = field(default_factory=time.perf_counter)
    upstream_s: float = 0.0
    scoring_s: float = 0.0

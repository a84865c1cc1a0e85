"""Library use: protect your own KServe-v2 ``grpc.aio`` server with a server interceptor.

For teams that run their own KServe-v2 server instead of Triton::

    from service.grpc.interceptor import build_interceptor
    from service.settings import Settings

    interceptor = build_interceptor(Settings(models={"my-model": {}}, calibration="cal.json"))
    server = grpc.aio.server(interceptors=[interceptor])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(MyServicer(), server)

The interceptor wraps the server's own ModelInfer handler with the same
:class:`~service.core.inference.InferenceCore` the sidecar uses (request rewriting,
batched scoring, policy, stripping, metrics, spans); the "upstream" is simply
the wrapped handler. It is built by the same :func:`service.core.pipeline.build_core`
as the sidecar, so the request hooks (load shedding, probing, traffic sketch,
capture) run here too. ModelStreamInfer messages are answered through the
server's ModelInfer handler, in order, with ``error_message`` on failure, at most
``stream_max_in_flight`` at once, and dropped when the caller cancels
(:func:`service.grpc.streams.ordered_responses`).
Models must be listed in ``Settings.models`` (no metadata lookup happens, so
auto-protection and metadata-based validation are off; raw byte sizes and
NaN/Inf are still checked).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator

import grpc
from tritonclient.grpc import service_pb2

from ..clients import client_of
from ..core.inference import InferenceCore
from ..core.pipeline import build_core
from ..core.requests import ModelSpec, RequestError
from ..metrics import SidecarMetrics
from ..settings import Settings
from .streams import ordered_responses

_PREFIX = "/inference.GRPCInferenceService/"


def _call_details(method: str, like):
    """Call details for another method of the same call (grpc.aio insists on its own Cython type)."""
    try:
        from grpc._cython import cygrpc

        return cygrpc._HandlerCallDetails(method, like.invocation_metadata)  # noqa: SLF001
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - other grpc builds
        return type(like)(method, like.invocation_metadata)


def _parser(deserializer, stream: bool):
    """Decode request bytes with the server's own deserializer; garbage is INVALID_ARGUMENT, not UNKNOWN.

    The wrapped handlers receive bytes (no ``request_deserializer``) because grpc
    answers a deserializer's exception with UNKNOWN and ends the call.
    """
    what = "ModelStreamInfer message is not a valid" if stream else "request is not a valid"

    def parse(data):
        if deserializer is None or not isinstance(data, bytes):
            return data
        try:
            return deserializer(data)
        except Exception as error:  # noqa: BLE001 - DecodeError, or anything the parser raises on garbage
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"advsentry: {what} inference.ModelInferRequest ({len(data)} bytes): {error}") from None

    return parse


async def _no_metadata(model: str, version: str) -> ModelSpec | None:
    return None


class AdvSentryInterceptor(grpc.aio.ServerInterceptor):
    """Wraps ModelInfer / ModelStreamInfer handlers of the server it is installed on."""

    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    async def close(self) -> None:
        """Stop the micro-batcher and the hooks (call from the server's event loop on shutdown)."""
        await self.core.close()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(_PREFIX):
            return handler
        if method.endswith("/ModelInfer") and handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, _parser(handler.request_deserializer, stream=False)),
                response_serializer=handler.response_serializer,
            )
        if method.endswith("/ModelStreamInfer") and handler.stream_stream is not None:
            unary = await continuation(_call_details(_PREFIX + "ModelInfer", handler_call_details))
            if unary is None or unary.unary_unary is None:
                return handler
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(unary.unary_unary, _parser(handler.request_deserializer, stream=True)),
                response_serializer=handler.response_serializer,
            )
        return handler

    def _local(self, behavior, context):
        async def call(request, metadata):
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result

        return call

    def _wrap_unary(self, behavior, parse=lambda data: data):
        async def wrapped(data, context):
            try:
                return await self.core.infer(parse(data), self._local(behavior, context),
                                             tuple(context.invocation_metadata() or ()),
                                             client_of(context, self.core.settings))
            except RequestError as error:
                if error.trailing_metadata:
                    context.set_trailing_metadata(error.trailing_metadata)
                await context.abort(error.code, error.message)

        return wrapped

    def _wrap_stream(self, behavior, parse=lambda data: data):
        async def wrapped(request_iterator: AsyncIterator, context):
            metadata = tuple(context.invocation_metadata() or ())
            client = client_of(context, self.core.settings)

            async def answer(data) -> service_pb2.ModelStreamInferResponse:
                request = service_pb2.ModelInferRequest()  # stays empty (no id to echo) if the bytes do not parse
                try:
                    request = parse(data)
                    response = await self.core.infer(request, self._local(behavior, context), metadata, client)
                    return service_pb2.ModelStreamInferResponse(infer_response=response)
                except RequestError as error:
                    return service_pb2.ModelStreamInferResponse(
                        error_message=f"[StatusCode.{error.code.name}] {error.message}",
                        infer_response=service_pb2.ModelInferResponse(
                            id=request.id, model_name=request.model_name, model_version=request.model_version),
                    )

            async for response in ordered_responses(request_iterator, answer, self.core.settings.stream_max_in_flight):
                yield response

        return wrapped


def build_interceptor(settings: Settings, *, metrics: SidecarMetrics | None = None,
                      metadata_lookup=None, tracer_provider=None) -> AdvSentryInterceptor:
    """An interceptor with its own core (:func:`build_core`: detectors, batcher, hooks); serve ``metrics`` yourself.

    Only the models listed in ``settings.models`` are protected (``protect_all``
    is off: without a metadata lookup there is no way to tell which models
    advsentry exported).
    """
    core: InferenceCore = build_core(
        settings.model_copy(update={"protect_all": False}),
        metadata_lookup=metadata_lookup or _no_metadata,
        metrics=metrics,
        upstream_name="local",
        tracer_provider=tracer_provider,
    )
    return AdvSentryInterceptor(core)

"""The KServe-v2 ``inference.GRPCInferenceService`` proxy.

ModelInfer and ModelStreamInfer go through :class:`InferenceCore`. Every other
RPC is forwarded as *bytes*: the request is never parsed, so the answer
(including error statuses and trailing metadata) is exactly what Triton sent,
for current and future fields alike.

Metadata: what goes upstream, on every RPC, is :func:`service.clients.forwarded_metadata`
(no transport headers, no trusted-caller secret, no ``strip_metadata`` key).

Streaming (:func:`service.grpc.streams.ordered_responses`): each stream message
is handled as its own task (so messages of one stream are scored in the same
micro-batches as everything else) and runs the same core and hooks as
ModelInfer; answers are written strictly in request order, each message is
answered exactly once, a failing message is answered with the protocol's
``error_message`` field while the stream goes on, at most
``stream_max_in_flight`` messages are in progress, and a cancelled stream's
pending messages are dropped before they reach upstream. Messages are sent
upstream as unary ModelInfer calls:
that keeps per-message status and deadline handling simple, and is why models
with a decoupled transaction policy (several responses per request) are not
supported through the interception path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

import grpc
from tritonclient.grpc import service_pb2

from ..clients import client_of, forwarded_metadata
from ..core.inference import InferenceCore, RequestError
from .streams import ordered_responses

LOGGER = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
INTERCEPTED = ("ModelInfer", "ModelStreamInfer")


def _timeout(context: grpc.aio.ServicerContext, limit: float) -> float:
    remaining = context.time_remaining()
    return limit if remaining is None else max(0.001, min(limit, remaining))


def parse_request(data: bytes, stream: bool = False) -> service_pb2.ModelInferRequest:
    """Decode request bytes; undecodable bytes are the client's mistake (INVALID_ARGUMENT, not UNKNOWN).

    Why here and not as the handler's ``request_deserializer``: grpc answers a
    deserializer's exception with UNKNOWN ("Unexpected DecodeError") and ends
    the call, a whole stream included; parsing in the handler lets a bad unary
    call get a precise status and a bad stream message get its error in the
    stream while the stream goes on.
    """
    try:
        return service_pb2.ModelInferRequest.FromString(data)
    except Exception as error:  # noqa: BLE001 - DecodeError, or anything upb raises on garbage
        what = "ModelStreamInfer message is not a valid" if stream else "request is not a valid"
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"advsentry: {what} inference.ModelInferRequest ({len(data)} bytes): {error}",
        ) from None


def passthrough_methods() -> list[str]:
    return [m for m in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
            if m not in INTERCEPTED]


class InferenceProxy:
    """Holds the upstream channel and builds the generic handler for the whole service."""

    def __init__(self, core: InferenceCore, channel: grpc.aio.Channel, *, upstream_timeout_s: float,
                 metrics=None) -> None:
        self.core = core
        self.channel = channel
        self.upstream_timeout_s = upstream_timeout_s
        self.metrics = metrics
        self._infer = channel.unary_unary(
            f"/{SERVICE}/ModelInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )

    # -- pass-through -------------------------------------------------------------------------
    def _passthrough(self, method: str, streaming_response: bool = False):
        call = self.channel.unary_unary(f"/{SERVICE}/{method}")  # bytes in, bytes out

        async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                response = await call(
                    request,
                    metadata=forwarded_metadata(self.core.settings, context.invocation_metadata()),
                    timeout=_timeout(context, self.upstream_timeout_s),
                )
                if self.metrics is not None:
                    self.metrics.passthrough.labels(method, "OK").inc()
                return response
            except grpc.aio.AioRpcError as error:
                if self.metrics is not None:
                    self.metrics.passthrough.labels(method, error.code().name).inc()
                trailing = error.trailing_metadata()
                if trailing:
                    context.set_trailing_metadata(tuple(trailing))
                await context.abort(error.code(), error.details() or "")

        return handler

    # -- interception -------------------------------------------------------------------------
    def _upstream(self, context: grpc.aio.ServicerContext):
        async def call(request, metadata: Sequence[tuple[str, str | bytes]]):
            return await self._infer(request, metadata=tuple(metadata), timeout=_timeout(context, self.upstream_timeout_s))

        return call

    async def model_infer(self, data: bytes, context: grpc.aio.ServicerContext):
        metadata = tuple(context.invocation_metadata() or ())  # the core strips what must not go upstream
        try:
            return await self.core.infer(parse_request(data), self._upstream(context), metadata,
                                         client_of(context, self.core.settings))
        except RequestError as error:
            if error.trailing_metadata:
                context.set_trailing_metadata(error.trailing_metadata)
            await context.abort(error.code, error.message)
        except Exception as error:  # noqa: BLE001 - never crash a call
            LOGGER.exception("ModelInfer failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"advsentry internal error: {type(error).__name__}: {error}")

    async def _stream_message(self, data: bytes, context, metadata, client) -> service_pb2.ModelStreamInferResponse:
        request = service_pb2.ModelInferRequest()  # stays empty (no id to echo) if the bytes do not parse
        try:
            request = parse_request(data, stream=True)
            response = await self.core.infer(request, self._upstream(context), metadata, client)
            return service_pb2.ModelStreamInferResponse(infer_response=response)
        except RequestError as error:
            message = f"[StatusCode.{error.code.name}] {error.message}"
        except Exception as error:  # noqa: BLE001 - one bad message must not end the stream
            LOGGER.exception("stream message failed")
            message = f"[StatusCode.INTERNAL] advsentry internal error: {type(error).__name__}: {error}"
        return service_pb2.ModelStreamInferResponse(
            error_message=message,
            infer_response=service_pb2.ModelInferResponse(
                model_name=request.model_name, model_version=request.model_version, id=request.id
            ),
        )

    async def model_stream_infer(
        self, request_iterator: AsyncIterator, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        metadata = tuple(context.invocation_metadata() or ())
        client = client_of(context, self.core.settings)

        async def answer(data: bytes) -> service_pb2.ModelStreamInferResponse:
            return await self._stream_message(data, context, metadata, client)

        async for response in ordered_responses(request_iterator, answer, self.core.settings.stream_max_in_flight):
            yield response

    def generic_handler(self) -> grpc.GenericRpcHandler:
        handlers = {
            method: grpc.unary_unary_rpc_method_handler(self._passthrough(method))
            for method in passthrough_methods()
        }
        # Requests arrive as bytes and are parsed in the handlers (see parse_request).
        handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
            self.model_infer,
            response_serializer=service_pb2.ModelInferResponse.SerializeToString,
        )
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self.model_stream_infer,
            response_serializer=service_pb2.ModelStreamInferResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

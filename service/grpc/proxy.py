"""The KServe-v2 ``inference.GRPCInferenceService`` proxy.

ModelInfer and ModelStreamInfer go through :class:`InferenceCore`. Every other
RPC is forwarded as *bytes*: the request is never parsed, so the answer
(including error statuses and trailing metadata) is exactly what Triton sent,
for current and future fields alike.

Streaming: each stream message is handled as its own task (so messages of one
stream are scored in the same micro-batches as everything else), but answers
are written strictly in request order, each message is answered exactly once,
and a failing message is answered with the protocol's ``error_message`` field
while the stream goes on. Messages are sent upstream as unary ModelInfer calls:
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

from ..clients import client_of
from ..inference import InferenceCore, RequestError

LOGGER = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
INTERCEPTED = ("ModelInfer", "ModelStreamInfer")
_DROP_HEADERS = {":authority", "user-agent", "content-type", "te", "grpc-timeout", "grpc-accept-encoding",
                 "grpc-encoding", "accept-encoding"}


def forwardable_metadata(context: grpc.aio.ServicerContext) -> list[tuple[str, str | bytes]]:
    """The client's metadata minus transport headers that the upstream channel sets itself."""
    return [(k, v) for k, v in (context.invocation_metadata() or ()) if k.lower() not in _DROP_HEADERS]


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
                 metrics=None, stream_window: int = 128) -> None:
        self.core = core
        self.channel = channel
        self.upstream_timeout_s = upstream_timeout_s
        self.metrics = metrics
        self.stream_window = stream_window
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
                    metadata=forwardable_metadata(context),
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
        metadata = forwardable_metadata(context)
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
        metadata = forwardable_metadata(context)
        client = client_of(context, self.core.settings)
        pending: asyncio.Queue = asyncio.Queue(maxsize=self.stream_window)
        done = object()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await pending.put(asyncio.ensure_future(self._stream_message(request, context, metadata, client)))
            finally:
                await pending.put(done)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                item = await pending.get()
                if item is done:
                    break
                yield await item
            await reader  # surfaces a broken client stream
        finally:
            reader.cancel()
            while not pending.empty():
                item = pending.get_nowait()
                if item is not done:
                    item.cancel()

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

"""The floor of any Python gRPC proxy: a byte forwarder with no logic (proxy-overhead reference).

It answers ``ModelInfer`` and ``ModelStreamInfer`` by forwarding the raw
request bytes to Triton and the raw answer bytes back: no protobuf parsing, no
validation, no scoring, no metrics, on one ``grpc.aio`` event loop, which is
what the sidecar runs on. Whatever it costs over calling Triton directly is
the cost of the Python gRPC transport itself (a server call plus a client
call per request); the proxy benchmark reports it beside the sidecar so the
two parts of the sidecar's overhead — transport vs advsentry's own work — are
told apart in numbers. It is a measuring instrument, not a product part.

Streams are forwarded message by message as unary upstream calls (as the
sidecar does), each answer wrapped as ``ModelStreamInferResponse.infer_response``
by prefixing the field's tag and length, again without parsing.

    python -m benchmarks.null_proxy --upstream 127.0.0.1:8001 --port 9001
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import grpc

SERVICE = "inference.GRPCInferenceService"
_INFER_RESPONSE_TAG = b"\x12"  # field 2 (infer_response), wire type 2 (length-delimited)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def wrap_stream_response(infer_response: bytes) -> bytes:
    """Serialized ``ModelStreamInferResponse(infer_response=<bytes>)`` without touching protobuf."""
    return _INFER_RESPONSE_TAG + _varint(len(infer_response)) + infer_response


async def serve(upstream: str, port: int, host: str = "127.0.0.1") -> None:
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    channel = grpc.aio.insecure_channel(upstream, options=options)
    infer = channel.unary_unary(f"/{SERVICE}/ModelInfer")  # bytes in, bytes out

    async def model_infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await infer(request, timeout=30.0)
        except grpc.aio.AioRpcError as error:
            await context.abort(error.code(), error.details() or "")

    async def model_stream_infer(requests: AsyncIterator[bytes], context) -> AsyncIterator[bytes]:
        async for request in requests:
            yield wrap_stream_response(await infer(request, timeout=30.0))

    ready = channel.unary_unary(f"/{SERVICE}/ServerReady")

    async def server_ready(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await ready(request, timeout=5.0)

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(model_stream_infer),
        "ServerReady": grpc.unary_unary_rpc_method_handler(server_ready),
    })
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="Triton gRPC HOST:PORT")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.upstream, args.port))


if __name__ == "__main__":
    main()

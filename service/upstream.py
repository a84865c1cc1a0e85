"""The upstream Triton as the sidecar sees it: one gRPC channel, cached model metadata, readiness.

Model metadata is needed for every intercepted request (validation, deciding
whether a model is protected), so it is cached per (model, version) for
``ttl_s`` seconds; a lookup error (unknown model, upstream down) is not cached
and yields ``None``, so the request itself goes upstream and gets Triton's own
status.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from .inference import ModelSpec


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


class Upstream:
    """Async client of the upstream Triton."""

    def __init__(self, address: str, *, max_message_bytes: int, ttl_s: float = 30.0, timeout_s: float = 5.0) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=channel_options(max_message_bytes))
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._cache: dict[tuple[str, str], tuple[float, ModelSpec]] = {}
        self._lock = asyncio.Lock()

    async def model_spec(self, model: str, version: str) -> ModelSpec | None:
        key = (model, version)
        hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        try:
            metadata = await self.stub.ModelMetadata(
                service_pb2.ModelMetadataRequest(name=model, version=version), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError:
            self._cache.pop(key, None)
            return None
        spec = ModelSpec.from_metadata(metadata)
        self._cache[key] = (time.monotonic(), spec)
        return spec

    async def ready(self) -> bool:
        try:
            reply = await self.stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=self.timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.ready)

    async def close(self) -> None:
        await self.channel.close()

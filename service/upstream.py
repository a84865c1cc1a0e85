"""The upstream Triton as the sidecar sees it: one gRPC channel, cached model metadata, readiness.

The channel is a :class:`service.tls.ReloadingChannel`: plaintext, or TLS
(optionally with a client certificate) whose files are watched, a change
swapping in a new channel without failing calls in flight (run :meth:`Upstream.watch`).

Model metadata is needed for every intercepted request (validation, deciding
whether a model is protected), so it is cached per (model, version) for
``ttl_s`` seconds; a lookup error is not cached. An unknown model yields
``None``, so the request itself goes upstream and gets Triton's own status; an
upstream that is down or slow fails the request (UNAVAILABLE) rather than let a
protected model's answer through unscored.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from .core.requests import ModelSpec, RequestError
from .tls import ClientTls, ReloadingChannel


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


#: Reconnect quickly after an upstream restart. gRPC's default backoff grows to
#: minutes between attempts; capped at 1 s, the first call after Triton is back
#: succeeds within about a second (measured in benchmarks/fault_soak.py).
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

#: Metadata lookup errors that mean "no such model": the request goes upstream and gets
#: Triton's own status. Any other error (upstream down, slow) must not let the request
#: through unscored, so it is answered as the lookup failed.
_UNKNOWN_MODEL = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)


class Upstream:
    """Async client of the upstream Triton."""

    def __init__(
        self,
        address: str,
        *,
        max_message_bytes: int,
        ttl_s: float = 30.0,
        timeout_s: float = 5.0,
        tls: ClientTls | None = None,
        tls_reload_interval_s: float = 5.0,
        swap_grace_s: float = 30.0,
    ) -> None:
        self.address = address
        self.channel = ReloadingChannel(
            address,
            options=[*channel_options(max_message_bytes), *RECONNECT_OPTIONS],
            tls=tls,
            reload_interval_s=tls_reload_interval_s,
            swap_grace_s=swap_grace_s,
        )
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
        except grpc.aio.AioRpcError as error:
            self._cache.pop(key, None)
            if error.code() in _UNKNOWN_MODEL:
                return None
            # Forwarding now would serve a protected model's answer unscored if Triton recovers
            # between this lookup and the inference (found by the fault soak): fail the request.
            code = error.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                code = grpc.StatusCode.UNAVAILABLE
            raise RequestError(
                code, f"upstream Triton {self.address}: cannot read metadata of model {model!r}: {error.details()}"
            ) from None
        spec = ModelSpec.from_metadata(metadata)
        self._cache[key] = (time.monotonic(), spec)
        return spec

    async def model_names(self) -> list[str]:
        """The ready models of the upstream's repository (empty when it cannot be asked)."""
        try:
            reply = await self.stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), timeout=self.timeout_s)
        except grpc.aio.AioRpcError:
            return []
        return sorted({model.name for model in reply.models})

    async def ready(self) -> bool:
        try:
            reply = await self.stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=self.timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.ready)

    async def watch(self) -> None:
        """Reload the TLS files when they change (a task; returns at once without TLS)."""
        await self.channel.watch()

    async def close(self) -> None:
        await self.channel.close()

"""Helpers for end-to-end tests against a real Triton and a real in-process sidecar.

Not a conftest: test modules import what they need, so one Triton is started
per test module (module-scoped fixtures) and other suites' conftest is untouched.
The sidecar runs in its own event loop on a background thread, so tests use
the ordinary synchronous ``tritonclient.grpc`` client against it, exactly as a
user would.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

MODEL = "efficientnet-lite0"


def export_bundled(out: Path) -> Path:
    from service.triton.export import export_model_repository

    export_model_repository(out)
    return out


def export_small_cnn(out: Path, name: str = "small") -> Path:
    """The small test CNN (``calibrate_models:target_cnn``, 32×32) with the paper's map, as model ``name`` in ``out``.

    Triton needs ``ADVSENTRY_PYTHONPATH`` set to the tests folder to import it.
    """
    from detector import FEATURE_RESPONSE, PAPER_CONFIG
    from service.triton.export import ModelSource, export_model_repository

    export_model_repository(out, model_name=name, source=ModelSource("factory", "calibrate_models:target_cnn"),
                            features={FEATURE_RESPONSE: PAPER_CONFIG}, image_size=32, max_batch_size=8)
    return out


class LoopThread:
    """An asyncio loop in a daemon thread; ``run(coro)`` blocks for its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float | None = 120) -> Any:
        future: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class RunningSidecar:
    """A started :class:`service.grpc.server.Sidecar` on a loop thread."""

    def __init__(self, settings, **kwargs: Any) -> None:
        from service.grpc.server import Sidecar

        self.loop = LoopThread()
        self.sidecar = Sidecar(settings, **kwargs)
        self.loop.run(self.sidecar.start())

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.sidecar.port}"

    def stop(self, grace: float = 1.0) -> None:
        self.loop.run(self.sidecar.stop(grace))
        self.loop.close()


def make_settings(**overrides: Any):
    from service.settings import Settings

    values: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "max_batch_delay_ms": 2.0}
    values.update(overrides)
    return Settings(**values)


def photo_pixels(index: int = 1) -> np.ndarray:
    """FP32 ``[1, 3, 224, 224]`` of a bundled photo (1 = chelsea the cat)."""
    from detector.samples import full_photo_samples, to_tensor

    return to_tensor([full_photo_samples()[index].pixels()]).numpy()


def infer_input(pixels: np.ndarray, name: str = "pixels"):
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput(name, list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels.astype(np.float32))
    return tensor


def outputs(*names: str):
    import tritonclient.grpc as grpcclient

    return [grpcclient.InferRequestedOutput(name) for name in names]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def fgsm_pixels(pixels: np.ndarray, eps: float = 2 / 255) -> np.ndarray:
    """An FGSM copy of ``pixels`` on the bundled model (8-bit grid): on the bundled cat it changes the
    top-1 class and scores above the clean photo, so tests have a flagged input without running an attack suite."""
    import torch

    from detector.models import load_bundled_model

    x = torch.from_numpy(np.array(pixels, dtype=np.float32)).requires_grad_(True)
    logits = load_bundled_model()(x)
    torch.nn.functional.cross_entropy(logits, logits.argmax(1)).backward()
    adversarial = ((x + eps * x.grad.sign()).clamp(0, 1) * 255).round().detach() / 255
    return adversarial.numpy().astype(np.float32)


def start_team_server(loop: "LoopThread", interceptor, triton_address: str) -> tuple[Any, int]:
    """A team's own grpc.aio KServe-v2 server (its ModelInfer calls Triton) with ``interceptor`` installed.

    Returns (server, port); stop it with ``loop.run(server.stop(None))``.
    """
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    class TeamServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
        stub = None

        async def ModelInfer(self, request, context):  # noqa: N802
            if self.stub is None:
                self.stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.aio.insecure_channel(triton_address))
            return await self.stub.ModelInfer(request)

    async def start():
        server = grpc.aio.server(interceptors=[interceptor])
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(TeamServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    return loop.run(start())


class RecordingTap:
    """A real gRPC hop between the sidecar and Triton that records every call (and can slow ModelInfer).

    Bytes in, bytes out for every unary method of ``inference.GRPCInferenceService`` (the sidecar sends
    stream messages upstream as unary ModelInfer calls), so what Triton receives is exactly what the
    sidecar sent. ``calls`` holds ``(method, metadata dict, monotonic start time)`` per call.
    """

    def __init__(self, upstream: str, *, infer_delay_s: float = 0.0) -> None:
        import time

        import grpc
        from tritonclient.grpc import service_pb2

        self.calls: list[tuple[str, dict[str, str], float]] = []
        self.infer_delay_s = infer_delay_s
        self.infer_in_flight = 0
        self.most_infer_in_flight = 0  # the most ModelInfer calls in progress at once
        self.loop = LoopThread()
        methods = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
        service = "inference.GRPCInferenceService"

        async def build():
            channel = grpc.aio.insecure_channel(upstream)

            def handler(method: str):
                call = channel.unary_unary(f"/{service}/{method}")

                async def forward(request: bytes, context):
                    metadata = {k: (v if isinstance(v, str) else v.decode()) for k, v in context.invocation_metadata()}
                    self.calls.append((method, metadata, time.monotonic()))
                    infer = method == "ModelInfer"
                    if infer:
                        self.infer_in_flight += 1
                        self.most_infer_in_flight = max(self.most_infer_in_flight, self.infer_in_flight)
                    try:
                        if infer and self.infer_delay_s:
                            await asyncio.sleep(self.infer_delay_s)
                        return await call(request, timeout=30)
                    except grpc.aio.AioRpcError as error:
                        await context.abort(error.code(), error.details() or "")
                    finally:
                        self.infer_in_flight -= infer

                return grpc.unary_unary_rpc_method_handler(forward)

            handlers = {name: handler(name) for name, m in methods.items() if not m.client_streaming}
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, channel, port

        self.server, self.channel, self.port = self.loop.run(build())
        self.address = f"127.0.0.1:{self.port}"

    def methods(self) -> list[str]:
        return [method for method, _, _ in self.calls]

    def stop(self) -> None:
        self.loop.run(self.server.stop(None))
        self.loop.run(self.channel.close())
        self.loop.close()

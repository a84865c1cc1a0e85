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

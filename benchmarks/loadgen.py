"""Closed-loop KServe-v2 load generator (loopback only) for the proxy and memory benchmarks.

Why its own client instead of ``tritonclient`` or ``perf_analyzer``: the
client shares the 2-core machine with Triton and the sidecar, so it must cost
as little CPU per request as possible. It sends one request serialized once
up front as raw bytes and reads answers as raw bytes (no protobuf work per
call bar the streaming error check), on one asyncio loop with ``concurrency``
workers that each keep exactly one request in flight (closed loop, like
``perf_analyzer --concurrency-range``).

Every run is bounded three ways: ``duration_s``, ``max_requests`` and a
per-call deadline; targets must be loopback addresses.

    python -m benchmarks.loadgen --target 127.0.0.1:8001 --model identity --concurrency 16 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import grpc
import numpy as np

SERVICE = "/inference.GRPCInferenceService"
_LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def check_loopback(target: str) -> None:
    """Refuse anything but a loopback ``HOST:PORT``: the generator must never load another machine."""
    host = target.rsplit(":", 1)[0].strip("[]")
    if host in _LOOPBACK_NAMES:
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"load generator targets loopback addresses only, got {target!r}")


def infer_request_bytes(model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]) -> bytes:
    """A serialized ``ModelInferRequest`` with raw input contents (the fast path every client uses)."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model)
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype="FP32", shape=list(array.shape))
        request.raw_input_contents.append(np.ascontiguousarray(array, dtype="<f4").tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request.SerializeToString()


@dataclass
class LoadResult:
    """One closed-loop run: what was sent, how fast it came back."""

    target: str
    concurrency: int
    streaming: bool
    requests: int
    errors: int
    duration_s: float
    throughput_rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    first_error: str | None = None
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        data = asdict(self)
        data.pop("latencies_ms")
        return data


async def _unary_worker(call, payload: bytes, stop: float, budget: list[int], timeout: float,
                        latencies: list[float], errors: list[str]) -> None:
    while time.perf_counter() < stop and budget[0] > 0:
        budget[0] -= 1
        started = time.perf_counter()
        try:
            await call(payload, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            errors.append(f"{error.code().name}: {error.details()}")
            continue
        latencies.append(time.perf_counter() - started)


async def _stream_worker(method, payload: bytes, stop: float, budget: list[int], timeout: float,
                         latencies: list[float], errors: list[str]) -> None:
    from tritonclient.grpc import service_pb2

    stream = method(timeout=timeout + max(0.0, stop - time.perf_counter()))
    try:
        while time.perf_counter() < stop and budget[0] > 0:
            budget[0] -= 1
            started = time.perf_counter()
            await stream.write(payload)
            answer = await stream.read()
            if answer is grpc.aio.EOF:
                errors.append("stream closed early")
                return
            # Error check only: a ModelStreamInferResponse with error_message set is a failed message.
            parsed = service_pb2.ModelStreamInferResponse.FromString(answer)
            if parsed.error_message:
                errors.append(parsed.error_message)
                continue
            latencies.append(time.perf_counter() - started)
        await stream.done_writing()
    except grpc.aio.AioRpcError as error:
        errors.append(f"{error.code().name}: {error.details()}")


async def run_load(
    target: str,
    payload: bytes,
    *,
    concurrency: int,
    duration_s: float,
    max_requests: int = 1_000_000,
    streaming: bool = False,
    warmup_s: float = 0.5,
    timeout_s: float = 30.0,
) -> LoadResult:
    """Closed-loop load: ``concurrency`` workers, each one request in flight, for ``duration_s``."""
    check_loopback(target)
    if concurrency < 1 or duration_s <= 0 or max_requests < 1:
        raise ValueError("concurrency, duration and max_requests must be positive")
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    # One channel per 16 workers: a single HTTP/2 connection serializes frames on one socket.
    channels = [grpc.aio.insecure_channel(target, options=options + [("grpc.use_local_subchannel_pool", 1)])
                for _ in range(max(1, (concurrency + 15) // 16))]
    try:
        unary = [c.unary_unary(f"{SERVICE}/ModelInfer") for c in channels]
        stream = [c.stream_stream(f"{SERVICE}/ModelStreamInfer") for c in channels]

        async def phase(seconds: float, budget: int) -> tuple[list[float], list[str], float]:
            latencies: list[float] = []
            errors: list[str] = []
            remaining = [budget]
            started = time.perf_counter()
            stop = started + seconds
            workers = [
                (_stream_worker(stream[i % len(stream)], payload, stop, remaining, timeout_s, latencies, errors)
                 if streaming else
                 _unary_worker(unary[i % len(unary)], payload, stop, remaining, timeout_s, latencies, errors))
                for i in range(concurrency)
            ]
            await asyncio.gather(*workers)
            return latencies, errors, time.perf_counter() - started

        if warmup_s > 0:
            await phase(warmup_s, max_requests)
        latencies, errors, elapsed = await phase(duration_s, max_requests)
    finally:
        for channel in channels:
            await channel.close()
    ms = sorted(x * 1000.0 for x in latencies)

    def pct(q: float) -> float:
        return float(np.percentile(ms, q)) if ms else float("nan")

    return LoadResult(
        target=target,
        concurrency=concurrency,
        streaming=streaming,
        requests=len(ms),
        errors=len(errors),
        duration_s=elapsed,
        throughput_rps=len(ms) / elapsed if elapsed > 0 else 0.0,
        p50_ms=pct(50),
        p90_ms=pct(90),
        p99_ms=pct(99),
        mean_ms=statistics.fmean(ms) if ms else float("nan"),
        first_error=errors[0] if errors else None,
        latencies_ms=ms,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="loopback HOST:PORT")
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", default="pixels")
    parser.add_argument("--shape", default="1,3,224,224", help="input shape, comma separated")
    parser.add_argument("--output", action="append", default=None, help="requested output (repeatable)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--max-requests", type=int, default=1_000_000)
    parser.add_argument("--streaming", action="store_true")
    args = parser.parse_args(argv)
    shape = tuple(int(d) for d in args.shape.split(","))
    pixels = np.random.default_rng(0).random(shape, dtype=np.float32)
    payload = infer_request_bytes(args.model, {args.input: pixels}, tuple(args.output or ("logits",)))
    result = asyncio.run(run_load(args.target, payload, concurrency=args.concurrency, duration_s=args.duration,
                                  max_requests=args.max_requests, streaming=args.streaming))
    print(json.dumps(result.summary(), indent=2))


if __name__ == "__main__":
    main()

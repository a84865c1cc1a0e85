"""Latency of the bundled model direct vs through the advsentry sidecar, and batch sizes under concurrency.

Starts a real tritonserver (nvidia-pytriton's binary) on the exported bundled
model and an in-process sidecar; prints one JSON object. CPU numbers are
dominated by guided backpropagation inside Triton, which both the "direct with
feature_response" and the sidecar path pay.

    python benchmarks/sidecar_latency.py --requests 20 --concurrency 16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def _percentiles(samples: list[float]) -> dict[str, float]:
    values = np.asarray(samples) * 1000
    return {"p50_ms": round(float(np.percentile(values, 50)), 2), "p99_ms": round(float(np.percentile(values, 99)), 2),
            "n": len(samples)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--concurrent-requests", type=int, default=64)
    args = parser.parse_args()

    import tritonclient.grpc as grpcclient
    from e2e_triton import MODEL, RunningSidecar, export_bundled, infer_input, make_settings, outputs, photo_pixels

    from service.triton.server import TritonServer

    pixels = photo_pixels(1)
    with tempfile.TemporaryDirectory() as tmp, TritonServer(export_bundled(Path(tmp))) as triton:
        sidecar = RunningSidecar(make_settings(upstream=triton.grpc_address, max_batch_size=16))
        try:
            direct = grpcclient.InferenceServerClient(triton.grpc_address)
            via = grpcclient.InferenceServerClient(sidecar.address)

            def timed(client, names):
                started = time.perf_counter()
                client.infer(MODEL, [infer_input(pixels)], outputs=outputs(*names))
                return time.perf_counter() - started

            for client, names in ((direct, ("logits", "feature_response")), (via, ("logits",))):
                timed(client, names)  # warm-up
            result = {
                "direct_logits_only": _percentiles([timed(direct, ("logits",)) for _ in range(args.requests)]),
                "direct_logits_and_feature_response": _percentiles(
                    [timed(direct, ("logits", "feature_response")) for _ in range(args.requests)]),
                "sidecar": _percentiles([timed(via, ("logits",)) for _ in range(args.requests)]),
            }
            registry = sidecar.sidecar.metrics.registry
            before = _batch_counts(registry)
            clients = [grpcclient.InferenceServerClient(sidecar.address) for _ in range(args.concurrency)]
            with ThreadPoolExecutor(args.concurrency) as pool:
                started = time.perf_counter()
                latencies = list(pool.map(lambda i: timed(clients[i % args.concurrency], ("logits",)),
                                          range(args.concurrent_requests)))
                wall = time.perf_counter() - started
            after = _batch_counts(registry)
            result[f"sidecar_concurrency_{args.concurrency}"] = {
                **_percentiles(latencies),
                "throughput_rps": round(args.concurrent_requests / wall, 2),
                "detector_batch_size_histogram": {k: after.get(k, 0) - before.get(k, 0) for k in after},
            }
        finally:
            sidecar.stop()
    print(json.dumps(result, indent=2))


def _batch_counts(registry) -> dict[str, float]:
    counts: dict[str, float] = {}
    for metric in registry.collect():
        if metric.name == "advsentry_batch_size":
            previous = 0.0
            for sample in metric.samples:
                if sample.name.endswith("_bucket"):
                    counts[f"le_{sample.labels['le']}"] = sample.value - previous
                    previous = sample.value
    return counts


if __name__ == "__main__":
    main()

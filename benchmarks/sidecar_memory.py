"""Sidecar memory under a bounded load: RSS at start and end, growth per request.

A real Triton serves the identity-like model (``benchmarks.common.IDENTITY_MODEL_PY``:
cheap, so the sidecar handles as many requests as it can and a per-request
leak shows quickly); ``advsentry serve`` fronts it as a child process; the
load generator (``benchmarks.loadgen``, loopback, closed loop) drives it for
``--duration`` seconds in slices, alternating unary and streaming, and the
sidecar's RSS is read from ``/proc`` after each slice. Growth per request is
the least-squares slope of RSS over requests served, fitted after the first
fifth of the run (allocator pools and caches fill during warm-up).

Goal: RSS stable (end − start small, slope ≈ 0 bytes per request). The full
run measures both scoring paths, each for ``--duration``: the default
(entropies computed in Triton, combined inline) and ``--entropy-in sidecar``
(maps over the wire, entropies in the sidecar's micro-batcher).

    python -m benchmarks.sidecar_memory                 # 5 minutes, writes results/sidecar_memory.json
    python -m benchmarks.sidecar_memory --smoke         # seconds; used by the test suite
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    RESULTS_DIR,
    SidecarProcess,
    load_average,
    process_rss_mib,
    write_identity_repository,
    write_result,
)
from benchmarks.loadgen import infer_request_bytes, run_load


def run(duration_s: float, slice_s: float, concurrency: int, entropy_in: str = "auto") -> dict[str, Any]:
    """``entropy_in``: ``auto`` (the default path: Triton computes the entropies) or ``sidecar`` (maps path)."""
    from detector import Detector
    from detector.detector import DEFAULT_ARTIFACT_PATH
    from service.triton.server import TritonServer

    detector = Detector.default()
    pixels = np.random.default_rng(0).random((1, 3, 16, 16), dtype=np.float32)
    payload = infer_request_bytes("identity", {"pixels": pixels}, ("logits",))
    samples: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = write_identity_repository(Path(tmp), detector.feature_outputs, entropy_output=detector.entropy_output)
        args = ("--policy", "annotate", "--calibration", str(DEFAULT_ARTIFACT_PATH), "--entropy-in", entropy_in)
        with TritonServer(repo) as triton, SidecarProcess(triton.grpc_address, args=args) as sidecar:
            rss_idle = process_rss_mib(sidecar.pid)
            served = errors = 0
            started = time.monotonic()
            streaming = False
            while time.monotonic() - started < duration_s:
                result = asyncio.run(run_load(sidecar.address, payload, concurrency=concurrency, duration_s=slice_s,
                                              warmup_s=0.0, streaming=streaming))
                served += result.requests
                errors += result.errors
                streaming = not streaming
                samples.append({"t_s": time.monotonic() - started, "requests": served,
                                "rss_mib": process_rss_mib(sidecar.pid)})
    if errors:
        raise AssertionError(f"{errors} requests failed during the memory run")
    fit_from = max(0, len(samples) // 5)
    tail = samples[fit_from:]
    if len(tail) >= 2 and tail[-1]["requests"] > tail[0]["requests"]:
        x = np.array([s["requests"] for s in tail], dtype=np.float64)
        y = np.array([s["rss_mib"] for s in tail], dtype=np.float64) * 1024 * 1024
        slope = float(np.polyfit(x, y, 1)[0])
    else:
        slope = float("nan")
    return {
        "entropy_in": entropy_in,
        "concurrency": concurrency,
        "duration_s": duration_s,
        "requests": served,
        "rss_idle_mib": rss_idle,
        "rss_start_mib": samples[0]["rss_mib"],
        "rss_end_mib": samples[-1]["rss_mib"],
        "rss_max_mib": max(s["rss_mib"] for s in samples),
        "growth_after_warmup_mib": tail[-1]["rss_mib"] - tail[0]["rss_mib"],
        "bytes_per_request_slope": slope,
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a few seconds")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load (bounded)")
    parser.add_argument("--slice", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    start_load = load_average()
    if args.smoke:
        result = run(2.0, 0.5, 4)
        path = write_result("sidecar_memory_smoke", {"smoke": True, "load_average_start": start_load, **result},
                            args.results_dir)
    else:
        # The default path first (its numbers are the top-level ones), then the maps path, which
        # allocates tensors per batch, each for the full duration.
        result = run(args.duration, args.slice, args.concurrency)
        maps_path = run(args.duration, args.slice, args.concurrency, entropy_in="sidecar")
        path = write_result("sidecar_memory", {"smoke": False, "load_average_start": start_load, **result,
                                               "maps_path": maps_path}, args.results_dir)
    print(f"RSS idle {result['rss_idle_mib']:.1f} MiB, start {result['rss_start_mib']:.1f}, end "
          f"{result['rss_end_mib']:.1f} after {result['requests']} requests; slope "
          f"{result['bytes_per_request_slope']:.2f} B/request")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

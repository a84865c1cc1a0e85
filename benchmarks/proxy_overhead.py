"""Proxy overhead: the sidecar (annotate mode) in front of a real Triton vs calling Triton directly.

Two model set-ups, each on a real ``tritonserver`` (nvidia-pytriton's binary):

- ``identity``: a trivial Python-backend model (``benchmarks.common.IDENTITY_MODEL_PY``)
  whose ``logits`` are the first ten input values, whose feature maps are the
  3×16×16 input itself and whose in-Triton entropy output is the first F input
  values. Triton costs almost nothing, so what a proxy adds is visible.
  Goal: added p50 ≤ 1 ms and throughput ≥ 90 % of direct. Four targets:
  ``direct``; ``sidecar`` (the default: Triton computes the entropies, the
  sidecar combines F floats); ``sidecar_maps`` (``--entropy-in sidecar``: maps
  over the wire, entropies in the sidecar's micro-batcher, the pre-change
  architecture); ``python_floor`` (``benchmarks.null_proxy``: a byte forwarder
  with no logic on the same ``grpc.aio`` stack, the least any Python proxy
  costs), so the overhead splits into transport and advsentry's own work;
  and, where an ``nginx`` binary exists, ``native_floor`` (nginx
  ``grpc_pass``, one worker, unary only): the least one more loopback hop
  through a native proxy costs on this machine.
- ``efficientnet-lite0``: the bundled model as ``advsentry export-model`` writes it.
  Two references: direct asking ``logits`` only (what a client pays without
  advsentry: one forward pass) and direct asking ``logits`` + the entropy
  output (what Triton itself must compute for detection: forward + guided
  backward + entropies), so the proxy's own overhead and the whole price of
  protection are both shown.

For each concurrency (1, 16, 64) and mode (unary, streaming), the targets
alternate ``--repeats`` times (closed loop, ``benchmarks.loadgen``), each after
a warm-up; medians and spreads of p50 latency and throughput are reported.
Proxies run as child processes (``advsentry serve --upstream`` with the
shipped default calibration, policy annotate).

    python -m benchmarks.proxy_overhead            # full run, writes results/proxy_overhead.json
    python -m benchmarks.proxy_overhead --smoke    # seconds; used by the test suite
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    RESULTS_DIR,
    NginxProcess,
    NullProxyProcess,
    SidecarProcess,
    load_average,
    summarize,
    write_identity_repository,
    write_result,
)
from benchmarks.loadgen import infer_request_bytes, run_load

IDENTITY_SIZE = 16


def _check_annotated(address: str, payload: bytes) -> dict[str, Any]:
    """One call through the sidecar must come back annotated (a benchmark of a broken proxy is worthless)."""
    import grpc
    from tritonclient.grpc import service_pb2

    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        response = service_pb2.ModelInferResponse.FromString(call(payload, timeout=60))
    parameters = {k: v.WhichOneof("parameter_choice") and getattr(v, v.WhichOneof("parameter_choice"))
                  for k, v in response.parameters.items()}
    if "advsentry_score" not in parameters:
        raise AssertionError(f"sidecar response is not annotated: {parameters}")
    if [o.name for o in response.outputs] != ["logits"]:
        raise AssertionError(f"sidecar did not strip the feature maps: {[o.name for o in response.outputs]}")
    return parameters


class _Stack:
    """Triton + the proxies under test (child processes) that can be restarted together.

    Why: Triton 2.51's Python backend (nvidia-pytriton 0.7.0) occasionally
    segfaults under sustained streaming load on this machine, also when called
    directly with no advsentry in the path. A run that hits a dead Triton is
    discarded, all processes are restarted and the run is repeated; the
    restarts are counted in the results.
    """

    def __init__(self, repository: Path, proxies: dict[str, Callable[[str], Any]]) -> None:
        self.repository = repository
        self.proxies = proxies  # name -> factory(upstream address) of a SidecarProcess-like context manager
        self.restarts = 0
        self.triton: Any = None
        self.running: dict[str, Any] = {}

    def start(self) -> "_Stack":
        from service.triton.server import TritonServer

        self.triton = TritonServer(self.repository).start()
        for name, factory in self.proxies.items():
            self.running[name] = factory(self.triton.grpc_address).__enter__()
        return self

    def stop(self) -> None:
        for proxy in self.running.values():
            proxy.__exit__()
        self.running = {}
        if self.triton is not None:
            self.triton.stop()

    def restart(self) -> None:
        self.stop()
        self.restarts += 1
        self.start()

    def address(self, name: str) -> str:
        return self.running[name].address if name in self.running else self.triton.grpc_address


def _measure(stack: _Stack, targets: dict[str, bytes], concurrencies: list[int], modes: list[bool], *, repeats: int,
             duration_s: float, warmup_s: float, max_requests: int,
             unary_only: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """``targets``: name ("sidecar" or a direct reference) → request payload."""
    rows = []
    for concurrency in concurrencies:
        for streaming in modes:
            active = {name: payload for name, payload in targets.items() if not (streaming and name in unary_only)}
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in active}
            for _ in range(repeats):
                for name, payload in active.items():  # interleaved: drift hits all alike
                    for attempt in range(3):
                        result = asyncio.run(run_load(stack.address(name), payload, concurrency=concurrency,
                                                      duration_s=duration_s, warmup_s=warmup_s,
                                                      max_requests=max_requests, streaming=streaming))
                        if not result.errors:
                            break
                        if stack.triton.is_alive() or attempt == 2:
                            raise AssertionError(f"{name} c={concurrency}: {result.errors} errors, "
                                                 f"e.g. {result.first_error}")
                        print(f"Triton died during {name} c={concurrency}; restarting", flush=True)
                        stack.restart()
                    runs[name].append(result.summary())
            row: dict[str, Any] = {"concurrency": concurrency, "mode": "streaming" if streaming else "unary"}
            for name, results in runs.items():
                row[name] = {
                    "p50_ms": summarize([r["p50_ms"] for r in results]),
                    "p99_ms": summarize([r["p99_ms"] for r in results]),
                    "throughput_rps": summarize([r["throughput_rps"] for r in results]),
                    "requests": sum(r["requests"] for r in results),
                }
            rows.append(row)
            print(f"c={concurrency:3d} {row['mode']:9s} " + "  ".join(
                f"{n}: p50 {row[n]['p50_ms']['median']:.2f} ms, {row[n]['throughput_rps']['median']:.0f} rps"
                for n in active), flush=True)
    return rows


def _compare(rows: list[dict[str, Any]], reference: str, via: str = "sidecar") -> None:
    for row in rows:
        if via not in row or reference not in row:  # a unary-only reference
            continue
        ref, through = row[reference], row[via]
        key = f"vs_{reference}" if via == "sidecar" else f"{via}_vs_{reference}"
        row[key] = {
            "added_p50_ms": through["p50_ms"]["median"] - ref["p50_ms"]["median"],
            "throughput_ratio": through["throughput_rps"]["median"] / ref["throughput_rps"]["median"],
        }


def _proxies(sidecar_args: tuple[str, ...], *, floor: bool, maps_path: bool,
             native: bool = False) -> dict[str, Callable[[str], Any]]:
    proxies: dict[str, Callable[[str], Any]] = {"sidecar": lambda upstream: SidecarProcess(upstream, args=sidecar_args)}
    if maps_path:
        proxies["sidecar_maps"] = lambda upstream: SidecarProcess(upstream, args=(*sidecar_args, "--entropy-in", "sidecar"))
    if floor:
        proxies["python_floor"] = lambda upstream: NullProxyProcess(upstream)
    if native:
        proxies["native_floor"] = lambda upstream: NginxProcess(upstream)
    return proxies


def run_identity(concurrencies: list[int], repeats: int, duration_s: float, warmup_s: float,
                 sidecar_args: tuple[str, ...], *, floor: bool = True, maps_path: bool = True,
                 native: bool = False) -> dict[str, Any]:
    from detector import Detector

    detector = Detector.default()
    pixels = np.random.default_rng(0).random((1, 3, IDENTITY_SIZE, IDENTITY_SIZE), dtype=np.float32)
    payload = infer_request_bytes("identity", {"pixels": pixels}, ("logits",))
    proxies = _proxies(sidecar_args, floor=floor, maps_path=maps_path, native=native)
    with tempfile.TemporaryDirectory() as tmp:
        repository = write_identity_repository(Path(tmp), detector.feature_outputs, size=IDENTITY_SIZE,
                                               entropy_output=detector.entropy_output)
        stack = _Stack(repository, proxies).start()
        try:
            annotation = _check_annotated(stack.address("sidecar"), payload)
            if maps_path:
                _check_annotated(stack.address("sidecar_maps"), payload)
            targets = {"direct": payload, **{name: payload for name in proxies}}
            rows = _measure(stack, targets, concurrencies, [False, True], repeats=repeats, duration_s=duration_s,
                            warmup_s=warmup_s, max_requests=1_000_000, unary_only=frozenset({"native_floor"}))
        finally:
            stack.stop()
    _compare(rows, "direct")
    for name in proxies:
        if name != "sidecar":
            _compare(rows, "direct", via=name)
    if floor:
        _compare(rows, "python_floor")
    if native:
        _compare(rows, "native_floor")
    return {"model": "identity", "input_shape": list(pixels.shape), "feature_outputs": list(detector.feature_outputs),
            "entropy_output": detector.entropy_output, "annotation_example": annotation,
            "triton_restarts": stack.restarts, "rows": rows}


def run_efficientnet(concurrencies: list[int], repeats: int, duration_s: float, warmup_s: float,
                     sidecar_args: tuple[str, ...]) -> dict[str, Any]:
    from detector import Detector
    from detector.samples import full_photo_samples, to_tensor
    from service.triton.export import export_model_repository

    detector = Detector.default()
    pixels = to_tensor([full_photo_samples()[1].pixels()]).numpy()
    logits_only = infer_request_bytes("efficientnet-lite0", {"pixels": pixels}, ("logits",))
    with_entropies = infer_request_bytes("efficientnet-lite0", {"pixels": pixels}, ("logits", detector.entropy_output))
    with tempfile.TemporaryDirectory() as tmp:
        export_model_repository(Path(tmp))
        stack = _Stack(Path(tmp), _proxies(sidecar_args, floor=True, maps_path=False)).start()
        try:
            annotation = _check_annotated(stack.address("sidecar"), logits_only)
            # The floor forwards what the sidecar sends upstream (logits + entropies), so the two are
            # compared on the same Triton work; the difference is advsentry's own per-request cost.
            targets = {"direct_logits": logits_only, "direct_with_entropies": with_entropies, "sidecar": logits_only,
                       "python_floor": with_entropies}
            rows = _measure(stack, targets, concurrencies, [False, True], repeats=repeats, duration_s=duration_s,
                            warmup_s=warmup_s, max_requests=100_000)
        finally:
            stack.stop()
    _compare(rows, "direct_logits")
    _compare(rows, "direct_with_entropies")
    _compare(rows, "direct_with_entropies", via="python_floor")
    _compare(rows, "python_floor")
    return {"model": "efficientnet-lite0", "input_shape": list(pixels.shape), "feature_outputs": list(detector.feature_outputs),
            "entropy_output": detector.entropy_output, "annotation_example": annotation,
            "triton_restarts": stack.restarts, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="seconds: concurrency 1 and 4, one short repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per identity-model run")
    parser.add_argument("--efficientnet-duration", type=float, default=10.0)
    parser.add_argument("--skip-efficientnet", action="store_true")
    parser.add_argument("--no-native", action="store_true", help="skip the nginx (native proxy) floor")
    parser.add_argument("--sidecar-arg", action="append", default=[], help="extra `advsentry serve` argument")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    from detector.detector import DEFAULT_ARTIFACT_PATH

    # disclosure score: the annotation check reads the score, and the cost measured stays the full annotation's
    sidecar_args = ("--policy", "annotate", "--calibration", str(DEFAULT_ARTIFACT_PATH), "--disclosure", "score",
                    *args.sidecar_arg)
    start_load = load_average()
    if args.smoke:
        identity = run_identity([1, 4], 1, 0.5, 0.2, sidecar_args, maps_path=False)
        payload: dict[str, Any] = {"smoke": True, "load_average_start": start_load, "identity": identity}
        path = write_result("proxy_overhead_smoke", payload, args.results_dir)
    else:
        native = shutil.which("nginx") is not None and not args.no_native
        if not native:
            print("nginx not found (or --no-native): the native-proxy floor is not measured", flush=True)
        payload = {"smoke": False, "load_average_start": start_load,
                   "run_settings": {"repeats": args.repeats, "duration_s": args.duration,
                                    "efficientnet_duration_s": args.efficientnet_duration, "native_floor": native},
                   "identity": run_identity([1, 16, 64], args.repeats, args.duration, 1.0, sidecar_args,
                                            native=native)}
        if not args.skip_efficientnet:
            payload["efficientnet"] = run_efficientnet([1, 16, 64], 1, args.efficientnet_duration, 3.0, sidecar_args)
        path = write_result("proxy_overhead", payload, args.results_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Black-box mode's cost: the sidecar's signal computation, its extra upstream calls, and the latency a client sees.

Black-box mode (issue 21) protects a model advsentry did not export: the
sidecar computes the detector's signals from the model's logits and the
request's pixels. Two shipped detectors:

- ``blackbox``: no extra upstream call; its whole cost is the signal
  computation in the sidecar;
- ``blackbox-squeeze``: also Feature Squeezing, whose two squeezed copies go
  upstream as two more ModelInfer calls beside the request's own, so the
  model does three forward passes per request.

Measured here: (1) per image at batch 1 and 16, the signal computation
(squeezing the copies included) against the bundled model's plain forward
pass (what serving without advsentry costs), in this process; (2) end to end
through a real ``tritonserver`` serving the logits-only model
(:mod:`benchmarks.logits_only`) and a real ``advsentry serve``: the latency of
sequential single-image requests sent directly to Triton, through the
sidecar with ``blackbox`` and with ``blackbox-squeeze``, and the model
executions Triton counted per request.

    python -m benchmarks.blackbox_cost            # writes results/blackbox_cost.json
    python -m benchmarks.blackbox_cost --smoke    # seconds; used by the test suite
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, SidecarProcess, load_average, time_repeated, write_result

DETECTORS = ("blackbox", "blackbox-squeeze")
MODEL = "logits-only"


def signal_rows(batches: tuple[int, ...], repeats: int) -> dict[str, list[dict[str, Any]]]:
    """Per detector and batch: the sidecar's computation beside one plain forward pass."""
    from detector import Detector
    from detector.models import load_bundled_model
    from detector.samples import full_photo_samples, to_tensor

    model = load_bundled_model()
    photos = to_tensor([s.pixels() for s in full_photo_samples()])
    found: dict[str, list[dict[str, Any]]] = {}
    for name in DETECTORS:
        detector = Detector.named(name)
        transforms = detector.outside_transforms()
        rows = []
        for batch in batches:
            pixels = photos[torch.arange(batch) % len(photos)]
            with torch.no_grad():
                logits = model(pixels)
                copies = {key: model(transform(pixels)).numpy() for key, transform in transforms.items()}
            pixels_np, logits_np = pixels.numpy(), logits.numpy()

            def forward() -> None:
                with torch.no_grad():
                    model(pixels)

            def sidecar() -> None:  # what the sidecar computes: the squeezed copies, then the signals
                with torch.no_grad():
                    for transform in transforms.values():
                        transform(pixels)
                detector.score_entropies(detector.outside_entropies(pixels_np, logits_np, copies))

            plain = time_repeated(forward, repeats=repeats)
            signals = time_repeated(sidecar, repeats=repeats)
            rows.append({"batch": batch, "plain_forward": plain, "blackbox_signals": signals,
                         "ratio": signals["median_s"] / plain["median_s"],
                         "signals_ms_per_image": 1000 * signals["median_s"] / batch,
                         "upstream_forward_passes": 1 + len(transforms)})
            print(f"{name} batch {batch}: model {1000 * plain['median_s'] / batch:.1f} ms/image, sidecar signals "
                  f"{1000 * signals['median_s'] / batch:.2f} ms/image ({signals['median_s'] / plain['median_s']:.3f}x), "
                  f"{len(transforms)} extra upstream call(s)")
        found[name] = rows
    return found


def _latency(samples: list[float]) -> dict[str, float]:
    values = np.asarray(samples)
    return {"p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90)),
            "mean": float(values.mean()), "n": int(len(values))}


def _inferences(client: Any) -> tuple[int, int]:
    stats = client.get_inference_statistics(MODEL).model_stats[0]
    return int(stats.inference_count), int(stats.execution_count)


def served_latency(requests: int, warmup: int) -> dict[str, Any]:
    """Sequential single-image requests: direct to Triton, and through the sidecar with each detector."""
    import tritonclient.grpc as grpcclient
    import yaml

    from benchmarks.logits_only import write_logits_only_model
    from detector.samples import full_photo_samples, to_tensor
    from service.triton.server import TritonServer

    pixels = to_tensor([full_photo_samples()[1].pixels()]).numpy()
    tensor = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    asked = [grpcclient.InferRequestedOutput("logits")]
    found: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="advsentry-bbcost-") as tmp:
        root = Path(tmp)
        write_logits_only_model(root / "repo", MODEL)
        triton = TritonServer(root / "repo").start()
        try:
            direct = grpcclient.InferenceServerClient(triton.grpc_address)
            targets: list[tuple[str, Any]] = [("direct", None)]
            for name in DETECTORS:
                config = root / f"{name}.yaml"
                config.write_text(yaml.safe_dump({"models": {MODEL: {"calibration": name}}}))
                targets.append((name, config))
            for label, config in targets:
                sidecar = SidecarProcess(triton.grpc_address, args=("--config", str(config))) if config else None
                try:
                    address = sidecar.__enter__().address if sidecar else triton.grpc_address
                    client = grpcclient.InferenceServerClient(address)
                    for _ in range(warmup):
                        client.infer(MODEL, [tensor], outputs=asked)
                    before = _inferences(direct)
                    samples = []
                    for _ in range(requests):
                        start = time.perf_counter()
                        answer = client.infer(MODEL, [tensor], outputs=asked)
                        samples.append(time.perf_counter() - start)
                    after = _inferences(direct)
                    params = answer.get_response().parameters
                    found[label] = {
                        "latency": _latency(samples),
                        "model_inferences_per_request": (after[0] - before[0]) / requests,
                        "model_executions_per_request": (after[1] - before[1]) / requests,
                        "scored": "advsentry_calibration" in params,
                    }
                finally:
                    if sidecar is not None:
                        sidecar.__exit__()
                print(f"{label}: p50 {1000 * found[label]['latency']['p50']:.1f} ms, "
                      f"{found[label]['model_inferences_per_request']:.1f} model inferences per request")
        finally:
            triton.stop()
    for label in DETECTORS:
        found[label]["added_p50_ms"] = 1000 * (found[label]["latency"]["p50"] - found["direct"]["latency"]["p50"])
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="batch 1, one repetition, a few served requests (seconds)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--requests", type=int, default=60, help="served requests per target")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    from detector import Detector

    started = load_average()
    signals = signal_rows((1,) if args.smoke else (1, 16), 1 if args.smoke else args.repeats)
    served = served_latency(3 if args.smoke else args.requests, 1 if args.smoke else 5)
    detectors = {}
    for name in DETECTORS:
        detector = Detector.named(name)
        detectors[name] = {"calibration_id": detector.calibration_id, "signals": list(detector.features),
                           "extra_upstream_calls": len(detector.outside_transforms()), "rows": signals[name]}
    name = "blackbox_cost_smoke" if args.smoke else "blackbox_cost"
    write_result(name, {"smoke": args.smoke, "load_average_start": started, **detectors["blackbox"],
                        "detectors": detectors, "served": served}, args.results_dir)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()

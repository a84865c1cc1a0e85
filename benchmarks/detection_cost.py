"""Detection cost: feature maps + entropy per image vs the bundled model's plain forward pass.

Whatever ``Detector.default()`` is (one guided-backprop map, or several maps
and a combiner), the cost of detecting one batch is broken into:

- ``forward_autograd``: the model's forward pass with autograd on (what the
  guided backward needs; the logits come from this same pass);
- ``guided_backward``: the rest of ``extract_maps`` (guided rectifier mode,
  one backward per distinct seed layer, any captured activations, and the
  other signals: squeezed copies' forward passes, logit and spectral statistics);
- ``gray``: feature maps → quantized gray levels, all entropy maps;
- ``entropy``: average local spatial entropy of the quantized maps, all entropy maps;
- ``combine``: the combiner over the per-map entropies;
- ``serialization``: the maps' trip from the Triton backend to the sidecar
  (tensor → numpy → ``raw_output_contents`` of a ``ModelInferResponse`` →
  bytes → parsed → the sidecar's float32 view and copy).

Reference: ``model(pixels)`` under ``torch.no_grad()`` (what serving without
advsentry costs). Goals: total ≤ 3× reference at batch 1 and batch 16 (a
detector of entropies only), ≤ 4× at batch 16 for one with other signals
(issue 11: each squeezer is one more forward pass).

    python -m benchmarks.detection_cost            # writes results/detection_cost.json
    python -m benchmarks.detection_cost --smoke    # seconds; used by the test suite
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, load_average, time_repeated, write_result


def _serialize_round_trip(maps: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Backend side: numpy + raw bytes in a response; sidecar side: parse, view, copy (as ``ModelDetector.score``)."""
    from tritonclient.grpc import service_pb2

    from service.core.requests import output_array

    response = service_pb2.ModelInferResponse(model_name="m")
    for name, tensor in maps.items():
        array = tensor.detach().to("cpu").float().numpy()
        response.outputs.add(name=name, datatype="FP32", shape=list(array.shape))
        response.raw_output_contents.append(array.tobytes())
    parsed = service_pb2.ModelInferResponse.FromString(response.SerializeToString())
    return {name: np.array(output_array(parsed, name), dtype=np.float32, copy=True) for name in maps}


def run(batches: list[int], repeats: int, *, image_size: int = 224) -> list[dict[str, Any]]:
    from detector import Detector, ScoreConfig
    from detector.entropy import average_local_spatial_entropy, gray_levels
    from detector.features import extract_maps
    from detector.models import load_bundled_model
    from detector.samples import full_photo_samples, to_tensor

    detector = Detector.default()
    model = load_bundled_model("cpu")
    photos = to_tensor([sample.pixels() for sample in full_photo_samples()])
    rows = []
    for batch in batches:
        index = torch.arange(batch) % photos.shape[0]
        pixels = photos[index][..., :image_size, :image_size].contiguous()

        def plain() -> torch.Tensor:
            with torch.no_grad():
                return model(pixels)

        def forward_autograd() -> torch.Tensor:
            with torch.enable_grad():
                return model(pixels.detach().clone().requires_grad_(True))

        def features() -> dict[str, torch.Tensor]:
            return extract_maps(model, pixels, detector.features)[0]

        maps = features()
        entropy_maps = {name: config for name, config in detector.features.items() if isinstance(config, ScoreConfig)}
        levels = {name: gray_levels(maps[name], config) for name, config in entropy_maps.items()}
        entropies = detector.entropies(maps)
        timings = {
            "plain_forward": time_repeated(plain, repeats=repeats),
            "forward_autograd": time_repeated(forward_autograd, repeats=repeats),
            "feature_maps": time_repeated(features, repeats=repeats),
            "gray": time_repeated(lambda: [gray_levels(maps[n], c) for n, c in entropy_maps.items()], repeats=repeats),
            "entropy": time_repeated(lambda: [average_local_spatial_entropy(levels[n], c) for n, c in entropy_maps.items()],
                                     repeats=repeats),
            "combine": time_repeated(lambda: detector.combiner.combine(entropies), repeats=repeats),
            "serialization": time_repeated(lambda: _serialize_round_trip(maps), repeats=repeats),
        }
        median = {name: t["median_s"] for name, t in timings.items()}
        breakdown_s = {
            "forward_autograd": median["forward_autograd"],
            "guided_backward": max(0.0, median["feature_maps"] - median["forward_autograd"]),
            "gray": median["gray"],
            "entropy": median["entropy"],
            "combine": median["combine"],
            "serialization": median["serialization"],
        }
        total = sum(breakdown_s.values())
        row = {
            "batch": batch,
            "maps": {name: list(maps[name].shape[1:]) for name in maps},
            "timings": timings,
            "breakdown_ms_per_image": {k: v / batch * 1000 for k, v in breakdown_s.items()},
            "plain_forward_ms_per_image": median["plain_forward"] / batch * 1000,
            "detection_ms_per_image": total / batch * 1000,
            "ratio_to_plain_forward": total / median["plain_forward"],
        }
        rows.append(row)
        parts = ", ".join(f"{k} {v:.1f}" for k, v in row["breakdown_ms_per_image"].items())
        print(f"batch {batch:3d}: plain forward {row['plain_forward_ms_per_image']:.1f} ms/img, detection "
              f"{row['detection_ms_per_image']:.1f} ms/img = {row['ratio_to_plain_forward']:.2f}x ({parts})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="batch 1, one repetition (seconds)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    from detector import Detector

    torch.manual_seed(0)
    start_load = load_average()
    detector = Detector.default()
    payload: dict[str, Any] = {
        "smoke": args.smoke,
        "load_average_start": start_load,
        "detector": {"features": {n: c.to_dict() for n, c in detector.features.items()},
                     "combiner": detector.combiner.to_dict(), "calibration": detector.calibration_id},
    }
    if args.smoke:
        # Full-size images: the default detector reads the head conv's 7×7 maps,
        # which a smaller input would shrink below the 3×3 patch.
        payload["rows"] = run([1], 1)
        path = write_result("detection_cost_smoke", payload, args.results_dir)
    else:
        payload["rows"] = run([1, 16], args.repeats)
        path = write_result("detection_cost", payload, args.results_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Black-box mode's cost: the sidecar's signal computation per image beside the model's own forward pass.

Black-box mode (issue 21) protects a model advsentry did not export: the
sidecar computes the shipped ``blackbox`` detector's signals from the model's
logits and the request's pixels. It makes **no** extra upstream call (its
signals need no second pass through the model), so its whole cost is this
computation in the sidecar, measured here per image at batch 1 and 16 against
the bundled model's plain forward pass (what serving without advsentry costs).

    python -m benchmarks.blackbox_cost            # writes results/blackbox_cost.json
    python -m benchmarks.blackbox_cost --smoke    # seconds; used by the test suite
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, time_repeated, write_result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="batch 1, one repetition (seconds)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    from detector import Detector
    from detector.models import load_bundled_model
    from detector.samples import full_photo_samples, to_tensor

    detector = Detector.named("blackbox")
    model = load_bundled_model()
    photos = to_tensor([s.pixels() for s in full_photo_samples()])
    rows = []
    for batch in ((1,) if args.smoke else (1, 16)):
        pixels = photos[torch.arange(batch) % len(photos)]
        with torch.no_grad():
            logits = model(pixels)
        pixels_np, logits_np = pixels.numpy(), logits.numpy()
        repeats = 1 if args.smoke else args.repeats

        def forward() -> None:
            with torch.no_grad():
                model(pixels)

        plain = time_repeated(forward, repeats=repeats)
        signals = time_repeated(lambda: detector.score_entropies(detector.outside_entropies(pixels_np, logits_np)),
                                repeats=repeats)
        rows.append({"batch": batch, "plain_forward": plain, "blackbox_signals": signals,
                     "ratio": signals["median_s"] / plain["median_s"],
                     "signals_ms_per_image": 1000 * signals["median_s"] / batch})
        print(f"batch {batch}: model {1000 * plain['median_s'] / batch:.1f} ms/image, black-box signals "
              f"{1000 * signals['median_s'] / batch:.2f} ms/image ({signals['median_s'] / plain['median_s']:.3f}x)")
    name = "blackbox_cost_smoke" if args.smoke else "blackbox_cost"
    write_result(name, {"smoke": args.smoke, "calibration_id": detector.calibration_id,
                        "signals": list(detector.features), "extra_upstream_calls": 0, "rows": rows},
                 args.results_dir)


if __name__ == "__main__":
    main()

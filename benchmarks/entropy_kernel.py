"""Entropy kernel throughput: advsentry's batched entropy vs ``skimage.filters.rank.entropy``.

Same 224×224 8-bit maps for both; skimage computes the per-pixel entropy map
image by image and we take its interior mean, advsentry computes the average
local spatial entropy of the whole batch in one call. Results must agree to
1e-5 (checked here on every run) before any time is reported.

    python -m benchmarks.entropy_kernel            # full run, writes results/entropy_kernel.json
    python -m benchmarks.entropy_kernel --smoke    # seconds; used by the test suite
"""

from __future__ import annotations

import argparse
import resource
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, load_average, time_repeated, write_result
from detector import ScoreConfig, average_local_spatial_entropy


def _skimage_mean_entropy(maps: np.ndarray, patch: int) -> np.ndarray:
    from skimage.filters.rank import entropy
    from skimage.morphology import footprint_rectangle

    r = patch // 2
    footprint = footprint_rectangle((patch, patch))
    return np.array([entropy(m, footprint)[r:-r, r:-r].mean() for m in maps])


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(batches: list[int], levels_list: list[int], repeats: int, size: int, device: str, results_dir: Path, name: str) -> dict:
    start_load = load_average()
    rng = np.random.default_rng(0)
    config = ScoreConfig()
    rows = []
    for batch in batches:
        # Smooth-ish random maps (a blurred field, quantized), like real gray-level responses.
        field = rng.standard_normal((batch, size, size)).cumsum(axis=1).cumsum(axis=2)
        field = (field - field.min(axis=(1, 2), keepdims=True)) / np.ptp(field, axis=(1, 2), keepdims=True)
        maps_u8 = np.clip(field * 256, 0, 255).astype(np.uint8)
        ours_input = torch.from_numpy(maps_u8).to(device)
        # Memory per batch: peak RSS growth of the *first* call at this batch size (the
        # kernel works a chunk of images at a time, so this stays flat as batches grow).
        rss_before = _peak_rss_mib()
        ours = average_local_spatial_entropy(ours_input, config).cpu().numpy()
        rss_growth = _peak_rss_mib() - rss_before
        reference = _skimage_mean_entropy(maps_u8, config.patch)
        max_error = float(np.abs(ours - reference).max())
        if max_error > 1e-5:
            raise AssertionError(f"advsentry and skimage disagree by {max_error} at batch {batch}")
        sync = torch.cuda.synchronize if device.startswith("cuda") else None
        ours_time = time_repeated(lambda: average_local_spatial_entropy(ours_input, config), repeats=repeats, sync=sync)
        skimage_time = time_repeated(lambda: _skimage_mean_entropy(maps_u8, config.patch), repeats=max(1, repeats // 2))
        rows.append({
            "batch": batch,
            "device": device,
            "advsentry": ours_time,
            "skimage": skimage_time,
            "advsentry_maps_per_s": batch / ours_time["median_s"],
            "skimage_maps_per_s": batch / skimage_time["median_s"],
            "speedup": skimage_time["median_s"] / ours_time["median_s"],
            "max_abs_error": max_error,
            "peak_rss_mib": _peak_rss_mib(),
            "peak_rss_growth_mib": rss_growth,
            "input_mib": maps_u8.nbytes / 2**20,
        })
        print(f"batch {batch:4d}: advsentry {rows[-1]['advsentry_maps_per_s']:9.1f} maps/s, "
              f"skimage {rows[-1]['skimage_maps_per_s']:7.1f} maps/s, speedup {rows[-1]['speedup']:.1f}x, "
              f"max error {max_error:.1e}")
    # Independence from the number of gray levels: same maps, more levels.
    level_rows = []
    maps = torch.rand(batches[0], size, size, device=device)
    for levels in levels_list:
        cfg = ScoreConfig(levels=levels, normalize="none")
        sync = torch.cuda.synchronize if device.startswith("cuda") else None
        timing = time_repeated(lambda: average_local_spatial_entropy(maps, cfg), repeats=repeats, sync=sync)
        level_rows.append({"levels": levels, "batch": batches[0], **timing})
        print(f"levels {levels:6d}: {timing['median_s'] * 1000:.1f} ms per batch of {batches[0]}")
    return write_result(name, {"config": config.to_dict(), "size": size, "load_average_start": start_load,
                               "torch_threads": torch.get_num_threads(), "rows": rows, "levels": level_rows},
                        results_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: the GPU row stays 'not measured'")
    if args.smoke:
        path = run([2], [16, 4096], 2, 64, args.device, args.results_dir, "entropy_kernel_smoke")
    else:
        path = run([1, 64, 256], [16, 256, 4096, 65536], 7, 224, args.device, args.results_dir, f"entropy_kernel_{args.device}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

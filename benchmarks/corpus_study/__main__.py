"""``python -m benchmarks.corpus_study [--smoke] [--out DIR] [--cache DIR]``: the detection study on the real-photo corpus."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from .run import StudySettings, study

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="advsentry detection study on the real-photo corpus")
    parser.add_argument("--smoke", action="store_true", help="bundled photos, two tiny attacks: checks the pipeline in seconds")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/corpus_study_learned, or corpus_study_smoke)")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "corpus_study", help="adversarial sets and signal banks")
    parser.add_argument("--dev-images", type=int, default=None)
    parser.add_argument("--test-images", type=int, default=None)
    parser.add_argument("--adaptive-images", type=int, default=None, help="test images the adaptive attack runs on (0: skip)")
    parser.add_argument("--threshold-holdout", type=float, default=None,
                        help="fraction of dev sources held out for the threshold (0: out-of-fold scores)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    settings = StudySettings.smoke_settings() if args.smoke else StudySettings()
    for field in ("dev_images", "test_images", "adaptive_images", "threshold_holdout"):
        if getattr(args, field) is not None:
            settings = replace(settings, **{field: getattr(args, field)})
    # corpus_study_learned: the study whose choice ships (results/corpus_study is the first run, before learned signals)
    out = args.out or ROOT / "benchmarks" / "results" / ("corpus_study_smoke" if args.smoke else "corpus_study_learned")
    study(out, args.cache, settings)


if __name__ == "__main__":
    main()

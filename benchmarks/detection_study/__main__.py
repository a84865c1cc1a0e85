"""``python -m benchmarks.detection_study [--smoke] [--out DIR] [--cache DIR]``: the whole study, one command."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .run import StudySettings, study

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="advsentry detection study")
    parser.add_argument("--smoke", action="store_true", help="tiny data and attacks: checks the pipeline in about a minute")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/detection_study[_smoke])")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "detection_study", help="adversarial sets and banks")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    settings = StudySettings.smoke_settings() if args.smoke else StudySettings()
    if args.seed != settings.seed:
        from dataclasses import replace

        settings = replace(settings, seed=args.seed)
    out = args.out or ROOT / "benchmarks" / "results" / ("detection_study_smoke" if args.smoke else "detection_study")
    study(out, args.cache, settings)


if __name__ == "__main__":
    main()

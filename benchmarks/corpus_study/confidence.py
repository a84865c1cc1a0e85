"""False alarms by the model's confidence: the chosen detector on clean test inputs of *any* confidence.

Why: the corpus keeps inputs the model classifies with probability ≥ 0.3,
and the chosen detector weighs logit signals, so clean inputs the model is
unsure of may be flagged more often than the study's FPR says. This scores
the test part of a corpus built with ``--min-confidence 0`` (same seed, so
the same by-source split; sources of the main corpus's dev part are left out
all the same) and reports the realized FPR of the study's thresholds per
confidence band, with Clopper–Pearson intervals.

    python -m benchmarks.corpus build --min-confidence 0 --out ~/.cache/advsentry/corpus-any-confidence
    python -m benchmarks.corpus_study.confidence     # adds "confidence" to results.json, re-renders results.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from detector import CalibrationArtifact
from detector.corpus import load_corpus
from detector.models import load_bundled_model
from detector.samples import to_tensor

from ..detection_study.run import _cached, _key
from . import candidates, report
from .run import clopper_pearson, signal_bank

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "corpus_study"
BANDS = ((0.0, 0.1), (0.1, 0.3), (0.3, 0.5), (0.5, 1.01))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path.home() / ".cache" / "advsentry" / "corpus-any-confidence")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "corpus_study" / "confidence")
    args = parser.parse_args(argv)
    results = json.loads((args.results / "results.json").read_text())
    artifact = CalibrationArtifact.load(args.results / "default_detector.json")
    dev_sources = {image.source for image in load_corpus().split("dev")}
    images = [image for image in load_corpus(args.corpus).split("test") if image.source not in dev_sources]
    model = load_bundled_model()

    first = CalibrationArtifact.load(candidates.FIRST_STUDY_ARTIFACT)
    squeezers = {name: candidates.candidates()[name] for name in ("squeeze_bits5", "squeeze_median2")}
    features = dict(artifact.features) | dict(first.features) | squeezers

    def compute() -> dict[str, np.ndarray]:
        pixels = to_tensor([image.pixels() for image in images])
        with torch.no_grad():
            confidence = torch.cat([torch.softmax(model(pixels[i : i + 32]), 1).amax(1) for i in range(0, len(pixels), 32)])
        values = signal_bank(model, pixels, features, 16)
        columns = lambda names: values[:, [list(features).index(n) for n in names]]  # noqa: E731
        return {"confidence": confidence.numpy(),
                "chosen": artifact.combiner.combine_array(columns(artifact.features)),
                "first_study_default": first.combiner.combine_array(columns(first.features)),
                "feature_squeezing": columns(squeezers).max(axis=1)}

    key = _key(sorted(image.sha256 for image in images), artifact.to_document()["checksum"], sorted(features))
    scored = _cached(args.cache / f"scores-{key}.pt", compute)
    bands = []
    for low, high in BANDS:
        inside = (scored["confidence"] >= low) & (scored["confidence"] < high)
        row: dict = {"band": [low, min(high, 1.0)], "n": int(inside.sum())}
        for detector in ("chosen", "first_study_default", "feature_squeezing"):
            for t in ("0.01", "0.05"):
                threshold = results["threshold_transfer"][detector][t]["threshold"]
                row[f"{detector}@{t}"] = clopper_pearson(int(np.sum(scored[detector][inside] > threshold)), int(inside.sum()))
        bands.append(row)
    results["confidence"] = {"corpus": "test part built with --min-confidence 0 (main corpus's dev sources excluded)",
                             "images": len(images), "bands": bands}
    (args.results / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    (args.results / "results.md").write_text(report.markdown(results))
    for band in bands:
        print(band["band"], band["n"], {k: round(v["value"], 3) for k, v in band.items() if "@" in k})


if __name__ == "__main__":
    main()

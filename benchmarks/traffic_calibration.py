"""Threshold calibration from live traffic (issue 12, part 1): does a threshold from a traffic sketch hold its target?

Traffic is the real-photo corpus's **dev** part (every clean dev input of the
any-confidence build, in random order), scored by the shipped default detector
(``Detector.named('default')``: 8 signals, logistic combiner). The scores are
the corpus study's cached signal banks (``.cache/corpus_study/full``, written
by ``python -m benchmarks.corpus_study``), combined with the shipped combiner —
the exact numbers the exported Triton model and the sidecar produce — so
nothing is recomputed. A share ``a`` ∈ {0, 1 %, 5 %} of the stream is replaced
by successful dev-part adversarials (all attacks of the study, pooled; redrawn
per repetition). The stream goes through the real path: ``TrafficState.add``
per request of 8 inputs → state file → ``calibrate_from_traffic`` (what
``advsentry calibrate traffic`` runs), for targets 1 % and 5 % and trims 0, 1 %,
5 %. The realized FPR is measured on the **test** part's clean inputs (other
sources: no photo contributes to both parts), with Clopper–Pearson intervals;
the detection rate on the test part's adversarials shows what trimming costs
or buys. The exact-quantile threshold of the same stream (the order statistic
at rank ⌊q·(n−1)⌋, the one the sketch estimates) is the reference for the
sketch's own error.

``--smoke``: synthetic Gaussian scores through the same pipeline (checks the
code in seconds; not a result). Results: ``benchmarks/results/traffic_calibration.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS_DIR, machine, write_result

TARGETS = (0.01, 0.05)
SHARES = (0.0, 0.01, 0.05)
TRIMS = (0.0, 0.01, 0.05)
BATCH = 8  # inputs per simulated request


def _study_scores(cache: Path) -> dict[str, Any]:
    """Default-detector scores of the corpus study's cached banks: dev/test clean, dev/test adversarials."""
    import torch

    from benchmarks.corpus_study.run import EXTRA, StudySettings, _corpus_digest, _data_settings, _key
    from benchmarks.corpus_study.suite import FULL_SUITE
    from detector.detector import DEFAULT_ARTIFACT

    settings = StudySettings()
    data_key = _key("data", _data_settings(settings), _corpus_digest(settings))
    root = Path(settings.clean_corpus).expanduser()
    if not (root / "manifest.json").exists():
        raise SystemExit(f"no any-confidence corpus at {root}: build it first (see benchmarks/corpus_study/README.md)")
    extra_key = _key(data_key, hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest())
    features, combiner = DEFAULT_ARTIFACT.features, DEFAULT_ARTIFACT.combiner

    def scores(part: str, attack: str | None, describe: Any) -> np.ndarray:
        columns = []
        for name, config in features.items():
            path = cache / (f"bank-{part}-{attack or 'clean'}-{name}-"
                            f"{_key(data_key, part, attack, describe, config.to_dict())}.pt")
            if not path.exists():
                raise SystemExit(f"missing {path}: run `python -m benchmarks.corpus_study` first (it caches the banks)")
            columns.append(np.asarray(torch.load(path, weights_only=False), dtype=np.float64))
        return np.asarray(combiner.combine_array(np.stack(columns, axis=1)), dtype=np.float64)

    parts = torch.load(cache / f"clean-{data_key}.pt", weights_only=False)[0]
    extra = torch.load(cache / f"clean-extra-{extra_key}.pt", weights_only=False)
    out: dict[str, Any] = {"clean": {}, "adversarial": {}, "sources": {}}
    for part in ("dev", "test"):
        out["clean"][part] = np.r_[scores(part, None, None), scores(f"{part}_{EXTRA}{extra_key[:8]}", None, None)]
        out["sources"][part] = np.array([*parts[part].sources, *extra[part].sources])
        adversarial = {}
        for spec in FULL_SUITE:
            run = torch.load(cache / f"attack-{spec.name}-{part}-{_key(data_key, asdict(spec), settings.attack_batch)}.pt",
                             weights_only=False)
            if len(run["index"]):
                adversarial[spec.name] = scores(part, spec.name, run["describe"])
        out["adversarial"][part] = adversarial
    out["origin"] = (f"corpus study banks {cache} (data key {data_key}, any-confidence extra {extra_key[:8]}), "
                     f"scored by the shipped default detector {DEFAULT_ARTIFACT.id}")
    return out


def _synthetic() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {"clean": {"dev": rng.normal(-2, 1.2, 400), "test": rng.normal(-1.9, 1.3, 400)},
            "sources": {"test": np.array([f"s{i // 3}" for i in range(400)])},
            "adversarial": {"dev": {"synthetic": rng.normal(2, 1.5, 60)}, "test": {"synthetic": rng.normal(2, 1.5, 60)}},
            "origin": "synthetic Gaussian scores (smoke: checks the pipeline, not a result)"}


def _stream(clean: np.ndarray, adversarial: np.ndarray, share: float, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """All clean dev scores plus ``share`` of the stream in adversarials (drawn without replacement), shuffled."""
    n_adv = int(round(share / (1 - share) * len(clean))) if share else 0
    if n_adv > len(adversarial):
        raise SystemExit(f"{n_adv} adversarials needed for share {share}, only {len(adversarial)} available")
    chosen = adversarial[rng.choice(len(adversarial), n_adv, replace=False)] if n_adv else np.zeros(0)
    return rng.permutation(np.r_[clean, chosen]), n_adv


def scenarios(data: dict[str, Any], seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(traffic clean scores, clean scores the FPR is realized on) per scenario.

    ``dev->test``: the issue's measurement (traffic from the dev part, FPR on the
    test part). The default combiner was fitted on the dev part, so dev clean
    scores are in-sample (lower than unseen inputs'), and the parts' sources
    differ; ``test half->other half`` splits the test part by source instead
    (neither half seen by the combiner, both drawn alike): what a deployment
    whose traffic does not drift sees.
    """
    test, sources = data["clean"]["test"], data["sources"]["test"]
    unique = np.unique(sources)
    half = set(unique[np.random.default_rng(seed).permutation(len(unique))[: len(unique) // 2]])
    in_half = np.array([s in half for s in sources])
    return {"dev->test": (data["clean"]["dev"], test), "test half->other half": (test[in_half], test[~in_half])}


def run(data: dict[str, Any], repeats: int, seed: int) -> dict[str, Any]:
    return {"scenarios": {name: run_scenario(traffic, evaluation, data, repeats, seed)
                          for name, (traffic, evaluation) in scenarios(data, seed).items()},
            "data": {"origin": data["origin"], "dev_clean": len(data["clean"]["dev"]), "test_clean": len(data["clean"]["test"]),
                     "dev_adversarial": {a: len(v) for a, v in data["adversarial"]["dev"].items()},
                     "test_adversarial": {a: len(v) for a, v in data["adversarial"]["test"].items()}}}


def run_scenario(dev_clean: np.ndarray, test_clean: np.ndarray, data: dict[str, Any], repeats: int,
                 seed: int) -> dict[str, Any]:
    from detector.calibrate.intervals import rate_interval
    from service.traffic_calibration import calibrate_from_traffic, quantile_level
    from detector.detector import DEFAULT_ARTIFACT
    from service.hooks.traffic import TrafficState

    model = "efficientnet-lite0"
    dev_adv = np.concatenate(list(data["adversarial"]["dev"].values()))
    test_adv = np.concatenate(list(data["adversarial"]["test"].values()))
    rng = np.random.default_rng(seed)
    cells: dict[tuple[float, float, float], dict[str, list[float]]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "traffic.json"
        for share in SHARES:
            for repeat in range(repeats if share else 1):  # the clean-only stream is the same set every time
                stream, n_adv = _stream(dev_clean, dev_adv, share, rng)
                state = TrafficState(window_s=3600.0, max_windows=168)
                now = time.time()
                for start in range(0, len(stream), BATCH):
                    state.add(model, "", DEFAULT_ARTIFACT.id, DEFAULT_ARTIFACT.threshold, DEFAULT_ARTIFACT.target_fpr,
                              stream[start : start + BATCH], now=now)
                state.save(path)
                for target in TARGETS:
                    for trim in TRIMS:
                        result = calibrate_from_traffic([str(path)], target_fpr=target, base=DEFAULT_ARTIFACT,
                                                        base_source="default", model=model, trim=trim)
                        # the order statistic DDSketch estimates (rank floor(q·(n−1))): isolates the sketch's error
                        exact = float(np.quantile(stream, quantile_level(target, trim), method="lower"))
                        t = result.artifact.threshold
                        cell = cells.setdefault((share, target, trim), {k: [] for k in (
                            "threshold", "exact_threshold", "fpr_k", "fpr_exact_k", "tpr", "stream", "adversarial")})
                        cell["threshold"].append(t)
                        cell["exact_threshold"].append(exact)
                        cell["fpr_k"].append(int(np.sum(test_clean > t)))
                        cell["fpr_exact_k"].append(int(np.sum(test_clean > exact)))
                        cell["tpr"].append(float(np.mean(test_adv > t)) if len(test_adv) else float("nan"))
                        cell["stream"].append(len(stream))
                        cell["adversarial"].append(n_adv)
    n_test = len(test_clean)
    rows = []
    for (share, target, trim), cell in sorted(cells.items()):
        k = int(np.median(cell["fpr_k"]))  # the median repetition's count (one stream when share is 0)
        rows.append({
            "adversarial_share": share, "target_fpr": target, "trim": trim, "repeats": len(cell["threshold"]),
            "stream_scores": int(np.median(cell["stream"])), "stream_adversarial": int(np.median(cell["adversarial"])),
            "threshold_median": float(np.median(cell["threshold"])),
            "exact_threshold_median": float(np.median(cell["exact_threshold"])),
            "sketch_vs_exact_max_relative": float(np.max(np.abs(np.subtract(cell["threshold"], cell["exact_threshold"]))
                                                         / np.maximum(np.abs(cell["exact_threshold"]), 1e-12))),
            "realized_fpr": rate_interval(k, n_test),
            "realized_fpr_range": [min(cell["fpr_k"]) / n_test, max(cell["fpr_k"]) / n_test],
            "realized_fpr_exact_threshold": rate_interval(int(np.median(cell["fpr_exact_k"])), n_test),
            "test_tpr_median": float(np.median(cell["tpr"])),
        })
    reference = {"threshold": DEFAULT_ARTIFACT.threshold, "target_fpr": DEFAULT_ARTIFACT.target_fpr,
                 "realized_fpr": rate_interval(int(np.sum(test_clean > DEFAULT_ARTIFACT.threshold)), n_test),
                 "test_tpr": float(np.mean(test_adv > DEFAULT_ARTIFACT.threshold)) if len(test_adv) else None}
    return {"rows": rows, "shipped_threshold": reference, "seconds": time.perf_counter() - started,
            "traffic_clean": len(dev_clean), "evaluation_clean": n_test}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def markdown(result: dict[str, Any]) -> str:
    data = result["data"]
    lines = ["# Threshold calibration from traffic (issue 12, part 1)", "",
             f"Data: {data['origin']}. Adversarials in the stream: successful dev-part adversarials of every attack, "
             f"pooled ({sum(data['dev_adversarial'].values())}), redrawn per repetition; TPR on the pooled test-part "
             f"adversarials ({sum(data['test_adversarial'].values())}). Realized FPR: the median repetition, 95 % "
             "Clopper–Pearson interval; range: over the repetitions.", ""]
    for name, part in result["scenarios"].items():
        ref = part["shipped_threshold"]
        lines += [
            f"## {name}: traffic {part['traffic_clean']} clean inputs, FPR realized on {part['evaluation_clean']}", "",
            f"Shipped threshold {ref['threshold']:.4f} (target {ref['target_fpr']}): realized FPR "
            f"{_pct(ref['realized_fpr']['value'])} [{_pct(ref['realized_fpr']['low'])}, "
            f"{_pct(ref['realized_fpr']['high'])}], TPR {_pct(ref['test_tpr'])}.", "",
            "| attacks in stream | target FPR | trim | threshold (sketch) | exact quantile | realized FPR [95 % CI] "
            "| range over draws | FPR at exact threshold | TPR |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in part["rows"]:
            fpr, exact = row["realized_fpr"], row["realized_fpr_exact_threshold"]
            lines.append(
                f"| {_pct(row['adversarial_share'])} ({row['stream_adversarial']}) | {_pct(row['target_fpr'])} | "
                f"{_pct(row['trim'])} | {row['threshold_median']:.4f} | {row['exact_threshold_median']:.4f} | "
                f"{_pct(fpr['value'])} [{_pct(fpr['low'])}, {_pct(fpr['high'])}] | "
                f"{_pct(row['realized_fpr_range'][0])}–{_pct(row['realized_fpr_range'][1])} | {_pct(exact['value'])} | "
                f"{_pct(row['test_tpr_median'])} |")
        lines += ["", "Sketch vs exact order statistic: largest relative threshold difference "
                  f"{max(r['sketch_vs_exact_max_relative'] for r in part['rows']):.4f} (relative accuracy 0.005).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="synthetic scores, 2 repetitions (seconds)")
    parser.add_argument("--cache", type=Path, default=Path(".cache/corpus_study/full"),
                        help="the corpus study's cache (signal banks, adversarial sets)")
    parser.add_argument("--repeats", type=int, default=20, help="adversarial draws per share")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    data = _synthetic() if args.smoke else _study_scores(args.cache)
    result = run(data, 2 if args.smoke else args.repeats, args.seed)
    result["machine"] = machine()
    name = "traffic_calibration_smoke" if args.smoke else "traffic_calibration"
    path = write_result(name, result, args.results_dir)
    (args.results_dir / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

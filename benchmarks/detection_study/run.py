"""Orchestration of the study: data → attacks → entropy banks → selection (dev) → tables (test).

Everything expensive is cached under ``--cache`` (adversarial sets per attack
and part, entropy banks), keyed by the settings that produced it, so a rerun
only redoes what changed. Results go to ``--out``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from detector import FEATURE_RESPONSE, PAPER_CONFIG, CalibrationArtifact, LogisticCombiner, ScoreConfig, SingleMap
from detector.attacks import make_attack
from detector.evaluation import evaluate, threshold_at_fpr
from detector.models import bundled_identity, load_bundled_model

from . import analysis, family, report
from .data import CleanSet, build_clean_set, split_by_photo
from .squeezing import squeezing_scores
from .suite import FULL_SUITE, SEEN_ATTACKS, SMOKE_SUITE, AttackSet

LOGGER = logging.getLogger("detection_study")


@dataclass(frozen=True)
class StudySettings:
    seed: int = 0
    crops_per_photo: int = 120
    max_per_photo: int = 48
    min_confidence: float = 0.3
    test_photos: int = 4
    attack_batch: int = 16
    n_boot: int = 1000
    smoke: bool = False

    @classmethod
    def smoke_settings(cls) -> "StudySettings":
        return cls(crops_per_photo=2, max_per_photo=1, min_confidence=0.05, test_photos=4, attack_batch=8, n_boot=50, smoke=True)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(path: Path, compute: Callable[[], Any]) -> Any:
    if path.exists():
        return torch.load(path, weights_only=False)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(value, tmp)
    tmp.replace(path)  # atomic: a killed run never leaves a half-written cache entry
    return value


def _cap_per_photo(clean: CleanSet, limit: int) -> CleanSet:
    counts: dict[str, int] = {}
    keep = []
    for index, source in enumerate(clean.sources):
        if counts.get(source, 0) < limit:
            keep.append(index)
            counts[source] = counts.get(source, 0) + 1
    return clean.subset(keep)


def run_attack(model: torch.nn.Module, clean: Any, spec: AttackSet, settings: Any,
               crafting: torch.nn.Module | None = None) -> dict[str, Any]:
    """Adversarials of the first ``cap`` images; only successful ones are positives.

    With ``crafting`` (a surrogate: a transfer attack) the adversarials are made
    on it and their success is judged on ``model``.
    """
    count = len(clean) if spec.cap is None else min(spec.cap, len(clean))
    attack = make_attack(spec.attack, crafting or model, seed=settings.seed, quantize=True, **spec.params)
    adversarial, success, linf, l2, queries = [], [], [], [], []
    for start in range(0, count, settings.attack_batch):
        stop = min(count, start + settings.attack_batch)
        result = attack(clean.pixels[start:stop], clean.labels[start:stop])
        if crafting is not None:
            with torch.no_grad():
                result.success = model(result.adversarial).argmax(1) != clean.labels[start:stop]
        adversarial.append((result.adversarial * 255).round().to(torch.uint8))
        success.append(result.success)
        linf.append(result.norms["linf"])
        l2.append(result.norms["l2"])
        if result.queries is not None:
            queries.append(result.queries)
        LOGGER.info("  %s: %d/%d images", spec.name, stop, count)
    success_t = torch.cat(success)
    return {
        "index": torch.arange(count)[success_t],
        "adversarial": torch.cat(adversarial)[success_t],
        "attempted": count,
        "success_rate": float(success_t.float().mean()) if count else 0.0,
        "linf_median": float(torch.cat(linf)[success_t].median()) if success_t.any() else None,
        "l2_median": float(torch.cat(l2)[success_t].median()) if success_t.any() else None,
        "queries_median": float(torch.cat(queries)[success_t].float().median()) if queries and success_t.any() else None,
        "describe": attack.describe(),
    }


def cached_attacks(model: torch.nn.Module, parts: dict[str, Any], suite: Any, settings: Any, cache: Path, data_key: str,
                   runner: Callable[..., dict[str, Any]] = run_attack) -> dict[str, dict[str, dict[str, Any]]]:
    """``{part: {attack: run}}`` for every attack set on every part, each cached under its settings' key."""
    attacks: dict[str, dict[str, dict[str, Any]]] = {part: {} for part in parts}
    for spec in suite:
        for part, clean in parts.items():
            path = cache / f"attack-{spec.name}-{part}-{_key(data_key, asdict(spec), settings.attack_batch)}.pt"
            LOGGER.info("attack %s on %s (%s)", spec.name, part, "cached" if path.exists() else "computing")
            attacks[part][spec.name] = _cached(path, lambda: runner(model, clean, spec, settings))
    return attacks


def _finite(value: float) -> float | None:
    return value if np.isfinite(value) else None


def default_artifact(results, candidates, names, combined, best_config, best_direction, dev_scorers, dev_split) -> CalibrationArtifact:
    """The chosen detector as a calibration artifact for the bundled model (threshold: 5% FPR on dev clean)."""
    chosen = results["default_detector"]
    if chosen == "combined":
        features = {family.output_name(candidates[names[c]]): candidates[names[c]] for c in combined.columns}
        combiner = combined.combiner
    else:
        features = {FEATURE_RESPONSE: best_config}
        combiner = SingleMap() if best_direction > 0 else LogisticCombiner((-1.0,), 0.0, (0.0,), (1.0,))
    threshold = threshold_at_fpr(dev_scorers[chosen](dev_split.clean), 0.05)
    return CalibrationArtifact.create(
        threshold, features, bundled_identity(), combiner, target_fpr=0.05,
        data={"source": "benchmarks/detection_study (dev part)", "dev_photos": results["data"]["dev_photos"],
              "dev_clean_images": results["data"]["dev"]},
        results={"detector": chosen,
                 # null where an attack had no successful adversarial in the test part
                 "test_auc": {a: _finite(row["auc"]["value"]) for a, row in results["test"][chosen].items()},
                 "test_tpr_at_5pct": {a: _finite(row["tpr"]["0.05"]["value"]) for a, row in results["test"][chosen].items()},
                 "held_out_fpr_at_threshold": results["held_out_fpr_at_dev_threshold_5pct"][chosen]},
    )


def study(out_dir: Path, cache_dir: Path, settings: StudySettings) -> dict[str, Any]:
    started = time.time()
    torch.manual_seed(settings.seed)
    model = load_bundled_model()
    suite = SMOKE_SUITE if settings.smoke else FULL_SUITE
    candidates = family.family(settings.smoke)
    names = list(candidates)
    cache = cache_dir / ("smoke" if settings.smoke else "full")

    data_key = _key("data", asdict(settings))
    clean_all = _cached(cache / f"clean-{data_key}.pt", lambda: build_clean_set(
        model, crops_per_photo=settings.crops_per_photo, min_confidence=settings.min_confidence, seed=settings.seed))
    clean_all = _cap_per_photo(clean_all, settings.max_per_photo)
    dev, test, test_names = split_by_photo(clean_all, seed=settings.seed, test_photos=settings.test_photos)
    LOGGER.info("clean: %d images (dev %d, test %d; test photos %s)", len(clean_all), len(dev), len(test), test_names)
    parts = {"dev": dev, "test": test}

    attacks = cached_attacks(model, parts, suite, settings, cache, data_key)

    def pixels_of(part: str, attack: str | None) -> torch.Tensor:
        if attack is None:
            return parts[part].pixels
        return attacks[part][attack]["adversarial"].float().div(255.0)

    def groups_of(part: str, attack: str | None) -> np.ndarray:
        sources = np.array(parts[part].sources)
        return sources if attack is None else sources[attacks[part][attack]["index"].numpy()]

    def bank(part: str, attack: str | None, chosen: dict[str, ScoreConfig]) -> np.ndarray:
        key = _key(data_key, part, attack, attack and attacks[part][attack]["describe"], {k: c.to_dict() for k, c in chosen.items()})
        path = cache / f"bank-{part}-{attack or 'clean'}-{key}.pt"
        LOGGER.info("entropy bank %s/%s: %d candidates (%s)", part, attack or "clean", len(chosen), "cached" if path.exists() else "computing")
        return _cached(path, lambda: family.entropy_bank(model, pixels_of(part, attack), chosen))

    def split_bank(part: str, chosen: dict[str, ScoreConfig]) -> analysis.Split:
        return analysis.Split(
            clean=bank(part, None, chosen),
            clean_groups=groups_of(part, None),
            attacks={s.name: bank(part, s.name, chosen) for s in suite},
            attack_groups={s.name: groups_of(part, s.name) for s in suite},
        )

    # ---- selection on the development part only ------------------------------------------
    dev_split = split_bank("dev", candidates)
    dev_aucs = analysis.candidate_aucs(dev_split)
    column, direction, dev_auc = analysis.best_single(dev_split, names)
    stage1 = names[column]
    refined = family.refinements(candidates[stage1])
    refined_split = split_bank("dev", refined)
    ref_names = list(refined)
    ref_column, ref_direction, ref_auc = analysis.best_single(refined_split, ref_names)
    if ref_auc > dev_auc:
        best_name, best_config, best_direction, best_dev_auc = ref_names[ref_column], refined[ref_names[ref_column]], ref_direction, ref_auc
    else:
        best_name, best_config, best_direction, best_dev_auc = stage1, candidates[stage1], direction, dev_auc
    LOGGER.info("best single on dev: %s (direction %+d, mean AUC %.3f)", best_name, best_direction, best_dev_auc)

    all_attacks = [s.name for s in suite]
    # The product's combiner stays within the per-request cost budget; the
    # unconstrained one is reported as a reference for what the budget costs.
    budget = analysis.one_pass_budget
    combined = analysis.fit_combiner(dev_split, names, candidates, all_attacks, budget=budget)
    unconstrained = analysis.fit_combiner(dev_split, names, candidates, all_attacks)
    seen = [a for a in SEEN_ATTACKS if a in all_attacks]
    combined_seen = analysis.fit_combiner(dev_split, names, candidates, seen, budget=budget)
    LOGGER.info("unconstrained combined on dev: %s (CV AUC %.3f)", unconstrained.history, unconstrained.cv_auc)
    LOGGER.info("combined on dev: %s (CV AUC %.3f)", combined.history, combined.cv_auc)

    # ---- the test part: scored once per chosen detector -----------------------------------
    needed = {"paper": PAPER_CONFIG, "best": best_config}
    for label, fitted in (("combined", combined), ("combined_seen", combined_seen), ("unconstrained", unconstrained)):
        for i, col in enumerate(fitted.columns):
            needed[f"{label}:{i}"] = candidates[names[col]]
    test_split = split_bank("test", needed)
    # The chosen candidates' dev entropies are columns of the banks already computed.
    dev_sources = [(dev_split, names), (refined_split, ref_names)]

    def dev_columns(bank_of: Callable[[analysis.Split], np.ndarray]) -> np.ndarray:
        columns = []
        for config in needed.values():
            name = family.candidate_name(config)
            split, split_names = next((sp, nm) for sp, nm in dev_sources if name in nm)
            columns.append(bank_of(split)[:, split_names.index(name)])
        return np.stack(columns, axis=1)

    dev_needed = analysis.Split(
        clean=dev_columns(lambda sp: sp.clean),
        clean_groups=dev_split.clean_groups,
        attacks={a: dev_columns(lambda sp, a=a: sp.attacks[a]) for a in dev_split.attacks},
        attack_groups=dev_split.attack_groups,
    )
    keys = list(needed)

    def scorers(split: analysis.Split) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
        return {
            "paper": lambda b: b[:, keys.index("paper")],
            "best_single": lambda b: best_direction * b[:, keys.index("best")],
            "combined": lambda b: combined.combiner.combine(torch.from_numpy(b[:, [keys.index(f"combined:{i}") for i in range(len(combined.columns))]])).numpy(),
            "combined_seen": lambda b: combined_seen.combiner.combine(torch.from_numpy(b[:, [keys.index(f"combined_seen:{i}") for i in range(len(combined_seen.columns))]])).numpy(),
            "combined_unconstrained": lambda b: unconstrained.combiner.combine(torch.from_numpy(b[:, [keys.index(f"unconstrained:{i}") for i in range(len(unconstrained.columns))]])).numpy(),
        }

    def squeeze(part: str, attack: str | None) -> np.ndarray:
        path = cache / f"squeeze-{part}-{attack or 'clean'}-{_key(data_key, attack and attacks[part][attack]['describe'])}.pt"
        return _cached(path, lambda: squeezing_scores(model, pixels_of(part, attack)))

    tables: dict[str, dict[str, Any]] = {}
    scores_out: dict[str, dict[str, Any]] = {}
    for detector_name, fn in scorers(test_split).items():
        clean_scores = fn(test_split.clean)
        scores_out[detector_name] = {"clean": clean_scores, **{a: fn(test_split.attacks[a]) for a in all_attacks}}
    scores_out["feature_squeezing"] = {"clean": squeeze("test", None), **{a: squeeze("test", a) for a in all_attacks}}
    for detector_name, by_set in scores_out.items():
        tables[detector_name] = {
            a: evaluate(by_set["clean"], by_set[a], n_boot=settings.n_boot, seed=settings.seed).to_dict() for a in all_attacks
        }

    # Dev-fitted threshold of each entropy detector applied to the test clean images.
    dev_scorers = scorers(dev_needed)
    held_out_fpr = {}
    for detector_name, fn in dev_scorers.items():
        threshold = threshold_at_fpr(fn(dev_needed.clean), 0.05)
        held_out_fpr[detector_name] = float(np.mean(scores_out[detector_name]["clean"] > threshold))

    dev_summary = {
        "paper": float(np.mean([dev_aucs[a][names.index(family.candidate_name(PAPER_CONFIG))] for a in dev_aucs])),
        "best_single": best_dev_auc,
        "combined_cv": combined.cv_auc,
        "combined_unconstrained_cv": unconstrained.cv_auc,
    }
    default = "combined" if combined.cv_auc > best_dev_auc else "best_single"
    results = {
        "settings": asdict(settings),
        "data": {
            "clean_total": len(clean_all), "dev": len(dev), "test": len(test), "test_photos": test_names,
            "dev_photos": sorted(set(dev.sources)), "per_photo": {s: clean_all.sources.count(s) for s in sorted(set(clean_all.sources))},
        },
        "attacks": {
            part: {a: {k: v for k, v in info.items() if k not in ("index", "adversarial")} | {"successful": int(len(info["index"]))}
                   for a, info in by_attack.items()}
            for part, by_attack in attacks.items()
        },
        "labels": {s.name: s.label for s in suite},
        "family_size": len(candidates),
        "dev_selection": {
            "mean_dev_auc": dev_summary,
            "best_single": {"name": best_name, "config": best_config.to_dict(), "direction": best_direction, "stage1": stage1},
            "combined": {"features": [names[c] for c in combined.columns], "configs": [candidates[names[c]].to_dict() for c in combined.columns],
                         "combiner": combined.combiner.to_dict(), "history": combined.history},
            "combined_unconstrained": {"features": [names[c] for c in unconstrained.columns],
                                       "combiner": unconstrained.combiner.to_dict(), "history": unconstrained.history},
            "combined_seen": {"trained_on": seen, "features": [names[c] for c in combined_seen.columns], "combiner": combined_seen.combiner.to_dict()},
            "top_candidates": report.top_candidates(dev_aucs, names, 25),
        },
        "default_detector": default,
        "test": tables,
        "held_out_fpr_at_dev_threshold_5pct": held_out_fpr,
        "elapsed_s": time.time() - started,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    default_artifact(results, candidates, names, combined, best_config, best_direction, dev_scorers, dev_needed).save(
        out_dir / "default_detector.json"
    )
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    (out_dir / "results.md").write_text(report.markdown(results))
    report.figures(out_dir, results, scores_out, model, parts["test"], attacks["test"], best_config, best_direction)
    LOGGER.info("done in %.0f s; wrote %s", time.time() - started, out_dir)
    return results

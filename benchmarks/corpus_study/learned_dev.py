"""``python -m benchmarks.corpus_study.learned_dev``: do the learned signals help? A dev-only comparison on a subset.

Why a separate, smaller run: the full study scores every candidate on every
dev and test set (about 3,600 forward passes for new signals), which on a
shared 2-core machine took longer than the session had. The question "is a
detector with LID / Fourier / head signals better on dev" only needs the dev
part, so this run uses the study's cached clean dev inputs and its cached
adversarials of the *seen* attacks (what the combiner is fitted on) and
leaves out the extra clean inputs of other confidences (``all_clean``).
Everything is on the dev part; the test part is not read.

It reports, with the study's own criterion (out-of-fold mean per-attack AUC,
folds grouped by source, quadratic logistic combiner):

- every candidate's dev AUC per seen attack (learned ones out-of-fold, see :mod:`.learned`);
- the shipped default's signals refitted on this subset, and the same plus each learned signal;
- greedy forward selection within the cost budget with and without the learned candidates.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector import CalibrationArtifact
from detector.models import load_bundled_model
from detector.signals import LearnedSignal

from ..detection_study.analysis import Split
from ..detection_study.run import _cached, _key, cached_attacks
from . import analysis, candidates, learned
from .data import corpus_parts
from .run import StudySettings, _corpus_digest, _data_settings, run_attack
from .suite import FULL_SUITE, SEEN_ATTACKS

LOGGER = logging.getLogger("corpus_study")
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ARTIFACT = ROOT / "detector" / "data" / "default_detector.json"


def compare(out: Path, cache_dir: Path, settings: StudySettings, shipped: Path = DEFAULT_ARTIFACT) -> dict[str, Any]:
    started = time.time()
    torch.manual_seed(settings.seed)
    model = load_bundled_model()
    cache = cache_dir / "full"
    data_key = _key("data", _data_settings(settings), _corpus_digest(settings))
    parts, _ = _cached(cache / f"clean-{data_key}.pt", lambda: corpus_parts(
        model, {"dev": settings.dev_images, "test": settings.test_images}, settings.seed))
    seen = [s for s in FULL_SUITE if s.name in SEEN_ATTACKS]
    # cached_attacks needs every part it is given; the test part's sets are loaded (cached), never read below
    attacks = cached_attacks(model, {p: parts[p] for p in ("dev", "test")}, seen, settings, cache, data_key, run_attack)
    pool = candidates.candidates()
    names = list(pool)
    templates = {n: c for n, c in pool.items() if isinstance(c, LearnedSignal)}

    def pixels_of(part: str, attack: str | None) -> torch.Tensor:
        return parts[part].pixels if attack is None else attacks[part][attack]["adversarial"].float().div(255.0)

    def groups_of(part: str, attack: str | None) -> np.ndarray:
        sources = np.array(parts[part].sources)
        return sources if attack is None else sources[attacks[part][attack]["index"].numpy()]

    def describe(part: str, attack: str | None) -> Any:
        return attack and attacks[part][attack]["describe"]

    sets = [("dev", None), *[("dev", s.name) for s in seen]]
    _, oof = learned.fit_learned(model, templates, sets, pixels_of, groups_of, [s.name for s in seen], cache=cache,
                                 data_key=data_key, describe=describe, batch=settings.bank_batch, seed=settings.seed)

    def column(name: str, part: str, attack: str | None) -> np.ndarray:
        if name in oof:
            return oof[name][(part, attack)]
        path = cache / f"bank-{part}-{attack or 'clean'}-{name}-{_key(data_key, part, attack, describe(part, attack), pool[name].to_dict())}.pt"
        if not path.exists():
            raise SystemExit(f"no cached bank for {name} on {part}/{attack}: run the full study once first")
        return torch.load(path, weights_only=False)

    def bank(part: str, attack: str | None) -> np.ndarray:
        return np.stack([column(n, part, attack) for n in names], axis=1)

    dev = Split(bank("dev", None), groups_of("dev", None), {s.name: bank("dev", s.name) for s in seen},
                {s.name: groups_of("dev", s.name) for s in seen})
    seen_names = [s.name for s in seen]
    aucs = analysis.directional_aucs(dev)
    x, y, g, which, weight = analysis._design(dev, seen_names)
    col = {n: i for i, n in enumerate(names)}

    def cv(features: list[str]) -> float:
        return analysis.cv_mean_auc(x[:, [col[f] for f in features]], y, g, which, weight, quadratic=True, c=1.0)

    shipped_features = list(CalibrationArtifact.load(shipped).features)
    base = cv(shipped_features)
    plus = {n: cv(shipped_features + [n]) for n in templates}
    plus_all = cv(shipped_features + list(templates))
    with_learned = analysis.select_combined(dev, names, pool, seen_names, candidates.extra_forwards, budget=settings.budget)
    without = [n for n in names if n not in templates]
    sub = {n: pool[n] for n in without}
    dev_without = Split(dev.clean[:, [col[n] for n in without]], dev.clean_groups,
                        {a: v[:, [col[n] for n in without]] for a, v in dev.attacks.items()}, dev.attack_groups)
    no_learned = analysis.select_combined(dev_without, without, sub, seen_names, candidates.extra_forwards, budget=settings.budget)
    results = {
        "method": __doc__.split("\n\n")[1].replace("\n", " "),
        "settings": asdict(settings) | {"all_clean": False},
        "dev_rows": {"clean": int(len(dev.clean)), **{a: int(len(v)) for a, v in dev.attacks.items()}},
        "dev_auc": {a: {n: float(max(v[i], 1 - v[i])) for i, n in enumerate(names)} for a, v in aucs.items()},
        "dev_auc_mean_seen": {n: float(np.mean([max(aucs[a][i], 1 - aucs[a][i]) for a in seen_names])) for i, n in enumerate(names)},
        "learned": {n: templates[n].to_dict() for n in templates},
        "shipped_default": {"features": shipped_features, "cv_mean_auc": base},
        "shipped_plus_one": plus,
        "shipped_plus_all_learned": plus_all,
        "greedy_with_learned": {"features": [names[c] for c in with_learned.columns], "history": with_learned.history,
                                "cv_mean_auc": with_learned.cv_auc, "extra_forwards": with_learned.cost},
        "greedy_without_learned": {"features": [without[c] for c in no_learned.columns], "history": no_learned.history,
                                   "cv_mean_auc": no_learned.cv_auc, "extra_forwards": no_learned.cost},
        "elapsed_s": time.time() - started,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "learned_dev.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    (out / "learned_dev.md").write_text(markdown(results))
    LOGGER.info("done in %.0f s", results["elapsed_s"])
    return results


def markdown(r: dict[str, Any]) -> str:
    lines = ["# Learned signals (LID, Fourier, head) on the dev part: do they help?", "", r["method"], "",
             f"Dev rows: {r['dev_rows']}. Criterion: out-of-fold mean AUC over the seen attacks (by-source folds).", "",
             "| detector | dev CV mean AUC |", "|---|---|",
             f"| shipped default's 8 signals (refitted on this subset) | {r['shipped_default']['cv_mean_auc']:.3f} |"]
    lines += [f"| shipped + `{n}` | {v:.3f} |" for n, v in r["shipped_plus_one"].items()]
    lines += [f"| shipped + all learned | {r['shipped_plus_all_learned']:.3f} |",
              f"| greedy without learned: {', '.join(r['greedy_without_learned']['features'])} | {r['greedy_without_learned']['cv_mean_auc']:.3f} |",
              f"| greedy with learned: {', '.join(r['greedy_with_learned']['features'])} | {r['greedy_with_learned']['cv_mean_auc']:.3f} |",
              "", "Single signals (dev AUC, direction-free; learned ones out-of-fold):", "",
              "| signal | " + " | ".join(r["dev_auc"]) + " | mean |", "|---|" + "---|" * (len(r["dev_auc"]) + 1)]
    order = sorted(r["dev_auc_mean_seen"], key=r["dev_auc_mean_seen"].get, reverse=True)
    lines += [f"| `{n}` | " + " | ".join(f"{r['dev_auc'][a][n]:.3f}" for a in r["dev_auc"]) + f" | {r['dev_auc_mean_seen'][n]:.3f} |"
              for n in order]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "corpus_study")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "corpus_study")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    compare(args.out, args.cache, StudySettings())


if __name__ == "__main__":
    main()

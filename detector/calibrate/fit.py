"""From finished units to the calibration: combiner, thresholds, held-out FPR, per-attack results.

- The threshold for each target FPR is fitted on the *fit* split's clean
  scores (:func:`detector.evaluation.threshold_at_fpr`); the FPR it actually
  gets is measured on the *held-out* split's clean images. The first target
  FPR is the threshold the artifact puts in force.
- With ``refit_combiner`` a :class:`LogisticCombiner` over the detector's maps
  is fitted on fit-split clean images against the successful adversarials of
  fit-split images (all attacks pooled); otherwise the configured combiner
  is kept as is. With ``refit_signals`` (which implies it) the learned
  signals' columns of the fit rows already hold out-of-fold values and those
  of held-out rows the refitted signals' values (``CalibrationJob.refit_signals``),
  so everything here works unchanged.
- Per attack: success rate, perturbation size (median L∞ and L2 in 8-bit
  gray levels, L0 in pixels) and query counts over the attacked images; AUC and
  TPR at 1/5/10 % FPR with bootstrap intervals (:func:`detector.evaluation.evaluate`)
  of held-out clean images against the successful adversarials (of held-out
  images only when the combiner was fitted on adversarials, of all images
  otherwise, since then no adversarial took part in any fit); and the TPR at
  each threshold in force.
- Honest intervals (:mod:`.intervals`): the held-out FPR and the TPR at each
  threshold get exact Clopper–Pearson 95 % intervals (``*_interval``), and
  the AUC a bootstrap over *sources* (``auc_by_source``), labelled "not
  meaningful" with fewer than 10 sources on a side. The image-level bootstrap
  intervals of ``detection`` are kept for compatibility; with few sources they
  are too narrow, which is why the report shows the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from detector.combiner import Combiner, fit_logistic_combiner
from detector.evaluation import FPR_POINTS, evaluate, threshold_at_fpr

from .intervals import cluster_auc, rate_interval
from .spec import AttackSpec, JobConfig


@dataclass
class AttackBank:
    """All units of one attack, concatenated."""

    spec: AttackSpec
    indices: np.ndarray  # attacked candidate indices
    success: np.ndarray
    linf: np.ndarray
    l2: np.ndarray
    l0: np.ndarray
    queries: np.ndarray | None
    surrogate_success: np.ndarray | None
    entropies: np.ndarray  # [successes, F], rows in order of success
    examples: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def success_indices(self) -> np.ndarray:
        return self.indices[self.success]


def concat_attack(spec: AttackSpec, units: list[dict[str, Any]], features: int, extra: dict[str, Any]) -> AttackBank:
    def cat(key: str, dtype: Any = np.float64) -> np.ndarray:
        parts = [np.asarray(u[key], dtype=dtype).reshape(-1) for u in units if u.get(key) is not None]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    attacked = sum(len(u["indices"]) for u in units)
    queries = [u for u in units if len(u["indices"])]
    has_queries = bool(queries) and all(u.get("queries") is not None for u in queries)
    transfer = spec.transfer
    entropies = [np.asarray(u["entropies"], dtype=np.float64).reshape(-1, features) for u in units]
    bank = AttackBank(
        spec=spec,
        indices=cat("indices", np.int64),
        success=cat("success", bool),
        linf=cat("linf"),
        l2=cat("l2"),
        l0=cat("l0"),
        queries=cat("queries") if has_queries else None,
        surrogate_success=cat("surrogate_success", bool) if transfer else None,
        entropies=np.vstack(entropies) if entropies else np.zeros((0, features)),
        examples=[u["example"] for u in units if u.get("example") is not None],
        extra=extra,
    )
    assert len(bank.indices) == attacked == len(bank.success)
    return bank


def _median(values: np.ndarray) -> float | None:
    return float(np.median(values)) if len(values) else None


def attack_summary(bank: AttackBank) -> dict[str, Any]:
    """Success rate, perturbation sizes of successful adversarials (8-bit levels / pixels), queries."""
    hits = bank.success
    summary: dict[str, Any] = {
        "attack": bank.spec.attack,
        "scenario": bank.spec.scenario,
        "targeted": bank.spec.targeted,
        "params": dict(bank.spec.params),
        "attacked": int(len(bank.indices)),
        "successful": int(hits.sum()),
        "success_rate": float(hits.mean()) if len(hits) else None,
        "linf_255_median": None if not hits.any() else round(_median(bank.linf[hits]) * 255, 4),
        "l2_median": None if not hits.any() else round(_median(bank.l2[hits]), 5),
        "l0_median": None if not hits.any() else _median(bank.l0[hits]),
    }
    if bank.queries is not None:
        summary["queries_total"] = int(bank.queries.sum())
        summary["queries_mean"] = float(bank.queries.mean()) if len(bank.queries) else None
        summary["queries_median_successful"] = _median(bank.queries[hits])
    if bank.surrogate_success is not None:
        summary["surrogate_success_rate"] = float(bank.surrogate_success.mean()) if len(hits) else None
        summary["transfer_success_rate"] = summary["success_rate"]
    summary.update(bank.extra)
    return summary


@dataclass
class Calibration:
    """Everything the artifact and the report are made of."""

    combiner: Combiner
    threshold: float
    operating_points: list[dict[str, Any]]
    per_attack: dict[str, dict[str, Any]]
    counts: dict[str, int]
    scores: dict[str, np.ndarray]  # "clean_fit", "clean_holdout", and per attack label (evaluated positives)
    sources: dict[str, int] = field(default_factory=dict)  # "fit", "holdout": distinct sources of the selected clean images


def _score(combiner: Combiner, entropies: np.ndarray) -> np.ndarray:
    return combiner.combine_array(np.asarray(entropies, dtype=np.float64))


def calibrate(
    config: JobConfig,
    combiner: Combiner,
    clean_entropies: np.ndarray,
    clean_holdout: np.ndarray,
    banks: dict[str, AttackBank],
    holdout_of: np.ndarray,
    *,
    clean_groups: np.ndarray | None = None,
    group_of: np.ndarray | None = None,
) -> Calibration:
    """Fit (combiner and) thresholds and evaluate; ``clean_holdout``/``holdout_of`` flag held-out rows / candidates.

    ``clean_groups`` (the source of each clean row) and ``group_of`` (the
    source of each candidate, for the adversarials) drive the by-source AUC
    interval; without them every image counts as its own source.
    """
    fit_rows = clean_entropies[~clean_holdout]
    held_rows = clean_entropies[clean_holdout]
    if len(fit_rows) == 0 or len(held_rows) == 0:
        raise ValueError(
            f"need selected clean images in both splits (fit {len(fit_rows)}, held-out {len(held_rows)}); "
            "add images or lower --min-confidence"
        )
    if clean_groups is None:
        clean_groups = np.arange(len(clean_entropies))
    if group_of is None:
        group_of = np.arange(len(holdout_of))
    held_groups = np.asarray(clean_groups)[clean_holdout]
    if config.refit_combiner:
        positives = [b.entropies[~holdout_of[b.success_indices]] for b in banks.values() if len(b.entropies)]
        positives = np.vstack(positives) if positives else np.zeros((0, clean_entropies.shape[1]))
        # keeps the configured form: a combiner shipped with z² terms is refitted with them
        combiner = fit_logistic_combiner(fit_rows, positives, quadratic=bool(getattr(combiner, "quadratic", ())))
    fit_scores, held_scores = _score(combiner, fit_rows), _score(combiner, held_rows)
    thresholds = [threshold_at_fpr(fit_scores, f) for f in config.target_fprs]
    points = [
        {
            "target_fpr": f,
            "threshold": t,
            "fit_fpr": float(np.mean(fit_scores > t)),
            "held_out_fpr": float(np.mean(held_scores > t)),
            "held_out_false_positives": int(np.sum(held_scores > t)),
            "held_out_clean": int(len(held_scores)),
            "held_out_sources": int(len(np.unique(held_groups))),
            "held_out_fpr_interval": rate_interval(int(np.sum(held_scores > t)), len(held_scores)),
        }
        for f, t in zip(config.target_fprs, thresholds)
    ]
    per_attack: dict[str, dict[str, Any]] = {}
    scores: dict[str, np.ndarray] = {"clean_fit": fit_scores, "clean_holdout": held_scores}
    for label, bank in banks.items():
        rows = bank.entropies
        origins = bank.success_indices
        if config.refit_combiner:
            keep = holdout_of[bank.success_indices]
            rows, origins = rows[keep], origins[keep]
        positives = _score(combiner, rows) if len(rows) else np.zeros(0)
        scores[label] = positives
        summary = attack_summary(bank)
        summary["evaluated_positives"] = "held-out images" if config.refit_combiner else "all images"
        summary["detection"] = evaluate(held_scores, positives, fprs=FPR_POINTS, n_boot=config.n_boot, seed=config.seed).to_dict()
        summary["detection"]["interval_method"] = "bootstrap over images (too narrow with few sources; see auc_by_source)"
        summary["auc_by_source"] = cluster_auc(held_scores, positives, held_groups, np.asarray(group_of)[origins],
                                               n_boot=config.n_boot, seed=config.seed)
        summary["tpr_at_threshold"] = {
            f"{p['target_fpr']:g}": (float(np.mean(positives > p["threshold"])) if len(positives) else None) for p in points
        }
        summary["tpr_at_threshold_interval"] = {
            f"{p['target_fpr']:g}": rate_interval(int(np.sum(positives > p["threshold"])), len(positives)) for p in points
        }
        per_attack[label] = summary
    counts = {"clean_fit": int(len(fit_rows)), "clean_holdout": int(len(held_rows))}
    sources = {"fit": int(len(np.unique(np.asarray(clean_groups)[~clean_holdout]))), "holdout": int(len(np.unique(held_groups)))}
    return Calibration(combiner, thresholds[0], points, per_attack, counts, scores, sources)

"""From finished units to the calibration: combiner, thresholds, realized held-out FPR, per-attack results.

Three splits of the clean images, by originals (:mod:`.data`, :mod:`.splits`):

- *fit*: with ``refit_combiner`` a :class:`LogisticCombiner` over the
  detector's maps is fitted on the fit split's clean images against the
  successful adversarials of fit-split images (all attacks pooled, but those
  marked ``fit=false``: evaluated only); otherwise
  the configured combiner is kept as is. With ``refit_signals`` (which implies
  it) the learned signals' columns of the fit rows already hold out-of-fold
  values and those of every other row the refitted signals' values
  (``CalibrationJob.refit_signals``), so everything here works unchanged.
- *threshold*: the threshold for each target FPR is the
  :func:`detector.evaluation.threshold_at_fpr` of the threshold split's clean
  scores, i.e. of rows no fit saw, scored by the pipeline that ships. Why not
  the fit rows: a combiner that fitted noise makes its own training rows look
  cleaner than unseen ones, so their quantile is too low (noise-only signals
  at a 5 % target: 14.5 % realized FPR in issue 20; in
  ``tests/test_calibrate_threshold.py`` 9.5 % on the fit rows, 5.2 % on the
  threshold split).
  When *nothing* is refitted nothing was fitted on the fit split either, so
  the threshold is set on the fit and threshold splits together: no leak, and
  more rows make a more precise quantile. Each operating point says which rows
  set it (``threshold_set_on``: splits, images, sources).
- *held-out*: the FPR each threshold actually gets (the *realized* FPR, with
  its exact interval) and the per-attack results are measured here only. The
  first target FPR is the threshold the artifact puts in force.

Candidates made from originals of several splits (role ``"out"``) are used
for nothing.

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
from detector.detector import exceeds
from detector.evaluation import FPR_POINTS, evaluate, threshold_at_fpr

from .intervals import cluster_auc, rate_interval
from .spec import AttackSpec, JobConfig
from .splits import FIT, HOLDOUT, MIXED, THRESHOLD


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
    counts: dict[str, int]  # selected clean images per split: "clean_fit", "clean_threshold", "clean_holdout", "clean_out"
    scores: dict[str, np.ndarray]  # "clean_fit", "clean_threshold", "clean_holdout", and per attack label (evaluated positives)
    sources: dict[str, int] = field(default_factory=dict)  # "fit", "threshold", "holdout": distinct sources of the selected clean images
    threshold_splits: tuple[str, ...] = (THRESHOLD,)  # the splits whose clean images set the thresholds


def _score(combiner: Combiner, entropies: np.ndarray) -> np.ndarray:
    return combiner.combine_array(np.asarray(entropies, dtype=np.float64))


def threshold_splits(config: JobConfig) -> tuple[str, ...]:
    """The splits whose clean images set the threshold: the threshold split alone after a refit, else fit and threshold."""
    return (THRESHOLD,) if config.refit_combiner else (FIT, THRESHOLD)


def calibrate(
    config: JobConfig,
    combiner: Combiner,
    clean_entropies: np.ndarray,
    clean_roles: np.ndarray,
    banks: dict[str, AttackBank],
    candidate_roles: np.ndarray,
    *,
    clean_groups: np.ndarray | None = None,
    group_of: np.ndarray | None = None,
) -> Calibration:
    """Fit (combiner and) thresholds and evaluate (see the module docstring for which split does what).

    ``clean_roles`` is the split of each clean row (``"fit"``,
    ``"threshold"``, ``"holdout"``, ``"out"``), ``candidate_roles`` that of
    each candidate (indexed by the banks' ``success_indices``); both as
    :func:`detector.calibrate.splits.assign_roles` gives them.
    ``clean_groups`` (the source of each clean row) and ``group_of`` (the
    source of each candidate, for the adversarials) drive the by-source AUC
    interval and the source counts; without them every image counts as its
    own source.
    """
    clean_roles, candidate_roles = np.asarray(clean_roles).astype(str), np.asarray(candidate_roles).astype(str)
    clean_entropies = np.asarray(clean_entropies, dtype=np.float64)
    if clean_groups is None:
        clean_groups = np.arange(len(clean_entropies))
    if group_of is None:
        group_of = np.arange(len(candidate_roles))
    clean_groups = np.asarray(clean_groups)
    rows = {role: clean_entropies[clean_roles == role] for role in (FIT, THRESHOLD, HOLDOUT)}
    on = threshold_splits(config)
    sets = np.isin(clean_roles, on)
    needed = {HOLDOUT: int(len(rows[HOLDOUT])), " + ".join(on): int(sets.sum())}
    if config.refit_combiner:
        needed[FIT] = int(len(rows[FIT]))
    if min(needed.values()) == 0:
        raise ValueError(
            "need selected clean images in every split used ("
            + ", ".join(f"{name} {n}" for name, n in needed.items()) + "); add images or lower --min-confidence"
        )
    held_groups = clean_groups[clean_roles == HOLDOUT]
    if config.refit_combiner:
        positives = [b.entropies[candidate_roles[b.success_indices] == FIT] for b in banks.values()
                     if len(b.entropies) and b.spec.fit]  # fit=false attacks are evaluated only
        positives = np.vstack(positives) if positives else np.zeros((0, clean_entropies.shape[1]))
        # keeps the configured form: a combiner shipped with z² terms is refitted with them
        combiner = fit_logistic_combiner(rows[FIT], positives, quadratic=bool(getattr(combiner, "quadratic", ())))
    scores = {f"clean_{role}": _score(combiner, rows[role]) if len(rows[role]) else np.zeros(0) for role in rows}
    setting = _score(combiner, clean_entropies[sets])
    setting_sources = int(len(np.unique(clean_groups[sets])))
    held_scores, fit_scores = scores["clean_holdout"], scores["clean_fit"]
    thresholds = [threshold_at_fpr(setting, f) for f in config.target_fprs]
    points = [
        {
            "target_fpr": f,
            "threshold": t,
            "threshold_set_on": {"splits": list(on), "clean": int(len(setting)), "sources": setting_sources},
            "threshold_rows_fpr": float(np.mean(exceeds(setting, t))),
            "fit_fpr": float(np.mean(exceeds(fit_scores, t))) if len(fit_scores) else None,
            # the realized FPR: on images no fit and no threshold saw
            "held_out_fpr": float(np.mean(exceeds(held_scores, t))),
            "held_out_false_positives": int(np.sum(exceeds(held_scores, t))),
            "held_out_clean": int(len(held_scores)),
            "held_out_sources": int(len(np.unique(held_groups))),
            "held_out_fpr_interval": rate_interval(int(np.sum(exceeds(held_scores, t))), len(held_scores)),
        }
        for f, t in zip(config.target_fprs, thresholds)
    ]
    per_attack: dict[str, dict[str, Any]] = {}
    for label, bank in banks.items():
        attacked = bank.entropies
        origins = bank.success_indices
        if config.refit_combiner:
            keep = candidate_roles[bank.success_indices] == HOLDOUT
            attacked, origins = attacked[keep], origins[keep]
        positives = _score(combiner, attacked) if len(attacked) else np.zeros(0)
        scores[label] = positives
        summary = attack_summary(bank)
        summary["evaluated_positives"] = "held-out images" if config.refit_combiner else "all images"
        if config.refit_combiner:
            summary["combiner"] = "seen" if bank.spec.fit else "unseen"
        summary["detection"] = evaluate(held_scores, positives, fprs=FPR_POINTS, n_boot=config.n_boot, seed=config.seed).to_dict()
        summary["detection"]["interval_method"] = "bootstrap over images (too narrow with few sources; see auc_by_source)"
        summary["auc_by_source"] = cluster_auc(held_scores, positives, held_groups, np.asarray(group_of)[origins],
                                               n_boot=config.n_boot, seed=config.seed)
        summary["tpr_at_threshold"] = {
            f"{p['target_fpr']:g}": (float(np.mean(exceeds(positives, p["threshold"]))) if len(positives) else None) for p in points
        }
        summary["tpr_at_threshold_interval"] = {
            f"{p['target_fpr']:g}": rate_interval(int(np.sum(exceeds(positives, p["threshold"]))), len(positives)) for p in points
        }
        per_attack[label] = summary
    counts = {f"clean_{role}": int(len(rows[role])) for role in rows}
    counts["clean_out"] = int(np.sum(clean_roles == MIXED))
    sources = {role: int(len(np.unique(clean_groups[clean_roles == role]))) for role in rows}
    return Calibration(combiner, thresholds[0], points, per_attack, counts, scores, sources, on)

"""Selection on the development part, evaluation on the test part.

Every choice (best single candidate and its score direction, the combiner's
features and weights) is made from development-part images only. The test
part is scored once per chosen detector to fill the tables.

- Best single map: the candidate with the highest mean AUC over the dev attack
  sets (each attack weighted equally). Its direction (does an attack raise or
  lower the entropy?) is part of what is chosen on dev.
- Combined detector: greedy forward selection of up to ``max_features``
  candidates (from the ``pool`` best single ones, at most one per map) by
  cross-validated AUC of an L2 logistic regression on standardized entropies;
  folds are grouped by source photo so no photo is both fitted and validated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.preprocessing import StandardScaler

from detector import ScoreConfig
from detector.combiner import LogisticCombiner, fit_logistic_combiner
from detector.evaluation import auc

from .family import map_key


@dataclass
class Split:
    """Entropy banks of one split: clean ``[N, F]`` and per attack ``[M_a, F]`` with photo groups."""

    clean: np.ndarray
    clean_groups: np.ndarray
    attacks: dict[str, np.ndarray]
    attack_groups: dict[str, np.ndarray]


def candidate_aucs(split: Split) -> dict[str, np.ndarray]:
    """AUC of every column against every attack: ``{attack: [F]}``."""
    return {
        name: np.array([auc(split.clean[:, f], adv[:, f]) for f in range(split.clean.shape[1])])
        for name, adv in split.attacks.items()
        if len(adv)
    }


def best_single(split: Split, names: Sequence[str], attacks: Sequence[str] | None = None) -> tuple[int, int, float]:
    """(column, direction ±1, mean dev AUC in that direction) of the best single candidate."""
    per_attack = candidate_aucs(split)
    used = [a for a in (attacks or per_attack) if a in per_attack]
    mean = np.mean([per_attack[a] for a in used], axis=0)
    # A candidate whose entropy *drops* under attack is as useful with the sign flipped.
    directional = np.maximum(mean, 1.0 - mean)
    column = int(np.argmax(directional))
    direction = 1 if mean[column] >= 0.5 else -1
    return column, direction, float(directional[column])


@dataclass
class FittedCombiner:
    columns: list[int]
    combiner: LogisticCombiner
    cv_auc: float
    history: list[tuple[str, float]]

    def score(self, bank: np.ndarray) -> np.ndarray:
        import torch

        return self.combiner.combine(torch.from_numpy(bank[:, self.columns])).numpy()


def _pooled(split: Split, attacks: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    adv = [split.attacks[a] for a in attacks if len(split.attacks[a])]
    groups = [split.attack_groups[a] for a in attacks if len(split.attacks[a])]
    x = np.vstack([split.clean, *adv])
    y = np.r_[np.zeros(len(split.clean)), np.ones(sum(len(a) for a in adv))]
    g = np.r_[split.clean_groups, *groups]
    return x, y, g


def _fit(x: np.ndarray, y: np.ndarray, c: float) -> tuple[StandardScaler, LogisticRegression]:
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(scaler.transform(x), y)
    return scaler, model


def _cv_auc(x: np.ndarray, y: np.ndarray, groups: np.ndarray, c: float) -> float:
    folds = min(5, len(np.unique(groups)))
    scores = np.zeros(len(y))
    for train, valid in GroupKFold(n_splits=folds).split(x, y, groups):
        if len(np.unique(y[train])) < 2:
            return 0.5
        scaler, model = _fit(x[train], y[train], c)
        scores[valid] = model.decision_function(scaler.transform(x[valid]))
    # AUC of out-of-fold scores; folds are calibrated alike enough for a ranking criterion.
    return auc(scores[y == 0], scores[y == 1])


def one_pass_budget(configs: list[ScoreConfig]) -> bool:
    """What the product can afford per request: one forward pass and at most one guided backward.

    Forward activations are free extra outputs of that forward pass; one
    guided-backprop map seeded at a layer costs a backward pass through the
    layers before it (the paper's map costs about two forward passes, which
    makes the detection-cost goal of 3× a forward pass). A plain-gradient or
    top-logit-seeded map needs a forward pass of its own and is excluded.
    """
    guided = [c for c in configs if c.response != "activation"]
    if any(c.response == "gradient" or c.seed == "top_logit" for c in guided):
        return False
    return len({c.layer for c in guided}) <= 1


def greedy_forward(
    candidates: Sequence[int],
    names: Sequence[str],
    max_features: int,
    *,
    allowed: Callable[[list[int]], bool],
    criterion: Callable[[list[int]], float],
) -> tuple[list[int], float, list[tuple[str, float]]]:
    """Greedy forward selection of columns: each step adds the allowed candidate that most raises
    ``criterion``, and stops when none raises it by more than 1e-3 (start: chance, 0.5).

    Returns the chosen columns, the final criterion and ``(name, criterion)`` after each step.
    """
    chosen: list[int] = []
    history: list[tuple[str, float]] = []
    best = 0.5
    while len(chosen) < max_features:
        trials = {f: criterion(chosen + [f]) for f in candidates if f not in chosen and allowed(chosen + [f])}
        if not trials:
            break
        f, value = max(trials.items(), key=lambda kv: kv[1])
        if value <= best + 1e-3:
            break
        chosen.append(f)
        best = value
        history.append((names[f], value))
    return chosen, best, history


def fit_combiner(
    split: Split,
    names: Sequence[str],
    configs: Mapping[str, ScoreConfig],
    attacks: Sequence[str],
    *,
    pool: int = 40,
    max_features: int = 6,
    c: float = 1.0,
    budget: Callable[[list[ScoreConfig]], bool] | None = None,
) -> FittedCombiner:
    """Greedy forward selection; with ``budget``, only sets of maps the budget allows are tried."""
    x, y, groups = _pooled(split, attacks)
    single = np.array([auc(x[y == 0, f], x[y == 1, f]) for f in range(x.shape[1])])
    ranked = np.argsort(-np.maximum(single, 1 - single))
    shortlist, seen_maps = [], set()
    for f in ranked:
        key = map_key(configs[names[f]])
        if budget is not None and not budget([configs[names[f]]]):
            continue
        if key not in seen_maps:
            shortlist.append(int(f))
            seen_maps.add(key)
        if len(shortlist) == pool:
            break
    chosen, best, history = greedy_forward(
        shortlist, names, max_features,
        allowed=lambda columns: budget is None or budget([configs[names[g]] for g in columns]),
        criterion=lambda columns: _cv_auc(x[:, columns], y, groups, c),
    )
    # the same fit the calibration job uses (rows: clean first, as in x)
    combiner = fit_logistic_combiner(x[y == 0][:, chosen], x[y == 1][:, chosen], c=c)
    return FittedCombiner(chosen, combiner, best, history)

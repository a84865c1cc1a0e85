"""Learned signals in the study: fit on the development part, cross-fitted by source so the combiner sees out-of-fold values.

A learned signal (:class:`detector.signals.LearnedSignal`: LID reference
sets, Fourier read-outs, small heads) is a template in the candidate pool.
Here, for every development set (clean, the extra clean inputs, every
attack), its parameter-free ``raw`` part is computed once (one forward pass
per batch, cached on disk); then

- **out-of-fold dev values**: dev rows are split into 5 folds grouped by
  source; for each fold the template is fitted on the other folds' clean rows
  and the *seen* attacks' adversarials (each attack weighted equally), and
  gives the values of the fold's rows (every attack's). The combiner's
  selection, fit and threshold read these, so no dev value comes from a
  signal that saw its own source;
- **the shipped signal**: the template fitted on every dev row (clean and
  seen attacks); the test part and the artifact use that one, computed from
  pixels exactly as the exported Triton model computes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from detector.signals import LearnedSignal
from detector.signals.fitting import FOLDS, cross_fit, raw_bank, signal_values

from ..detection_study.run import _cached, _key

LOGGER = logging.getLogger("corpus_study")
__all__ = ["FOLDS", "fit_learned", "raw_bank"]  # raw_bank and the cross-fit live in detector.signals.fitting


def fit_learned(
    model: torch.nn.Module,
    templates: Mapping[str, LearnedSignal],
    sets: Sequence[tuple[str, str | None]],
    pixels_of: Callable[[str, str | None], torch.Tensor],
    groups_of: Callable[[str, str | None], np.ndarray],
    seen: Sequence[str],
    *,
    cache: Path,
    data_key: str,
    describe: Callable[[str, str | None], object],
    batch: int,
    seed: int,
    role_of: Callable[[str, str | None], np.ndarray] | None = None,
) -> tuple[dict[str, LearnedSignal], dict[str, dict[tuple[str, str | None], np.ndarray]]]:
    """``(fitted signals, {name: {(part, attack): out-of-fold dev values}})`` for the dev ``sets`` (see the module docstring).

    ``role_of``: each row's role, ``"fit"``, ``"held"`` (the threshold's part,
    see :func:`.analysis.select_combined`) or ``"out"`` (shares an original
    with both); only ``"fit"`` rows are fitted on, the others get the values
    of the signal fitted on them, i.e. of the signal that ships.
    """
    if not templates:
        return {}, {}
    raws: dict[str, list[torch.Tensor]] = {name: [] for name in templates}
    for part, attack in sets:
        for name, template in templates.items():
            path = cache / f"raw-{part}-{attack or 'clean'}-{name}-{_key(data_key, part, attack, describe(part, attack), template.to_dict())}.pt"
            if not path.exists():
                LOGGER.info("learned signals: raw parts of %s/%s", part, attack or "clean")
                computed = raw_bank(model, pixels_of(part, attack), templates, batch)
                for other, value in computed.items():
                    _cached(cache / f"raw-{part}-{attack or 'clean'}-{other}-"
                                    f"{_key(data_key, part, attack, describe(part, attack), templates[other].to_dict())}.pt",
                            lambda value=value: value)
            raws[name].append(torch.load(path, weights_only=False))
    lengths = [len(groups_of(part, attack)) for part, attack in sets]
    groups = np.concatenate([groups_of(part, attack) for part, attack in sets])
    is_clean = np.concatenate([np.full(n, attack is None) for n, (_, attack) in zip(lengths, sets)])
    is_seen = np.concatenate([np.full(n, attack in seen) for n, (_, attack) in zip(lengths, sets)])
    weight = np.concatenate([np.full(n, 1.0 / max(n, 1)) for n in lengths])
    fitted: dict[str, LearnedSignal] = {}
    out_of_fold: dict[str, dict[tuple[str, str | None], np.ndarray]] = {}
    fit_rows = (np.concatenate([role_of(part, attack) for part, attack in sets]) == "fit") if role_of else np.ones(len(groups), bool)
    for name, template in templates.items():
        raw = torch.cat(raws[name])
        keep = torch.from_numpy(fit_rows)
        result = cross_fit(template, raw[keep], groups[fit_rows], is_clean[fit_rows], is_seen[fit_rows], weight[fit_rows],
                           seed=seed, name=name)
        fitted[name] = result.signal
        values = np.zeros(len(groups))
        values[fit_rows] = result.out_of_fold
        values[~fit_rows] = signal_values(result.signal, raw[~keep])
        bounds = np.cumsum([0, *lengths])
        out_of_fold[name] = {s: values[bounds[i] : bounds[i + 1]] for i, s in enumerate(sets)}
        LOGGER.info("learned signal %s fitted (%d dev rows, %d folds by source; %d rows not fitted on)",
                    name, int(fit_rows.sum()), result.folds, int((~fit_rows).sum()))
    return fitted, out_of_fold

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
from sklearn.model_selection import GroupKFold

from detector.features import _capture_activations
from detector.signals import LearnedSignal, SignalContext

from ..detection_study.run import _cached, _key

LOGGER = logging.getLogger("corpus_study")
FOLDS = 5


def raw_bank(model: torch.nn.Module, pixels: torch.Tensor, learned: Mapping[str, LearnedSignal], batch: int) -> dict[str, torch.Tensor]:
    """``{name: [N, ...]}`` raw parts of every learned signal (feature maps kept as float16 to bound memory)."""
    layers = {layer for signal in learned.values() for layer in signal.layers()}
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in learned}
    for start in range(0, len(pixels), batch):
        chunk = pixels[start : start + batch]
        captured, handles = _capture_activations(model, layers)
        try:
            with torch.no_grad():
                logits = model(chunk)
        finally:
            for handle in handles:
                handle.remove()
        context = SignalContext(model, chunk, logits, activations=captured)
        with torch.no_grad():
            for name, signal in learned.items():
                raw = signal.raw(context).float()
                rows[name].append(raw.half() if raw.dim() > 2 else raw)
    return {name: torch.cat(parts) if parts else torch.zeros(0) for name, parts in rows.items()}


def _values(signal: LearnedSignal, raw: torch.Tensor, batch: int = 256) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([signal.from_raw(raw[i : i + batch].float()).double().numpy()
                               for i in range(0, len(raw), batch)]) if len(raw) else np.zeros(0)


def _fit(template: LearnedSignal, raw: torch.Tensor, is_clean: np.ndarray, is_seen: np.ndarray,
         weight: np.ndarray, seed: int) -> LearnedSignal:
    return template.fit(raw[torch.from_numpy(is_clean)].float().numpy(), raw[torch.from_numpy(is_seen)].float().numpy(),
                        adversarial_weight=weight[is_seen], seed=seed)


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
) -> tuple[dict[str, LearnedSignal], dict[str, dict[tuple[str, str | None], np.ndarray]]]:
    """``(fitted signals, {name: {(part, attack): out-of-fold dev values}})`` for the dev ``sets`` (see the module docstring)."""
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
    folds = min(FOLDS, len(np.unique(groups)))
    fitted: dict[str, LearnedSignal] = {}
    out_of_fold: dict[str, dict[tuple[str, str | None], np.ndarray]] = {}
    for name, template in templates.items():
        raw = torch.cat(raws[name])
        values = np.zeros(len(groups))
        for fold, (train, valid) in enumerate(GroupKFold(n_splits=folds).split(groups, groups=groups)):
            mask = np.zeros(len(groups), dtype=bool)
            mask[train] = True
            try:
                signal = _fit(template, raw, is_clean & mask, is_seen & mask, weight, seed + fold)
            except (ValueError, RuntimeError) as error:  # a fold without enough clean rows or a class (smoke data)
                LOGGER.warning("learned signal %s: fold %d fitted on all dev rows (%s)", name, fold, error)
                signal = _fit(template, raw, is_clean, is_seen, weight, seed + fold)
            values[valid] = _values(signal, raw[torch.from_numpy(valid)])
        fitted[name] = _fit(template, raw, is_clean, is_seen, weight, seed)
        bounds = np.cumsum([0, *lengths])
        out_of_fold[name] = {s: values[bounds[i] : bounds[i + 1]] for i, s in enumerate(sets)}
        LOGGER.info("learned signal %s fitted (%d dev rows, %d folds by source)", name, len(groups), folds)
    return fitted, out_of_fold

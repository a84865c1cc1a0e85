"""Fitting learned signals on raw parts: the shared core of ``advsentry calibrate --refit-signals`` and the corpus study.

A :class:`~detector.signals.LearnedSignal` splits into a parameter-free
``raw`` part (what the model gives for a batch) and a fitted ``from_raw``
part. Fitting it therefore needs only the raw parts of clean and adversarial
inputs, computed once:

- :func:`raw_bank` computes them for a batch of pixels (one forward pass per
  batch; feature maps kept as float16 to bound memory);
- :func:`capture_first` captures the activations of the *first* forward pass
  run inside a block, so a caller that already runs the model (the
  calibration's scoring call) gets the raw parts of that same pass;
- :func:`cross_fit` fits a template on all given rows (the signal to ship)
  and, with folds grouped by source, gives every row its *out-of-fold* value:
  the value of the signal fitted without the row's source. A combiner and a
  threshold fitted on those values never see a signal value from a signal
  that saw its own source (otherwise a head that memorized its training
  rows would make the combiner over-trust it).

Adversarial rows carry weights (e.g. each attack counted equally); clean rows
are unweighted. Everything here is deterministic given ``seed``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .base import LearnedSignal, SignalContext

LOGGER = logging.getLogger("advsentry.signals")

#: Folds of the cross-fit (fewer when there are fewer distinct sources).
FOLDS = 5


@contextlib.contextmanager
def capture_first(model: nn.Module, layers: set[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, ``{layer: output}`` of the first forward call of each module named in ``layers`` (detached).

    Later calls (e.g. Feature Squeezing's extra forward passes on squeezed
    copies) do not overwrite it: the captured outputs belong to the first pass.
    """
    from ..features import _capture_activations  # imported here: detector.features imports this package

    captured, handles = _capture_activations(model, layers, first_only=True)
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def raw_parts(context: SignalContext, learned: Mapping[str, LearnedSignal]) -> dict[str, torch.Tensor]:
    """``{name: [B, ...]}`` raw parts of one batch as stored: float32, feature maps (more than 2 dims) as float16."""
    with torch.no_grad():
        return {name: stored_form(signal.raw(context)) for name, signal in learned.items()}


def stored_form(raw: torch.Tensor) -> torch.Tensor:
    """How a raw part is kept: float32, or float16 for feature maps (more than 2 dims; they dominate memory)."""
    raw = raw.float()
    return raw.half() if raw.dim() > 2 else raw


def raw_bank(model: nn.Module, pixels: torch.Tensor, learned: Mapping[str, LearnedSignal], batch: int) -> dict[str, torch.Tensor]:
    """``{name: [N, ...]}`` raw parts of every learned signal (feature maps kept as float16 to bound memory)."""
    from ..features import _capture_activations  # imported here: detector.features imports this package

    layers = {layer for signal in learned.values() for layer in signal.layers()}
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in learned}
    for start in range(0, len(pixels), batch):
        chunk = pixels[start : start + batch]
        captured, handles = _capture_activations(model, layers)  # what extract_maps captures on the served path
        try:
            with torch.no_grad():
                logits = model(chunk)
        finally:
            for handle in handles:
                handle.remove()
        context = SignalContext(model, chunk, logits, activations=captured)
        for name, raw in raw_parts(context, learned).items():
            rows[name].append(raw)
    return {name: torch.cat(parts) if parts else torch.zeros(0) for name, parts in rows.items()}


def signal_values(signal: LearnedSignal, raw: torch.Tensor, batch: int = 256) -> np.ndarray:
    """``[N]`` float64 values of a fitted signal from stored raw parts (in batches, float32)."""
    with torch.no_grad():
        return np.concatenate([signal.from_raw(raw[i : i + batch].float()).double().numpy()
                               for i in range(0, len(raw), batch)]) if len(raw) else np.zeros(0)


def fit_signal(template: LearnedSignal, raw: torch.Tensor, is_clean: np.ndarray, is_adversarial: np.ndarray,
               weight: np.ndarray, seed: int) -> LearnedSignal:
    """``template`` fitted on the rows flagged clean against those flagged adversarial (``weight`` of the latter)."""
    return template.fit(raw[torch.from_numpy(is_clean)].float().numpy(), raw[torch.from_numpy(is_adversarial)].float().numpy(),
                        adversarial_weight=weight[is_adversarial], seed=seed)


@dataclass(frozen=True)
class CrossFit:
    """One learned signal's cross-fit: the signal fitted on every row, and each row's out-of-fold value."""

    signal: LearnedSignal
    out_of_fold: np.ndarray  # [N] float64
    folds: int
    #: folds whose training part could not fit the template (too few clean rows, no adversarial):
    #: their rows got values of a signal fitted on every row, i.e. *not* out of fold.
    fallback_folds: tuple[int, ...] = ()


def cross_fit(
    template: LearnedSignal,
    raw: torch.Tensor,
    groups: np.ndarray,
    is_clean: np.ndarray,
    is_adversarial: np.ndarray,
    weight: np.ndarray,
    *,
    seed: int = 0,
    folds: int = FOLDS,
    name: str = "",
) -> CrossFit:
    """Fit ``template`` on all rows and out of fold, folds grouped by ``groups`` (the source of each row).

    ``raw`` ``[N, ...]`` holds every row's raw part; the template is fitted on
    the rows flagged ``is_clean`` against those flagged ``is_adversarial``
    (weighted by ``weight``); rows flagged neither still get out-of-fold
    values. Fold ``f`` is fitted with seed ``seed + f``, the final signal
    with ``seed``. A fold whose training part cannot fit the template falls
    back to all rows (logged and listed in :attr:`CrossFit.fallback_folds`).
    """
    from sklearn.model_selection import GroupKFold

    groups = np.asarray(groups)
    is_clean, is_adversarial = np.asarray(is_clean, dtype=bool), np.asarray(is_adversarial, dtype=bool)
    weight = np.asarray(weight, dtype=np.float64)
    if not len(raw) == len(groups) == len(is_clean) == len(is_adversarial) == len(weight):
        raise ValueError(f"cross_fit: {len(raw)} raw rows, {len(groups)} groups, {len(is_clean)}/{len(is_adversarial)} "
                         f"flags and {len(weight)} weights: expected one per row")
    n_folds = min(folds, len(np.unique(groups)))
    if n_folds < 2:
        raise ValueError(f"learned signal {name or template.kind}: rows from {len(np.unique(groups))} source(s); "
                         "out-of-fold values need at least 2")
    values = np.zeros(len(groups))
    fallback: list[int] = []
    for fold, (train, valid) in enumerate(GroupKFold(n_splits=n_folds).split(groups, groups=groups)):
        mask = np.zeros(len(groups), dtype=bool)
        mask[train] = True
        try:
            signal = fit_signal(template, raw, is_clean & mask, is_adversarial & mask, weight, seed + fold)
        except (ValueError, RuntimeError) as error:  # a fold without enough clean rows or a class
            LOGGER.warning("learned signal %s: fold %d fitted on all rows (%s)", name or template.kind, fold, error)
            fallback.append(fold)
            signal = fit_signal(template, raw, is_clean, is_adversarial, weight, seed + fold)
        values[valid] = signal_values(signal, raw[torch.from_numpy(valid)])
    fitted = fit_signal(template, raw, is_clean, is_adversarial, weight, seed)
    return CrossFit(fitted, values, n_folds, tuple(fallback))

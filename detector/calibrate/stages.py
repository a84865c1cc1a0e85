"""The work of one unit: score a clean chunk; attack a chunk and score the successful adversarials.

Each function is deterministic given its inputs (the chunk's images, the
per-(attack, chunk) seed from :meth:`AttackSpec.seed_for`), which is what makes
a sharded job merge into exactly the single run's result: a chunk is always
attacked as the same batch with the same seed, whichever process runs it.

Units store per-map *entropies*, not scores, so that the combiner can be
(re)fitted afterwards without rescoring. Only successful adversarials are
scored: they are the positives. With ``refit_signals`` they also store each
learned signal's ``raw`` part of the scored rows (``{name: [rows, ...]}``,
feature maps as float16), taken from the activations of the same forward
pass that scored them, so the job can refit the signals afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from detector.attacks import QueryModel, make_attack
from detector.config import ScoreConfig
from detector.entropy import gray_levels, local_entropy_map
from detector.signals import LearnedSignal, Signal, SignalContext
from detector.signals.fitting import capture_first, stored_form

from .access import Scorer
from .data import CleanPlan
from .spec import AttackSpec, JobConfig
from .splits import FIT, THRESHOLD
from .triton_query import TritonEndpoint, triton_query_model


@dataclass
class Runtime:
    """The live objects a job's units need (models, endpoint, scorer)."""

    config: JobConfig
    plan: CleanPlan
    scorer: Scorer
    local: nn.Module | None
    surrogate: nn.Module | None
    endpoint: TritonEndpoint | None
    device: torch.device
    #: with ``refit_signals``: the learned signals whose raw parts the units keep (templates allowed)
    learned: dict[str, LearnedSignal] = field(default_factory=dict)

    def attack_model(self, spec: AttackSpec) -> nn.Module | QueryModel:
        if spec.transfer:
            assert self.surrogate is not None
            return self.surrogate
        if spec.scenario == "black_box_probing":
            if self.config.query_via_triton or self.local is None:
                assert self.endpoint is not None
                return triton_query_model(self.endpoint)
            return QueryModel.from_module(self.local)
        if self.local is None:
            raise RuntimeError(f"{spec.label}: needs a local model")
        return self.local


def learned_signals(runtime: Runtime) -> dict[str, LearnedSignal]:
    """The detector's learned signals whose raw parts the units keep: all of them with ``refit_signals``, else none."""
    if not runtime.config.refit_signals:
        return {}
    return dict(runtime.learned)


@dataclass(frozen=True)
class PendingRefit(Signal):
    """Stands in, while the units are scored, for a learned signal that is refitted at the end (a template).

    A template has no values yet (its parameters belong to the layer it was
    moved from, or to none); the units keep its raw part, and its column is
    rewritten by the refit (:meth:`CalibrationJob.refit_signals`). Its value
    here is 0, never read. It reads the template's layers, so the scoring
    pass captures them.
    """

    template: LearnedSignal | None = None

    def layers(self) -> set[str]:
        return self.template.layers() if self.template is not None else set()

    def values(self, context: SignalContext) -> torch.Tensor:
        return torch.zeros(context.pixels.shape[0], device=context.pixels.device)


def _score(runtime: Runtime, batch: torch.Tensor, rows: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The detector's maps of ``batch`` and (with ``refit_signals``) the learned signals' raw parts of its first ``rows``.

    The raw parts come from the activations of the scoring call's own (first)
    forward pass; the learned signals' own columns are placeholders then
    (:class:`PendingRefit`), rewritten from these raw parts by the refit.
    """
    learned = learned_signals(runtime)
    if not learned:
        return runtime.scorer.maps(batch)[0], None
    local = runtime.scorer.local
    if local is None:  # JobConfig refuses refit_signals with Triton scoring; this guards direct use
        raise RuntimeError("refit_signals needs a local model (raw parts come from its activations)")
    layers = {layer for signal in learned.values() for layer in signal.layers()}
    with capture_first(local, layers) as captured:
        maps, logits = runtime.scorer.maps(batch)
    context = SignalContext(local, batch.to(runtime.scorer.detector.device), logits, activations=captured)
    with torch.no_grad():
        raw = {name: stored_form(signal.raw(context).float()[:rows]).cpu() for name, signal in learned.items()}
    return maps, raw


def clean_unit(runtime: Runtime, chunk: int) -> dict[str, Any]:
    """Labels, confidence, selection and (for selected images) entropies of one clean chunk."""
    indices = list(runtime.plan.chunk(chunk))
    pixels = runtime.plan.pixels(indices).to(runtime.device)
    probabilities = torch.softmax(runtime.scorer.logits(pixels).float(), dim=1).cpu()
    confidence, labels = probabilities.max(dim=1)
    selected = confidence >= runtime.config.confidence_floor
    entropies = torch.zeros(0, len(runtime.scorer.detector.features))
    raw = None
    if selected.any():
        batch = pixels[selected.to(pixels.device)]
        maps, raw = _score(runtime, batch, len(batch))
        entropies = runtime.scorer.entropies(maps)
    record = {
        "indices": torch.tensor(indices),
        "labels": labels,
        "confidence": confidence,
        "selected": selected,
        "entropies": entropies.double(),  # rows: selected images, in order
        "classes": int(probabilities.shape[1]),
    }
    if runtime.config.refit_signals:
        record["raw"] = raw or {}  # rows: as "entropies"; empty when nothing was selected
    return record


def target_labels(indices: list[int], labels: torch.Tensor, classes: int, seed: int) -> torch.Tensor:
    """A seeded target class per image, never its clean label (independent of batching)."""
    targets = []
    for index, label in zip(indices, labels.tolist()):
        draw = int(np.random.default_rng([seed, index]).integers(0, classes - 1))
        targets.append(draw + (draw >= label))
    return torch.tensor(targets, dtype=torch.long)


def _selected(runtime: Runtime, spec: AttackSpec, clean: dict[str, Any]) -> tuple[list[int], torch.Tensor]:
    keep = [
        (int(i), int(label))
        for i, label, sel in zip(clean["indices"].tolist(), clean["labels"].tolist(), clean["selected"].tolist())
        if sel and (spec.limit is None or i < spec.limit)
    ]
    return [i for i, _ in keep], torch.tensor([label for _, label in keep], dtype=torch.long)


def universal_pool(plan: CleanPlan, fit_images: int = 16) -> list[int]:
    """The candidates a universal perturbation may be fitted on: the first ``4 * fit_images`` of the fit and threshold splits.

    Never held-out ones (the per-attack results are measured there), nor
    candidates that mix splits (they share an original with the held-out
    split, maybe). Threshold-split images are allowed: the perturbation is part
    of the attack, not of the detector, and no clean score depends on it.
    """
    return [i for i in range(len(plan.candidates)) if plan.role(i) in (FIT, THRESHOLD)][: 4 * fit_images]


def universal_fit(runtime: Runtime, spec: AttackSpec, fit_images: int = 16) -> dict[str, Any]:
    """Fit a universal perturbation on the first ``fit_images`` confident candidates of :func:`universal_pool`."""
    plan, config = runtime.plan, runtime.config
    pool = universal_pool(plan, fit_images)
    pixels = plan.pixels(pool).to(runtime.device)
    probabilities = torch.softmax(runtime.scorer.logits(pixels).float(), dim=1).cpu()
    confidence, labels = probabilities.max(dim=1)
    chosen = [k for k in range(len(pool)) if confidence[k] >= config.confidence_floor][:fit_images]
    if not chosen:
        raise RuntimeError(f"{spec.label}: no confident fit- or threshold-split image to fit the universal perturbation on")
    indices = [pool[k] for k in chosen]
    labels = labels[chosen]
    attack = make_attack(spec.attack, runtime.attack_model(spec), seed=spec.seed_for(config.seed, -1),
                         quantize=config.quantize, targeted=spec.targeted, **spec.params)
    targets = target_labels(indices, labels, int(probabilities.shape[1]), config.seed) if spec.targeted else None
    dev = runtime.device
    perturbation = attack.fit(pixels[chosen], labels.to(dev), None if targets is None else targets.to(dev))
    return {"perturbation": perturbation.detach().cpu(), "fitted_on": indices, "fooling_rate": attack.fooling_rate}


def _example(runtime: Runtime, index: int, clean: torch.Tensor, adversarial: torch.Tensor,
             clean_maps: dict[str, torch.Tensor], adv_maps: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """What the report's example grid shows for one image: input, adversarial, first entropy map's response and entropy.

    ``None`` for a detector with no entropy map (only scalar signals: nothing to draw).
    """
    found = next(((n, c) for n, c in runtime.scorer.detector.features.items() if isinstance(c, ScoreConfig)), None)
    if found is None:
        return None
    name, config = found
    example: dict[str, Any] = {
        "index": index,
        "name": runtime.plan.candidates[index].name,
        "map": name,
        "clean": (clean * 255).round().to(torch.uint8).cpu(),
        "adversarial": (adversarial * 255).round().to(torch.uint8).cpu(),
    }
    for kind, maps in (("clean", clean_maps), ("adversarial", adv_maps)):
        levels = gray_levels(maps[name][None].detach().to("cpu", torch.float32), config)
        example[f"{kind}_gray"] = levels[0].to(torch.int32)
        example[f"{kind}_entropy"] = local_entropy_map(levels, config)[0].to(torch.float16)
    return example


def attack_unit(runtime: Runtime, spec: AttackSpec, chunk: int, clean: dict[str, Any],
                perturbation: torch.Tensor | None = None) -> dict[str, Any]:
    """Attack the selected images of one chunk; score the successful adversarials on the production path."""
    config = runtime.config
    indices, labels = _selected(runtime, spec, clean)
    features = len(runtime.scorer.detector.features)
    record: dict[str, Any] = {"indices": torch.tensor(indices, dtype=torch.long), "entropies": torch.zeros(0, features).double()}
    if not indices:
        empty = torch.zeros(0)
        record.update(success=empty.bool(), linf=empty, l2=empty, l0=empty, queries=None, surrogate_success=None, example=None)
        return record
    dev = runtime.device
    pixels = runtime.plan.pixels(indices).to(dev)
    targets = target_labels(indices, labels, clean["classes"], config.seed) if spec.targeted else None
    attack = make_attack(spec.attack, runtime.attack_model(spec), seed=spec.seed_for(config.seed, chunk),
                         quantize=config.quantize, targeted=spec.targeted, **spec.params)
    if perturbation is not None:
        attack.perturbation = perturbation.to(dev)  # type: ignore[attr-defined]
    result = attack(pixels, labels.to(dev), None if targets is None else targets.to(dev))
    success = result.success.cpu()
    surrogate_success = None
    if spec.transfer:  # crafted on the surrogate: what counts is the protected model's answer
        surrogate_success = success
        predicted = runtime.scorer.logits(result.adversarial).argmax(dim=1).cpu()
        success = predicted == targets if targets is not None else predicted != labels
    record.update(
        success=success,
        surrogate_success=surrogate_success,
        linf=result.norms["linf"].cpu(),
        l2=result.norms["l2"].cpu(),
        l0=result.norms["l0"].cpu(),
        queries=None if result.queries is None else result.queries.cpu().double(),
        targets=targets,
        example=None,
    )
    hits = success.nonzero().flatten().tolist()
    if hits:
        batch = result.adversarial[hits]
        want_example = chunk < config.example_chunks
        if want_example:  # the clean counterpart rides along in the same scoring call
            batch = torch.cat([batch, pixels[hits[0] : hits[0] + 1]])
        maps, raw = _score(runtime, batch, len(hits))
        entropies = runtime.scorer.entropies(maps).double()
        record["entropies"] = entropies[: len(hits)]
        if raw is not None:
            record["raw"] = raw  # rows: as "entropies" (the successful adversarials)
        if want_example:
            record["example"] = _example(
                runtime, indices[hits[0]], pixels[hits[0]], result.adversarial[hits[0]],
                {k: v[-1] for k, v in maps.items()}, {k: v[0] for k, v in maps.items()},
            )
    return record

"""The adaptive attack: a white-box attacker who knows the whole detector (Tramèr et al. 2020's checklist).

The attacker maximizes misclassification *and* keeps the detector's score
under its threshold: PGD (L∞, on the 8-bit grid) on

    loss = CW margin of the true class  +  λ · max(0, score(x) - threshold + 1)

swept over ε ∈ {2, 4, 8}/255 and λ, and per input the first iterate that is
misclassified *and* unflagged counts as an evasion (judged by the exact
detector, not the surrogate). Reported: the share of inputs that end correctly
classified or flagged at the 5 % threshold, beside the undefended model's
robust accuracy under the same PGD budget (λ = 0).

Gradients (the checklist's "approximate non-differentiable steps"):
- logit margin, softmax entropy, spectral shares, the median squeezer: exact;
- bit-depth squeezing and the final 8-bit rounding: straight-through (BPDA
  with the identity);
- average local spatial entropy (histograms of quantized levels, not
  differentiable): the forward value is exact; the backward pass goes through
  a soft version (no quantization; patch multiplicities counted with a
  Gaussian kernel of one gray level), the usual smooth surrogate;
- learned signals (LID, Fourier read-out, small head): exact (their
  ``from_raw(raw(·))`` is differentiable: distances, FFT, a 1×1 conv);
- guided-backprop maps: the plain gradient of the same seed with
  ``create_graph`` (the guided masks are piecewise constant in the input).
The detector has no randomness, so no expectation over transformations is needed.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from detector import CalibrationArtifact, ScoreConfig, map_entropies
from detector.features import extract_maps
from detector.signals import (HighFrequencyEnergy, LearnedSignal, LogitMargin, ResidualEntropy, SignalContext, SoftmaxEntropy,
                              SqueezeDistance)
from detector.signals.residual import high_pass_residual
from detector.signals.spectral import _LUMINANCE, high_frequency_share
from detector.signals.squeeze import bit_depth, median_filter

from ..detection_study.run import _cached
from .data import Clean

LOGGER = logging.getLogger("corpus_study")
EPSILONS_255 = (2, 4, 8)
WEIGHTS = (0.0, 1.0, 10.0)


def _straight_through(exact: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    return exact.detach() + soft - soft.detach()


def _soft_normalize(gray: torch.Tensor, config: ScoreConfig) -> torch.Tensor:
    flat = gray.reshape(gray.shape[0], -1).float()
    if config.normalize == "none":
        return flat.clamp(0, 1).view_as(gray)
    if config.normalize == "standardize":
        z = (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True).clamp_min(1e-12)
        return ((z + 3.0) / 6.0).clamp(0, 1).view_as(gray)
    if config.normalize == "percentile":
        q = config.percentile / 100.0
        low, high = flat.quantile(1 - q, dim=1, keepdim=True), flat.quantile(q, dim=1, keepdim=True)
        flat = torch.minimum(torch.maximum(flat, low), high)
    else:
        low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - low) / (high - low).clamp_min(1e-12)).clamp(0, 1).view_as(gray)


def soft_entropy(maps: torch.Tensor, config: ScoreConfig) -> torch.Tensor:
    """A smooth stand-in for the average local spatial entropy, for gradients only."""
    from detector.entropy import to_gray

    gray = to_gray(maps.float(), config)
    levels = _soft_normalize(gray, config) * config.levels  # [B, H, W], continuous gray levels
    k, n = config.patch, config.patch**2
    # Every other patch position (stride ≥ 2): a quarter of the memory and time, the same kind of gradient.
    patches = F.unfold(levels.unsqueeze(1), k, stride=max(2, config.stride))  # [B, n, P]
    difference = patches.unsqueeze(1) - patches.unsqueeze(2)  # [B, n, n, P]
    counts = torch.exp(-0.5 * difference.pow(2)).sum(dim=1)  # [B, n, P], soft multiplicities ≥ 1
    entropy = math.log2(n) - torch.log2(counts).mean(dim=1)
    return entropy.mean(dim=1)


def surrogate_signals(model: torch.nn.Module, pixels: torch.Tensor, artifact: CalibrationArtifact) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, ``[B, F]`` signals) with gradients; forward values equal the detector's on entropy features."""
    return _signals(model, pixels, artifact)


def exact_signals(model: torch.nn.Module, pixels: torch.Tensor, artifact: CalibrationArtifact) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits with gradients, ``[B, F]`` signals without): the plain PGD (λ = 0) needs no detector gradient."""
    logits = model(pixels)
    with torch.no_grad():
        maps, _ = extract_maps(model, pixels.detach(), artifact.features)
        return logits, map_entropies(maps, artifact.features)


def _signals(model: torch.nn.Module, pixels: torch.Tensor, artifact: CalibrationArtifact) -> tuple[torch.Tensor, torch.Tensor]:
    features = artifact.features
    layers = {c.layer for c in features.values() if isinstance(c, ScoreConfig) and c.layer} | {
        c.layer for c in features.values() if isinstance(c, HighFrequencyEnergy) and c.layer} | {
        layer for c in features.values() if isinstance(c, LearnedSignal) for layer in c.layers()}
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o)) for name in layers]
    try:
        logits = model(pixels)
    finally:
        for handle in handles:
            handle.remove()
    # Exact values of the entropy features (the others' surrogate forward values are exact already).
    entropy_features = {n: c for n, c in features.items() if isinstance(c, ScoreConfig | ResidualEntropy)}
    exact = torch.zeros(len(pixels), len(features))
    if entropy_features:
        with torch.no_grad():
            maps, _ = extract_maps(model, pixels.detach(), {n: c for n, c in entropy_features.items() if isinstance(c, ScoreConfig)})
            for index, (name, config) in enumerate(features.items()):
                if isinstance(config, ScoreConfig):
                    exact[:, index] = map_entropies({name: maps[name]}, {name: config})[:, 0]
                elif isinstance(config, ResidualEntropy):
                    exact[:, index] = config.values(SignalContext(model, pixels.detach(), logits.detach()))
    probabilities = torch.softmax(logits, 1)
    columns = []
    for index, (name, config) in enumerate(features.items()):
        if isinstance(config, LogitMargin):
            top2 = logits.topk(2, dim=1).values
            value = top2[:, 0] - top2[:, 1]
        elif isinstance(config, SoftmaxEntropy):
            value = -(probabilities * torch.log_softmax(logits, 1)).sum(1) / math.log(2.0)
        elif isinstance(config, SqueezeDistance):
            squeezed = (_straight_through(bit_depth(pixels, config.bits), pixels) if config.squeezer == "bit_depth"
                        else median_filter(pixels, config.size))
            value = (probabilities - torch.softmax(model(squeezed), 1)).abs().sum(1)
        elif isinstance(config, HighFrequencyEnergy):
            weights = torch.tensor(_LUMINANCE, device=pixels.device).view(1, 3, 1, 1)
            maps = captured[config.layer] if config.layer else (pixels * weights).sum(1, keepdim=True)
            value = high_frequency_share(maps, float(config.cutoff))
        elif isinstance(config, LearnedSignal):
            value = config.from_raw(config.raw(SignalContext(model, pixels, logits, activations=captured)))
        elif isinstance(config, ResidualEntropy):
            value = _straight_through(exact[:, index], soft_entropy(high_pass_residual(pixels, config.blur), config.entropy_config()))
        elif config.response == "activation":
            value = _straight_through(exact[:, index], soft_entropy(captured[config.layer], config))
        else:
            seed = captured[config.layer] if config.layer else logits
            (response,) = torch.autograd.grad(seed, pixels, grad_outputs=seed, create_graph=True)
            value = _straight_through(exact[:, index], soft_entropy(response, config))
        columns.append(value)
    return logits, torch.stack(columns, dim=1)


def adaptive_pgd(model, clean: torch.Tensor, labels: torch.Tensor, artifact: CalibrationArtifact, *,
                 eps: float, weight: float, steps: int) -> dict[str, torch.Tensor]:
    """Per input: evaded (wrong and unflagged at some step), and wrong at the end (undefended view)."""
    alpha = eps / 4
    combiner, threshold = artifact.combiner, artifact.threshold
    x = clean.clone()
    evaded = torch.zeros(len(clean), dtype=torch.bool)
    wrong_ever = torch.zeros(len(clean), dtype=torch.bool)
    evasions = clean.clone()  # the first evading 8-bit image of each input, re-scored exactly at the end
    for _ in range(steps + 1):
        x_q = _straight_through(torch.round(x * 255) / 255, x).detach().requires_grad_(True)
        logits, signals = (surrogate_signals if weight > 0 else exact_signals)(model, x_q, artifact)
        score = combiner.combine(signals.double()).float()
        with torch.no_grad():
            wrong = logits.argmax(1) != labels
            wrong_ever |= wrong
            new = wrong & (score <= threshold) & ~evaded
            evasions[new] = x_q.detach()[new]
            evaded |= new
        true = logits.gather(1, labels[:, None])[:, 0]
        other = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), -1e9).amax(1)
        loss = (true - other).clamp_min(-5.0) + weight * (score - threshold + 1.0).clamp_min(0.0)
        (gradient,) = torch.autograd.grad(loss.sum(), x_q)
        with torch.no_grad():
            x = (x - alpha * gradient.sign()).clamp(clean - eps, clean + eps).clamp(0, 1)
    # The surrogate's forward values are meant to be exact; check every claimed evasion with the real detector.
    verified = evaded.clone()
    if evaded.any():
        from detector import Detector

        detector = Detector(artifact.features, combiner=combiner, threshold=threshold, model=model)
        with torch.no_grad():
            maps, logits = detector.maps_and_logits(evasions[evaded])
            scores = detector.score_maps(maps)
        verified[evaded] = (logits.argmax(1) != labels[evaded]) & (scores <= threshold)
    return {"evaded": verified, "claimed": evaded, "wrong_ever": wrong_ever}


def adaptive_study(model, clean: Clean, artifact: CalibrationArtifact, *, settings, cache: Path, steps: int = 10) -> dict[str, Any]:
    count = min(settings.adaptive_images, len(clean))
    pixels, labels = clean.pixels[:count], clean.labels[:count]
    rows = []
    for eps_255 in EPSILONS_255:
        for weight in WEIGHTS:
            def run() -> dict[str, torch.Tensor]:
                parts = [adaptive_pgd(model, pixels[i : i + 8], labels[i : i + 8], artifact, eps=eps_255 / 255,
                                      weight=weight, steps=steps if not settings.smoke else 1) for i in range(0, count, 8)]
                return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

            LOGGER.info("adaptive attack ε=%d/255 λ=%g on %d images", eps_255, weight, count)
            outcome = _cached(cache / f"eps{eps_255}-w{weight:g}-s{steps}-n{count}.pt", run)
            rows.append({
                "eps_255": eps_255, "weight": weight, "n": count,
                "undefended_robust_accuracy": float(1 - outcome["wrong_ever"].float().mean()),
                "evasion_rate": float(outcome["evaded"].float().mean()),
                "surrogate_claimed_evasions": int(outcome["claimed"].sum()),
                "correct_or_flagged": float(1 - outcome["evaded"].float().mean()),
            })
    worst = {str(e): min(r["correct_or_flagged"] for r in rows if r["eps_255"] == e) for e in EPSILONS_255}
    undefended = {str(e): min(r["undefended_robust_accuracy"] for r in rows if r["eps_255"] == e) for e in EPSILONS_255}
    method = (f"PGD L∞, {steps} steps of ε/4 on the 8-bit grid, loss = CW margin + λ·hinge(score − threshold + 1), "
              f"λ ∈ {list(WEIGHTS)}; the first misclassified and unflagged iterate counts as an evasion, confirmed by re-scoring it with the exact detector. "
              "λ = 0 is the plain (non-adaptive) PGD. Gradients: see benchmarks/corpus_study/adaptive.py.")
    return {"method": method, "rows": rows, "worst_case": worst, "undefended_robust_accuracy": undefended,
            "threshold": artifact.threshold, "features": list(artifact.features)}

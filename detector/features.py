"""Compute every feature map a detector needs for a batch, in as few passes as possible.

A detector may read several maps of one input (guided-backprop responses seeded
at different layers, or forward activations of intermediate layers). This
module groups the requested maps so that forward activations are captured
during the same forward pass as a guided backward, and each distinct backward
seed costs one backward pass. Other signals (:mod:`detector.signals`) are
computed from the same forward pass (logits, captured activations) plus the
extra forward passes they need, each served as ``[B, 1]``.
:class:`FeatureModel` wraps it as an ``nn.Module`` returning
``{"logits": ..., <output name>: map or signal, ...}``: exactly what a
Triton-hosted model returns to the sidecar.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .config import ScoreConfig
from .guided import guided_responses
from .signals import FeatureConfig, Signal, SignalContext


def _capture_activations(model: nn.Module, layers: set[str], *, first_only: bool = False) -> tuple[dict[str, torch.Tensor], list]:
    """``({layer: output}, hook handles)``: forward hooks that record each named layer's output (detached).

    ``first_only`` keeps the output of a layer's first call (later passes, such
    as Feature Squeezing's squeezed copies, do not overwrite it); the caller
    removes the handles.
    """
    modules = dict(model.named_modules())
    missing = sorted(layers - set(modules))
    if missing:
        raise KeyError(f"model has no module(s) named {', '.join(map(repr, missing))}")
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name in layers:
        def hook(module: nn.Module, inputs: object, output: object, name: str = name) -> None:
            if isinstance(output, torch.Tensor) and not (first_only and name in captured):
                captured[name] = output.detach()

        handles.append(modules[name].register_forward_hook(hook))
    return captured, handles


def extract_maps(
    model: nn.Module, pixels: torch.Tensor, features: Mapping[str, FeatureConfig]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``{output name: map or [B, 1] signal}`` for every feature, and the logits, for a batch of pixels."""
    specs = {name: c for name, c in features.items() if isinstance(c, ScoreConfig)}
    signals = {name: c for name, c in features.items() if isinstance(c, Signal)}
    activation_layers = {c.layer for c in specs.values() if c.response == "activation"}
    activation_layers |= {layer for signal in signals.values() for layer in signal.layers()}
    if None in activation_layers:
        raise ValueError("response='activation' needs an explicit layer name")
    # One forward pass per (response kind, seed kind); one backward per distinct seed layer.
    backward_groups: dict[tuple[str, str], dict[str | None, list[str]]] = {}
    for name, config in specs.items():
        if config.response != "activation":
            group = backward_groups.setdefault((config.response, config.seed), {})
            group.setdefault(config.layer if config.seed == "final_conv" else None, []).append(name)

    captured, handles = _capture_activations(model, activation_layers)  # type: ignore[arg-type]
    maps: dict[str, torch.Tensor] = {}
    logits: torch.Tensor | None = None
    try:
        for (response, seed), by_layer in backward_groups.items():
            responses, logits, _, _ = guided_responses(
                model, pixels, list(by_layer), top_logit=seed == "top_logit", guided=response == "guided_backprop"
            )
            for layer, names in by_layer.items():
                for name in names:
                    maps[name] = responses[layer]
        if logits is None:  # activations only: one forward pass, no autograd
            with torch.no_grad():
                logits = model(pixels)
    finally:
        for handle in handles:
            handle.remove()
    for name, config in specs.items():
        if config.response == "activation":
            maps[name] = captured[config.layer]  # type: ignore[index]
    if signals:
        context = SignalContext(model, pixels.detach(), logits.detach(), activations=captured)
        for name, signal in signals.items():
            maps[name] = signal.compute(context)
    return maps, logits.detach()


class FeatureModel(nn.Module):
    """``pixels -> {"logits": ..., **maps}``: the model as the Triton backend serves it."""

    def __init__(self, model: nn.Module, specs: Mapping[str, FeatureConfig]) -> None:
        super().__init__()
        self.model = model
        self.specs = dict(specs)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        maps, logits = extract_maps(self.model, pixels, self.specs)
        return {"logits": logits, **maps}

"""Class activation maps: where in the image the evidence for a class sits.

CAM (Zhou et al. 2016, "Learning Deep Features for Discriminative
Localization") is exact for a network whose head is *global average pool →
linear*: with ``A`` the last convolutional features ``[C, h, w]`` and ``W`` the
linear layer's weights, the map of class ``k`` is ``M_k = Σ_c W[k, c] · A[c]``
and the class logit is ``mean(M_k) + b_k``. EfficientNet-Lite0 (the bundled
model) has such a head, so its CAM is the real thing, not an approximation.

How the head is found without editing the model: a forward hook on the last
``nn.AdaptiveAvgPool2d(1)`` (or ``AdaptiveAvgPool2d((1, 1))``) module keeps its
input ``A``; the last ``nn.Linear`` whose ``in_features`` equals ``C`` is the
classifier. The identity ``logits == W · mean(A) + b`` is then *checked* on the
batch (dropout is off in eval mode); when it does not hold, or there is no such
pool, Grad-CAM (Selvaraju et al. 2017) is used instead on the last ``nn.Conv2d``:
``ReLU(Σ_c α_c A_c)`` with ``α_c`` the spatial mean of ``∂ logit_k / ∂ A_c``.
:class:`ClassMaps.method` says which one was computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: Relative tolerance of the ``logits == W · mean(A) + b`` check that makes CAM exact.
HEAD_CHECK_RTOL = 1e-3


@dataclass(frozen=True)
class ClassMaps:
    """Per-input, per-class maps at the feature resolution, and how they were computed."""

    #: ``[B, K, h, w]``: for CAM the raw class maps (their spatial mean + bias is the logit)
    maps: torch.Tensor
    #: ``[B, K]`` the class index of every map
    classes: torch.Tensor
    #: ``[B, num_classes]`` logits of the same forward pass
    logits: torch.Tensor
    method: str  # "cam" | "grad-cam"
    layer: str

    def upsampled(self, size: tuple[int, int]) -> torch.Tensor:
        """``[B, K, H, W]`` bilinear upsampling to the input size (for overlays)."""
        return F.interpolate(self.maps, size=size, mode="bilinear", align_corners=False)


def _gap_and_classifier(model: nn.Module) -> tuple[str, nn.Module, str, nn.Linear] | None:
    modules = list(model.named_modules())
    pools = [(n, m) for n, m in modules
             if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))]
    linears = [(n, m) for n, m in modules if isinstance(m, nn.Linear)]
    if not pools or not linears:
        return None
    pool_name, pool = pools[-1]
    linear_name, linear = linears[-1]
    return pool_name, pool, linear_name, linear


def _last_conv(model: nn.Module) -> tuple[str, nn.Module]:
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("the model has no nn.Conv2d: neither CAM nor Grad-CAM applies")
    return convs[-1]


def _top_classes(logits: torch.Tensor, classes: torch.Tensor | None, k: int) -> torch.Tensor:
    if classes is None:
        return logits.topk(k, dim=1).indices
    classes = torch.as_tensor(classes, device=logits.device).long()
    return classes.view(logits.shape[0], -1) if classes.ndim <= 2 else classes


def class_activation_maps(model: nn.Module, pixels: torch.Tensor, classes: torch.Tensor | None = None,
                          *, top: int = 2, method: str = "auto") -> ClassMaps:
    """CAM (or Grad-CAM) of ``classes`` ``[B, K]`` (default: each input's ``top`` classes).

    ``method``: ``auto`` (CAM when the head is verified to be GAP → linear, else
    Grad-CAM), ``cam`` (raises when the head does not verify) or ``grad-cam``.
    """
    if method not in ("auto", "cam", "grad-cam"):
        raise ValueError(f"method={method!r}: expected auto, cam or grad-cam")
    head = _gap_and_classifier(model) if method != "grad-cam" else None
    if head is not None:
        pool_name, pool, _, linear = head
        kept: dict[str, torch.Tensor] = {}
        handle = pool.register_forward_hook(lambda m, inputs, output: kept.__setitem__("a", inputs[0].detach()))
        try:
            with torch.no_grad():
                logits = model(pixels)
        finally:
            handle.remove()
        features = kept.get("a")
        if features is not None and features.ndim == 4 and features.shape[1] == linear.in_features:
            weight = linear.weight.detach()
            bias = linear.bias.detach() if linear.bias is not None else torch.zeros(weight.shape[0])
            predicted = features.mean(dim=(2, 3)) @ weight.T + bias
            scale = logits.abs().max().clamp_min(1.0)
            if torch.allclose(predicted, logits, rtol=0, atol=HEAD_CHECK_RTOL * float(scale)):
                chosen = _top_classes(logits, classes, top)
                maps = torch.einsum("bkc,bchw->bkhw", weight[chosen], features)
                return ClassMaps(maps, chosen, logits, "cam", pool_name)
    if method == "cam":
        raise ValueError("the model's head is not global-average-pool → linear; use Grad-CAM")
    return grad_cam(model, pixels, classes, top=top)


def grad_cam(model: nn.Module, pixels: torch.Tensor, classes: torch.Tensor | None = None,
             *, top: int = 2, layer: str | None = None) -> ClassMaps:
    """Grad-CAM on ``layer`` (default: the last ``nn.Conv2d``)."""
    if layer is None:
        layer, module = _last_conv(model)
    else:
        module = dict(model.named_modules())[layer]
    kept: dict[str, torch.Tensor] = {}

    def hook(m: nn.Module, inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        kept["a"] = output

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            x = pixels.detach().clone().requires_grad_(True)
            logits = model(x)
            chosen = _top_classes(logits.detach(), classes, top)
            maps = []
            for j in range(chosen.shape[1]):
                target = logits.gather(1, chosen[:, j : j + 1]).sum()
                grads = torch.autograd.grad(target, kept["a"], retain_graph=j + 1 < chosen.shape[1])[0]
                alpha = grads.mean(dim=(2, 3), keepdim=True)
                maps.append(torch.relu((alpha * kept["a"]).sum(dim=1)).detach())
    finally:
        handle.remove()
    return ClassMaps(torch.stack(maps, dim=1), chosen, logits.detach(), "grad-cam", layer)

"""Layers by role ("the block at 1/16 resolution"), so a detector fitted on one model can be refitted on another.

Signals read named modules of the model they were fitted on (the shipped
detectors: ``net._blocks.10`` of the bundled EfficientNet-Lite0). A user's
model has other names (``model._blocks.N``, ``features.7``, ``layer3``) and
other channel counts, so those names mean nothing there. What carries over is
the *role* of a layer: where it sits in the network, measured as its output
stride (input size / map size, rounded to a power of two).

The rule, :func:`layer_for_role`: the module whose output is a 4-D map at that
stride and that *finishes last* in a forward pass, leaving out what a
downsampling block runs at its input's resolution and padded copies. A block container finishes
after its children, so this is the output of the last block at that
resolution, the layer a detector designer would pick by hand; on the bundled
model it gives back exactly the shipped choices (``net._blocks.0`` at 1/2,
``net._blocks.4`` at 1/8, ``net._blocks.10`` at 1/16; tested). A role is
written ``@1/16`` wherever a layer name goes.

:func:`rebind_features` moves a detector's layers to another model: every
layer the model lacks (or whose channel count differs from what a fitted
signal expects) is replaced by the model's layer of the same role, and a
learned signal so moved becomes an unfitted template (its parameters belong
to the old layer) that ``calibrate --refit-signals`` fits again.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

ROLE_PREFIX = "@1/"


class LayerError(ValueError):
    """A layer or role the model does not have (the message lists what it has)."""


@dataclass(frozen=True)
class LayerInfo:
    """One module whose output is a feature map: stride, channels, and when it finished in the forward pass."""

    name: str
    stride: int
    channels: int
    order: int
    #: the map's height is what a stride gives (floor or ceil of input / stride); a padded copy's is larger
    canonical: bool = True
    #: the stride of the module's input map (None: its input is not a map)
    input_stride: int | None = None

    @property
    def role(self) -> str:
        return f"{ROLE_PREFIX}{self.stride}"


def is_role(layer: str | None) -> bool:
    return bool(layer) and str(layer).startswith(ROLE_PREFIX)


def _stride(image_size: int, height: int) -> int:
    return 2 ** max(0, round(math.log2(image_size / max(height, 1))))


def probe_layers(model: nn.Module, image_size: int) -> dict[str, LayerInfo]:
    """Every module with a ``[B, C, H, W]`` output in one forward pass of a gray image (first call of each)."""
    found: dict[str, LayerInfo] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(module: nn.Module, inputs: object, output: object, name: str = name) -> None:
            if name not in found and isinstance(output, torch.Tensor) and output.dim() == 4:
                height = int(output.shape[-2])
                stride = _stride(image_size, height)
                canonical = height in (image_size // stride, -(-image_size // stride))
                first = inputs[0] if isinstance(inputs, tuple) and inputs else None
                input_stride = (_stride(image_size, int(first.shape[-2]))
                                if isinstance(first, torch.Tensor) and first.dim() == 4 else None)
                found[name] = LayerInfo(name, stride, int(output.shape[1]), len(found), canonical, input_stride)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.full((1, 3, image_size, image_size), 0.5, device=_device_of(model)))
    finally:
        for handle in handles:
            handle.remove()
    return found


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _before_a_downsampling(layers: Mapping[str, LayerInfo], info: LayerInfo) -> bool:
    """Whether ``info`` is the input-resolution part of an enclosing module that downsamples (a strided block's
    expansion and activation run at the previous stride, and finish after the previous block)."""
    parts = info.name.split(".")
    for prefix in (".".join(parts[:i]) for i in range(1, len(parts))):
        outer = layers.get(prefix)
        if outer is not None and outer.input_stride == info.stride and outer.stride != info.stride:
            return True
    return False


def layer_for_role(layers: Mapping[str, LayerInfo], role: str) -> str:
    """The module of ``role`` (``@1/16``): the last to finish with a map at that stride (see the module docstring).

    What runs inside a downsampling block at its input's resolution does not
    count (a strided block expands, activates and pads its input at the
    previous stride; those finish after the previous block), nor do padded
    copies (a map larger than the stride gives).
    """
    candidates = [info for info in layers.values()
                  if info.role == role and info.canonical and not _before_a_downsampling(layers, info)]
    if not candidates:
        strides = sorted({info.stride for info in layers.values()})
        raise LayerError(f"the model has no feature map at {role} (its maps are at "
                         f"{', '.join(f'{ROLE_PREFIX}{s}' for s in strides) or 'no stride: no 4-D output'})")
    return max(candidates, key=lambda info: info.order).name


def role_of(layers: Mapping[str, LayerInfo], name: str) -> str:
    if name not in layers:
        raise LayerError(f"the model has no module {name!r} with a feature-map output")
    return layers[name].role


def _layer_fields(config: object) -> list[str]:
    """The dataclass fields of a signal or map config that name a layer."""
    return [f.name for f in dataclasses.fields(config) if f.name == "layer"] if dataclasses.is_dataclass(config) else []


def rebind_features(features: Mapping[str, object], model: nn.Module, image_size: int, *,
                    reference: nn.Module | None = None, reference_size: int = 224
                    ) -> tuple[dict[str, object], dict[str, tuple[str, str]]]:
    """``features`` with every layer ``model`` cannot serve moved to its layer of the same role.

    A layer is kept when ``model`` has it (and, for a fitted learned signal,
    with the channel count it was fitted for). Otherwise its role comes from
    the name itself (``@1/16``) or from where that name sits in ``reference``
    (the model the detector was fitted on), and the layer becomes ``model``'s
    layer of that role; a learned signal moved so is reset to a template.
    Returns (the features, ``{feature: (old layer, new layer)}`` of what moved).
    Raises :class:`LayerError` when a layer can be placed neither way.
    """
    from .signals import LearnedSignal

    layers = probe_layers(model, image_size)
    reference_layers: dict[str, LayerInfo] | None = None
    moved: dict[str, tuple[str, str]] = {}
    out: dict[str, object] = {}
    for name, config in features.items():
        fields = _layer_fields(config)
        layer = getattr(config, "layer", None) if fields else None
        if not layer:
            out[name] = config
            continue
        fits = layer in layers and not (isinstance(config, LearnedSignal) and config.fitted
                                        and _fitted_channels(config) not in (None, layers[layer].channels))
        if fits:
            out[name] = config
            continue
        if is_role(layer):
            role = layer
        else:
            if reference is None:
                raise LayerError(f"feature {name!r} reads layer {layer!r}, which the model does not serve "
                                 f"(as fitted), and no reference model says what role it plays")
            if reference_layers is None:
                reference_layers = probe_layers(reference, reference_size)
            role = role_of(reference_layers, layer)
        new = layer_for_role(layers, role)
        config = dataclasses.replace(config, layer=new)
        if isinstance(config, LearnedSignal):
            config = config.template()
        out[name] = config
        moved[name] = (layer, new)
    return out, moved


def _fitted_channels(signal: object) -> int | None:
    """The channel count a fitted learned signal expects, where it says (head: ``channels``; LID: its reference)."""
    channels = getattr(signal, "channels", None)
    if channels:
        return int(channels)
    reference = getattr(signal, "reference_array", None)
    if reference is not None and getattr(signal, "reference", ""):
        return int(reference.shape[1])
    return None

"""Feature responses: guided backpropagation of a layer's activations to the input.

Method (Springenberg et al. 2014, used by Amirian et al. 2018): forward the
batch, keep the activations ``A`` of the final convolutional layer, and
backpropagate ``A`` itself (gradient seed = ``A``) to the input, where every
rectifier only passes gradient where its forward input was positive *and* the
incoming gradient is positive.

How models are handled without editing their code: a
:class:`torch.overrides.TorchFunctionMode` intercepts activation *calls*
(``F.relu``, ``F.hardtanh``/``relu6``, ``F.leaky_relu``, ``torch.relu``,
``Tensor.relu``, ``F.silu``, ``F.gelu``, …) during the forward pass. nn modules
(``nn.ReLU``, ``nn.ReLU6``, …) call these functions too, so both module- and
functional-style models are covered by one mechanism, and nothing on the model
is swapped: there is nothing to restore, also when the forward raises.

Guided rule, one formula for all activations f: ``grad_in = f'(x) · max(grad_out, 0)``.
For ReLU this is exactly Springenberg's rule; for ReLU6/hardtanh it passes
gradient inside (min, max); for LeakyReLU the negative side keeps its slope; for
smooth activations (SiLU, GELU, ELU, Mish, Softplus, Hardswish) ``f'`` is the
activation's true derivative at x, so a smooth network gets the same
"positive evidence only" filtering of the backward signal.

Limits (raised as :class:`UnsupportedModelError` or documented): TorchScript /
traced modules run outside Python and cannot be intercepted; activations written
as raw arithmetic (``x.clamp(min=0)``, ``x * (x > 0)``) are not recognised; code
that calls an in-place activation and ignores its return value sees the
out-of-place result only through the return value.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .config import ScoreConfig


class UnsupportedModelError(TypeError):
    """The model cannot be handled by guided backpropagation (and why)."""


def _hardtanh_bounds(args: tuple, kwargs: dict) -> tuple[float, float]:
    low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
    high = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
    return float(low), float(high)


def _leaky_slope(args: tuple, kwargs: dict) -> float:
    return float(args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01))


# func -> (out-of-place forward f(x), derivative mask builder or None for the generic VJP)
_RectifierSpec = tuple[Callable[..., torch.Tensor], Callable[[torch.Tensor, tuple, dict], torch.Tensor] | None]


def _relu_spec() -> _RectifierSpec:
    return (lambda x, *a, **k: torch.relu(x), lambda x, a, k: (x > 0).to(x.dtype))


def _relu6_spec() -> _RectifierSpec:
    return (lambda x, *a, **k: torch.clamp(x, 0.0, 6.0), lambda x, a, k: ((x > 0) & (x < 6)).to(x.dtype))


def _hardtanh_spec() -> _RectifierSpec:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        low, high = _hardtanh_bounds((x, *args), kwargs)
        return torch.clamp(x, low, high)

    def derivative(x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        low, high = _hardtanh_bounds(args, kwargs)
        return ((x > low) & (x < high)).to(x.dtype)

    return forward, derivative


def _leaky_spec() -> _RectifierSpec:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return F.leaky_relu(x, _leaky_slope((x, *args), kwargs))

    def derivative(x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        slope = _leaky_slope(args, kwargs)
        return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, slope))

    return forward, derivative


def _smooth_spec(fn: Callable[..., torch.Tensor]) -> _RectifierSpec:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        kwargs = {key: value for key, value in kwargs.items() if key != "inplace"}
        args = tuple(a for a in args if not isinstance(a, bool))  # drop positional inplace flags
        return fn(x, *args, **kwargs)

    return forward, None


@functools.lru_cache(maxsize=1)
def _activation_table() -> dict[Callable[..., Any], _RectifierSpec]:
    table: dict[Callable[..., Any], _RectifierSpec] = {}
    for func in (F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_):
        table[func] = _relu_spec()
    table[F.relu6] = _relu6_spec()
    for func in (F.hardtanh, F.hardtanh_):
        table[func] = _hardtanh_spec()
    for func in (F.leaky_relu, F.leaky_relu_):
        table[func] = _leaky_spec()
    for func in (F.silu, F.gelu, F.elu, F.mish, F.softplus, F.hardswish, F.celu, F.selu):
        table[func] = _smooth_spec(func)
    return table


class _GuidedActivation(torch.autograd.Function):
    """Identity-valued forward of a precomputed activation; guided backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor, forward_fn: Callable, mask_fn: Callable | None, extra: tuple) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.forward_fn, ctx.mask_fn, ctx.extra = forward_fn, mask_fn, extra
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        positive = grad_out.clamp(min=0)
        args, kwargs = ctx.extra
        if ctx.mask_fn is not None:
            grad_in = positive * ctx.mask_fn(x, args, kwargs)
        else:  # smooth activation: the exact derivative f'(x), applied to the positive part
            with torch.enable_grad():
                xx = x.detach().requires_grad_(True)
                (grad_in,) = torch.autograd.grad(ctx.forward_fn(xx, *args[1:], **kwargs), xx, positive)
        return grad_in, None, None, None, None


@dataclass
class _Event:
    order: int
    output: torch.Tensor


class _GuidedMode(TorchFunctionMode):
    """Routes activation calls through :class:`_GuidedActivation` while active."""

    def __init__(self, recorder: "_LayerRecorder") -> None:
        super().__init__()
        self.recorder = recorder
        self.intercepted = 0
        self.table = _activation_table()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        spec = self.table.get(func)
        if spec is None or not args or not isinstance(args[0], torch.Tensor) or not args[0].requires_grad:
            return func(*args, **kwargs)
        forward_fn, mask_fn = spec
        x = args[0]
        plain_kwargs = {key: value for key, value in kwargs.items() if key != "inplace"}
        y = forward_fn(x, *args[1:], **plain_kwargs)
        out = _GuidedActivation.apply(x, y.detach(), forward_fn, mask_fn, (args, plain_kwargs))
        self.intercepted += 1
        self.recorder.activation(out)
        return out


class _LayerRecorder:
    """Finds seed tensors: named modules' outputs, and/or the final conv's activations."""

    def __init__(self, model: nn.Module, layers: Sequence[str | None]) -> None:
        self.order = 0
        self.last_conv: tuple[str, _Event] | None = None
        self.after_conv: list[_Event] = []
        self.named_outputs: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []
        modules = dict(model.named_modules())
        for layer in {layer for layer in layers if layer is not None}:
            if layer not in modules:
                raise KeyError(f"model has no module named {layer!r}")
            self.handles.append(modules[layer].register_forward_hook(functools.partial(self._named_hook, layer)))
        if None in layers:
            convs = [(name, m) for name, m in modules.items() if isinstance(m, nn.Conv2d)]
            if not convs:
                raise UnsupportedModelError("no nn.Conv2d in the model: name the seed layer explicitly (layer=...)")
            for name, module in convs:
                self.handles.append(module.register_forward_hook(functools.partial(self._conv_hook, name)))

    def _named_hook(self, name: str, module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            self.named_outputs[name] = output  # a module called several times: its last call

    def _conv_hook(self, name: str, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self.order += 1
        self.last_conv = (name, _Event(self.order, output))
        self.after_conv = []

    def activation(self, output: torch.Tensor) -> None:
        self.order += 1
        if self.last_conv is not None and not self.after_conv:
            self.after_conv.append(_Event(self.order, output))

    def seed(self, layer: str | None) -> tuple[str, torch.Tensor]:
        if layer is not None:
            if layer not in self.named_outputs:
                raise UnsupportedModelError(f"module {layer!r} did not produce a tensor in the forward pass")
            return layer, self.named_outputs[layer]
        if self.last_conv is None:
            raise UnsupportedModelError("no convolution ran in the forward pass")
        name, conv = self.last_conv
        # The activations of the final conv layer: the first activation after it
        # (through BatchNorm etc.) when it keeps the conv output's shape.
        for event in self.after_conv:
            if event.output.shape == conv.output.shape:
                return name, event.output
        return name, conv.output

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class FeatureResponse:
    """Result of one batched guided backward pass."""

    response: torch.Tensor  # [B, C, H, W], same shape as the input
    logits: torch.Tensor  # [B, num_classes], detached
    layer: str  # the module whose output seeded the backward pass
    intercepted: int  # activation calls routed through the guided rule


def _check_model(model: nn.Module) -> None:
    if isinstance(model, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
        raise UnsupportedModelError(
            "TorchScript/traced models run outside Python, so their activations cannot be "
            "intercepted for guided backpropagation; pass the eager nn.Module instead"
        )


def guided_responses(
    model: nn.Module,
    pixels: torch.Tensor,
    seeds: Sequence[str | None],
    *,
    top_logit: bool = False,
    guided: bool = True,
) -> tuple[dict[str | None, torch.Tensor], torch.Tensor, dict[str | None, str], int]:
    """Responses seeded at several layers from *one* forward pass (one backward per seed).

    ``seeds`` are module names, ``None`` for the auto-detected final conv
    activations; with ``top_logit`` the single seed is the top-1 logit. Returns
    ``({seed: response}, logits, {seed: resolved layer name}, intercepted)``.
    A backward pass from an early layer only runs through the layers before it.
    """
    _check_model(model)
    if pixels.dim() != 4:
        raise ValueError(f"pixels must be [B, C, H, W], got shape {tuple(pixels.shape)}")
    if not seeds:
        raise ValueError("no seed layer given")
    x = pixels.detach().clone().requires_grad_(True)
    recorder = _LayerRecorder(model, [] if top_logit else list(seeds))
    mode: _GuidedMode | _RecorderMode = _GuidedMode(recorder) if guided else _RecorderMode(recorder)
    responses: dict[str | None, torch.Tensor] = {}
    names: dict[str | None, str] = {}
    try:
        with torch.enable_grad():
            with mode:
                logits = model(x)
            if not isinstance(logits, torch.Tensor):
                raise UnsupportedModelError(f"model returned {type(logits).__name__}, expected a logits tensor")
            intercepted = mode.intercepted
            if guided and intercepted == 0:
                raise UnsupportedModelError(
                    "no activation call was intercepted (activations written as raw tensor "
                    "arithmetic?); guided backpropagation is not possible for this model"
                )
            unique = list(dict.fromkeys(seeds))
            for index, seed_layer in enumerate(unique):
                if top_logit:
                    name, target = "logits", logits
                    grad_seed = torch.zeros_like(logits).scatter_(1, logits.argmax(dim=1, keepdim=True), 1.0)
                else:
                    name, target = recorder.seed(seed_layer)
                    grad_seed = target.detach()
                retain = index < len(unique) - 1
                (response,) = torch.autograd.grad(target, x, grad_seed, retain_graph=retain)
                responses[seed_layer] = response.detach()
                names[seed_layer] = name
    finally:
        recorder.close()
    return responses, logits.detach(), names, intercepted


def guided_backprop(
    model: nn.Module,
    pixels: torch.Tensor,
    *,
    layer: str | None = None,
    seed: str = "final_conv",
    guided: bool = True,
) -> FeatureResponse:
    """Feature responses of a batch, with logits from the same forward pass.

    ``guided=False`` gives the plain gradient of the same seed (for comparison).
    Raises :class:`UnsupportedModelError` when guided backprop is asked for but
    no activation call could be intercepted (the response would silently be a
    plain gradient).
    """
    if seed not in ("final_conv", "top_logit"):
        raise ValueError(f"seed={seed!r}: expected 'final_conv' or 'top_logit'")
    responses, logits, names, intercepted = guided_responses(
        model, pixels, [layer], top_logit=seed == "top_logit", guided=guided
    )
    return FeatureResponse(responses[layer], logits, names[layer], intercepted)


class _RecorderMode(TorchFunctionMode):
    """Records activation outputs (to locate the final conv activations) without guiding."""

    def __init__(self, recorder: _LayerRecorder) -> None:
        super().__init__()
        self.recorder = recorder
        self.table = _activation_table()
        self.intercepted = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func in self.table and isinstance(out, torch.Tensor):
            self.recorder.activation(out)
        return out


def guided_feature_response(
    model: nn.Module, pixels: torch.Tensor, config: ScoreConfig | None = None
) -> torch.Tensor:
    """The paper's feature response of a batch: ``[B, C, H, W]`` → same shape.

    ``config.response`` selects guided backprop (default) or the plain gradient;
    ``config.layer`` / ``config.seed`` select the seed.
    """
    config = config or ScoreConfig()
    if config.response == "activation":
        raise ValueError("config.response='activation' has no backward pass; use detector.features")
    return guided_backprop(
        model, pixels, layer=config.layer, seed=config.seed, guided=config.response == "guided_backprop"
    ).response

"""The ``Signal`` base class: one named scalar per input, computed where the model lives.

The paper's signal is the average local spatial entropy of a feature map
(:class:`~detector.config.ScoreConfig`, computed by :mod:`detector.entropy`).
Everything else a detector reads about an input is a :class:`Signal`: one
small frozen dataclass per concept (torchattacks / Foolbox style), each with
its configuration serialized into the calibration artifact under a
``"signal"`` discriminator, so a threshold is never applied to a signal
computed differently.

Why every signal yields ``[B, 1]`` already reduced: the exported Triton model
computes all signals in the same call as the logits and serves them in the
``[B, F]`` output; when the sidecar asks for the raw outputs instead (the maps
path), a signal's output *is* its value and :meth:`Signal.reduce` only
flattens it, so both paths give the same number.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn


class SignalError(ValueError):
    """A signal's configuration is invalid or names something the model lacks."""


@dataclass
class SignalContext:
    """What signals of one batch share: the model, the pixels, the logits of the same forward pass.

    ``activations`` holds the forward outputs of the layers the signals asked
    for (captured during the forward pass that produced ``logits``), and
    :meth:`cached` memoizes work several signals share (e.g. the logits of a
    squeezed copy), so each extra forward pass runs once per batch.
    """

    model: nn.Module
    pixels: torch.Tensor
    logits: torch.Tensor
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    _cache: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False)

    def cached(self, key: Any, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits of another batch through the same model (no autograd)."""
        if self.model is None:
            raise SignalError("this signal runs the model again; in black-box mode its copies' logits must be given")
        with torch.no_grad():
            return self.model(pixels)

    def transformed_logits(self, key: str, transform: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Logits of ``transform(pixels)``: one more forward pass per batch and ``key``.

        In black-box mode there is no model here: the sidecar sent the copies
        upstream and passes their logits in (:meth:`with_transformed`).
        """
        return self.cached(("transformed_logits", key), lambda: self.forward(transform(self.pixels)))

    def with_transformed(self, logits: dict[str, torch.Tensor]) -> "SignalContext":
        """This context, the logits of the transformed copies ``{key: [B, classes]}`` already known."""
        for key, values in logits.items():
            self._cache[("transformed_logits", key)] = values
        return self

    @property
    def probabilities(self) -> torch.Tensor:
        return self.cached("softmax", lambda: torch.softmax(self.logits.float(), dim=1))


_REGISTRY: dict[str, type["Signal"]] = {}


@dataclass(frozen=True)
class Signal(abc.ABC):
    """A configured scalar per input. Subclasses set ``kind`` and implement :meth:`values`."""

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            if cls.kind in _REGISTRY and _REGISTRY[cls.kind] is not cls:
                raise TypeError(f"signal kind {cls.kind!r} registered twice")
            _REGISTRY[cls.kind] = cls

    def layers(self) -> set[str]:
        """Modules whose forward outputs this signal reads (captured during the main forward pass)."""
        return set()

    def transforms(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Transformed copies of the input whose logits this signal needs, by key (see :meth:`SignalContext.transformed_logits`).

        Why declared: in black-box mode the sidecar sends each copy upstream as
        one more call beside the request's own, so it must know them up front.
        """
        return {}

    @abc.abstractmethod
    def values(self, context: SignalContext) -> torch.Tensor:
        """``[B]`` float values for the batch in ``context``."""

    def compute(self, context: SignalContext) -> torch.Tensor:
        """``[B, 1]``: the served output (see the module docstring for why it is already reduced)."""
        with torch.no_grad():
            return self.values(context).float().reshape(-1, 1)

    @staticmethod
    def reduce(output: torch.Tensor) -> torch.Tensor:
        """``[B]`` from the served ``[B, 1]`` output."""
        return output.reshape(output.shape[0], -1)[:, 0].float()

    def to_dict(self) -> dict[str, Any]:
        return {"signal": self.kind, **dataclasses.asdict(self)}

    def differences(self, other: Any) -> list[str]:
        if not isinstance(other, Signal) or other.kind != self.kind:
            return [f"signal: {self.kind!r} != {getattr(other, 'kind', 'entropy')!r}"]
        return [
            f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

    def replace(self, **changes: Any) -> "Signal":
        return dataclasses.replace(self, **changes)


def signal_kinds() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def signal_from_dict(data: dict[str, Any]) -> Signal:
    data = dict(data)
    kind = data.pop("signal", None)
    cls = _REGISTRY.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise SignalError(f"unknown signal {kind!r} (known: {', '.join(signal_kinds())})")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SignalError(f"signal {kind!r}: unknown field(s) {', '.join(unknown)}")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    except TypeError as error:
        raise SignalError(f"signal {kind!r}: {error}") from error


# ---- learned signals (LID reference sets, Fourier weights, small heads) --------------------------------------

_ARRAY_DTYPES = ("float16", "float32")


def pack_array(array: Any, dtype: str = "float32") -> str:
    """``"<dtype>:<d0>x<d1>...:<base64>"``: a small array inside a calibration artifact (JSON), little-endian."""
    import base64

    import numpy as np

    if dtype not in _ARRAY_DTYPES:
        raise SignalError(f"pack_array: dtype {dtype!r} not in {_ARRAY_DTYPES}")
    values = np.ascontiguousarray(np.asarray(array, dtype=np.dtype(dtype).newbyteorder("<")))
    shape = "x".join(str(d) for d in values.shape)
    return f"{dtype}:{shape}:{base64.b64encode(values.tobytes()).decode('ascii')}"


def unpack_array(text: str) -> Any:
    """The float32 NumPy array :func:`pack_array` wrote; :class:`SignalError` if malformed."""
    import base64
    import binascii

    import numpy as np

    try:
        dtype, shape_text, payload = text.split(":", 2)
        shape = tuple(int(d) for d in shape_text.split("x")) if shape_text else ()
        if dtype not in _ARRAY_DTYPES:
            raise ValueError(f"dtype {dtype!r}")
        values = np.frombuffer(base64.b64decode(payload, validate=True), dtype=np.dtype(dtype).newbyteorder("<"))
        return values.reshape(shape).astype(np.float32)
    except (ValueError, binascii.Error) as error:
        raise SignalError(f"malformed packed array ({error})") from error


def _abbreviate(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}… ({len(text)} chars)"


@dataclass(frozen=True)
class LearnedSignal(Signal):
    """A signal with parameters fitted on clean and adversarial development inputs, stored in the artifact.

    A learned signal splits its computation in two so that a study can fit it
    on cached inputs and cross-fit it (out-of-fold values for the combiner):
    :meth:`raw` (what the model gives for a batch: pooled activations, a
    spectrum, a feature map; no parameters) and :meth:`from_raw` (the fitted
    part). ``values = from_raw(raw(context))`` on every path (local, Triton,
    the adaptive attack's gradients). An unfitted instance (``fitted`` False)
    is a template: it can compute ``raw`` and :meth:`fit`, not values.
    """

    @property
    @abc.abstractmethod
    def fitted(self) -> bool: ...

    @abc.abstractmethod
    def raw(self, context: SignalContext) -> torch.Tensor:
        """``[B, ...]``: the parameter-free part of the signal for a batch."""

    @abc.abstractmethod
    def from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """``[B]`` values from :meth:`raw`'s output (differentiable)."""

    @abc.abstractmethod
    def fit(self, clean: Any, adversarial: Any, *, adversarial_weight: Any = None, seed: int = 0) -> "LearnedSignal":
        """A fitted copy of this template from raw clean ``[N, ...]`` and adversarial ``[M, ...]`` rows."""

    def template(self) -> "LearnedSignal":
        """An unfitted copy: every field back to its default but the configuration (layer, sizes)."""
        learned = {"parameters", "channels", "reference", "mean", "scale", "weights", "bias"}
        defaults = {f.name: f.default for f in dataclasses.fields(self)
                    if f.name in learned and f.default is not dataclasses.MISSING}
        return dataclasses.replace(self, **defaults)

    def values(self, context: SignalContext) -> torch.Tensor:
        if not self.fitted:
            raise SignalError(f"signal {self.kind!r} is not fitted (a template): fit it before computing values")
        return self.from_raw(self.raw(context))

    def differences(self, other: Any) -> list[str]:
        # Parameters are long packed strings: say which field differs, not the whole value.
        if not isinstance(other, Signal) or other.kind != self.kind:
            return super().differences(other)
        return [
            f"{f.name}: {_abbreviate(getattr(self, f.name))} != {_abbreviate(getattr(other, f.name))}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

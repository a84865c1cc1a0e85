"""``ScoreConfig``: every parameter that turns an input into an entropy score.

The paper (Amirian et al. 2018) leaves several choices open: how the feature
response is made and seeded, how it becomes a gray-scale image, how it is
normalized, how many gray levels, patch size, stride and padding. advsentry
makes each one an explicit field here. A calibration artifact stores the whole
config, so a threshold is never applied to a score computed differently.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

ResponseKind = Literal["guided_backprop", "gradient", "activation"]
SeedKind = Literal["final_conv", "top_logit"]
GrayKind = Literal["luminance", "abs_sum", "abs_max", "sum", "mean", "l2"]
NormalizeKind = Literal["minmax", "percentile", "standardize", "none"]
PaddingKind = Literal["valid", "reflect", "replicate"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "response": ("guided_backprop", "gradient", "activation"),
    "seed": ("final_conv", "top_logit"),
    "gray": ("luminance", "abs_sum", "abs_max", "sum", "mean", "l2"),
    "normalize": ("minmax", "percentile", "standardize", "none"),
    "padding": ("valid", "reflect", "replicate"),
}


class ConfigError(ValueError):
    """A ScoreConfig field has an invalid value."""


@dataclass(frozen=True)
class ScoreConfig:
    """How one feature map of an input is turned into one average local spatial entropy.

    Response (what map is computed from the input):
      response: ``guided_backprop`` (paper: final-conv activations backpropagated to
        the input through guided rectifiers), ``gradient`` (plain backprop of the same
        seed, for comparison) or ``activation`` (the forward activations of ``layer``
        itself, no backward pass).
      layer: module name (as in ``model.named_modules()``) whose output seeds the
        backward pass or is the activation map; ``None`` = the final convolutional
        layer's activations, detected automatically.
      seed: ``final_conv`` backpropagates the layer's activations (the paper);
        ``top_logit`` backpropagates the top-1 logit instead.

    Gray-scale image (from a ``[C, H, W]`` map to ``[H, W]``):
      gray: ``luminance`` (ITU-R 601 weights, 3-channel maps only), ``abs_sum``,
        ``abs_max``, ``sum``, ``mean`` or ``l2`` over channels.
      normalize: per image, to [0, 1]: ``minmax``; ``percentile`` (clip to the
        [100-p, p] percentiles, then min-max; robust to a few extreme pixels);
        ``standardize`` (z-score, ±3σ mapped to [0, 1]); ``none`` (values already
        in [0, 1]).
      levels: number of gray levels the normalized image is quantized to.

    Entropy:
      patch: side k of the square patch (k×k values per histogram).
      stride: step between patches.
      padding: ``valid`` (only patches fully inside the map) or a pad mode that
        gives one patch per pixel.
    """

    response: ResponseKind = "guided_backprop"
    layer: str | None = None
    seed: SeedKind = "final_conv"
    gray: GrayKind = "luminance"
    normalize: NormalizeKind = "minmax"
    percentile: float = 99.0
    levels: int = 256
    patch: int = 3
    stride: int = 1
    padding: PaddingKind = "valid"

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"ScoreConfig.{name}={value!r}: expected one of {', '.join(allowed)}")
        if not isinstance(self.levels, int) or not 2 <= self.levels <= 65536:
            raise ConfigError(f"ScoreConfig.levels={self.levels!r}: expected an integer in 2..65536")
        if not isinstance(self.patch, int) or not 2 <= self.patch <= 15:
            raise ConfigError(f"ScoreConfig.patch={self.patch!r}: expected an integer in 2..15")
        if not isinstance(self.stride, int) or self.stride < 1:
            raise ConfigError(f"ScoreConfig.stride={self.stride!r}: expected a positive integer")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise ConfigError(f"ScoreConfig.percentile={self.percentile!r}: expected a value in (50, 100]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ScoreConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ScoreConfig field(s): {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "ScoreConfig":
        return dataclasses.replace(self, **changes)

    def differences(self, other: "ScoreConfig") -> list[str]:
        """Human-readable list of fields that differ, ``"levels: 256 != 16"``."""
        return [
            f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


#: The paper's method with each open choice made explicit: guided backprop of
#: the final conv layer's activations, the usual gradient visualization (gray by
#: luminance, min-max to [0, 1], 8-bit), 3×3 patches, stride 1, no padding.
PAPER_CONFIG = ScoreConfig()

NAMED_CONFIGS: dict[str, ScoreConfig] = {"paper": PAPER_CONFIG}

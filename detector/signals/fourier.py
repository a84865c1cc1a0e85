"""Fourier features with a fitted linear read-out (after Harder et al. 2021, "SpectralDefense").

Harder et al. detect adversarials from the magnitude Fourier spectrum of the
input and of feature maps with a logistic regression. Whole spectra are
``H×W`` numbers per map; here the spectrum's *shape* is reduced to a fixed
small vector: the mean log power in ``radial_bins`` rings (radius 0 to the
corner, DC excluded) and in ``angular_bins`` orientation sectors of the upper
half of the band (radius > 0.5, 1 = Nyquist along an axis), each minus the
image's mean log power over all non-DC frequencies (so brightness and
contrast cancel). A linear weight vector over the standardized features,
fitted by logistic regression on the development part, turns it into one
scalar (the logit of "adversarial"), stored in the calibration artifact with
the standardization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .base import LearnedSignal, SignalContext, SignalError
from .spectral import _LUMINANCE

#: Orientation sectors only use the upper half of the band, where a perturbation's energy shows.
ANGULAR_MIN_RADIUS = 0.5


def _bin_masks(height: int, width: int, radial_bins: int, angular_bins: int, device: torch.device) -> torch.Tensor:
    """``[radial + angular, H, W]`` 0/1 masks of the (unshifted) FFT grid; DC in none."""
    fy = torch.fft.fftfreq(height, device=device).view(-1, 1).expand(height, width)
    fx = torch.fft.fftfreq(width, device=device).view(1, -1).expand(height, width)
    radius = torch.sqrt(fy**2 + fx**2) / 0.5
    not_dc = radius > 0
    edges = torch.linspace(0.0, math.sqrt(2.0) + 1e-6, radial_bins + 1, device=device)
    masks = [(radius > edges[i]) & (radius <= edges[i + 1]) & not_dc for i in range(radial_bins)]
    angle = torch.remainder(torch.atan2(fy, fx), math.pi)  # [0, π): the spectrum of a real map is symmetric
    sector = torch.clamp((angle / (math.pi / angular_bins)).long(), max=angular_bins - 1)
    masks += [(sector == j) & (radius > ANGULAR_MIN_RADIUS) for j in range(angular_bins)]
    return torch.stack(masks).float()


def spectrum_features(maps: torch.Tensor, radial_bins: int, angular_bins: int) -> torch.Tensor:
    """``[B, radial + angular]`` binned log power of ``[B, C, H, W]`` maps (channels' power averaged), mean-removed."""
    maps = maps.float()
    centred = maps - maps.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(centred).abs().pow(2).mean(dim=1)  # [B, H, W]
    log_power = torch.log(power + 1e-10)
    masks = _bin_masks(maps.shape[-2], maps.shape[-1], radial_bins, angular_bins, maps.device)
    counts = masks.sum(dim=(-2, -1)).clamp_min(1.0)
    binned = torch.einsum("bhw,khw->bk", log_power, masks) / counts
    not_dc = torch.ones_like(log_power[0])
    not_dc[0, 0] = 0.0
    overall = (log_power * not_dc).sum(dim=(-2, -1)) / not_dc.sum()
    return binned - overall[:, None]


@dataclass(frozen=True)
class FourierFeatures(LearnedSignal):
    """Binned log spectrum of the input (``layer=None``: luminance) or of a layer, through a fitted linear read-out."""

    layer: str | None = None
    radial_bins: int = 12
    angular_bins: int = 4
    mean: tuple[float, ...] = ()
    scale: tuple[float, ...] = ()
    weights: tuple[float, ...] = ()
    bias: float = 0.0
    kind = "fourier"

    def __post_init__(self) -> None:
        if not isinstance(self.radial_bins, int) or not 2 <= self.radial_bins <= 64:
            raise SignalError(f"fourier.radial_bins={self.radial_bins!r}: expected an integer in 2..64")
        if not isinstance(self.angular_bins, int) or not 0 <= self.angular_bins <= 16:
            raise SignalError(f"fourier.angular_bins={self.angular_bins!r}: expected an integer in 0..16")
        size = self.radial_bins + self.angular_bins
        if self.weights and not len(self.weights) == len(self.mean) == len(self.scale) == size:
            raise SignalError(f"fourier: weights, mean and scale need {size} values each "
                              f"(got {len(self.weights)}, {len(self.mean)}, {len(self.scale)})")

    @property
    def fitted(self) -> bool:
        return bool(self.weights)

    def layers(self) -> set[str]:
        return {self.layer} if self.layer else set()

    def raw(self, context: SignalContext) -> torch.Tensor:
        if self.layer is None:
            weights = torch.tensor(_LUMINANCE, dtype=torch.float32, device=context.pixels.device)
            maps = (context.pixels.float() * weights.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        else:
            maps = context.activations[self.layer]
            if maps.dim() != 4:
                raise SignalError(f"fourier: layer {self.layer!r} output has shape {tuple(maps.shape)}, expected [B, C, H, W]")
        return spectrum_features(maps, self.radial_bins, self.angular_bins)

    def from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        as_tensor = lambda values: torch.tensor(values, dtype=torch.float32, device=raw.device)  # noqa: E731
        return ((raw.float() - as_tensor(self.mean)) / as_tensor(self.scale)) @ as_tensor(self.weights) + self.bias

    def fit(self, clean: Any, adversarial: Any, *, adversarial_weight: Any = None, seed: int = 0,
            c: float = 1.0) -> "FourierFeatures":
        """L2 logistic regression (balanced classes) on standardized features; scikit-learn, imported here only."""
        from sklearn.linear_model import LogisticRegression

        clean, adversarial = np.asarray(clean, np.float64), np.asarray(adversarial, np.float64)
        x = np.vstack([clean, adversarial])
        y = np.r_[np.zeros(len(clean)), np.ones(len(adversarial))]
        mean, scale = x.mean(0), x.std(0)
        scale[scale < 1e-12] = 1.0
        weight = np.ones(len(y))
        if adversarial_weight is not None:
            w = np.asarray(adversarial_weight, np.float64)
            weight[len(clean):] = w / w.mean()
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit((x - mean) / scale, y, sample_weight=weight)
        return self.replace(mean=tuple(map(float, mean)), scale=tuple(map(float, scale)),  # type: ignore[return-value]
                            weights=tuple(map(float, model.coef_[0])), bias=float(model.intercept_[0]))

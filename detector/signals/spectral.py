"""Fourier signals (after Harder et al. 2021, "SpectralDefense"): where in frequency the energy sits.

Adversarial perturbations of natural photos are broadband, and natural
photos' spectra fall off roughly as 1/f², so a perturbation shows as excess
energy at high spatial frequencies of the input, and of early feature maps.
Harder et al. feed whole magnitude spectra to a classifier; one scalar per map
keeps the Triton output at F floats per image: the log share of spectral power
above ``cutoff`` (radial frequency, 1 = Nyquist).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Signal, SignalContext, SignalError

_LUMINANCE = (0.299, 0.587, 0.114)


def high_frequency_share(maps: torch.Tensor, cutoff: float) -> torch.Tensor:
    """``log`` of the share of power above ``cutoff`` of ``[B, C, H, W]`` maps (channels summed)."""
    maps = maps.float()
    centred = maps - maps.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.rfft2(centred).abs().pow(2).sum(dim=1)  # [B, H, W//2+1]
    height, width = maps.shape[-2], maps.shape[-1]
    fy = torch.fft.fftfreq(height, device=maps.device).abs().view(-1, 1)
    fx = torch.fft.rfftfreq(width, device=maps.device).view(1, -1)
    radius = torch.sqrt(fy**2 + fx**2) / 0.5  # 1 = Nyquist along an axis
    high = (power * (radius > cutoff)).sum(dim=(-2, -1))
    total = power.sum(dim=(-2, -1))
    return torch.log((high + 1e-12) / (total + 1e-12))


@dataclass(frozen=True)
class HighFrequencyEnergy(Signal):
    """Log share of spectral power above ``cutoff`` of the input (``layer=None``, luminance) or of a layer's activations."""

    layer: str | None = None
    cutoff: float = 0.5
    kind = "spectral_hf"

    def __post_init__(self) -> None:
        if not 0.0 < float(self.cutoff) < 1.4:
            raise SignalError(f"spectral_hf.cutoff={self.cutoff!r}: expected a value in (0, 1.4)")

    def layers(self) -> set[str]:
        return {self.layer} if self.layer else set()

    def values(self, context: SignalContext) -> torch.Tensor:
        if self.layer is None:
            weights = torch.tensor(_LUMINANCE, dtype=context.pixels.dtype, device=context.pixels.device)
            maps = (context.pixels * weights.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        else:
            maps = context.activations[self.layer]
            if maps.dim() != 4:
                raise SignalError(f"spectral_hf: layer {self.layer!r} output has shape {tuple(maps.shape)}, expected [B, C, H, W]")
        return high_frequency_share(maps, float(self.cutoff))

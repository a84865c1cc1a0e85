"""Average local spatial entropy of feature maps, batched on CPU or CUDA.

Pipeline per image: feature map ``[C, H, W]`` → gray ``[H, W]`` → normalized to
[0, 1] → quantized to ``levels`` gray levels → Shannon entropy (base 2) of the
histogram of every k×k patch → mean over patches.

Why the entropy is computed from *value coincidences* instead of histograms:
a patch holds only n = k² values, so its histogram has at most n non-empty
bins. With c_j the number of values in the patch equal to value j,

    S = -Σ_bins h log2 h = log2 n - (1/n) Σ_{j=1..n} log2 c_j

which needs the n(n-1)/2 pairwise equalities inside the patch and nothing that
depends on the number of gray levels. A one-hot histogram would cost
O(levels) memory and time per patch. All operations are whole-batch tensor ops
on shifted views of the quantized maps: no per-image or per-patch Python loop.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from .config import ScoreConfig

# ITU-R BT.601 luma weights, the usual RGB → gray conversion (PIL, OpenCV).
_LUMINANCE = (0.299, 0.587, 0.114)


def to_gray(maps: torch.Tensor, config: ScoreConfig) -> torch.Tensor:
    """``[B, C, H, W]`` → ``[B, H, W]`` (``[B, H, W]`` passes through)."""
    if maps.dim() == 3:
        return maps
    if maps.dim() != 4:
        raise ValueError(f"feature maps must be [B,H,W] or [B,C,H,W], got shape {tuple(maps.shape)}")
    if config.gray == "luminance":
        if maps.shape[1] != 3:
            raise ValueError(f"gray='luminance' needs 3-channel maps, got {maps.shape[1]} channels")
        weights = torch.tensor(_LUMINANCE, dtype=maps.dtype, device=maps.device).view(1, 3, 1, 1)
        return (maps * weights).sum(dim=1)
    if config.gray == "abs_sum":
        return maps.abs().sum(dim=1)
    if config.gray == "abs_max":
        return maps.abs().amax(dim=1)
    if config.gray == "sum":
        return maps.sum(dim=1)
    if config.gray == "mean":
        return maps.mean(dim=1)
    return maps.pow(2).sum(dim=1).sqrt()  # l2


def normalize(gray: torch.Tensor, config: ScoreConfig) -> torch.Tensor:
    """Per-image map of ``[B, H, W]`` values into [0, 1]."""
    flat = gray.reshape(gray.shape[0], -1).float()
    if config.normalize == "none":
        return flat.clamp(0.0, 1.0).view_as(gray)
    if config.normalize == "standardize":
        mean = flat.mean(dim=1, keepdim=True)
        std = flat.std(dim=1, keepdim=True).clamp_min(1e-12)
        return ((flat - mean) / std).add_(3.0).div_(6.0).clamp_(0.0, 1.0).view_as(gray)
    if config.normalize == "percentile":
        n = flat.shape[1]
        high_k = min(n, max(1, math.ceil(config.percentile / 100.0 * n)))
        low_k = max(1, n + 1 - high_k)
        low = flat.kthvalue(low_k, dim=1, keepdim=True).values
        high = flat.kthvalue(high_k, dim=1, keepdim=True).values
        flat = torch.minimum(torch.maximum(flat, low), high)
    else:
        low = flat.amin(dim=1, keepdim=True)
        high = flat.amax(dim=1, keepdim=True)
    span = high - low
    # A constant map has zero entropy whatever we map it to; avoid 0/0.
    scaled = (flat - low) / torch.where(span > 0, span, torch.ones_like(span))
    return scaled.clamp_(0.0, 1.0).view_as(gray)


def quantize(unit: torch.Tensor, levels: int) -> torch.Tensor:
    """[0, 1] floats → integer gray levels 0..levels-1 (uint8 when they fit)."""
    dtype = torch.uint8 if levels <= 256 else torch.int32
    return (unit * levels).floor_().clamp_(0, levels - 1).to(dtype)


def gray_levels(maps: torch.Tensor, config: ScoreConfig) -> torch.Tensor:
    """Feature maps → quantized gray images ``[B, H, W]``.

    Integer-typed maps are taken as gray levels already (no normalization), so
    an 8-bit image can be scored exactly as ``skimage.filters.rank.entropy`` sees it.
    """
    if maps.dim() not in (3, 4):
        raise ValueError(f"feature maps must be [B,H,W] or [B,C,H,W], got shape {tuple(maps.shape)}")
    if not maps.is_floating_point():
        if maps.dim() == 4:
            if maps.shape[1] != 1:
                raise ValueError("integer maps must be single-channel gray levels")
            maps = maps[:, 0]
        return maps
    return quantize(normalize(to_gray(maps, config), config), config.levels)


def local_entropy_map(levels_map: torch.Tensor, config: ScoreConfig) -> torch.Tensor:
    """Entropy (bits) of every k×k patch of quantized gray images ``[B, H, W]`` → ``[B, H', W']``."""
    k, s = config.patch, config.stride
    q = levels_map
    if config.padding != "valid":
        pad = (k // 2, (k - 1) // 2, k // 2, (k - 1) // 2)
        q = F.pad(q.unsqueeze(1).float(), pad, mode=config.padding).squeeze(1).to(levels_map.dtype)
    batch, height, width = q.shape
    if height < k or width < k:
        raise ValueError(f"maps of {height}x{width} are smaller than the {k}x{k} patch")
    out_h = (height - k) // s + 1
    out_w = (width - k) // s + 1
    views = [
        q[:, dy : dy + s * (out_h - 1) + 1 : s, dx : dx + s * (out_w - 1) + 1 : s]
        for dy in range(k)
        for dx in range(k)
    ]
    n = k * k
    count_dtype = torch.uint8 if n < 256 else torch.int16
    # counts[j] = number of *other* values in the patch equal to value j.
    counts = torch.zeros((n, batch, out_h, out_w), dtype=count_dtype, device=q.device)
    for a, b in itertools.combinations(range(n), 2):
        equal = views[a] == views[b]
        counts[a] += equal
        counts[b] += equal
    log_sum = torch.zeros((batch, out_h, out_w), dtype=torch.float32, device=q.device)
    for j in range(n):
        log_sum += counts[j].float().add_(1.0).log2_()
    # Entropy is >= 0; float rounding of log2(n) - log2(n) must not show as -2e-7.
    return log_sum.mul_(-1.0 / n).add_(math.log2(n)).clamp_(min=0.0)


def average_local_spatial_entropy(maps: torch.Tensor, config: ScoreConfig | None = None) -> torch.Tensor:
    """Mean local spatial entropy per image: ``[B, H, W]`` or ``[B, C, H, W]`` → ``[B]``.

    Float maps are converted to gray, normalized and quantized per ``config``;
    integer maps are used as gray levels directly.
    """
    config = config or ScoreConfig()
    entropy = local_entropy_map(gray_levels(maps, config), config)
    return entropy.mean(dim=(1, 2))

"""Average local spatial entropy of feature maps, batched on CPU or CUDA.

Pipeline per image: feature map ``[C, H, W]`` → gray ``[H, W]`` → normalized to
[0, 1] → quantized to ``levels`` gray levels → Shannon entropy (base 2) of the
histogram of every k×k patch → mean over patches.

Why the entropy is computed from *value coincidences* instead of histograms:
a patch holds only n = k² values, so its histogram has at most n non-empty
bins. With c_j the number of values in the patch equal to value j,

    S = -Σ_bins h log2 h = log2 n - (1/n) Σ_{j=1..n} log2 c_j

which needs only equalities between values inside the patch and nothing that
depends on the number of gray levels. A one-hot histogram would cost
O(levels) memory and time per patch.

How the multiplicities are counted (why it is fast; ``benchmarks/entropy_kernel``
holds it to ≥ 50× ``skimage.filters.rank.entropy``):

- Equality depends only on the *displacement* d between two pixels, so one
  comparison map per displacement serves every pair of every patch:
  2k(k-1) comparisons (12 for 3×3) instead of n(n-1)/2 per patch position
  (36); a displacement -d is a shifted view of the map of d.
- The multiplicity of position j in patch p is the sum of the comparison maps
  over a k×k window of displacements, evaluated at pixel p+j: a box sum in
  displacement space, computed separably (rows, then columns) and shared
  between the k² positions: 32 uint8 additions for 3×3 instead of 72.
- Σ_j log2 c_j = log2 Π_j c_j: the k² multiplicities are multiplied (pairs in
  uint8 while they fit, then float32) and a single log2 is taken per patch,
  of the ratio to its largest possible value n^n computed the same way, so a
  constant patch scores exactly 0.
- Images are processed a few at a time, so that the ~60 intermediate planes
  stay in cache; every step is a whole-chunk tensor op on shifted views (no
  per-pixel or per-patch Python loop), on CPU or CUDA alike.
- Gray levels only matter by equality: maps wider than 8 bits are narrowed to
  16 bits (wrapping, which is injective on any range of 65,536 values), so
  65,536 levels cost what 256 do, bar wider comparisons.
"""

from __future__ import annotations

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


#: Images per chunk on CPU: small enough that a chunk's intermediate planes stay in
#: cache (measured fastest at 4-8 for 224×224 on the development machine), large
#: enough to amortize per-op dispatch. On CUDA the whole batch is one chunk.
CPU_CHUNK_PIXELS = 8 * 224 * 224


def _sum(a: torch.Tensor | int, b: torch.Tensor | int) -> torch.Tensor | int:
    """``a + b`` where either may be the constant ``1`` (a pixel always equals itself)."""
    if isinstance(a, int):
        return b + a if not isinstance(b, int) else a + b
    return a + b


def _window_sums(terms: list, k: int) -> list:
    """Sums of k consecutive terms out of 2k-1; window ``o`` covers terms ``k-1-o .. 2k-2-o``.

    Direct sums sharing the overlapping pairs for k ≤ 3 (4 additions for k=3),
    prefix sums beyond. uint8 wraps modulo 256, so a difference of prefix sums
    is exact whenever the window sum itself (≤ k² ≤ 225) fits.
    """
    if k == 2:
        return [_sum(terms[1], terms[2]), _sum(terms[0], terms[1])]
    if k == 3:
        left, right = _sum(terms[1], terms[2]), _sum(terms[2], terms[3])
        return [_sum(right, terms[4]), _sum(left, terms[3]), _sum(terms[0], left)]
    p = k - 1
    prefix = [terms[0]]
    for term in terms[1:]:
        prefix.append(_sum(prefix[-1], term))
    return [prefix[2 * p - o] if o == p else prefix[2 * p - o] - prefix[p - o - 1] for o in range(k)]


def _narrow(q: torch.Tensor) -> torch.Tensor:
    """Equality-preserving narrowing of integer gray levels to uint8/int16 where the value range allows."""
    if q.dtype in (torch.uint8, torch.int8, torch.int16) or q.numel() == 0:
        return q
    low, high = torch.aminmax(q)
    span = int(high) - int(low)
    if span < 256:
        return q.to(torch.uint8)  # wraps modulo 256: injective on a range of 256 values
    if span < 65536:
        return q.to(torch.int16)
    return q


def _multiplicities(q: torch.Tensor, k: int, s: int, out_h: int, out_w: int) -> list[torch.Tensor]:
    """For each patch position j (row-major), uint8 ``[B, out_h, out_w]``: how many values of the patch equal value j."""
    batch, height, width = q.shape
    p = k - 1
    # Padded so that every displacement's comparison map is one slice; padding values
    # only ever meet positions outside valid patches, so they never reach a result.
    padded = q.new_zeros((batch, height + 2 * p, width + 4 * p))
    padded[:, p : p + height, 2 * p : 2 * p + width] = q
    base = padded[:, : height + p, p : width + 3 * p]
    equal: dict[tuple[int, int], torch.Tensor | int] = {(0, 0): 1}
    for dy in range(p + 1):
        for dx in range(-p, p + 1):
            if dy == 0 and dx <= 0:
                continue
            # same[y, x] = padded[y, x+p] == padded[y+dy, x+p+dx]; pixel u sits at [u_y+p, u_x+p].
            same = torch.eq(base, padded[:, dy : dy + height + p, p + dx : width + 3 * p + dx]).view(torch.uint8)
            equal[(dy, dx)] = same[:, p : p + height, p : p + width]
            equal[(-dy, -dx)] = same[:, p - dy : p - dy + height, p - dx : p - dx + width]
    rows = {dy: _window_sums([equal[(dy, dx)] for dx in range(-p, p + 1)], k) for dy in range(-p, p + 1)}
    columns = [_window_sums([rows[dy][ox] for dy in range(-p, p + 1)], k) for ox in range(k)]
    h_end, w_end = s * (out_h - 1) + 1, s * (out_w - 1) + 1
    # Position j=(jy, jx) of patch p reads pixel p+j, whose window of displacements starts at -j.
    return [columns[jx][jy][:, jy : jy + h_end : s, jx : jx + w_end : s] for jy in range(k) for jx in range(k)]


def _log2_ratio_sum(counts: list[torch.Tensor], n: int) -> torch.Tensor:
    """Σ_j log2(c_j / n) per patch (≤ 0), as few log2 calls as float32 range allows.

    Products are formed in uint8 pairs while n² fits, then in float32, and each
    product is divided by the same product of n's computed the same way, so
    rounding can never make a ratio exceed 1 and an all-equal patch gives exactly 0.
    """
    factors: list[torch.Tensor] = []
    if n * n < 256:
        for i in range(0, len(counts) - 1, 2):
            factors.append(counts[i] * counts[i + 1])
        if len(counts) % 2:
            factors.append(counts[-1])
        bounds = [n * n] * (len(counts) // 2) + [n] * (len(counts) % 2)
    else:
        factors, bounds = list(counts), [n] * len(counts)
    total: torch.Tensor | None = None
    i = 0
    while i < len(factors):
        product = factors[i].to(torch.float32)
        limit = torch.tensor(float(bounds[i]), dtype=torch.float32)
        log_bound = math.log2(bounds[i])
        i += 1
        while i < len(factors) and log_bound + math.log2(bounds[i]) < 120:  # float32 tops out at 2^128
            product.mul_(factors[i])
            limit.mul_(float(bounds[i]))
            log_bound += math.log2(bounds[i])
            i += 1
        term = product.div_(limit.item()).log2_()
        total = term if total is None else total.add_(term)
    assert total is not None
    return total


def _patch_entropy(levels_map: torch.Tensor, config: ScoreConfig) -> torch.Tensor:
    """Entropy (bits) of every patch, float32 ``[B, H', W']`` (no chunking)."""
    k, s = config.patch, config.stride
    batch, height, width = levels_map.shape
    out_h = (height - k) // s + 1
    out_w = (width - k) // s + 1
    n = k * k
    log_ratio = _log2_ratio_sum(_multiplicities(levels_map, k, s, out_h, out_w), n)
    # S = -(1/n) Σ_j log2(c_j/n); ≥ 0 by construction, clamp guards the last ulp.
    return log_ratio.mul_(-1.0 / n).clamp_(min=0.0)


def _prepare(levels_map: torch.Tensor, config: ScoreConfig) -> torch.Tensor:
    k = config.patch
    q = _narrow(levels_map)
    if config.padding != "valid":
        pad = (k // 2, (k - 1) // 2, k // 2, (k - 1) // 2)
        q = F.pad(q.unsqueeze(1).float(), pad, mode=config.padding).squeeze(1).to(q.dtype)
    height, width = q.shape[-2:]
    if height < k or width < k:
        raise ValueError(f"maps of {height}x{width} are smaller than the {k}x{k} patch")
    return q


def _chunks(q: torch.Tensor) -> list[torch.Tensor]:
    if q.device.type != "cpu" or q.shape[0] <= 1:
        return [q]
    per_chunk = max(1, CPU_CHUNK_PIXELS // max(1, q.shape[1] * q.shape[2]))
    return list(torch.split(q, per_chunk))


def local_entropy_map(levels_map: torch.Tensor, config: ScoreConfig) -> torch.Tensor:
    """Entropy (bits) of every k×k patch of quantized gray images ``[B, H, W]`` → ``[B, H', W']``."""
    q = _prepare(levels_map, config)
    return torch.cat([_patch_entropy(chunk, config) for chunk in _chunks(q)])



def average_local_spatial_entropy(maps: torch.Tensor, config: ScoreConfig | None = None) -> torch.Tensor:
    """Mean local spatial entropy per image: ``[B, H, W]`` or ``[B, C, H, W]`` → ``[B]``.

    Float maps are converted to gray, normalized and quantized per ``config``;
    integer maps are used as gray levels directly.
    """
    config = config or ScoreConfig()
    q = _prepare(gray_levels(maps, config), config)
    # Chunk by chunk, keeping only the means: the full entropy map is never materialized.
    return torch.cat([_patch_entropy(chunk, config).mean(dim=(1, 2)) for chunk in _chunks(q)])

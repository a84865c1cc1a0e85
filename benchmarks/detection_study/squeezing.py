"""Feature Squeezing (Xu, Evans, Qi, NDSS 2018): the baseline detector.

Score = the largest L1 distance between the model's softmax on the input and
on each squeezed version of it. The ImageNet configuration of the paper:
5-bit color depth, 2×2 median smoothing, and non-local means (search window
11, patch 3, h = 4 gray levels).

Bit-depth reduction and median smoothing are IBM ART's preprocessors
(``FeatureSqueezing``, ``SpatialSmoothing``); non-local means is scikit-image's
``denoise_nl_means``. ART has the squeezers but not the detector score, so
only the max-L1 combination is written here.
"""

from __future__ import annotations

import numpy as np
import torch


def _nl_means(images: np.ndarray) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    out = np.empty_like(images)
    for i, image in enumerate(images):  # skimage filters one image at a time
        hwc = np.transpose(image, (1, 2, 0))
        out[i] = np.transpose(
            denoise_nl_means(hwc, patch_size=3, patch_distance=5, h=4.0 / 255.0, channel_axis=-1, fast_mode=True),
            (2, 0, 1),
        )
    return out


def squeezing_scores(model: torch.nn.Module, pixels: torch.Tensor, *, batch_size: int = 32) -> np.ndarray:
    """``[N]`` Feature Squeezing scores (max L1 softmax distance over the three squeezers)."""
    from art.defences.preprocessor import FeatureSqueezing, SpatialSmoothing

    if pixels.shape[0] == 0:  # an attack with no successful adversarial
        return np.zeros(0, dtype=np.float64)
    bit_depth = FeatureSqueezing(clip_values=(0.0, 1.0), bit_depth=5)
    median = SpatialSmoothing(window_size=2, channels_first=True, clip_values=(0.0, 1.0))
    scores = []
    for start in range(0, pixels.shape[0], batch_size):
        x = pixels[start : start + batch_size].detach().cpu().numpy().astype(np.float32)
        variants = [bit_depth(x)[0], median(x)[0], _nl_means(x)]
        with torch.no_grad():
            base = torch.softmax(model(torch.from_numpy(x)), dim=1)
            distances = [
                (torch.softmax(model(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))), dim=1) - base).abs().sum(dim=1)
                for v in variants
            ]
        scores.append(torch.stack(distances, dim=1).max(dim=1).values.numpy())
    return np.concatenate(scores).astype(np.float64)

"""Clean images for the study: confident crops of the bundled photos, split by source photo.

Why split by photo: crops of one photo share content, lighting and camera
noise. A detector tuned on crops of the cat and tested on other crops of the
same cat would be tested on near-duplicates of its training data. The dev part
(all selection and fitting) and the test part (reporting only) share no photo.

Why a confidence filter: the paper evaluates on images the network classifies
correctly; without ImageNet labels for crops we use the network's own top-1
class, kept only when its probability is at least ``min_confidence``, so an
"attack success" is a real change of a confident decision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from detector.samples import PHOTO_NAMES, SampleImage, random_crops, to_tensor


@dataclass
class CleanSet:
    samples: list[SampleImage]
    pixels: torch.Tensor  # [N, 3, 224, 224] in [0, 1], exactly the 8-bit crops
    labels: torch.Tensor  # [N] top-1 class
    confidence: torch.Tensor  # [N]

    def subset(self, index: np.ndarray | list[int]) -> "CleanSet":
        index = list(map(int, index))
        return CleanSet([self.samples[i] for i in index], self.pixels[index], self.labels[index], self.confidence[index])

    @property
    def sources(self) -> list[str]:
        return [s.source for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)


def build_clean_set(
    model: torch.nn.Module, *, crops_per_photo: int, min_confidence: float, seed: int, batch_size: int = 32
) -> CleanSet:
    """Crops of every bundled photo that the model classifies with at least ``min_confidence``."""
    candidates = random_crops(crops_per_photo, seed=seed, min_fraction=0.3)
    kept: list[SampleImage] = []
    pixels, labels, confidence = [], [], []
    for start in range(0, len(candidates), batch_size):
        chunk = candidates[start : start + batch_size]
        x = to_tensor([s.pixels() for s in chunk])
        with torch.no_grad():
            p, y = torch.softmax(model(x), dim=1).max(dim=1)
        keep = p >= min_confidence
        kept.extend(s for s, k in zip(chunk, keep.tolist()) if k)
        pixels.append(x[keep])
        labels.append(y[keep])
        confidence.append(p[keep])
    return CleanSet(kept, torch.cat(pixels), torch.cat(labels), torch.cat(confidence))


def split_by_photo(clean: CleanSet, *, seed: int, test_photos: int) -> tuple[CleanSet, CleanSet, list[str]]:
    """(dev, test, test photo names): ``test_photos`` photos drawn by seed go to test.

    Photos that contribute no confident crop are left out of the draw.
    """
    present = [name for name in PHOTO_NAMES if name in set(clean.sources)]
    rng = np.random.default_rng(seed)
    test_names = sorted(rng.choice(present, size=min(test_photos, len(present) - 1), replace=False).tolist())
    sources = np.array(clean.sources)
    test_index = np.flatnonzero(np.isin(sources, test_names))
    dev_index = np.flatnonzero(~np.isin(sources, test_names))
    return clean.subset(dev_index), clean.subset(test_index), test_names

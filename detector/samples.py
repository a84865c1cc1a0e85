"""Real photographs that ship inside installed packages, and deterministic crops of them.

Sources: scikit-image ``skimage.data`` (astronaut, chelsea, coffee, rocket,
hubble_deep_field, immunohistochemistry, motorcycle_left), scikit-learn
``load_sample_images`` (china, flower) and matplotlib's ``grace_hopper.jpg``.
None of them is downloaded: each file is part of its package's wheel.

Crops are described by a :class:`SampleImage` record (source photo, box) so that
a data set can be split *by source photo* and regenerated exactly from a seed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PHOTO_NAMES: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "motorcycle_left",
    "china",
    "flower",
    "grace_hopper",
)


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """One bundled photo as ``uint8 [H, W, 3]`` RGB."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        array = load_sample_image(f"{name}.jpg")
    elif name == "grace_hopper":
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        array = np.asarray(Image.open(path).convert("RGB"))
    elif name == "motorcycle_left":
        import skimage.data

        array = skimage.data.stereo_motorcycle()[0]
    elif name in PHOTO_NAMES:
        import skimage.data

        array = getattr(skimage.data, name)()
    else:
        raise KeyError(f"unknown bundled photo {name!r}; known: {', '.join(PHOTO_NAMES)}")
    array = np.asarray(array)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    array = array[..., :3].astype(np.uint8, copy=False)
    array.setflags(write=False)
    return array


@dataclass(frozen=True)
class SampleImage:
    """A square crop of a bundled photo, resized to ``size``; ``box`` is (top, left, side)."""

    source: str
    box: tuple[int, int, int]
    size: int

    @property
    def name(self) -> str:
        top, left, side = self.box
        return f"{self.source}_{top}_{left}_{side}"

    def pixels(self) -> np.ndarray:
        """``uint8 [size, size, 3]``."""
        top, left, side = self.box
        crop = load_photo(self.source)[top : top + side, left : left + side]
        return np.asarray(Image.fromarray(crop).resize((self.size, self.size), Image.BICUBIC))


def full_photo_samples(size: int = 224) -> list[SampleImage]:
    """The largest centred square of every bundled photo (one per photo)."""
    samples = []
    for name in PHOTO_NAMES:
        height, width = load_photo(name).shape[:2]
        side = min(height, width)
        samples.append(SampleImage(name, ((height - side) // 2, (width - side) // 2, side), size))
    return samples


def random_crops(
    count_per_photo: int,
    *,
    seed: int = 0,
    size: int = 224,
    min_fraction: float = 0.35,
    photos: tuple[str, ...] = PHOTO_NAMES,
) -> list[SampleImage]:
    """``count_per_photo`` distinct square crops per photo at random positions and scales.

    The crop side is between ``min_fraction`` and 1 of the photo's short side.
    Deterministic for a given seed; crops are distinct boxes.
    """
    rng = np.random.default_rng(seed)
    samples: list[SampleImage] = []
    for name in photos:
        height, width = load_photo(name).shape[:2]
        short = min(height, width)
        boxes: set[tuple[int, int, int]] = set()
        while len(boxes) < count_per_photo:
            side = int(rng.integers(max(int(short * min_fraction), 32), short + 1))
            top = int(rng.integers(0, height - side + 1))
            left = int(rng.integers(0, width - side + 1))
            boxes.add((top, left, side))
        samples.extend(SampleImage(name, box, size) for box in sorted(boxes))
    return samples


def to_tensor(images: list[np.ndarray] | np.ndarray):
    """``uint8 [B, H, W, 3]`` (or a list of them) → float ``[B, 3, H, W]`` in [0, 1]."""
    import torch

    batch = np.stack(list(images)) if isinstance(images, list) else np.asarray(images)
    return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div_(255.0)


def load_image_file(path: str | Path, size: int = 224) -> np.ndarray:
    """An image file → ``uint8 [size, size, 3]`` (centre crop then resize).

    Raises ``ValueError`` with the reason for unreadable files or unsupported modes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in ("RGB", "L", "RGBA", "P", "LA"):
                rgb = image.convert("RGB")
            else:
                raise ValueError(f"{path}: unsupported image mode {mode!r} (expected RGB, RGBA, L, LA or P)")
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"{path}: not a readable image ({error})") from error
    width, height = rgb.size
    side = min(width, height)
    box = ((width - side) // 2, (height - side) // 2, (width - side) // 2 + side, (height - side) // 2 + side)
    return np.asarray(rgb.crop(box).resize((size, size), Image.BICUBIC))

"""Bundled photos and their deterministic crops."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from detector.samples import PHOTO_NAMES, full_photo_samples, load_image_file, load_photo, random_crops


def test_every_bundled_photo_loads_as_rgb():
    for name in PHOTO_NAMES:
        photo = load_photo(name)
        assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3
        assert min(photo.shape[:2]) >= 256
    with pytest.raises(KeyError, match="unknown bundled photo"):
        load_photo("lena")


def test_crops_are_deterministic_distinct_and_grouped_by_source():
    first = random_crops(5, seed=1)
    assert first == random_crops(5, seed=1)
    assert first != random_crops(5, seed=2)
    assert len(first) == 5 * len(PHOTO_NAMES) == len({s.box + (s.source,) for s in first})
    sample = first[0]
    assert sample.pixels().shape == (224, 224, 3)
    np.testing.assert_array_equal(sample.pixels(), first[0].pixels())
    assert [s.source for s in full_photo_samples()] == list(PHOTO_NAMES)


def test_image_files_load_with_clear_errors(tmp_path):
    Image.fromarray(load_photo("coffee")).save(tmp_path / "coffee.png")
    assert load_image_file(tmp_path / "coffee.png").shape == (224, 224, 3)
    Image.fromarray(load_photo("coffee")[..., 0]).save(tmp_path / "gray.png")
    assert load_image_file(tmp_path / "gray.png").shape == (224, 224, 3)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_image_file(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        load_image_file(tmp_path / "text.png")
    Image.fromarray(np.zeros((8, 8), dtype=np.float32), mode="F").save(tmp_path / "float.tiff")
    with pytest.raises(ValueError, match="unsupported image mode 'F'"):
        load_image_file(tmp_path / "float.tiff")

"""Average local spatial entropy: equality with a NumPy reference and with skimage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_entropy import reference_average_entropy, reference_gray_levels, reference_local_entropy
from skimage.filters.rank import entropy as skimage_entropy
from skimage.morphology import footprint_rectangle

from conftest import DEVICES
from detector import ScoreConfig, average_local_spatial_entropy, gray_levels, local_entropy_map
from detector.config import ConfigError


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("patch", "stride", "levels"),
    # 7 and 15: the prefix-sum window path, uint8 sums that wrap, several log2 groups per patch.
    [(3, 1, 256), (3, 2, 16), (2, 1, 4), (4, 3, 1000), (5, 1, 8), (3, 1, 65536), (7, 2, 300), (15, 1, 3)],
)
def test_entropy_map_equals_reference(device, patch, stride, levels):
    rng = np.random.default_rng(patch * 100 + stride * 10 + levels)
    # Few distinct values per patch as well as many: low `high` forces coincidences.
    levels_map = rng.integers(0, min(levels, 6 if levels > 6 else levels), size=(3, 23, 31))
    levels_map[1] = rng.integers(0, levels, size=(23, 31))
    config = ScoreConfig(patch=patch, stride=stride, levels=levels)
    dtype = torch.uint8 if levels <= 256 else torch.int32
    ours = local_entropy_map(torch.from_numpy(levels_map).to(device=device, dtype=dtype), config).cpu().numpy()
    for image in range(3):
        expected = reference_local_entropy(levels_map[image], patch, stride)
        assert ours[image].shape == expected.shape
        np.testing.assert_allclose(ours[image], expected, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("gray", "normalize", "levels", "patch", "stride"),
    [
        ("luminance", "minmax", 256, 3, 1),
        ("abs_sum", "percentile", 16, 3, 1),
        ("abs_max", "standardize", 64, 5, 2),
        ("sum", "minmax", 7, 3, 3),
        ("mean", "percentile", 256, 2, 1),
        ("l2", "minmax", 32, 3, 1),
    ],
)
def test_average_entropy_of_random_maps_equals_reference(device, gray, normalize, levels, patch, stride):
    rng = np.random.default_rng(7)
    maps = rng.standard_normal((2, 3, 40, 36)).astype(np.float32) * rng.uniform(0.1, 10, size=(2, 1, 1, 1)).astype(np.float32)
    config = ScoreConfig(gray=gray, normalize=normalize, levels=levels, patch=patch, stride=stride)
    ours = average_local_spatial_entropy(torch.from_numpy(maps).to(device), config).cpu().numpy()
    expected = [
        reference_average_entropy(m, gray=gray, normalize=normalize, levels=levels, patch=patch, stride=stride)
        for m in maps
    ]
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_matches_skimage_rank_entropy_on_the_interior():
    """skimage's rank entropy (square footprint) is the same definition at interior pixels."""
    rng = np.random.default_rng(3)
    images = np.stack([
        rng.integers(0, 256, (48, 64)),
        rng.integers(100, 104, (48, 64)),  # few distinct values: many coincidences
        (np.add.outer(np.arange(48), np.arange(64)) % 256),
    ]).astype(np.uint8)
    for patch in (3, 5):
        ours = local_entropy_map(torch.from_numpy(images), ScoreConfig(patch=patch)).numpy()
        r = patch // 2
        for image, our_map in zip(images, ours):
            theirs = skimage_entropy(image, footprint_rectangle((patch, patch)))
            np.testing.assert_allclose(our_map, theirs[r:-r, r:-r], atol=1e-5)


def test_cost_is_independent_of_levels_and_values_only_matter_by_equality():
    """Relabelling gray levels (any injective map, any number of levels) keeps every entropy."""
    rng = np.random.default_rng(11)
    small = rng.integers(0, 5, size=(2, 30, 30))
    relabel = np.array([0, 40_000, 7, 65_535, 12])
    a = local_entropy_map(torch.from_numpy(small).to(torch.uint8), ScoreConfig(levels=5))
    b = local_entropy_map(torch.from_numpy(relabel[small]).to(torch.int32), ScoreConfig(levels=65536))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_batches_equal_one_image_at_a_time(device, monkeypatch):
    """The CPU kernel works a few images at a time; chunk borders must not change any value."""
    import detector.entropy as entropy_module

    rng = np.random.default_rng(5)
    maps = torch.from_numpy(rng.integers(0, 7, size=(7, 20, 24)).astype(np.uint8)).to(device)
    one_by_one = torch.cat([local_entropy_map(maps[i : i + 1], ScoreConfig()) for i in range(7)])
    means = torch.cat([average_local_spatial_entropy(maps[i : i + 1]) for i in range(7)])
    monkeypatch.setattr(entropy_module, "CPU_CHUNK_PIXELS", 3 * 20 * 24)  # chunks of 3, 3, 1
    torch.testing.assert_close(local_entropy_map(maps, ScoreConfig()), one_by_one, rtol=0, atol=0)
    torch.testing.assert_close(average_local_spatial_entropy(maps), means, rtol=0, atol=0)


def test_integer_maps_of_any_value_range_equal_reference():
    """Values are only compared: int64 levels spanning more than 16 bits stay exact (no narrowing then)."""
    rng = np.random.default_rng(9)
    small = rng.integers(0, 4, size=(2, 12, 14))
    for values in (np.array([0, 70_000, 5, 1_000_000_007]), np.array([-3, 65_532, 17, 40_000])):
        levels = values[small]
        ours = local_entropy_map(torch.from_numpy(levels), ScoreConfig(levels=65536)).numpy()
        for image in range(2):
            np.testing.assert_allclose(ours[image], reference_local_entropy(levels[image], 3, 1), atol=1e-5)


def test_known_values():
    constant = torch.zeros((1, 5, 5), dtype=torch.uint8)
    assert average_local_spatial_entropy(constant).item() == 0.0
    distinct = torch.arange(9, dtype=torch.uint8).view(1, 3, 3)
    assert average_local_spatial_entropy(distinct).item() == pytest.approx(np.log2(9))
    half = torch.tensor([[[0, 0], [1, 1]]], dtype=torch.uint8)
    assert average_local_spatial_entropy(half, ScoreConfig(patch=2)).item() == pytest.approx(1.0)


def test_padding_gives_one_patch_per_pixel():
    maps = torch.rand(2, 17, 19)
    for mode in ("reflect", "replicate"):
        out = local_entropy_map(gray_levels(maps, ScoreConfig()), ScoreConfig(padding=mode))
        assert out.shape == (2, 17, 19)
    assert local_entropy_map(gray_levels(maps, ScoreConfig()), ScoreConfig()).shape == (2, 15, 17)


def test_constant_float_map_scores_zero_not_nan():
    assert average_local_spatial_entropy(torch.full((2, 3, 8, 8), 4.2)).tolist() == [0.0, 0.0]


def test_bad_shapes_and_configs_are_rejected_with_clear_errors():
    with pytest.raises(ValueError, match="3-channel"):
        average_local_spatial_entropy(torch.rand(1, 4, 8, 8))
    with pytest.raises(ValueError, match="smaller than"):
        average_local_spatial_entropy(torch.rand(1, 2, 2))
    with pytest.raises(ValueError, match=r"\[B,H,W\] or \[B,C,H,W\]"):
        average_local_spatial_entropy(torch.rand(8, 8))
    with pytest.raises(ConfigError, match="levels"):
        ScoreConfig(levels=1)
    with pytest.raises(ConfigError, match="gray"):
        ScoreConfig(gray="hsv")  # type: ignore[arg-type]


def test_score_config_round_trips_and_lists_differences():
    config = ScoreConfig(levels=16, layer="net._conv_head", normalize="percentile")
    assert ScoreConfig.from_dict(config.to_dict()) == config
    assert config.differences(ScoreConfig()) == [
        "layer: 'net._conv_head' != None",
        "normalize: 'percentile' != 'minmax'",
        "levels: 16 != 256",
    ]
    with pytest.raises(ConfigError, match="unknown ScoreConfig field"):
        ScoreConfig.from_dict({"bins": 3})


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_real_feature_responses_equal_reference(bundled_model, photo_batch, device):
    from detector import guided_feature_response

    response = guided_feature_response(bundled_model, photo_batch[:2]).to(device)
    for config in (ScoreConfig(), ScoreConfig(gray="abs_sum", normalize="percentile", levels=16, stride=2)):
        ours = average_local_spatial_entropy(response, config).cpu().numpy()
        expected = [
            reference_average_entropy(
                m, gray=config.gray, normalize=config.normalize, levels=config.levels, patch=config.patch, stride=config.stride
            )
            for m in response.cpu().numpy()
        ]
        np.testing.assert_allclose(ours, expected, atol=1e-5)
        levels = gray_levels(response, config).cpu().numpy()
        reference_levels = reference_gray_levels(response[0].cpu().numpy(), config.gray, config.normalize, config.levels)
        assert (levels[0] == reference_levels).mean() > 0.999

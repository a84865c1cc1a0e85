"""The family of detectors around the paper's method, and the per-image entropy bank.

A *candidate* is one ScoreConfig: which map (guided-backprop response seeded at
a given layer, the plain gradient, or the forward activations of a layer) and
how it becomes an entropy (gray conversion, normalization, gray levels, patch,
stride). The bank holds every candidate's average local spatial entropy for
every image, so that selection, combiners and tables are cheap afterwards.

Maps are computed once per batch and shared by all candidates that read them:
guided responses from all seed layers come from one forward pass.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np
import torch

from detector import PAPER_CONFIG, ScoreConfig, average_local_spatial_entropy
from detector.features import extract_maps

#: Seed layers for guided backprop on EfficientNet-Lite0 (None = final conv, the paper).
GUIDED_SEEDS: tuple[str | None, ...] = (
    None, "net._blocks.0", "net._blocks.1", "net._blocks.2", "net._blocks.3", "net._blocks.4",
    "net._blocks.5", "net._blocks.7", "net._blocks.9", "net._blocks.11", "net._blocks.13", "net._blocks.15",
)
#: Layers whose forward activations are candidate maps (extra Triton outputs, no backward pass).
ACTIVATION_LAYERS: tuple[str, ...] = (
    "net._conv_stem", "net._blocks.0", "net._blocks.1", "net._blocks.2", "net._blocks.3", "net._blocks.5",
    "net._blocks.7", "net._blocks.9", "net._blocks.11", "net._blocks.13", "net._blocks.15", "net._conv_head",
)

RESPONSE_GRID = {"gray": ("luminance", "abs_sum"), "normalize": ("minmax", "percentile", "standardize"), "levels": (16, 256)}
ACTIVATION_GRID = {"gray": ("mean", "abs_max"), "normalize": ("percentile", "standardize"), "levels": (16, 256)}


def map_key(config: ScoreConfig) -> tuple:
    """What identifies the map a candidate reads (candidates with the same key share it)."""
    return (config.response, config.layer, config.seed)


def candidate_name(config: ScoreConfig) -> str:
    if config.response == "activation":
        source = f"act:{config.layer}"
    elif config.seed == "top_logit":
        source = f"{'gb' if config.response == 'guided_backprop' else 'grad'}:top_logit"
    else:
        source = f"{'gb' if config.response == 'guided_backprop' else 'grad'}:{config.layer or 'final_conv'}"
    return f"{source}|{config.gray}|{config.normalize}|{config.levels}|k{config.patch}s{config.stride}"


def _grid(base: ScoreConfig, grid: Mapping[str, tuple]) -> list[ScoreConfig]:
    keys = list(grid)
    return [base.replace(**dict(zip(keys, values))) for values in itertools.product(*(grid[k] for k in keys))]


def family(smoke: bool = False) -> dict[str, ScoreConfig]:
    """All candidates, by name. The paper's config is always included."""
    configs = [PAPER_CONFIG]
    if smoke:  # the pipeline, not the science: a handful of candidates of every kind
        small = {"gray": ("luminance",), "normalize": ("minmax", "standardize"), "levels": (16,)}
        for seed in GUIDED_SEEDS[:2]:
            configs += _grid(ScoreConfig(layer=seed), small)
        configs += _grid(ScoreConfig(response="activation", layer=ACTIVATION_LAYERS[0]), {**small, "gray": ("mean",)})
        return {candidate_name(c): c for c in configs}
    for seed in GUIDED_SEEDS:
        configs += _grid(ScoreConfig(layer=seed), RESPONSE_GRID)
    configs += _grid(ScoreConfig(seed="top_logit"), RESPONSE_GRID)
    configs += _grid(ScoreConfig(response="gradient"), RESPONSE_GRID)
    for layer in ACTIVATION_LAYERS:
        configs += _grid(ScoreConfig(response="activation", layer=layer), ACTIVATION_GRID)
    return {candidate_name(c): c for c in configs}


def refinements(config: ScoreConfig) -> dict[str, ScoreConfig]:
    """Patch / stride / level variants of one candidate (second selection stage)."""
    variants = [config.replace(patch=p, stride=s) for p, s in ((3, 1), (3, 2), (5, 1), (2, 1))]
    variants += [config.replace(levels=v) for v in (4, 8, 32, 64)]
    return {candidate_name(c): c for c in variants}


def entropy_bank(
    model: torch.nn.Module, pixels: torch.Tensor, candidates: Mapping[str, ScoreConfig], *, batch_size: int = 16
) -> np.ndarray:
    """``[N, F]`` average local spatial entropies, columns in ``candidates`` order."""
    by_map: dict[tuple, list[int]] = {}
    configs = list(candidates.values())
    for column, config in enumerate(configs):
        by_map.setdefault(map_key(config), []).append(column)
    specs = {str(key): configs[columns[0]] for key, columns in by_map.items()}
    out = np.zeros((pixels.shape[0], len(configs)), dtype=np.float64)
    for start in range(0, pixels.shape[0], batch_size):
        maps, _ = extract_maps(model, pixels[start : start + batch_size], specs)
        for key, columns in by_map.items():
            feature_map = maps[str(key)]
            for column in columns:
                out[start : start + feature_map.shape[0], column] = (
                    average_local_spatial_entropy(feature_map, configs[column]).double().numpy()
                )
    return out


def output_name(config: ScoreConfig) -> str:
    """A Triton output name for a candidate's map: ``gb_blocks_3``, ``act_conv_stem``, ``gb_final_conv``."""
    if config.response == "activation":
        prefix = "act"
    else:
        prefix = "gb" if config.response == "guided_backprop" else "grad"
    layer = "top_logit" if config.seed == "top_logit" else (config.layer or "final_conv")
    return f"{prefix}_{layer.removeprefix('net.').strip('_').replace('._', '_').replace('.', '_')}"

"""Figures in the style of the paper's Figure 3: input | feature response | local entropy map."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from .config import ScoreConfig
from .entropy import gray_levels, local_entropy_map


def save_response_figure(
    path: Path, pixels: torch.Tensor, maps: Mapping[str, torch.Tensor], configs: Mapping[str, object],
    contributions: Mapping[str, float] | None = None,
) -> Path:
    """Write one PNG: the input, per entropy map its gray-level image and local entropy map, and each signal's share.

    Scalar signals (logit margin, squeezing, ...) have no map to draw; with
    ``contributions`` a last panel shows how much each signal pushed the score.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = {name: feature for name, feature in maps.items() if isinstance(configs.get(name), ScoreConfig)}
    columns = 1 + 2 * len(maps) + (1 if contributions else 0)
    figure, grid = plt.subplots(1, columns, figsize=(3.2 * columns + (1.8 if contributions else 0), 3.4), squeeze=False)
    axes = list(grid[0])
    axes[0].imshow(pixels.detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy())
    axes[0].set_title("input")
    column = 1
    for name, feature in maps.items():
        config = configs[name]
        assert isinstance(config, ScoreConfig)
        levels = gray_levels(feature.unsqueeze(0).detach().cpu().float(), config)
        entropy = local_entropy_map(levels, config)[0]
        axes[column].imshow(levels[0].numpy(), cmap="gray", vmin=0, vmax=config.levels - 1)
        axes[column].set_title(f"{name} (gray)")
        image = axes[column + 1].imshow(entropy.numpy(), cmap="inferno", vmin=0)
        axes[column + 1].set_title(f"local entropy, mean {entropy.mean():.3f} bits")
        figure.colorbar(image, ax=axes[column + 1], fraction=0.046)
        column += 2
    for axis in axes[:column]:
        axis.axis("off")
    if contributions:
        names, values = list(contributions), list(contributions.values())
        bars = axes[column]
        bars.barh(range(len(names)), values, color=["#c0392b" if v > 0 else "#2980b9" for v in values])
        bars.set_yticks(range(len(names)), names, fontsize=7)
        bars.axvline(0, color="black", linewidth=0.5)
        bars.set_title("share of the score")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path

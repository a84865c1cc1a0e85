"""The probing embedding: a few dozen floats per input that make near-duplicate queries close.

Stateful probing detection (Chen, Carlini & Wagner 2020; ``service/hooks/probing.py``)
keeps, per client, the embeddings of its recent queries and flags a client whose
new query sits too close to its previous ones. The embedding is computed inside
the exported Triton model (``advsentry_embedding``, ``[B, D]`` FP32), in the
same call as the logits, so the sidecar never decodes pixels; offline tools and
tests compute exactly the same numbers with :func:`embed`.

What it is (chosen by measurement, ``benchmarks/probing.py``: the smallest
kNN distance of clean corpus clients, 1 % quantile, is 545x the attacks' median
kNN distance here, 59x with the bundled model's pooled penultimate features
projected the same way): an *input-space* embedding.
The image is area-downsampled to ``grid x grid`` (16 x 16: the 8/255 stripes of
Square, one-pixel changes and the Gaussian probes of HopSkipJump average out),
mean-centred and L2-normalized (so the blends of the image with uniform noise
that boundary attacks walk along, which only lower the contrast, land on the
same point), then projected by a fixed seeded Gaussian matrix to ``dim``
floats and L2-normalized again. It needs no forward pass, is model-agnostic
(any exported model serves it) and is cheap (one pooling and a 768 x 64
matrix product per image).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: The Triton output name of the embedding.
EMBEDDING_OUTPUT = "advsentry_embedding"


@dataclass(frozen=True)
class EmbeddingConfig:
    """How the embedding is computed; recorded in the exported model's ``advsentry_model.json``."""

    kind: str = "pixels"
    grid: int = 16
    dim: int = 64
    seed: int = 0

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, document: dict) -> "EmbeddingConfig":
        config = cls(**document)
        if config.kind != "pixels":
            raise ValueError(f"unknown embedding kind {config.kind!r} (only 'pixels' is served)")
        if config.grid < 1 or config.dim < 1:
            raise ValueError("embedding grid and dim must be positive")
        return config


DEFAULT_EMBEDDING = EmbeddingConfig()


def projection(config: EmbeddingConfig = DEFAULT_EMBEDDING, channels: int = 3) -> np.ndarray:
    """The fixed ``[channels * grid * grid, dim]`` FP32 Gaussian projection (numpy PCG64: same on every machine)."""
    rng = np.random.default_rng(config.seed)
    matrix = rng.standard_normal((channels * config.grid * config.grid, config.dim))
    return (matrix / np.sqrt(config.dim)).astype(np.float32)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


class Embedder:
    """``pixels [B, C, H, W] in [0, 1] -> [B, dim]`` unit vectors (the projection built once)."""

    def __init__(self, config: EmbeddingConfig = DEFAULT_EMBEDDING, channels: int = 3) -> None:
        self.config = config
        self.matrix = torch.from_numpy(projection(config, channels))

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(pixels.detach().float(), self.config.grid).flatten(1)
        x = _unit(x - x.mean(dim=1, keepdim=True))
        return _unit(x @ self.matrix.to(x.device))


def embed(pixels: torch.Tensor | np.ndarray, config: EmbeddingConfig = DEFAULT_EMBEDDING) -> np.ndarray:
    """:class:`Embedder` for one batch, as FP32 numpy (what Triton returns)."""
    tensor = torch.as_tensor(np.asarray(pixels, dtype=np.float32)) if isinstance(pixels, np.ndarray) else pixels
    return Embedder(config, int(tensor.shape[1]))(tensor).cpu().numpy().astype(np.float32)

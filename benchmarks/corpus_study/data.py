"""Clean inputs of the corpus study: the real-photo corpus's dev and test parts (or, for ``--smoke``, bundled crops).

The corpus is split by source already (``benchmarks/corpus``): no original
file contributes to both parts. Here each part is subsampled round-robin over
sources (one input of every source before a second of any), so a bounded
study still spans as many sources as it can. Labels are the model's own top-1
classes (the corpus kept only confidently classified inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from detector.samples import to_tensor


@dataclass
class Clean:
    ids: list[str]
    sources: list[str]
    pixels: torch.Tensor  # [N, 3, 224, 224] in [0, 1], exactly the 8-bit images
    labels: torch.Tensor  # [N]

    def __len__(self) -> int:
        return len(self.ids)


def round_robin(sources: list[str], limit: int, seed: int) -> list[int]:
    """Indices of at most ``limit`` items, one per source per round, sources in seeded order."""
    rng = np.random.default_rng(seed)
    by_source: dict[str, list[int]] = {}
    for index, source in enumerate(sources):
        by_source.setdefault(source, []).append(index)
    order = [list(by_source)[i] for i in rng.permutation(len(by_source))]
    picked: list[int] = []
    depth = 0
    while len(picked) < limit and any(len(by_source[s]) > depth for s in order):
        picked.extend(by_source[s][depth] for s in order if len(by_source[s]) > depth)
        depth += 1
    return sorted(picked[:limit])


def _labelled(model: torch.nn.Module, ids: list[str], sources: list[str], images: list[np.ndarray]) -> Clean:
    pixels = to_tensor(images)
    with torch.no_grad():
        labels = torch.cat([model(pixels[i : i + 32]).argmax(1) for i in range(0, len(pixels), 32)])
    return Clean(ids, sources, pixels, labels)


def corpus_parts(model: torch.nn.Module, per_part: dict[str, int], seed: int) -> tuple[dict[str, Clean], dict]:
    from detector.corpus import load_corpus

    corpus = load_corpus(verify=True)
    parts = {}
    for part, limit in per_part.items():
        images = corpus.split(part)
        index = round_robin([im.source for im in images], limit, seed)
        chosen = [images[i] for i in index]
        parts[part] = _labelled(model, [im.id for im in chosen], [im.source for im in chosen], [im.pixels() for im in chosen])
    described = {
        "origin": "advsentry real-photo corpus (benchmarks/corpus)",
        "corpus_created_at": corpus.manifest.get("created_at"),
        "corpus_images": len(corpus.images),
        "corpus_sources": len(corpus.sources),
    }
    return parts, described


def corpus_rest(model: torch.nn.Module, parts: dict[str, Clean], root=None) -> dict[str, Clean]:
    """Per part, every image of the corpus at ``root`` (default: the study's) the attack pool did not take.

    Clean only: they cost no attack. A corpus built from the same packages and
    seed with another confidence floor has the same ids and the same split.
    """
    from detector.corpus import load_corpus

    corpus = load_corpus(root)
    rest = {}
    for part, pool in parts.items():
        taken = set(pool.ids)
        images = [im for im in corpus.split(part) if im.id not in taken]
        rest[part] = _labelled(model, [im.id for im in images], [im.source for im in images], [im.pixels() for im in images])
    return rest


def smoke_parts(model: torch.nn.Module, seed: int) -> tuple[dict[str, Clean], dict]:
    """One crop of each bundled photo; photos split into dev and test (checks the pipeline; not a result)."""
    from detector.samples import random_crops

    crops = random_crops(1, seed=seed, min_fraction=0.3)
    photos = sorted({c.source for c in crops})
    test = set(photos[::2])
    parts = {}
    for part in ("dev", "test"):
        chosen = [c for c in crops if (c.source in test) == (part == "test")]
        parts[part] = _labelled(model, [c.name for c in chosen], [c.source for c in chosen], [c.pixels() for c in chosen])
    return parts, {"origin": "bundled photos (smoke)"}

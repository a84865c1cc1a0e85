"""The clean images of a calibration job: candidates, their sources and hashes, the fit / held-out split.

Three origins (:meth:`JobConfig.resolved_clean_source`): the user's
``--images``; the real-photo corpus's *dev* part (:mod:`detector.corpus`;
its test part is reserved for reporting), grouped by the manifest's
``source`` and capped at ``--max-images`` (600 by default) across as many
sources as possible; or crops of the bundled photos.

Everything here is decided *before* any model runs, from the file list (or
the bundled photos) and the seed alone, so every shard of a job agrees on it
without talking to the others:

- candidates are ordered (bundled crops interleaved across photos, so any
  prefix spans many photos) and cut into fixed-size chunks, the job's units;
- the split is by *source* (a bundled photo, or a file): a seeded permutation
  of the sorted source names sends ``holdout`` of them to the held-out split,
  so the threshold is never checked on near-duplicates of what it was fitted on.

Which candidates are *selected* (the model's top-1 confidence at least the
floor, as in the detection study) is decided per image in the clean stage.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.models import file_sha256
from detector.samples import SampleImage, load_image_file, load_photo, random_crops, to_tensor

from .spec import JobConfig, JobConfigError, digest

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
#: Per-source hashes are listed in the artifact up to this many sources (else only their digest).
MAX_LISTED_SOURCES = 200


@dataclass(frozen=True)
class Candidate:
    """One clean image: a crop of a bundled photo or a user's file."""

    name: str
    group: str  # the source the split is made by
    sample: SampleImage | None = None
    path: str | None = None

    def pixels(self, size: int) -> np.ndarray:
        """``uint8 [size, size, 3]``."""
        if self.sample is not None:
            return self.sample.pixels()
        return load_image_file(self.path, size)  # type: ignore[arg-type]


@dataclass
class CleanPlan:
    """Candidates, chunks and split of one job."""

    candidates: list[Candidate]
    holdout_groups: frozenset[str]
    source_sha256: dict[str, str]
    chunk_size: int
    image_size: int
    description: dict[str, Any]

    @property
    def key(self) -> str:
        """Content key: the candidates, their sources' hashes, chunking and image size."""
        return digest([c.name for c in self.candidates], self.source_sha256, self.chunk_size, self.image_size)

    @property
    def n_chunks(self) -> int:
        return -(-len(self.candidates) // self.chunk_size)

    def chunk(self, index: int) -> range:
        return range(index * self.chunk_size, min(len(self.candidates), (index + 1) * self.chunk_size))

    def is_holdout(self, index: int) -> bool:
        return self.candidates[index].group in self.holdout_groups

    def pixels(self, indices: list[int] | range) -> torch.Tensor:
        """``[N, 3, H, W]`` float pixels in [0, 1] (exactly the 8-bit images)."""
        return to_tensor([self.candidates[i].pixels(self.image_size) for i in indices])


def _round_robin(lists: list[list[Any]]) -> list[Any]:
    """The first of every list, then the second of every list, and so on."""
    rounds = max((len(v) for v in lists), default=0)
    return [group[r] for r in range(rounds) for group in lists if r < len(group)]


def _interleave(samples: list[SampleImage]) -> list[SampleImage]:
    by_photo: dict[str, list[SampleImage]] = {}
    for sample in samples:
        by_photo.setdefault(sample.source, []).append(sample)
    return _round_robin(list(by_photo.values()))


def _image_files(paths: tuple[str, ...]) -> list[tuple[str, Path]]:
    files: list[tuple[str, Path]] = []
    for entry in paths:
        root = Path(entry)
        if root.is_dir():
            found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            files.extend((f"{root.name}/{p.relative_to(root).as_posix()}", p) for p in found)
        elif root.is_file():
            files.append((root.name, root))
        else:
            raise JobConfigError(f"clean images: {entry} is neither a folder nor a file")
    if not files:
        raise JobConfigError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {', '.join(paths)}")
    return files


CORPUS_ORIGIN = "advsentry real-photo corpus (dev part)"


def _corpus_candidates(config: JobConfig) -> tuple[list[Candidate], dict[str, str], dict[str, Any]]:
    """The corpus's *dev* part, interleaved across sources (seeded) and capped.

    Never the test part: it is reserved for reporting the detector's
    performance, and a threshold fitted on it would make that report
    optimistic. Interleaving across sources means any cap (and any attack
    ``limit=N``) spans as many sources as it can, which is what the held-out
    FPR's reliability depends on.
    """
    try:
        from detector.corpus import CORPUS_ENV, corpus_dir, corpus_installed, load_corpus
    except ImportError as error:
        raise JobConfigError(f"--clean-source corpus: this advsentry has no corpus support ({error})") from error
    root = Path(config.corpus).expanduser() if config.corpus else corpus_dir()
    if not corpus_installed(root):
        raise JobConfigError(
            f"--clean-source corpus: no advsentry real-photo corpus installed at {root} (no manifest.json there); "
            f"build it (python -m benchmarks.corpus build), point {CORPUS_ENV} or --corpus DIR at it, "
            "or use --clean-source bundled or --images DIR"
        )
    corpus = load_corpus(root)  # CorpusError (a ValueError) when malformed: bad input, exit 3
    dev = sorted(corpus.split("dev"), key=lambda image: image.id)
    if not dev:
        raise JobConfigError(f"the corpus at {root} has no dev images (its test part is reserved for reporting)")
    rng = np.random.default_rng([config.seed, 0xC0])
    by_source: dict[str, list[Any]] = {}
    for image in dev:
        by_source.setdefault(image.source, []).append(image)
    names = sorted(by_source)
    ordered = [[by_source[names[i]][j] for j in rng.permutation(len(by_source[names[i]]))] for i in rng.permutation(len(names))]
    chosen = _round_robin(ordered)[: config.image_cap]
    candidates = [Candidate(image.id, image.source, path=str(image.file)) for image in chosen]
    hashes = {image.id: image.sha256 for image in chosen}
    manifest = root / "manifest.json"
    details = {
        "root": str(root),
        "manifest_sha256": file_sha256(str(manifest)) if manifest.is_file() else None,
        "schema": corpus.manifest.get("schema"),
        "part": "dev",
        "dev_images": len(dev),
        "dev_sources": len(names),
        "used_images": len(chosen),
        "max_images": config.image_cap,
        "test_part": "not used (reserved for reporting)",
    }
    return candidates, hashes, details


def plan_clean_images(config: JobConfig) -> CleanPlan:
    """Enumerate candidates, hash their sources and split the sources (no model involved)."""
    source = config.resolved_clean_source()
    extra: dict[str, Any] = {}
    if source == "corpus":
        candidates, sources, corpus_details = _corpus_candidates(config)
        origin = CORPUS_ORIGIN
        extra["corpus"] = corpus_details
    elif source == "bundled":
        samples = _interleave(random_crops(config.crops_per_photo, seed=config.seed, size=config.image_size, min_fraction=0.3))
        candidates = [Candidate(s.name, s.source, sample=s) for s in samples][: config.image_cap]
        sources = {
            name: hashlib.sha256(np.ascontiguousarray(load_photo(name)).tobytes()).hexdigest()
            for name in sorted({c.group for c in candidates})
        }
        origin = "bundled photos (scikit-image, scikit-learn, matplotlib sample data), random square crops"
        extra["crops_per_photo"] = config.crops_per_photo
    else:
        files = _image_files(config.images)
        if config.image_cap is not None and len(files) > config.image_cap:  # a seeded subset, kept in file order
            keep = np.sort(np.random.default_rng([config.seed, 0xF1]).permutation(len(files))[: config.image_cap])
            files = [files[i] for i in keep]
        candidates = [Candidate(name, name, path=str(path)) for name, path in files]
        sources = {name: file_sha256(str(path.resolve())) for name, path in files}
        origin = "image files: " + ", ".join(config.images)
    if config.max_images is not None:
        extra["max_images"] = config.max_images
    groups = sorted({c.group for c in candidates})
    if len(groups) < 2:
        raise JobConfigError("the fit / held-out split needs images from at least two sources (photos or files)")
    order = np.random.default_rng(config.seed).permutation(len(groups))
    n_holdout = min(len(groups) - 1, max(1, round(config.holdout * len(groups))))
    holdout = frozenset(groups[i] for i in order[:n_holdout])
    manifest = hashlib.sha256("\n".join(f"{k} {v}" for k, v in sorted(sources.items())).encode()).hexdigest()
    description: dict[str, Any] = {
        "origin": origin,
        "clean_source": source,
        "candidates": len(candidates),
        "sources": len(groups),
        "sources_sha256": manifest,
        "holdout_sources": sorted(holdout) if len(holdout) <= MAX_LISTED_SOURCES else len(holdout),
        "split": f"by source, seeded; held-out fraction {config.holdout}",
        "min_confidence": config.confidence_floor,
        "image_size": config.image_size,
    }
    if len(sources) <= MAX_LISTED_SOURCES:
        description["source_files_sha256"] = sources
    description.update(extra)
    return CleanPlan(candidates, holdout, sources, config.chunk_size, config.image_size, description)

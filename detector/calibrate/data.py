"""The clean images of a calibration job: candidates, their sources, originals and hashes, the three splits.

Three origins (:meth:`JobConfig.resolved_clean_source`): the user's
``--images``; the real-photo corpus's *dev* part (:mod:`detector.corpus`;
its test part is reserved for reporting), grouped by the manifest's
``source`` and capped at ``--max-images`` (600 by default) across as many
sources as possible; both together (``--images`` with ``--clean-source
corpus``: the files all used, the corpus capped); or crops of the bundled
photos.

Everything here is decided *before* any model runs, from the file list (or
the bundled photos) and the seed alone, so every shard of a job agrees on it
without talking to the others:

- candidates are ordered (bundled crops interleaved across photos, so any
  prefix spans many photos) and cut into fixed-size chunks, the job's units;
- the split is by *originals* (:mod:`.splits`): the files a candidate was made
  from, a bundled photo, a user's file (by SHA-256), a corpus image's photo, or
  its cut-out and background (see :func:`corpus_originals`). A seeded share
  ``holdout`` of the distinct originals goes to the *held-out* split (where the
  FPR and the per-attack results are measured), ``threshold_split`` to the
  *threshold* split (where the threshold is set), the rest to the *fit* split
  (what ``--refit-combiner`` / ``--refit-signals`` fit on). A candidate made
  from originals of several splits is used for nothing (role ``"out"``,
  counted). Why three splits: a combiner that fitted noise makes its own
  training rows look cleaner than unseen ones, so a threshold set on them is
  too low (noise-only signals, 5 % target: 14.5 % realized FPR in issue 20,
  9.5 % in ``tests/test_calibrate_threshold.py``, where the threshold split
  gives 5.2 %); set on
  rows no fit saw, it is what the held-out split then measures. Why originals:
  crops of one photo, or composites on one background, are near-duplicates;
  a split that lets them sit on two sides measures the threshold on familiar
  content.

Which candidates are *selected* (the model's top-1 confidence at least the
floor, as in the detection study) is decided per image in the clean stage.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.models import file_sha256
from detector.samples import SampleImage, load_image_file, load_photo, random_crops, to_tensor

from .spec import JobConfig, JobConfigError, digest
from .splits import FIT, HOLDOUT, JOB_ROLES, MIXED, THRESHOLD, assign_roles, role_counts

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
#: Per-source hashes are listed in the artifact up to this many sources (else only their digest).
MAX_LISTED_SOURCES = 200


@dataclass(frozen=True)
class Candidate:
    """One clean image: a crop of a bundled photo or a user's file."""

    name: str
    group: str  # the source (photo, file, corpus source): what the by-source intervals resample
    sample: SampleImage | None = None
    path: str | None = None
    #: what the split is made by (:mod:`.splits`); empty: the source alone
    originals: frozenset[str] = frozenset()

    @property
    def split_by(self) -> frozenset[str]:
        """The originals this candidate was made from (``{"source:<group>"}`` when none are known)."""
        return self.originals or frozenset([f"source:{self.group}"])

    def pixels(self, size: int) -> np.ndarray:
        """``uint8 [size, size, 3]``."""
        if self.sample is not None:
            return self.sample.pixels()
        return load_image_file(self.path, size)  # type: ignore[arg-type]


@dataclass
class CleanPlan:
    """Candidates, chunks and split of one job."""

    candidates: list[Candidate]
    #: each candidate's split: ``"fit"``, ``"threshold"``, ``"holdout"`` or ``"out"`` (mixed: used for nothing)
    roles: tuple[str, ...]
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

    def role(self, index: int) -> str:
        return self.roles[index]

    def is_holdout(self, index: int) -> bool:
        return self.roles[index] == HOLDOUT

    @property
    def holdout_groups(self) -> frozenset[str]:
        """The sources of the held-out candidates."""
        return frozenset(c.group for c, r in zip(self.candidates, self.roles) if r == HOLDOUT)

    def split_counts(self) -> dict[str, dict[str, int]]:
        """Candidates and sources per split (``"out"``: candidates that mix splits, used for nothing)."""
        counts: dict[str, dict[str, int]] = {}
        for role in (*JOB_ROLES, MIXED):
            members = [c for c, r in zip(self.candidates, self.roles) if r == role]
            counts[role] = {"candidates": len(members), "sources": len({c.group for c in members})}
        return counts

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
#: provenance roles of the files that belong to the image's own source (a crop's photo, a composite's cut-out)
_OWN_ROLES = ("photo", "object")


def portable_path(path: str | Path) -> str:
    """``path`` as an artifact records it: relative to the working directory or ``~/`` where it can be.

    Why: an artifact is shared and committed; the absolute location of a
    directory on the machine that wrote it means nothing elsewhere (and names
    that machine's user). The corpus is identified by its manifest's SHA-256;
    the root is only a hint.
    """
    resolved = Path(path).expanduser().resolve()
    for base, prefix in ((Path.cwd().resolve(), ""), (Path.home().resolve(), "~/")):
        if resolved.is_relative_to(base):
            return prefix + resolved.relative_to(base).as_posix()
    return str(path)


def corpus_originals(images: Sequence[Any]) -> dict[str, frozenset[str]]:
    """``{image id: the originals it was made from}`` for corpus images (:class:`detector.corpus.CorpusImage`).

    An original is named by its *source* (``"source:<id>"``) wherever the
    manifest says which source a file belongs to, else by its SHA-256
    (``"sha256:<hex>"``). Why the source first: the corpus merges duplicates
    into one source (the same photo at several resolutions, a mirror image:
    different bytes, same content), so splitting by SHA-256 alone could put
    two copies of one photo on two sides; its source keeps them together.
    Which source a file belongs to: a crop's photo and a composite's cut-out
    belong to the image's own source (provenance roles ``photo``, ``object``);
    a composite's background belongs to the source of the background's own
    crops when one is among ``images``, else it is known by its SHA-256 only.
    So a crop is made of one original (its source), a composite of two (its
    cut-out's source and its background), and a composite on a held-out
    background is never fitted on. Images whose provenance has no SHA-256
    (older manifests) are made of their source alone: the old by-source split.
    """
    owner: dict[str, str] = {}
    for image in images:
        for entry in image.provenance:
            if entry.get("sha256") and entry.get("role") in _OWN_ROLES:
                owner.setdefault(str(entry["sha256"]), image.source)
    found: dict[str, frozenset[str]] = {}
    for image in images:
        names = {f"source:{image.source}"}
        for entry in image.provenance:
            sha = entry.get("sha256")
            if sha and entry.get("role") not in _OWN_ROLES:
                names.add(f"source:{owner[sha]}" if sha in owner else f"sha256:{sha}")
        found[image.id] = frozenset(names)
    return found


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
    originals = corpus_originals(dev)  # the whole dev part: a background's crops name its source even when not chosen
    candidates = [Candidate(image.id, image.source, path=str(image.file), originals=originals[image.id]) for image in chosen]
    hashes = {image.id: image.sha256 for image in chosen}
    manifest = root / "manifest.json"
    details = {
        "root": portable_path(root),
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


def _file_candidates(config: JobConfig, cap: int | None) -> tuple[list[Candidate], dict[str, str], str]:
    """The user's ``--images``: each file its own source and, by content, its own original."""
    files = _image_files(config.images)
    if cap is not None and len(files) > cap:  # a seeded subset, kept in file order
        keep = np.sort(np.random.default_rng([config.seed, 0xF1]).permutation(len(files))[:cap])
        files = [files[i] for i in keep]
    sources = {name: file_sha256(str(path.resolve())) for name, path in files}
    # a file is its own original, by content: two copies of one file land in one split
    candidates = [Candidate(name, name, path=str(path), originals=frozenset([f"sha256:{sources[name]}"])) for name, path in files]
    return candidates, sources, "image files: " + ", ".join(config.images)


def plan_clean_images(config: JobConfig) -> CleanPlan:
    """Enumerate candidates, hash their sources and split them by originals (no model involved)."""
    source = config.resolved_clean_source()
    extra: dict[str, Any] = {}
    if source == "corpus":
        candidates, sources, corpus_details = _corpus_candidates(config)
        origin = CORPUS_ORIGIN
        extra["corpus"] = corpus_details
    elif source == "corpus+files":  # the user's files and the corpus, interleaved so any prefix has both
        candidates, sources, corpus_details = _corpus_candidates(config)
        files, file_sources, files_origin = _file_candidates(config, cap=None)
        taken = sorted(set(sources) & set(file_sources))
        if taken:
            raise JobConfigError(f"image file names {taken[:3]} are also corpus image ids; rename the files or their folder")
        candidates = _round_robin([files, candidates])
        sources = {**file_sources, **sources}
        origin = f"{files_origin} and the {CORPUS_ORIGIN}"
        extra["corpus"] = corpus_details
        extra["image_files"] = len(files)
    elif source == "bundled":
        samples = _interleave(random_crops(config.crops_per_photo, seed=config.seed, size=config.image_size, min_fraction=0.3))
        photos = sorted({s.source for s in samples})
        sources = {name: hashlib.sha256(np.ascontiguousarray(load_photo(name)).tobytes()).hexdigest() for name in photos}
        # a crop is made of its photo
        candidates = [Candidate(s.name, s.source, sample=s, originals=frozenset([f"sha256:{sources[s.source]}"]))
                      for s in samples][: config.image_cap]
        sources = {name: sources[name] for name in sorted({c.group for c in candidates})}
        origin = "bundled photos (scikit-image, scikit-learn, matplotlib sample data), random square crops"
        extra["crops_per_photo"] = config.crops_per_photo
    else:
        candidates, sources, origin = _file_candidates(config, cap=config.image_cap)
    if config.max_images is not None:
        extra["max_images"] = config.max_images
    roles = split_candidates(candidates, config)
    groups = sorted({c.group for c in candidates})
    plan = CleanPlan(candidates, roles, sources, config.chunk_size, config.image_size, {})
    counts = plan.split_counts()
    holdout = plan.holdout_groups
    manifest = hashlib.sha256("\n".join(f"{k} {v}" for k, v in sorted(sources.items())).encode()).hexdigest()
    description: dict[str, Any] = {
        "origin": origin,
        "clean_source": source,
        "candidates": len(candidates),
        "sources": len(groups),
        "sources_sha256": manifest,
        "holdout_sources": sorted(holdout) if len(holdout) <= MAX_LISTED_SOURCES else len(holdout),
        "split": (f"by originals (photo, file, corpus cut-out and background), seeded; shares of the originals: "
                  f"held-out {config.holdout}, threshold {config.threshold_split}, fit the rest; candidates that mix "
                  "splits are used for nothing"),
        "split_shares": {HOLDOUT: config.holdout, THRESHOLD: config.threshold_split,
                         FIT: round(1.0 - config.holdout - config.threshold_split, 12)},
        "split_candidates": counts,
        "min_confidence": config.confidence_floor,
        "image_size": config.image_size,
        "upscaled_candidates": upscaled_files(candidates, config.image_size),
    }
    if len(sources) <= MAX_LISTED_SOURCES:
        description["source_files_sha256"] = sources
    description.update(extra)
    plan.description = description
    return plan


def upscaled_files(candidates: Sequence[Candidate], image_size: int) -> int:
    """How many file candidates are smaller than ``image_size`` on their short side (read from the headers).

    Why it matters: an upscaled clean image is smoother than the model's real
    inputs, so an attack's full-resolution perturbation stands out on it and
    detection looks better than it is (the real-photo corpus stores 224 px
    crops: a 260 px model calibrated on it sees them upscaled).
    """
    from PIL import Image

    count = 0
    for candidate in candidates:
        if candidate.path is None:
            continue
        try:
            with Image.open(candidate.path) as image:
                count += min(image.size) < image_size
        except OSError:  # unreadable: the clean stage says so with the file's name
            continue
    return count


def upscaling_warning(description: dict[str, Any]) -> str | None:
    """The warning for a plan whose clean images are mostly upscaled (None when under a tenth)."""
    upscaled, total, size = description.get("upscaled_candidates", 0), description.get("candidates", 0), description.get("image_size")
    if not total or upscaled < 0.1 * total:
        return None
    return (f"{upscaled} of {total} clean images are smaller than --image-size {size} and are UPSCALED to it.\n"
            "An upscaled image is smoother than the model's real inputs: any attack's perturbation stands out on it, "
            "so the AUCs look better than they are and the threshold may not hold on real traffic.\n"
            f"Give clean images of at least {size} px (your own with --images; the real-photo corpus's are 224 px), "
            "or calibrate at the size the images have.")


def split_candidates(candidates: Sequence[Candidate], config: JobConfig) -> tuple[str, ...]:
    """Each candidate's split (:func:`detector.calibrate.splits.assign_roles` over their originals).

    Refuses (:class:`JobConfigError`) a split the job cannot use: no
    held-out candidate (nothing to measure the FPR on), nothing to set the
    threshold on, and, when something is refitted, an empty fit or threshold
    split (the threshold must come from rows the refit did not see).
    """
    originals = [c.split_by for c in candidates]
    distinct = len(set().union(*originals)) if originals else 0
    shares = {HOLDOUT: config.holdout, THRESHOLD: config.threshold_split}
    roles = tuple(str(r) for r in assign_roles(originals, shares, config.seed, rest=FIT, mixed=MIXED)) if originals else ()
    present = {r: roles.count(r) for r in (*JOB_ROLES, MIXED)}
    empty = [r for r in ([HOLDOUT, FIT, THRESHOLD] if config.refit_combiner else [HOLDOUT]) if not present[r]]
    if not config.refit_combiner and not (present[FIT] or present[THRESHOLD]):
        empty.append("fit and threshold")
    if empty:
        raise JobConfigError(
            f"the split by originals leaves no candidate in the {' / '.join(empty)} split "
            f"({len(candidates)} candidates made from {distinct} originals (photos, files): {role_counts(distinct, shares)} "
            f"originals per split; {present[MIXED]} candidate(s) mix splits and are used for nothing); "
            f"add images from more photos or files, or change --holdout / --threshold-split"
        )
    return roles

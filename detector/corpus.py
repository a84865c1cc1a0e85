"""Loader for the real-photo corpus (``advsentry.corpus/v1``) that benchmarks read.

The corpus itself is built by ``python -m benchmarks.corpus build`` from photos
that Debian packages install; it is a cache (PNG files plus ``manifest.json``)
under ``~/.cache/advsentry/corpus`` or ``$ADVSENTRY_CORPUS_DIR``, never
committed. This module only *reads* it, so it depends on numpy, PIL and the
standard library alone (no torch): code that merely lists the corpus stays
light.

Each image records its ``split`` (``dev``/``test``, assigned by *source* — the
original file, or for a composite the cut-out — so thresholds fitted on dev are
checked on unseen photos), the model's own top-1 ``label`` and ``confidence``,
and its provenance (package, path, SHA-256 of the original bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CORPUS_ENV = "ADVSENTRY_CORPUS_DIR"
SCHEMA = "advsentry.corpus/v1"
SPLITS = ("dev", "test")
_REQUIRED = ("id", "file", "split", "source", "kind", "label", "confidence", "sha256")
#: Packages whose images are kept for an independent evaluation: never read for development,
#: tests or tuning. The builder never reads them; the loader refuses a corpus that names one, so
#: no reader of the corpus (calibrate, the studies, probe, benchmarks) needs its own filter.
RESERVED_PACKAGES = frozenset({"foolbox", "caer", "palapeli-data", "opencv-doc"})


class CorpusError(ValueError):
    """The corpus is missing, malformed, or a file does not match its manifest."""


def corpus_dir() -> Path:
    """``$ADVSENTRY_CORPUS_DIR`` when set, else ``~/.cache/advsentry/corpus``."""
    value = os.environ.get(CORPUS_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "advsentry" / "corpus"


@dataclass(frozen=True)
class CorpusImage:
    """One 224x224 input of the corpus."""

    id: str
    file: Path
    split: str
    source: str
    kind: str
    label: int
    confidence: float
    sha256: str
    provenance: tuple[dict, ...] = field(default=(), compare=False)

    def pixels(self) -> np.ndarray:
        """``uint8 [224, 224, 3]`` RGB, read from the PNG."""
        from PIL import Image

        try:
            with Image.open(self.file) as image:
                array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError) as exc:
            raise CorpusError(f"{self.file}: cannot read corpus image {self.id!r}: {exc}") from exc
        return array


@dataclass(frozen=True)
class Corpus:
    """The manifest and its images, in manifest order."""

    root: Path
    images: tuple[CorpusImage, ...]
    manifest: dict = field(compare=False, repr=False)

    def split(self, name: str) -> list[CorpusImage]:
        """The images of ``"dev"`` or ``"test"``."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return [image for image in self.images if image.split == name]

    @property
    def sources(self) -> set[str]:
        return {image.source for image in self.images}


def _root(root: Path | str | None) -> Path:
    return Path(root) if root is not None else corpus_dir()


def corpus_installed(root: Path | str | None = None) -> bool:
    """True when ``root/manifest.json`` exists, parses, and has the corpus schema."""
    try:
        manifest = json.loads((_root(root) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("schema") == SCHEMA


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_corpus(root: Path | str | None = None, *, verify: bool = False) -> Corpus:
    """Read the corpus at ``root`` (default :func:`corpus_dir`).

    ``verify=True`` also checks every PNG's SHA-256 against the manifest.
    Raises :class:`CorpusError` naming what is wrong and how to build it.
    """
    root = _root(root)
    path = root / "manifest.json"
    hint = "build it with: python -m benchmarks.corpus build" + (f" --out {root}" if root != corpus_dir() else "")
    if not path.is_file():
        raise CorpusError(f"no corpus at {root} (missing manifest.json); {hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CorpusError(f"{path}: unreadable manifest ({exc}); {hint}") from exc
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise CorpusError(f"{path}: schema is {found!r}, expected {SCHEMA!r}; {hint}")
    entries = manifest.get("images")
    if not isinstance(entries, list):
        raise CorpusError(f"{path}: 'images' must be a list")
    images: list[CorpusImage] = []
    seen: set[str] = set()
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise CorpusError(f"{path}: images[{n}] is not an object")
        missing = [key for key in _REQUIRED if key not in entry]
        if missing:
            raise CorpusError(f"{path}: images[{n}] lacks {', '.join(missing)}")
        if entry["split"] not in SPLITS:
            raise CorpusError(f"{path}: images[{n}] has split {entry['split']!r}, expected dev or test")
        if entry["id"] in seen:
            raise CorpusError(f"{path}: duplicate image id {entry['id']!r}")
        seen.add(entry["id"])
        file = (root / entry["file"]).resolve()
        if root.resolve() not in file.parents:
            raise CorpusError(f"{path}: images[{n}] file {entry['file']!r} lies outside the corpus")
        try:
            image = CorpusImage(
                id=str(entry["id"]),
                file=file,
                split=entry["split"],
                source=str(entry["source"]),
                kind=str(entry["kind"]),
                label=int(entry["label"]),
                confidence=float(entry["confidence"]),
                sha256=str(entry["sha256"]),
                provenance=tuple(dict(p) for p in entry.get("provenance", ())),
            )
        except (TypeError, ValueError) as exc:
            raise CorpusError(f"{path}: images[{n}] is malformed: {exc}") from exc
        reserved = sorted({str(p.get("package")) for p in image.provenance} & RESERVED_PACKAGES)
        if reserved:
            raise CorpusError(f"{path}: image {image.id!r} comes from reserved package(s) {reserved}, whose "
                              f"images are kept for an independent evaluation; {hint} --force")
        if not file.is_file():
            raise CorpusError(f"{file}: missing corpus image {image.id!r}; {hint} --force")
        if verify and _sha256(file) != image.sha256:
            raise CorpusError(f"{file}: SHA-256 does not match the manifest (modified or corrupt); {hint} --force")
        images.append(image)
    return Corpus(root=root, images=tuple(images), manifest=manifest)

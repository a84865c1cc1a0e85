"""Build the real-photo corpus: extract, crop/composite, classify, split by source, write.

Pipeline (one process, one torch thread: the build shares small machines):

1. :mod:`benchmarks.corpus.sources` scans the installed Debian packages for
   photos, backgrounds and photographic cut-outs (natural-image rule there).
2. Every source is assigned to ``dev`` or ``test`` *before* any pixel is made
   (seeded shuffle, alternating, so about 50/50 by sources). Backgrounds are
   sources too; a composite only uses backgrounds of its cut-out's split, so no
   original file contributes to both parts.
3. Candidates, 224x224 RGB uint8: photos and backgrounds give a centre crop
   plus random square crops covering 40–100 % of the short side (60–100 % when
   the short side is under 448 px, to avoid upscaling blur), resized with PIL
   LANCZOS; cut-outs are alpha-composited, scaled to 40–80 % of the frame at a
   random position, onto random crops of backgrounds of their split (a
   different background each time).
4. The bundled EfficientNet-Lite0 labels each candidate; a candidate is kept
   when its top-1 softmax probability is >= ``min_confidence``, at most
   ``max_per_source`` per source (in generation order, so the centre crop
   comes first) so that no photo dominates.
5. Output: lossless PNGs plus ``manifest.json`` (schema
   ``advsentry.corpus/v1``, read by :mod:`detector.corpus`), and a stats-only
   summary (``summary.md`` / ``summary.json``) for the repository.

Why labels are the model's own top-1 class: the packages carry no ImageNet
labels, and the benchmarks need inputs the model classifies confidently (an
adversarial attack is measured against the clean prediction).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from benchmarks.corpus import sources as src
from detector.corpus import SCHEMA, corpus_dir

BUILDER_VERSION = 1
SIZE = 224
SPLITS = ("dev", "test")
SUMMARY_DIR = Path(__file__).resolve().parents[1] / "results" / "corpus"


@dataclass(frozen=True)
class Settings:
    """Everything that determines the output; a cached build is reused only when these match."""

    seed: int = 0
    min_confidence: float = 0.3
    crops_per_photo: int = 4
    composites_per_object: int = 3
    max_per_source: int = 4
    batch_size: int = 32
    smoke: bool = False
    builder_version: int = BUILDER_VERSION

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Candidate:
    source: str
    kind: str  # "crop" | "composite"
    index: int  # per source, generation order
    split: str
    pixels: np.ndarray
    provenance: list[dict]
    label: int = -1
    confidence: float = 0.0


# --------------------------------------------------------------------------- split


def assign_splits(sources: Iterable[str], seed: int) -> dict[str, str]:
    """``source -> "dev" | "test"``: a seeded shuffle of the sorted ids, dealt alternately."""
    ordered = sorted(set(sources))
    random.Random(f"split:{seed}").shuffle(ordered)
    return {source: SPLITS[i % 2] for i, source in enumerate(ordered)}


# --------------------------------------------------------------------------- pixels


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def square_crops(image: Image.Image, count: int, rng: random.Random) -> list[tuple[int, int, int]]:
    """``count`` boxes ``(left, top, side)``: the centre crop, then random ones."""
    width, height = image.size
    short = min(width, height)
    low = 0.4 if short >= 2 * SIZE else 0.6
    boxes = [((width - short) // 2, (height - short) // 2, short)]
    while len(boxes) < count:
        side = max(1, int(round(short * rng.uniform(low, 1.0))))
        boxes.append((rng.randint(0, width - side), rng.randint(0, height - side), side))
    return boxes[:count]


def crop_resize(image: Image.Image, box: tuple[int, int, int]) -> Image.Image:
    left, top, side = box
    return image.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.LANCZOS)


def composite(obj: Image.Image, background: Image.Image, rng: random.Random) -> Image.Image:
    """``obj`` (RGBA, trimmed to its alpha bounding box) pasted onto a 224 crop of ``background``."""
    back = crop_resize(_rgb(background), square_crops(background, 2, rng)[1])
    obj = obj.convert("RGBA")
    bbox = obj.getchannel("A").getbbox()
    if bbox:
        obj = obj.crop(bbox)
    scale = rng.uniform(0.4, 0.8) * SIZE / max(obj.size)
    size = (max(1, round(obj.size[0] * scale)), max(1, round(obj.size[1] * scale)))
    obj = obj.resize(size, Image.LANCZOS)
    x = rng.randint(0, SIZE - size[0])
    y = rng.randint(0, SIZE - size[1])
    out = back.convert("RGBA")
    layer = Image.new("RGBA", out.size, (0, 0, 0, 0))
    layer.paste(obj, (x, y))
    return Image.alpha_composite(out, layer).convert("RGB")


def make_candidates(
    photos: list[src.Original], backgrounds: list[src.Original], objects: list[src.Original], settings: Settings
) -> tuple[list[Candidate], dict[str, str]]:
    """All candidates, and the split of every source (photos, backgrounds and objects)."""
    split_of = assign_splits([o.source for o in photos + backgrounds + objects], settings.seed)
    candidates: list[Candidate] = []
    for original in photos + backgrounds:
        rng = random.Random(f"crop:{settings.seed}:{original.source}")
        image = _rgb(original.image())
        for index, box in enumerate(square_crops(image, settings.crops_per_photo, rng)):
            pixels = np.asarray(crop_resize(image, box), dtype=np.uint8)
            candidates.append(
                Candidate(original.source, "crop", index, split_of[original.source], pixels, [original.provenance("photo")])
            )
    by_split = {name: [b for b in backgrounds if split_of[b.source] == name] for name in SPLITS}
    for original in objects:
        rng = random.Random(f"composite:{settings.seed}:{original.source}")
        split = split_of[original.source]
        pool = by_split[split]
        if not pool:
            continue
        chosen = rng.sample(pool, min(settings.composites_per_object, len(pool)))
        obj = original.image()
        for index, background in enumerate(chosen):
            pixels = np.asarray(composite(obj, background.image(), rng), dtype=np.uint8)
            candidates.append(
                Candidate(
                    original.source,
                    "composite",
                    index,
                    split,
                    pixels,
                    [original.provenance("object"), background.provenance("background")],
                )
            )
    return candidates, split_of


# --------------------------------------------------------------------------- classify


def classify(candidates: list[Candidate], batch_size: int, log=print) -> None:
    """Fill ``label`` and ``confidence`` with the bundled model's top-1 softmax."""
    import torch

    from detector.models import load_bundled_model
    from detector.samples import to_tensor

    torch.set_num_threads(1)
    model = load_bundled_model("cpu")
    start = time.monotonic()
    with torch.no_grad():
        for at in range(0, len(candidates), batch_size):
            chunk = candidates[at : at + batch_size]
            probs = torch.softmax(model(to_tensor([c.pixels for c in chunk])), dim=1)
            confidence, label = probs.max(dim=1)
            for candidate, p, k in zip(chunk, confidence.tolist(), label.tolist()):
                candidate.confidence, candidate.label = float(p), int(k)
            done = at + len(chunk)
            if done == len(candidates) or (at // batch_size) % 10 == 0:
                rate = done / max(time.monotonic() - start, 1e-6)
                log(f"  classified {done}/{len(candidates)} ({rate:.1f} img/s)")


def select(candidates: list[Candidate], settings: Settings) -> list[Candidate]:
    """Confident candidates, at most ``max_per_source`` per source, in generation order."""
    kept: list[Candidate] = []
    per_source: dict[str, int] = {}
    for candidate in candidates:
        if candidate.confidence < settings.min_confidence:
            continue
        if per_source.get(candidate.source, 0) >= settings.max_per_source:
            continue
        per_source[candidate.source] = per_source.get(candidate.source, 0) + 1
        kept.append(candidate)
    return kept


# --------------------------------------------------------------------------- write


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    qs = np.quantile(np.asarray(values), [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    return {k: round(float(v), 4) for k, v in zip(("min", "p10", "p25", "p50", "p75", "p90", "max"), qs)}


def _histogram(values: list[float]) -> dict[str, int]:
    edges = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0001]
    counts, _ = np.histogram(np.asarray(values, dtype=float), bins=edges)
    return {f"{edges[i]:.1f}-{min(edges[i + 1], 1.0):.1f}": int(c) for i, c in enumerate(counts)}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[-48:].strip("-")


def image_id(candidate: Candidate) -> str:
    """Readable and unique: a slug of the source, a digest of the full source id, the index."""
    digest = hashlib.sha256(candidate.source.encode()).hexdigest()[:8]
    return f"{_slug(candidate.source)}-{digest}-{candidate.kind[:4]}{candidate.index}"


def compute_stats(
    candidates: list[Candidate],
    kept: list[Candidate],
    split_of: dict[str, str],
    discoveries: dict[str, src.Discovery],
    class_names: tuple[str, ...],
) -> dict:
    stats: dict = {"candidates": len(candidates), "kept": len(kept)}
    stats["sources"] = {
        name: {
            "assigned": sum(1 for s in split_of.values() if s == name),
            "kept": len({c.source for c in kept if c.split == name}),
            "images": sum(1 for c in kept if c.split == name),
        }
        for name in SPLITS
    }
    stats["sources"]["distinct_kept"] = len({c.source for c in kept})
    by_package: dict[str, dict[str, int]] = {}
    for candidate in candidates:
        package = candidate.provenance[0]["package"]
        row = by_package.setdefault(package, {"originals": 0, "candidates": 0, "kept": 0})
        row["candidates"] += 1
    for candidate in kept:
        by_package[candidate.provenance[0]["package"]]["kept"] += 1
    for discovery in discoveries.values():
        for original in discovery.originals:
            by_package.setdefault(original.package, {"originals": 0, "candidates": 0, "kept": 0})["originals"] += 1
    stats["by_package"] = dict(sorted(by_package.items()))
    stats["by_kind"] = {
        kind: {"candidates": sum(c.kind == kind for c in candidates), "kept": sum(c.kind == kind for c in kept)}
        for kind in ("crop", "composite")
    }
    stats["dropped"] = {name: dict(sorted(d.dropped.items())) for name, d in discoveries.items()}
    stats["skipped_zstd_entries"] = sum(d.skipped_zstd for d in discoveries.values())
    all_conf = [c.confidence for c in candidates]
    stats["confidence_quantiles"] = {"all": _quantiles(all_conf), "kept": _quantiles([c.confidence for c in kept])}
    stats["confidence_histogram"] = {"all": _histogram(all_conf), "kept": _histogram([c.confidence for c in kept])}
    counts: dict[int, int] = {}
    for candidate in kept:
        counts[candidate.label] = counts.get(candidate.label, 0) + 1
    stats["distinct_classes"] = len(counts)
    stats["top_classes"] = [
        {"label": label, "label_name": class_names[label], "count": n}
        for label, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:25]
    ]
    return stats


def write_corpus(
    out: Path,
    kept: list[Candidate],
    settings: Settings,
    packages: dict[str, str | None],
    stats: dict,
    class_names: tuple[str, ...],
) -> dict:
    """Write PNGs and the manifest into ``out`` (atomically: a temp dir renamed into place)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.building-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "images").mkdir(parents=True)
    images = []
    for candidate in kept:
        ident = image_id(candidate)
        buffer = io.BytesIO()
        Image.fromarray(candidate.pixels).save(buffer, format="PNG", optimize=False, compress_level=6)
        data = buffer.getvalue()
        (staging / "images" / f"{ident}.png").write_bytes(data)
        images.append(
            {
                "id": ident,
                "file": f"images/{ident}.png",
                "sha256": hashlib.sha256(data).hexdigest(),
                "split": candidate.split,
                "source": candidate.source,
                "kind": candidate.kind,
                "provenance": candidate.provenance,
                "label": candidate.label,
                "label_name": class_names[candidate.label],
                "confidence": round(candidate.confidence, 6),
            }
        )
    manifest = {
        "schema": SCHEMA,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings.to_dict(),
        "packages": packages,
        "images": images,
        "stats": stats,
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return manifest


def write_summary(manifest: dict, directory: Path = SUMMARY_DIR) -> None:
    """Stats-only ``summary.json`` and ``summary.md`` (committed; no images)."""
    directory.mkdir(parents=True, exist_ok=True)
    stats = manifest["stats"]
    summary = {
        "schema": manifest["schema"],
        "created_at": manifest["created_at"],
        "settings": manifest["settings"],
        "packages": manifest["packages"],
        "stats": stats,
    }
    (directory / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    s = stats["sources"]
    lines = [
        "# Real-photo corpus: summary",
        "",
        f"Built {manifest['created_at']} by `python -m benchmarks.corpus build` "
        f"(seed {manifest['settings']['seed']}, min confidence {manifest['settings']['min_confidence']}, "
        f"at most {manifest['settings']['max_per_source']} inputs per source). Images are not committed; "
        "rebuild them with the command above (they land in `~/.cache/advsentry/corpus`).",
        "",
        f"- candidates: {stats['candidates']}, kept: **{stats['kept']}** from "
        f"**{s['distinct_kept']}** distinct sources ({stats['distinct_classes']} ImageNet classes)",
        f"- dev: {s['dev']['images']} inputs from {s['dev']['kept']} sources; "
        f"test: {s['test']['images']} inputs from {s['test']['kept']} sources",
        f"- confidence (kept): {stats['confidence_quantiles']['kept']}",
        f"- confidence (all candidates): {stats['confidence_quantiles']['all']}",
        "",
        "| package | version | originals | candidates | kept |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for package, row in stats["by_package"].items():
        lines.append(
            f"| {package} | {manifest['packages'].get(package)} | {row['originals']} | {row['candidates']} | {row['kept']} |"
        )
    lines += ["", "| kind | candidates | kept |", "| --- | ---: | ---: |"]
    for kind, row in stats["by_kind"].items():
        lines.append(f"| {kind} | {row['candidates']} | {row['kept']} |")
    lines += ["", "Files dropped by the natural-image rule (see `benchmarks/corpus/sources.py`):", ""]
    for scan, rules in stats["dropped"].items():
        if isinstance(rules, dict):
            lines.append(f"- {scan}: " + ", ".join(f"{rule} {n}" for rule, n in rules.items()))
        else:
            lines.append(f"- {scan}: {rules} candidates")
    lines += ["", "Confidence histogram (all candidates → kept):", "", "| bin | all | kept |", "| --- | ---: | ---: |"]
    for bin_name, n in stats["confidence_histogram"]["all"].items():
        lines.append(f"| {bin_name} | {n} | {stats['confidence_histogram']['kept'][bin_name]} |")
    lines += ["", "Most frequent classes among kept inputs:", ""]
    lines.append(", ".join(f"{c['label_name']} ({c['count']})" for c in stats["top_classes"]))
    (directory / "summary.md").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- entry


def cached(out: Path, settings: Settings, packages: dict[str, str | None]) -> dict | None:
    """The existing manifest when it was built with these settings and package versions."""
    path = Path(out) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("schema") != SCHEMA or manifest.get("settings") != settings.to_dict():
        return None
    if manifest.get("packages") != packages:
        return None
    if not all((Path(out) / image["file"]).is_file() for image in manifest.get("images", [])):
        return None
    return manifest


def build(
    out: Path | None = None,
    settings: Settings = Settings(),
    *,
    force: bool = False,
    summary_dir: Path | None = None,
    log=print,
) -> dict:
    """Build (or reuse) the corpus in ``out``; returns the manifest. Raises SystemExit(2) without the packages."""
    out = Path(out) if out is not None else corpus_dir()
    if settings.smoke:  # 2 photos + 2 backgrounds x 2 crops, 2 cut-outs x 2 composites = 12 candidates
        settings = replace(
            settings,
            crops_per_photo=min(settings.crops_per_photo, 2),
            composites_per_object=min(settings.composites_per_object, 2),
        )
    packages = src.installed_versions()
    missing = [p for p, v in packages.items() if v is None]
    if missing:
        raise MissingPackages(src.missing_packages_message(missing))
    if not force:
        manifest = cached(out, settings, packages)
        if manifest is not None:
            log(f"corpus up to date in {out} ({len(manifest['images'])} images); --force rebuilds")
            return manifest
    started = time.monotonic()
    limit = 4 if settings.smoke else None
    log("scanning packages ...")
    discoveries = {
        "gcompris-qt-data": src.scan_gcompris(limit),
        "backgrounds": src.scan_backgrounds(None if not settings.smoke else 2),
        "tuxpaint-stamps-default": src.scan_stamps(2 if settings.smoke else None),
    }
    for name, d in discoveries.items():
        log(f"  {name}: {len(d.originals)} originals kept, dropped {d.dropped}")
    photos = discoveries["gcompris-qt-data"].originals
    backgrounds = discoveries["backgrounds"].originals
    objects = discoveries["tuxpaint-stamps-default"].originals
    if settings.smoke:
        photos, objects = photos[:2], objects[:2]
    log("making candidates ...")
    candidates, split_of = make_candidates(photos, backgrounds, objects, settings)
    log(f"  {len(candidates)} candidates from {len(split_of)} sources")
    classify(candidates, settings.batch_size, log)
    kept = select(candidates, settings)
    from detector.models import imagenet_class_names

    names = imagenet_class_names()
    stats = compute_stats(candidates, kept, split_of, discoveries, names)
    stats["dropped"]["low-confidence"] = sum(c.confidence < settings.min_confidence for c in candidates)
    stats["dropped"]["over-per-source-cap"] = (
        sum(c.confidence >= settings.min_confidence for c in candidates) - len(kept)
    )
    stats["build_seconds"] = round(time.monotonic() - started, 1)
    manifest = write_corpus(out, kept, settings, packages, stats, names)
    if summary_dir is not None:
        write_summary(manifest, summary_dir)
    log(
        f"wrote {len(kept)} images from {stats['sources']['distinct_kept']} sources to {out} "
        f"in {stats['build_seconds']} s (dev {stats['sources']['dev']['images']}, test {stats['sources']['test']['images']})"
    )
    return manifest


class MissingPackages(RuntimeError):
    """The Debian packages the corpus is extracted from are not installed."""

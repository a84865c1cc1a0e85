"""Where the corpus's original photos come from, and which files count as photos.

Everything here reads files that Debian packages installed under ``/usr/share``;
nothing is downloaded. Three roles:

* ``photo`` — large opaque photographs cropped directly (GCompris activity
  photos, inside ``.rcc`` bundles, read with :mod:`benchmarks.corpus.rcc`);
* ``background`` — desktop wallpapers, Scratch stage backdrops, Tux Paint
  templates: cropped directly *and* used behind cut-outs;
* ``object`` — Tux Paint stamps, PNG cut-outs with alpha, composited onto
  backgrounds.

**Natural-image rule** (why: these packages mix photos with drawings, icons,
gradients and abstract art, and the model's confidence alone would keep some
cartoons). Opaque images (roles photo/background) are kept when *all* hold, in
this order; the first failing rule is recorded as the reason it was dropped:

1. ``min-side``: shorter side >= 150 px;
2. ``transparent``: >= 99 % of pixels fully opaque (GCompris word drawings,
   puzzle pieces and round detail crops are cut-outs, not scenes);
3. ``colours``: >= 5000 distinct RGB colours in a 128x128 box-filtered
   thumbnail (cartoons, gradients and icons have a few hundred to ~3000);
4. ``flat``: <= 30 % of thumbnail pixels sit in flat regions (sum over RGB of
   |horizontal| + |vertical| neighbour differences <= 3) — drawn scenes and
   smooth abstract wallpapers have large exactly flat areas, photos have noise.

Cut-outs (role object) are judged on their opaque pixels at native size (they
are small, median short side ~120 px, so a thumbnail would blur them):
``opaque-pixels`` >= 1500, ``colours`` >= 500 distinct colours among them,
``flat`` <= 10 % (photos of objects are textured; the drawn stamps are flat
fills with outlines). Folder rules come first: ``artwork`` drops GCompris
``paintings/`` and ``details/`` (reproductions of paintings, not photos) and
``drawing-folder`` drops Tux Paint ``cartoon/`` and ``symbols/`` folders.

**Duplicates** are merged into one *source* so that the by-source split holds:
identical bytes (the same file in several bundles, symlinked wallpaper sizes),
one Plasma wallpaper's several resolutions (one folder = one source), Tux Paint
``X_mirror.png`` with ``X.png``, and files whose 16x16 gray thumbnails match
(the same photo at several resolutions, e.g. MATE's ``Elephants*.jpg``).
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from benchmarks.corpus import rcc

#: Debian packages the builder reads, and what it reads from each.
PACKAGES: dict[str, str] = {
    "gcompris-qt-data": "photos (WebP inside /usr/share/gcompris-qt/rcc/*.rcc)",
    "tuxpaint-stamps-default": "cut-out objects (/usr/share/tuxpaint/stamps)",
    "scratch": "backgrounds (/usr/share/scratch/Media/Backgrounds)",
    "mate-backgrounds": "backgrounds (/usr/share/backgrounds/mate)",
    "plasma-workspace-wallpapers": "backgrounds (/usr/share/wallpapers)",
    "tuxpaint-data": "backgrounds (/usr/share/tuxpaint/templates)",
}

GCOMPRIS_RCC = "/usr/share/gcompris-qt/rcc"
TUXPAINT_STAMPS = "/usr/share/tuxpaint/stamps"
BACKGROUND_GLOBS: tuple[tuple[str, str], ...] = (
    ("scratch", "/usr/share/scratch/Media/Backgrounds/**/*"),
    ("mate-backgrounds", "/usr/share/backgrounds/mate/**/*"),
    ("plasma-workspace-wallpapers", "/usr/share/wallpapers/*/contents/images/*"),
    ("tuxpaint-data", "/usr/share/tuxpaint/templates/*"),
)
IMAGE_SUFFIXES = (".webp", ".png", ".jpg", ".jpeg", ".gif")

MIN_SIDE = 150
MIN_OPAQUE_FRACTION = 0.99
MIN_THUMB_COLOURS = 5000
MAX_THUMB_FLAT = 0.30
MIN_OBJECT_PIXELS = 1500
MIN_OBJECT_COLOURS = 500
MAX_OBJECT_FLAT = 0.10
FLAT_GRADIENT = 3
ARTWORK_FOLDERS = ("/paintings/", "/details/")
DRAWING_FOLDERS = ("/cartoon/", "/symbols/")


@dataclass
class Original:
    """One original file: where it is, its bytes' digest, its role, and its source id."""

    package: str
    path: str  # filesystem path; for rcc entries "<bundle>:/<path inside the bundle>"
    sha256: str
    role: str  # "photo" | "background" | "object"
    source: str  # the source id (duplicates share one)
    data: bytes = field(repr=False, default=b"")

    def provenance(self, role: str | None = None) -> dict:
        return {"package": self.package, "path": self.path, "sha256": self.sha256, "role": role or self.role}

    def image(self) -> Image.Image:
        image = Image.open(io.BytesIO(self.data))
        image.load()
        return image


@dataclass
class Discovery:
    """What a scan found: kept originals, and how many files each rule dropped."""

    originals: list[Original] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    skipped_zstd: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


# --------------------------------------------------------------------------- rules


def _flat_fraction(rgb: np.ndarray, mask: np.ndarray | None = None) -> float:
    rgb = rgb.astype(np.int32)
    grad = np.abs(np.diff(rgb, axis=0))[:, :-1].sum(-1) + np.abs(np.diff(rgb, axis=1))[:-1].sum(-1)
    if mask is None:
        return float((grad <= FLAT_GRADIENT).mean()) if grad.size else 1.0
    inner = mask[:-1, :-1] & mask[1:, :-1] & mask[:-1, 1:]
    return float((grad[inner] <= FLAT_GRADIENT).mean()) if inner.any() else 1.0


def _distinct(rgb: np.ndarray) -> int:
    rgb = rgb.reshape(-1, 3).astype(np.int32)
    return int(np.unique((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]).size)


def photo_rule(image: Image.Image | np.ndarray) -> str | None:
    """``None`` when an opaque image passes the natural-image rule, else the failing rule's name."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if min(image.size) < MIN_SIDE:
        return "min-side"
    rgba = image.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"))
    if (alpha >= 250).mean() < MIN_OPAQUE_FRACTION:
        return "transparent"
    thumb = np.asarray(rgba.convert("RGB").resize((128, 128), Image.BOX))
    if _distinct(thumb) < MIN_THUMB_COLOURS:
        return "colours"
    if _flat_fraction(thumb) > MAX_THUMB_FLAT:
        return "flat"
    return None


def object_rule(image: Image.Image | np.ndarray) -> str | None:
    """``None`` when a cut-out's opaque pixels look photographic, else the failing rule's name."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    rgba = np.asarray(image.convert("RGBA"))
    opaque = rgba[..., 3] >= 250
    if int(opaque.sum()) < MIN_OBJECT_PIXELS:
        return "opaque-pixels"
    if _distinct(rgba[..., :3][opaque]) < MIN_OBJECT_COLOURS:
        return "colours"
    if _flat_fraction(rgba[..., :3], opaque) > MAX_OBJECT_FLAT:
        return "flat"
    return None


def _thumb_key(image: Image.Image) -> bytes:
    """A coarse fingerprint: 16x16 gray thumbnail quantised to 16 levels."""
    gray = np.asarray(image.convert("L").resize((16, 16), Image.BOX)) // 16
    return gray.astype(np.uint8).tobytes()


# --------------------------------------------------------------------------- packages


def installed_versions(packages: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """``package -> installed version`` from dpkg-query (``None`` when not installed)."""
    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            out = subprocess.run(
                ["dpkg-query", "-W", "-f=${Status}\t${Version}", package],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            versions[package] = None
            continue
        status, _, version = out.stdout.partition("\t")
        versions[package] = version.strip() if out.returncode == 0 and "installed" in status.split() else None
    return versions


def missing_packages_message(missing: Iterable[str]) -> str:
    missing = sorted(missing)
    return (
        "the real-photo corpus is extracted from Debian packages that are not installed: "
        + ", ".join(missing)
        + "\ninstall them with:\n    sudo apt-get install -y "
        + " ".join(sorted(PACKAGES))
    )


# --------------------------------------------------------------------------- scans


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _merge_duplicates(found: list[Original], group_of: Callable[[Original], str | None] | None = None) -> list[Original]:
    """Give duplicates one source id (the first one seen), by bytes, by ``group_of`` and by thumbnail."""
    by_sha: dict[str, str] = {}
    by_group: dict[str, str] = {}
    by_thumb: dict[bytes, str] = {}
    for original in found:
        group = group_of(original) if group_of else None
        source = by_sha.get(original.sha256) or (by_group.get(group) if group else None)
        key = None
        if source is None:
            try:
                key = _thumb_key(original.image())
            except Exception:  # noqa: BLE001 — unreadable files were dropped earlier
                key = None
            source = by_thumb.get(key) if key is not None else None
        original.source = source or original.source
        by_sha.setdefault(original.sha256, original.source)
        if group:
            by_group.setdefault(group, original.source)
        if key is not None:
            by_thumb.setdefault(key, original.source)
    return found


def _dedupe_keep_first(found: list[Original]) -> list[Original]:
    """Within one source keep a single original (the largest file: the best resolution)."""
    best: dict[str, Original] = {}
    for original in found:
        current = best.get(original.source)
        if current is None or len(original.data) > len(current.data):
            best[original.source] = original
    return [o for o in found if best[o.source] is o]


def scan_gcompris(limit: int | None = None) -> Discovery:
    """Photos inside GCompris's resource bundles (role ``photo``)."""
    found = Discovery()
    kept: list[Original] = []
    for bundle in sorted(glob.glob(os.path.join(GCOMPRIS_RCC, "*.rcc"))):
        for entry in rcc.read_rcc(bundle):
            if not entry.path.lower().endswith(IMAGE_SUFFIXES):
                continue
            if entry.skipped:
                if entry.compression == "zstd":
                    found.skipped_zstd += 1
                found.drop("undecodable")
                continue
            path = f"{bundle}:/{entry.path}"
            if any(folder in "/" + entry.path for folder in ARTWORK_FOLDERS):
                found.drop("artwork")
                continue
            try:
                image = Image.open(io.BytesIO(entry.data))
                image.load()
            except Exception:  # noqa: BLE001
                found.drop("unreadable")
                continue
            reason = photo_rule(image)
            if reason:
                found.drop(reason)
                continue
            kept.append(Original("gcompris-qt-data", path, _sha(entry.data), "photo", _source_id("gcompris-qt-data", entry.path), entry.data))
            if limit is not None and len(kept) >= limit:
                break
        if limit is not None and len(kept) >= limit:
            break
    before = len(kept)
    kept = _dedupe_keep_first(_merge_duplicates(kept))
    found.dropped["duplicate"] = found.dropped.get("duplicate", 0) + before - len(kept)
    found.originals = kept
    return found


def _read_passing(path: str, rule, found: "Discovery") -> bytes | None:
    """The file's bytes when it opens as an image and passes ``rule``; else the reason is counted and None."""
    data = Path(path).read_bytes()
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception:  # noqa: BLE001 - any undecodable file is just not a photo
        found.drop("unreadable")
        return None
    reason = rule(image)
    if reason:
        found.drop(reason)
        return None
    return data


def scan_backgrounds(limit: int | None = None) -> Discovery:
    """Wallpapers, Scratch backdrops and Tux Paint templates (role ``background``)."""
    found = Discovery()
    kept: list[Original] = []
    for package, pattern in BACKGROUND_GLOBS:
        for path in sorted(glob.glob(pattern, recursive=True)):
            if not os.path.isfile(path) or not path.lower().endswith(IMAGE_SUFFIXES):
                continue
            data = _read_passing(path, photo_rule, found)
            if data is None:
                continue
            kept.append(Original(package, path, _sha(data), "background", _source_id(package, path), data))
            if limit is not None and len(kept) >= limit:
                break
        if limit is not None and len(kept) >= limit:
            break

    def wallpaper_folder(original: Original) -> str | None:
        match = re.match(r"/usr/share/wallpapers/([^/]+)/", original.path)
        return f"plasma:{match.group(1)}" if match else None

    before = len(kept)
    kept = _dedupe_keep_first(_merge_duplicates(kept, wallpaper_folder))
    found.dropped["duplicate"] = found.dropped.get("duplicate", 0) + before - len(kept)
    found.originals = kept
    return found


def scan_stamps(limit: int | None = None) -> Discovery:
    """Photographic Tux Paint stamps (role ``object``)."""
    found = Discovery()
    kept: list[Original] = []
    for path in sorted(glob.glob(os.path.join(TUXPAINT_STAMPS, "**", "*.png"), recursive=True)):
        if any(folder in path for folder in DRAWING_FOLDERS):
            found.drop("drawing-folder")
            continue
        data = _read_passing(path, object_rule, found)
        if data is None:
            continue
        kept.append(Original("tuxpaint-stamps-default", path, _sha(data), "object", _source_id("tuxpaint-stamps-default", path), data))
        if limit is not None and len(kept) >= limit:
            break

    def unmirrored(original: Original) -> str:
        return re.sub(r"_mirror(?=\.png$)", "", original.path)

    before = len(kept)
    kept = _dedupe_keep_first(_merge_duplicates(kept, unmirrored))
    found.dropped["duplicate"] = found.dropped.get("duplicate", 0) + before - len(kept)
    found.originals = kept
    return found


def _source_id(package: str, path: str) -> str:
    """A readable, stable source id: package plus the path below its data folder."""
    for prefix in (
        "gcompris/src/activities/",
        "/usr/share/tuxpaint/stamps/",
        "/usr/share/scratch/Media/Backgrounds/",
        "/usr/share/backgrounds/mate/",
        "/usr/share/wallpapers/",
        "/usr/share/tuxpaint/templates/",
    ):
        if path.startswith(prefix):
            path = path[len(prefix) :]
            break
    path = path.replace("/resource/", "/")
    return f"{package}:{path}"

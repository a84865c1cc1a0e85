"""The real-photo corpus: .rcc reader, photo filter, by-source split, loader.

Fast and independent of the Debian packages (CI may not have them): the .rcc
file, the arrays and the manifest are all made here. Only the smoke build
needs the packages and is skipped without them.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.corpus import rcc
from benchmarks.corpus import sources as src
from benchmarks.corpus.build import Candidate, Settings, assign_splits, make_candidates, select
from detector.corpus import CORPUS_ENV, SCHEMA, CorpusError, corpus_dir, corpus_installed, load_corpus


# --------------------------------------------------------------------------- rcc


def _handmade_rcc() -> bytes:
    """A version-3 bundle laid out by hand per Qt's format (not via write_rcc).

    root dir -> "img" dir -> {"a.bin" (zlib), "b.txt" (stored)}.
    """
    a_raw = bytes(range(256)) * 4
    b_raw = b"plain bytes, not compressed"

    names = bytearray()

    def name(text: str) -> int:
        offset = len(names)
        encoded = text.encode("utf-16-be")
        names.extend(struct.pack(">HI", len(text), 0) + encoded)
        return offset

    n_img, n_a, n_b = name("img"), name("a.bin"), name("b.txt")
    data = bytearray()
    a_payload = struct.pack(">I", len(a_raw)) + zlib.compress(a_raw)
    a_off = len(data)
    data.extend(struct.pack(">I", len(a_payload)) + a_payload)
    b_off = len(data)
    data.extend(struct.pack(">I", len(b_raw)) + b_raw)
    mtime = struct.pack(">Q", 0)
    tree = b"".join(
        [
            struct.pack(">IHII", 0, 0x2, 1, 1) + mtime,  # 0: root, 1 child at index 1
            struct.pack(">IHII", n_img, 0x2, 2, 2) + mtime,  # 1: img/, children 2..3
            struct.pack(">IHHHI", n_a, 0x1, 0, 0, a_off) + mtime,  # 2: zlib
            struct.pack(">IHHHI", n_b, 0x0, 0, 0, b_off) + mtime,  # 3: stored
        ]
    )
    tree_off = 24
    data_off = tree_off + len(tree)
    names_off = data_off + len(data)
    header = b"qres" + struct.pack(">IIIII", 3, tree_off, data_off, names_off, 1)
    return header + tree + bytes(data) + bytes(names), a_raw, b_raw


def test_rcc_reader_on_a_handmade_bundle(tmp_path: Path) -> None:
    blob, a_raw, b_raw = _handmade_rcc()
    path = tmp_path / "tiny.rcc"
    path.write_bytes(blob)
    entries = {e.path: e for e in rcc.read_rcc(path)}
    assert set(entries) == {"img/a.bin", "img/b.txt"}
    assert entries["img/a.bin"].data == a_raw and entries["img/a.bin"].compression == "zlib"
    assert entries["img/b.txt"].data == b_raw and entries["img/b.txt"].compression == "none"


def test_rcc_writer_round_trips_and_zstd_is_skipped() -> None:
    files = {"x/y/photo.webp": (b"\x00" * 500, True), "readme": (b"hello", False)}
    for version in (1, 2, 3):
        got = {e.path: e.data for e in rcc.read_rcc_bytes(rcc.write_rcc(files, version=version))}
        assert got == {k: v for k, (v, _) in files.items()}
    # flip the stored entry's flags to zstd: reported, not decoded
    blob = bytearray(rcc.write_rcc({"z.bin": (b"abc", False)}))
    struct.pack_into(">H", blob, 24 + 22 + 4, rcc.FLAG_COMPRESSED_ZSTD)
    (entry,) = rcc.read_rcc_bytes(bytes(blob))
    assert entry.data is None and entry.compression == "zstd" and entry.skipped


def test_rcc_reader_rejects_non_bundles() -> None:
    with pytest.raises(rcc.RccError):
        list(rcc.read_rcc_bytes(b"PK\x03\x04 not a bundle at all"))


# --------------------------------------------------------------------------- filter


def _natural(size: int = 256, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([120 + 80 * x, 90 + 100 * y, 140 - 60 * x * y], axis=-1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _cartoon(size: int = 256) -> np.ndarray:
    array = np.full((size, size, 3), (250, 240, 200), np.uint8)
    array[40:200, 60:180] = (200, 40, 40)
    array[100:140, 20:240] = (30, 90, 200)
    array[96:100, 20:240] = 0  # an outline
    return array


def test_photo_rule_keeps_natural_and_drops_cartoon() -> None:
    assert src.photo_rule(_natural()) is None
    assert src.photo_rule(_cartoon()) == "colours"
    assert src.photo_rule(_natural(size=120)) == "min-side"
    # a smooth gradient has many colours but large flat regions
    y, x = np.mgrid[0:256, 0:256]
    smooth = np.stack([x // 2, y // 2, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    assert src.photo_rule(smooth) in ("colours", "flat")


def test_object_rule_on_cutouts() -> None:
    photo = np.zeros((120, 120, 4), np.uint8)
    photo[..., :3] = _natural(120, seed=1)
    photo[20:100, 20:100, 3] = 255
    assert src.object_rule(photo) is None
    drawn = photo.copy()
    drawn[..., :3] = _cartoon(120)
    assert src.object_rule(drawn) in ("colours", "flat")
    tiny = np.zeros((120, 120, 4), np.uint8)
    tiny[:10, :10, 3] = 255
    assert src.object_rule(tiny) == "opaque-pixels"


# --------------------------------------------------------------------------- split


def _original(package: str, name: str, role: str, array: np.ndarray) -> src.Original:
    buffer = __import__("io").BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    data = buffer.getvalue()
    return src.Original(package, f"/fake/{name}", hashlib.sha256(data).hexdigest(), role, f"{package}:{name}", data)


def test_split_is_by_source_and_backgrounds_stay_in_their_split() -> None:
    sources = [f"s{i}" for i in range(101)]
    split = assign_splits(sources, seed=3)
    assert split == assign_splits(list(reversed(sources)), seed=3)  # order-independent, seeded
    counts = {name: sum(v == name for v in split.values()) for name in ("dev", "test")}
    assert abs(counts["dev"] - counts["test"]) <= 1

    photos = [_original("p", f"photo{i}", "photo", _natural(200, i)) for i in range(6)]
    backgrounds = [_original("b", f"bg{i}", "background", _natural(260, 100 + i)) for i in range(6)]
    obj_array = np.zeros((80, 80, 4), np.uint8)
    obj_array[..., :3] = _natural(80, 7)
    obj_array[10:70, 10:70, 3] = 255
    objects = [_original("o", f"obj{i}", "object", obj_array) for i in range(8)]
    settings = Settings(crops_per_photo=3, composites_per_object=2)
    candidates, split_of = make_candidates(photos, backgrounds, objects, settings)
    assert all(c.pixels.shape == (224, 224, 3) and c.pixels.dtype == np.uint8 for c in candidates)
    files_in: dict[str, set[str]] = {}
    for candidate in candidates:
        assert candidate.split == split_of[candidate.source]
        for prov in candidate.provenance:
            files_in.setdefault(prov["path"], set()).add(candidate.split)
    assert all(len(splits) == 1 for splits in files_in.values()), files_in
    assert any(c.kind == "composite" for c in candidates)


def test_select_caps_per_source_and_thresholds() -> None:
    pix = np.zeros((224, 224, 3), np.uint8)
    cands = [Candidate("a", "crop", i, "dev", pix, [], 1, 0.9) for i in range(6)]
    cands += [Candidate("b", "crop", 0, "test", pix, [], 2, 0.2)]
    kept = select(cands, Settings(min_confidence=0.5, max_per_source=4))
    assert [c.index for c in kept] == [0, 1, 2, 3]


# --------------------------------------------------------------------------- loader


def _write_manifest(root: Path) -> dict:
    (root / "images").mkdir(parents=True)
    images = []
    for i, split in enumerate(("dev", "test", "dev")):
        array = _natural(224, seed=i)
        path = root / "images" / f"img{i}.png"
        Image.fromarray(array).save(path)
        images.append(
            {
                "id": f"img{i}", "file": f"images/img{i}.png", "split": split, "source": f"src{i // 2}",
                "kind": "crop", "label": 10 + i, "label_name": "x", "confidence": 0.8,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "provenance": [{"package": "p", "path": "/usr/share/p", "sha256": "0" * 64, "role": "photo"}],
            }
        )
    manifest = {"schema": SCHEMA, "created_at": "now", "settings": {}, "packages": {}, "images": images, "stats": {}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_load_corpus_round_trip_and_verify(tmp_path: Path) -> None:
    assert not corpus_installed(tmp_path)
    with pytest.raises(CorpusError, match="benchmarks.corpus build"):
        load_corpus(tmp_path)
    _write_manifest(tmp_path)
    assert corpus_installed(tmp_path)
    corpus = load_corpus(tmp_path, verify=True)
    assert [i.id for i in corpus.split("dev")] == ["img0", "img2"]
    assert [i.id for i in corpus.split("test")] == ["img1"]
    assert corpus.sources == {"src0", "src1"}
    assert corpus.images[0].pixels().shape == (224, 224, 3)
    assert np.array_equal(corpus.images[1].pixels(), _natural(224, seed=1))
    assert corpus.images[0].provenance[0]["role"] == "photo"
    with pytest.raises(ValueError):
        corpus.split("train")

    # a modified PNG: found by verify=True only
    path = tmp_path / "images" / "img1.png"
    Image.fromarray(_natural(224, seed=99)).save(path)
    load_corpus(tmp_path)
    with pytest.raises(CorpusError, match="SHA-256"):
        load_corpus(tmp_path, verify=True)


def test_load_corpus_refuses_images_from_reserved_packages(tmp_path: Path) -> None:
    manifest = _write_manifest(tmp_path)
    manifest["images"][2]["provenance"].append({"package": "palapeli-data", "path": "/usr/share/x", "role": "photo"})
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorpusError, match="reserved package"):
        load_corpus(tmp_path)


def test_load_corpus_malformed(tmp_path: Path) -> None:
    manifest = _write_manifest(tmp_path)
    manifest["schema"] = "something/else"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert not corpus_installed(tmp_path)
    with pytest.raises(CorpusError, match="schema"):
        load_corpus(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CorpusError, match="unreadable"):
        load_corpus(tmp_path)
    manifest["schema"] = SCHEMA
    manifest["images"][0]["file"] = "images/missing.png"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorpusError, match="missing"):
        load_corpus(tmp_path)


def test_corpus_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CORPUS_ENV, str(tmp_path))
    assert corpus_dir() == tmp_path
    monkeypatch.delenv(CORPUS_ENV)
    assert corpus_dir() == Path.home() / ".cache" / "advsentry" / "corpus"


# --------------------------------------------------------------------------- builder CLI


def test_missing_packages_exit_code_2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    from benchmarks.corpus import __main__ as cli

    monkeypatch.setattr(src, "installed_versions", lambda packages=src.PACKAGES: {p: None for p in packages})
    assert cli.main(["build", "--smoke", "--out", str(tmp_path / "c")]) == 2
    assert "apt-get install" in capsys.readouterr().err


def test_smoke_build(tmp_path: Path) -> None:
    if any(v is None for v in src.installed_versions().values()):
        pytest.skip("Debian photo packages not installed")
    from benchmarks.corpus.build import build

    out = tmp_path / "corpus"
    manifest = build(out, Settings(smoke=True), log=lambda *_: None)
    assert manifest["stats"]["candidates"] <= 16
    assert corpus_installed(out)
    corpus = load_corpus(out, verify=True)
    assert len(corpus.images) == manifest["stats"]["kept"]
    again = build(out, Settings(smoke=True), log=lambda *_: None)  # cached: same manifest
    assert again["created_at"] == manifest["created_at"]

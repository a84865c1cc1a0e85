"""A minimal reader of Qt binary resource bundles (``.rcc`` files).

Why our own reader: GCompris ships its photos inside ``.rcc`` bundles, and the
only other way to open them is Qt itself (PySide/PyQt, a large dependency).
The format is small and documented in Qt's source (``qtbase/src/corelib/io/
qresource.cpp`` reader, ``qtbase/src/tools/rcc/rcc.cpp`` writer):

Header (all integers big-endian)::

    "qres"  version:u32  tree_offset:u32  data_offset:u32  names_offset:u32
    [overall_flags:u32]          # version >= 3 only

Tree: an array of fixed-size nodes, node 0 is the root directory. A node is
14 bytes (version 1) or 22 bytes (version >= 2, an extra u64 last-modified)::

    name_offset:u32  flags:u16  then
      directory: child_count:u32  first_child_index:u32
      file:      territory:u16  language:u16  data_offset:u32
    [last_modified:u64]          # version >= 2

Flags: ``0x1`` zlib-compressed, ``0x2`` directory, ``0x4`` zstd-compressed
(version 3). Names (at ``names_offset + name_offset``): ``length:u16 hash:u32``
then ``length`` UTF-16BE code units. Data (at ``data_offset + data_offset``):
``size:u32`` then ``size`` bytes; zlib entries are in ``qCompress`` format, i.e.
a u32 uncompressed length followed by a zlib stream.

zstd entries are *not* decoded (that would need the ``zstandard`` package);
:func:`read_rcc` reports them in :attr:`RccEntry.skipped` so callers can count
them. GCompris 3.1 uses zlib only.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

MAGIC = b"qres"
FLAG_COMPRESSED = 0x01
FLAG_DIRECTORY = 0x02
FLAG_COMPRESSED_ZSTD = 0x04


class RccError(ValueError):
    """The file is not a readable Qt resource bundle."""


@dataclass(frozen=True)
class RccEntry:
    """One file inside a bundle: its path (``/`` separated, no leading ``/``) and bytes.

    ``data`` is ``None`` and ``skipped`` names the reason when the entry could
    not be decoded (zstd, or a corrupt zlib stream).
    """

    path: str
    data: bytes | None
    compression: str  # "none" | "zlib" | "zstd"
    skipped: str | None = None


def _u16(buf: bytes, at: int) -> int:
    return struct.unpack_from(">H", buf, at)[0]


def _u32(buf: bytes, at: int) -> int:
    return struct.unpack_from(">I", buf, at)[0]


def read_rcc_bytes(buf: bytes) -> Iterator[RccEntry]:
    """Every file entry of an in-memory bundle, depth first."""
    if len(buf) < 20 or buf[:4] != MAGIC:
        raise RccError("not a Qt resource bundle (no 'qres' magic)")
    version = _u32(buf, 4)
    if version not in (1, 2, 3):
        raise RccError(f"unsupported rcc format version {version}")
    tree, data, names = _u32(buf, 8), _u32(buf, 12), _u32(buf, 16)
    node_size = 14 if version == 1 else 22

    def name_of(offset: int) -> str:
        at = names + offset
        length = _u16(buf, at)
        return buf[at + 6 : at + 6 + 2 * length].decode("utf-16-be")

    def walk(index: int, prefix: str, depth: int) -> Iterator[RccEntry]:
        if depth > 64:
            raise RccError("rcc tree too deep (corrupt file?)")
        at = tree + index * node_size
        if at + 14 > len(buf):
            raise RccError(f"rcc tree node {index} out of range")
        flags = _u16(buf, at + 4)
        name = "" if index == 0 else name_of(_u32(buf, at))
        path = f"{prefix}/{name}" if prefix else name
        if flags & FLAG_DIRECTORY:
            count, first = _u32(buf, at + 6), _u32(buf, at + 10)
            for child in range(first, first + count):
                yield from walk(child, path, depth + 1)
            return
        offset = data + _u32(buf, at + 10)
        size = _u32(buf, offset)
        blob = buf[offset + 4 : offset + 4 + size]
        if len(blob) != size:
            raise RccError(f"{path}: data runs past the end of the file")
        if flags & FLAG_COMPRESSED_ZSTD:
            yield RccEntry(path, None, "zstd", skipped="zstd-compressed (not decoded)")
        elif flags & FLAG_COMPRESSED:
            try:
                expected = _u32(blob, 0)
                raw = zlib.decompress(blob[4:])
            except (zlib.error, struct.error) as exc:
                yield RccEntry(path, None, "zlib", skipped=f"corrupt zlib data: {exc}")
                return
            if len(raw) != expected:
                yield RccEntry(path, None, "zlib", skipped="zlib length prefix mismatch")
                return
            yield RccEntry(path, raw, "zlib")
        else:
            yield RccEntry(path, blob, "none")

    yield from walk(0, "", 0)


def read_rcc(path: str | Path) -> list[RccEntry]:
    """Every file entry of the bundle at ``path``."""
    return list(read_rcc_bytes(Path(path).read_bytes()))


def write_rcc(entries: dict[str, tuple[bytes, bool]], version: int = 3) -> bytes:
    """A bundle holding ``entries`` (``path -> (bytes, zlib_compress)``), flat or nested.

    Used by the tests (a fixture built per the format above) and as executable
    documentation of the layout; not by the corpus builder.
    """
    # Build a directory tree.
    root: dict = {}
    for path, value in entries.items():
        node = root
        parts = [p for p in path.split("/") if p]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    names_blob = bytearray()
    data_blob = bytearray()
    name_offsets: dict[str, int] = {}

    def add_name(name: str) -> int:
        if name not in name_offsets:
            name_offsets[name] = len(names_blob)
            encoded = name.encode("utf-16-be")
            names_blob.extend(struct.pack(">HI", len(encoded) // 2, 0) + encoded)
        return name_offsets[name]

    # Breadth-first numbering: children of one directory are contiguous.
    nodes: list[tuple[str, object]] = [("", root)]
    records: list[bytes] = []
    node_size = 14 if version == 1 else 22
    queue = [0]
    next_index = 1
    layout: dict[int, tuple[int, int]] = {}
    while queue:
        index = queue.pop(0)
        _, value = nodes[index]
        if isinstance(value, dict):
            children = sorted(value.items())
            layout[index] = (len(children), next_index)
            for child in children:
                nodes.append(child)
                queue.append(next_index)
                next_index += 1
    for index, (name, value) in enumerate(nodes):
        name_off = add_name(name) if index else 0
        if isinstance(value, dict):
            count, first = layout[index]
            record = struct.pack(">IHII", name_off, FLAG_DIRECTORY, count, first)
        else:
            payload, compress = value
            flags = 0
            if compress:
                payload = struct.pack(">I", len(payload)) + zlib.compress(payload)
                flags = FLAG_COMPRESSED
            offset = len(data_blob)
            data_blob.extend(struct.pack(">I", len(payload)) + payload)
            record = struct.pack(">IHHHI", name_off, flags, 0, 0, offset)
        if version >= 2:
            record += struct.pack(">Q", 0)
        assert len(record) == node_size
        records.append(record)
    header_size = 24 if version >= 3 else 20
    tree_blob = b"".join(records)
    tree_off = header_size
    data_off = tree_off + len(tree_blob)
    names_off = data_off + len(data_blob)
    header = MAGIC + struct.pack(">IIII", version, tree_off, data_off, names_off)
    if version >= 3:
        header += struct.pack(">I", FLAG_COMPRESSED)
    return header + tree_blob + bytes(data_blob) + bytes(names_blob)

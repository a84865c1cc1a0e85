"""The capture ring: keep flagged requests on disk so that a verdict can be explained later (issue 14).

Opt-in (``capture_dir`` unset = off). :class:`CaptureHook` is a request hook
(:mod:`service.hooks.base`): for a request with at least one flagged input, and
within ``capture_sample_rate``, ``observe()`` only does a non-blocking
``put_nowait`` of the scored request on a bounded queue; when the queue is full
the request is not kept and ``advsentry_capture_dropped_total{reason="queue_full"}``
counts it. Nothing on the request path waits for the disk.

A background thread decodes the input tensors and writes one record per request
into :class:`CaptureRing`, a directory of ``<id>.npz`` (the input tensors as
the client sent them) and ``<id>.json`` (id = the request / trace id, time,
model, version, calibration id, threshold, per-input scores, flags, signals and
their names). The JSON is written last, through a rename, so a record exists
exactly when its JSON does; the ring's index is rebuilt from the directory when
a sidecar starts (records survive a restart). After every write the ring evicts
the oldest records until it holds at most ``capture_max_items`` records and
``capture_max_bytes`` bytes, and drops records older than ``capture_max_age_s``.

``advsentry explain --capture DIR --id ID`` reads a record back
(:meth:`CaptureRing.load`). What this means for privacy is in the README
("Capture of flagged inputs"): captured inputs are user data.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prometheus_client import CollectorRegistry, Counter, Gauge

from .base import RequestHook, ScoredRequest

LOGGER = logging.getLogger(__name__)

_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


@dataclass(frozen=True)
class CaptureEntry:
    """One record in the ring's index."""

    id: str
    time: float
    bytes: int


@dataclass(frozen=True)
class CapturedRequest:
    """One record read back: metadata and the input tensors."""

    id: str
    metadata: dict[str, Any]
    inputs: dict[str, np.ndarray]

    @property
    def scores(self) -> list[float]:
        return list(self.metadata["scores"])

    @property
    def flags(self) -> list[bool]:
        return list(self.metadata["flags"])


def _check_id(record_id: str) -> str:
    if not record_id or not set(record_id) <= _SAFE or len(record_id) > 128:
        raise ValueError(f"invalid capture id {record_id!r} (letters, digits, '-' and '_' only)")
    return record_id


class CaptureRing:
    """A bounded directory of captured requests (count, bytes and age caps); oldest evicted first.

    Thread-safe. Constructing one on an existing directory rebuilds the index
    from the records found there (and removes half-written leftovers).
    """

    def __init__(self, directory: str | Path, *, max_items: int = 1000, max_bytes: int = 1 << 30,
                 max_age_s: float | None = None) -> None:
        if max_items < 1 or max_bytes < 1:
            raise ValueError("capture caps must be positive")
        self.directory = Path(directory)
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._index: OrderedDict[str, CaptureEntry] = OrderedDict()
        # owner-only when the ring creates the directory: captured inputs are user data
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._rebuild()

    # -- index -------------------------------------------------------------------------------

    def _rebuild(self) -> None:
        entries = []
        for path in self.directory.glob("*.json"):
            record_id = path.stem
            tensors = path.with_suffix(".npz")
            try:
                stamp = float(json.loads(path.read_text())["time"])
                size = path.stat().st_size + (tensors.stat().st_size if tensors.exists() else 0)
            except (OSError, ValueError, KeyError, TypeError):
                LOGGER.warning("capture ring: ignoring unreadable record %s", path.name)
                continue
            entries.append(CaptureEntry(record_id, stamp, size))
        known = {entry.id for entry in entries}
        for leftover in [*self.directory.glob("*.npz"), *self.directory.glob(".*.tmp")]:
            if leftover.suffix == ".npz" and leftover.stem in known:
                continue
            leftover.unlink(missing_ok=True)  # a write interrupted before its JSON was committed
        with self._lock:
            self._index = OrderedDict((e.id, e) for e in sorted(entries, key=lambda e: (e.time, e.id)))
            self._enforce(time.time())

    def entries(self) -> list[CaptureEntry]:
        """Records, oldest first."""
        with self._lock:
            return list(self._index.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(e.bytes for e in self._index.values())

    # -- writing ------------------------------------------------------------------------------

    def add(self, record_id: str, metadata: dict[str, Any], inputs: dict[str, np.ndarray]) -> CaptureEntry | None:
        """Write one record and enforce the caps; ``None`` when the record alone exceeds ``max_bytes``."""
        record_id = _check_id(record_id)
        stamp = float(metadata.get("time", time.time()))
        document = json.dumps({**metadata, "id": record_id, "time": stamp,
                               "inputs": {k: {"dtype": str(v.dtype), "shape": list(v.shape)}
                                          for k, v in inputs.items()}}, sort_keys=True)
        tensors = self.directory / f"{record_id}.npz"
        final = self.directory / f"{record_id}.json"
        temporary = self.directory / f".{record_id}.json.tmp"
        temporary_npz = self.directory / f".{record_id}.npz.tmp"
        with open(temporary_npz, "wb") as handle:
            np.savez_compressed(handle, **inputs)
        size = temporary_npz.stat().st_size + len(document.encode())
        if size > self.max_bytes:
            temporary_npz.unlink(missing_ok=True)
            return None
        entry = CaptureEntry(record_id, stamp, size)
        with self._lock:
            # Room first (oldest out), then the commit: the directory never holds more than the caps.
            self._remove(record_id)
            self._enforce(time.time(), reserve=entry)
            os.replace(temporary_npz, tensors)
            temporary.write_text(document)
            os.replace(temporary, final)  # the commit point: a record exists when its JSON does
            last = next(reversed(self._index.values()), None)
            self._index[record_id] = entry
            if last is not None and stamp < last.time:  # keep oldest-first order for late timestamps
                self._index = OrderedDict(sorted(self._index.items(), key=lambda kv: (kv[1].time, kv[0])))
        return entry

    def _remove(self, record_id: str) -> None:
        self._index.pop(record_id, None)
        (self.directory / f"{record_id}.json").unlink(missing_ok=True)
        (self.directory / f"{record_id}.npz").unlink(missing_ok=True)

    def _enforce(self, now: float, reserve: CaptureEntry | None = None) -> None:
        """Evict oldest-first until within the caps, with room for ``reserve`` (caller holds the lock)."""
        extra_items, extra_bytes = (1, reserve.bytes) if reserve is not None else (0, 0)
        total = sum(e.bytes for e in self._index.values())
        while self._index:
            oldest = next(iter(self._index.values()))
            too_old = self.max_age_s is not None and now - oldest.time > self.max_age_s
            if (not too_old and len(self._index) + extra_items <= self.max_items
                    and total + extra_bytes <= self.max_bytes):
                break
            total -= oldest.bytes
            self._remove(oldest.id)

    # -- reading ------------------------------------------------------------------------------

    def load(self, record_id: str) -> CapturedRequest:
        """One record by id (the request / trace id the sidecar logged); ``KeyError`` when absent."""
        return load_captured(self.directory, record_id)


def load_captured(directory: str | Path, record_id: str) -> CapturedRequest:
    """Read one record without opening the ring (no index rebuild, no eviction: safe beside a live sidecar)."""
    record_id = _check_id(record_id)
    path = Path(directory) / f"{record_id}.json"
    if not path.is_file():
        raise KeyError(f"no captured request {record_id!r} in {directory}")
    metadata = json.loads(path.read_text())
    with np.load(path.with_suffix(".npz")) as archive:
        inputs = {name: archive[name] for name in archive.files}
    return CapturedRequest(record_id, metadata, inputs)


class CaptureHook(RequestHook):
    """Puts flagged requests on a bounded queue; a writer thread stores them in a :class:`CaptureRing`."""

    name = "capture"

    def __init__(self, ring: CaptureRing, *, sample_rate: float = 1.0, queue_size: int = 64,
                 metrics: Any = None, seed: int | None = None) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError("capture sample rate must be in [0, 1]")
        self.ring = ring
        self.sample_rate = sample_rate
        self.metrics = metrics.part(CaptureMetrics) if metrics is not None else None
        self._random = random.Random(seed)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self.dropped = 0
        self.written = 0
        self._thread = threading.Thread(target=self._writer, name="advsentry-capture", daemon=True)
        self._thread.start()

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        if self.metrics is not None:
            self.metrics.capture_dropped.labels(reason).inc()

    def observe(self, scored: ScoredRequest) -> dict[str, str | float | bool]:
        """O(1) on the request path: a flag check, a coin flip and a ``put_nowait``."""
        if not bool(np.any(scored.flags)):
            return {}
        if self.sample_rate < 1.0 and self._random.random() >= self.sample_rate:
            return {}
        try:
            self._queue.put_nowait(scored)
        except queue.Full:
            self._drop("queue_full")
        return {}

    def _writer(self) -> None:
        while True:
            scored = self._queue.get()
            try:
                if scored is None:
                    return
                self._write(scored)
            except Exception:  # noqa: BLE001 - the writer must survive a bad record or a full disk
                LOGGER.exception("capture ring: could not write a record")
                self._drop("write_error")
            finally:
                self._queue.task_done()

    def _write(self, scored: ScoredRequest) -> None:
        ctx = scored.context
        signals = None if scored.signals is None else np.asarray(scored.signals, dtype=np.float64).tolist()
        metadata = {
            "time": time.time(),
            "request_started": ctx.started,
            "model": ctx.model,
            "version": ctx.version,
            "calibration_id": scored.calibration_id,
            "threshold": scored.threshold,
            "scores": np.asarray(scored.scores, dtype=np.float64).tolist(),
            "flags": [bool(f) for f in np.asarray(scored.flags)],
            "signals": signals,
            "signal_names": list(scored.signal_names),
            "invalid_input": bool(scored.invalid_input),
        }
        entry = self.ring.add(ctx.request_id, metadata, scored.inputs())
        if entry is None:
            self._drop("too_large")
            return
        self.written += 1
        if self.metrics is not None:
            self.metrics.capture_written.inc()
            self.metrics.capture_items.set(len(self.ring))
            self.metrics.capture_bytes.set(self.ring.total_bytes)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued record is written (tests, shutdown); ``False`` on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    async def close(self) -> None:
        """Write what is queued, then stop the writer thread (without blocking the event loop)."""
        import asyncio

        await asyncio.get_running_loop().run_in_executor(None, self._stop)

    def _stop(self) -> None:
        if self._thread.is_alive():
            try:
                self._queue.put(None, timeout=30)
            except queue.Full:  # a writer stuck on the disk: give up on it (daemon thread)
                LOGGER.warning("capture ring: writer did not drain its queue; %d records not written",
                               self._queue.qsize())
                return
            self._thread.join(30)


def capture_hook_from_settings(settings: Any, metrics: Any = None) -> CaptureHook | None:
    """The capture hook the settings ask for (``capture_dir`` set), or ``None`` (the default: off)."""
    directory = getattr(settings, "capture_dir", None)
    if directory is None:
        return None
    ring = CaptureRing(directory, max_items=settings.capture_max_items, max_bytes=settings.capture_max_bytes,
                       max_age_s=settings.capture_max_age_s)
    hook = CaptureHook(ring, sample_rate=settings.capture_sample_rate, queue_size=settings.capture_queue_size,
                       metrics=metrics)
    if hook.metrics is not None:
        hook.metrics.capture_items.set(len(ring))
        hook.metrics.capture_bytes.set(ring.total_bytes)
    return hook


class CaptureMetrics:
    """The capture ring's series (registered by :meth:`service.metrics.SidecarMetrics.part`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.capture_dropped = Counter(
            "advsentry_capture_dropped",
            "Flagged requests the capture ring did not keep, by reason (queue_full|too_large|write_error).",
            ("reason",), registry=registry,
        )
        for reason in ("queue_full", "too_large", "write_error"):
            self.capture_dropped.labels(reason)
        self.capture_written = Counter(
            "advsentry_capture_written", "Flagged requests written to the capture ring.", registry=registry
        )
        self.capture_items = Gauge("advsentry_capture_items", "Requests held in the capture ring.", registry=registry)
        self.capture_bytes = Gauge("advsentry_capture_bytes", "Bytes held in the capture ring.", registry=registry)


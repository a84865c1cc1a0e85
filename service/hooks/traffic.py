"""The traffic score sketch: what today's traffic says about the threshold in force (issue 12, part 1).

The sidecar sees every request, so it can measure what no offline calibration
can: the score distribution of *this* deployment's inputs. :class:`TrafficHook`
(a :class:`~service.hooks.base.RequestHook`, active in every policy, shadow
included) adds each scored input to a DDSketch (DataDog's mergeable quantile
sketch, ``ddsketch`` on PyPI: every quantile within a relative accuracy
``alpha`` of the exact one, bounded memory, negative values supported, so the
logistic combiner's logits fit as they are).

Sketches are kept per (model, calibration id) — a score only means something
for the detector and combiner that produced it — and per time window
(``traffic_window_s``, e.g. one per hour); windows older than
``traffic_window_s * traffic_max_windows`` are dropped. The state is written
atomically to ``traffic_state_path`` every ``traffic_flush_s`` and when the
sidecar stops, and read back at start, so it survives restarts.

From the union of a series' windows come:

- the **traffic-implied FPR** of the threshold in force: the share of observed
  scores above the threshold, ``1 − CDF(threshold)`` read from the sketch. On
  clean traffic it is the false-positive rate the threshold really has here;
  it also counts real attacks, so it is an upper bound on the FPR. Far above
  the artifact's ``target_fpr`` means the threshold does not fit this traffic
  (``GetStatus``, ``advsentry_traffic_implied_fpr``, the alert);
- ``advsentry calibrate traffic`` (``service/traffic_calibration.py``), which
  merges the state of several replicas (state files, or ``GetTrafficState`` of
  running sidecars) into a threshold for a target FPR.

The state document (JSON, ``advsentry.traffic/v1``) holds each window's sketch
as the library's own protobuf (``ddsketch.pb``), base64-encoded, next to its
count, first/last seen time, min and max (which the protobuf does not carry).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ddsketch import DDSketch
from ddsketch.pb import ddsketch_pb2
from ddsketch.pb.proto import DDSketchProto, KeyMappingProto

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..metrics import LABELS
from .base import RequestHook, ScoredRequest

LOGGER = logging.getLogger(__name__)

SCHEMA = "advsentry.traffic/v1"
DEFAULT_RELATIVE_ACCURACY = 0.005


class TrafficStateError(ValueError):
    """A traffic state document is malformed or its sketches cannot be merged."""


# ---- sketch helpers (the library has quantiles and merge; these add CDF and (de)serialization) ----------


def new_sketch(relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY) -> DDSketch:
    return DDSketch(relative_accuracy)


def sketch_to_bytes(sketch: DDSketch) -> bytes:
    """The library's protobuf encoding (mapping, positive and negative bins, zero count)."""
    return DDSketchProto.to_proto(sketch).SerializeToString()


def sketch_from_bytes(data: bytes, relative_accuracy: float) -> DDSketch:
    """Decode a sketch written by :func:`sketch_to_bytes` into a plain ``DDSketch`` with ``relative_accuracy``."""
    proto = ddsketch_pb2.DDSketch()
    proto.ParseFromString(data)
    decoded = DDSketchProto.from_proto(proto)
    sketch = new_sketch(relative_accuracy)
    if decoded.count:
        try:
            sketch.merge(decoded)
        except ValueError as error:  # another relative accuracy (gamma)
            raise TrafficStateError(f"sketch has another relative accuracy than {relative_accuracy}: {error}") from None
    return sketch


def fraction_above(sketch: DDSketch, threshold: float) -> float | None:
    """Share of the sketched values above ``threshold`` (``1 − CDF``); None when the sketch is empty.

    Each bin counts as its representative value (the one ``get_quantile_value``
    returns), so only values within the relative accuracy of the threshold
    can be counted on the wrong side.
    """
    total = sketch.count
    if not total:
        return None
    proto = DDSketchProto.to_proto(sketch)
    mapping = KeyMappingProto.from_proto(proto.mapping)
    above = 0.0
    for store, sign in ((proto.positiveValues, 1.0), (proto.negativeValues, -1.0)):
        key = store.contiguousBinIndexOffset
        for count in store.contiguousBinCounts:
            if count and sign * mapping.value(key) > threshold:
                above += count
            key += 1
    if threshold < 0:
        above += proto.zeroCount
    return min(1.0, max(0.0, above / total))


def quantile(sketch: DDSketch, q: float) -> float | None:
    """The value at quantile ``q`` (within the sketch's relative accuracy); None when empty."""
    value = sketch.get_quantile_value(min(1.0, max(0.0, q)))
    return None if value is None else float(value)


# ---- windows and series ------------------------------------------------------------------------------------


@dataclass
class TrafficWindow:
    """Scores of one series in one time window ``[start, start + window_s)``."""

    start: float
    sketch: DDSketch
    first_seen: float = math.inf
    last_seen: float = -math.inf
    min: float = math.inf
    max: float = -math.inf

    @property
    def count(self) -> int:
        return int(round(self.sketch.count))

    def add(self, values: np.ndarray, now: float) -> None:
        for value in values:
            self.sketch.add(float(value))
        self.first_seen = min(self.first_seen, now)
        self.last_seen = max(self.last_seen, now)
        self.min = min(self.min, float(values.min()))
        self.max = max(self.max, float(values.max()))

    def merge(self, other: "TrafficWindow") -> None:
        self.sketch.merge(other.sketch)
        self.first_seen = min(self.first_seen, other.first_seen)
        self.last_seen = max(self.last_seen, other.last_seen)
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "first_seen": self.first_seen, "last_seen": self.last_seen, "count": self.count,
                "min": self.min, "max": self.max,
                "sketch": base64.b64encode(sketch_to_bytes(self.sketch)).decode("ascii")}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], relative_accuracy: float) -> "TrafficWindow":
        sketch = sketch_from_bytes(base64.b64decode(data["sketch"]), relative_accuracy)
        if int(round(sketch.count)) != int(data["count"]):
            raise TrafficStateError(f"window at {data['start']}: sketch holds {sketch.count} values, count says {data['count']}")
        return cls(float(data["start"]), sketch, float(data["first_seen"]), float(data["last_seen"]),
                   float(data["min"]), float(data["max"]))


@dataclass
class TrafficSeries:
    """The scores one model produced under one calibration, window by window."""

    model: str
    calibration_id: str
    threshold: float | None = None
    target_fpr: float | None = None
    versions: set[str] = field(default_factory=set)
    windows: dict[float, TrafficWindow] = field(default_factory=dict)  # start -> window
    non_finite: int = 0
    #: the union of every window, kept current by ``add`` (reads are O(bins), not O(windows × bins));
    #: None = rebuild at the next read (after windows were dropped or merged)
    _total: DDSketch | None = field(default=None, repr=False, compare=False)

    @property
    def count(self) -> int:
        return sum(w.count for w in self.windows.values())

    @property
    def first_seen(self) -> float | None:
        return min((w.first_seen for w in self.windows.values()), default=None)

    @property
    def last_seen(self) -> float | None:
        return max((w.last_seen for w in self.windows.values()), default=None)

    def merged(self, relative_accuracy: float, since: float | None = None) -> DDSketch:
        """One sketch of every window (starting at or after ``since`` when given); do not modify it."""
        if since is None and self._total is not None:
            return self._total
        sketch = new_sketch(relative_accuracy)
        for window in self.windows.values():
            if since is None or window.start >= since:
                sketch.merge(window.sketch)
        if since is None:
            self._total = sketch
        return sketch

    def invalidate(self) -> None:
        self._total = None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "calibration_id": self.calibration_id, "threshold": self.threshold,
                "target_fpr": self.target_fpr, "versions": sorted(self.versions), "non_finite": self.non_finite,
                "windows": [self.windows[start].to_dict() for start in sorted(self.windows)]}


def _series_key(model: str, calibration_id: str | None) -> tuple[str, str]:
    return model, calibration_id or "none"


class TrafficState:
    """Every series' windows; add scores, prune old windows, (de)serialize, merge other replicas' state."""

    def __init__(self, relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY, window_s: float = 3600.0,
                 max_windows: int = 168) -> None:
        if not 0 < relative_accuracy < 1:
            raise ValueError(f"relative accuracy must be in (0, 1), got {relative_accuracy}")
        self.relative_accuracy = float(relative_accuracy)
        self.window_s = float(window_s)
        self.max_windows = int(max_windows)
        self.series: dict[tuple[str, str], TrafficSeries] = {}

    @property
    def retention_s(self) -> float:
        return self.window_s * self.max_windows

    def window_start(self, now: float) -> float:
        return math.floor(now / self.window_s) * self.window_s

    def get(self, model: str, calibration_id: str | None) -> TrafficSeries | None:
        return self.series.get(_series_key(model, calibration_id))

    def add(self, model: str, version: str, calibration_id: str | None, threshold: float | None,
            target_fpr: float | None, scores: np.ndarray, now: float | None = None) -> int:
        """Add the finite ``scores`` of one request; returns how many were added."""
        now = time.time() if now is None else now
        key = _series_key(model, calibration_id)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = TrafficSeries(model, key[1])
        series.threshold, series.target_fpr = threshold, target_fpr
        series.versions.add(version or "")
        values = np.asarray(scores, dtype=np.float64).reshape(-1)
        finite = values[np.isfinite(values)]
        series.non_finite += int(values.size - finite.size)
        if finite.size:
            start = self.window_start(now)
            window = series.windows.get(start)
            if window is None:
                window = series.windows[start] = TrafficWindow(start, new_sketch(self.relative_accuracy))
                self.prune(now)
            window.add(finite, now)
            if series._total is not None:  # noqa: SLF001 - keep the union current
                for value in finite:
                    series._total.add(float(value))  # noqa: SLF001
        return int(finite.size)

    def prune(self, now: float | None = None) -> None:
        """Drop windows older than the retention (``window_s * max_windows``) and series left empty."""
        now = time.time() if now is None else now
        oldest = self.window_start(now) - (self.max_windows - 1) * self.window_s
        for key, series in list(self.series.items()):
            for start in [s for s in series.windows if s < oldest]:
                del series.windows[start]
                series.invalidate()
            if not series.windows:
                del self.series[key]

    def merge(self, other: "TrafficState") -> None:
        """Add another replica's (or another file's) state; windows with the same start are merged."""
        if other.relative_accuracy != self.relative_accuracy:
            raise TrafficStateError(f"cannot merge sketches of relative accuracy {other.relative_accuracy} "
                                    f"into {self.relative_accuracy}")
        for key, theirs in other.series.items():
            mine = self.series.get(key)
            if mine is None:
                mine = self.series[key] = TrafficSeries(theirs.model, theirs.calibration_id, theirs.threshold,
                                                        theirs.target_fpr)
            mine.versions |= theirs.versions
            mine.non_finite += theirs.non_finite
            mine.invalidate()
            for start, window in theirs.windows.items():
                if start in mine.windows:
                    mine.windows[start].merge(window)
                else:
                    copy = TrafficWindow(start, new_sketch(self.relative_accuracy), window.first_seen,
                                         window.last_seen, window.min, window.max)
                    copy.sketch.merge(window.sketch)
                    mine.windows[start] = copy

    def to_document(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "written_at": time.time(), "relative_accuracy": self.relative_accuracy,
                "window_s": self.window_s, "max_windows": self.max_windows,
                "series": [self.series[key].to_dict() for key in sorted(self.series)]}

    def to_json(self) -> bytes:
        return json.dumps(self.to_document(), sort_keys=True, allow_nan=True).encode()

    @classmethod
    def from_document(cls, document: Any, *, source: str = "traffic state") -> "TrafficState":
        if not isinstance(document, dict) or document.get("schema") != SCHEMA:
            schema = document.get("schema") if isinstance(document, dict) else type(document).__name__
            raise TrafficStateError(f"{source}: not a traffic state (schema {schema!r}, expected {SCHEMA!r})")
        try:
            state = cls(float(document["relative_accuracy"]), float(document["window_s"]), int(document["max_windows"]))
            for item in document["series"]:
                series = TrafficSeries(str(item["model"]), str(item["calibration_id"]), item.get("threshold"),
                                       item.get("target_fpr"), set(item.get("versions") or ()),
                                       non_finite=int(item.get("non_finite") or 0))
                for data in item["windows"]:
                    window = TrafficWindow.from_dict(data, state.relative_accuracy)
                    series.windows[window.start] = window
                state.series[_series_key(series.model, series.calibration_id)] = series
        except TrafficStateError as error:
            raise TrafficStateError(f"{source}: {error}") from None
        except (KeyError, TypeError, ValueError) as error:
            raise TrafficStateError(f"{source}: malformed traffic state ({error!r})") from None
        return state

    @classmethod
    def from_json(cls, data: bytes | str, *, source: str = "traffic state") -> "TrafficState":
        try:
            document = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise TrafficStateError(f"{source}: not JSON ({error})") from None
        return cls.from_document(document, source=source)

    @classmethod
    def load(cls, path: str | Path) -> "TrafficState":
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise TrafficStateError(f"{path}: cannot read ({error.strerror or error})") from None
        return cls.from_json(data, source=str(path))

    def save(self, path: str | Path) -> None:
        """Write atomically: a temporary file in the same directory, fsynced, then renamed over ``path``."""
        write_atomic(Path(path), self.to_json())


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def merge_states(states: Iterable[TrafficState]) -> TrafficState:
    """One state holding every given state's windows (replicas, files)."""
    states = list(states)
    if not states:
        raise TrafficStateError("no traffic state to merge")
    merged = TrafficState(states[0].relative_accuracy, states[0].window_s, states[0].max_windows)
    for state in states:
        merged.merge(state)
    return merged


# ---- the request hook ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrafficSummary:
    """What ``GetStatus`` reports for one model: the series of the calibration in force."""

    count: int
    implied_fpr: float | None
    first_seen: float | None
    last_seen: float | None


class TrafficHook(RequestHook):
    """Sketches every scored input per (model, calibration id); persists and publishes the traffic-implied FPR."""

    name = "traffic"

    def __init__(self, state_path: Path | None, *, flush_s: float = 60.0, window_s: float = 3600.0,
                 max_windows: int = 168, relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY,
                 calibration_paths: Sequence[Path] = (), metrics=None) -> None:  # type: ignore[no-untyped-def]
        self.state_path = Path(state_path) if state_path else None
        self.flush_s = float(flush_s)
        self.metrics = metrics.part(TrafficMetrics) if metrics is not None else None
        #: artifacts the sidecar may have in force (the shipped default is always one): their target FPRs
        self._calibration_paths = tuple(Path(p) for p in calibration_paths)
        self._targets: dict[str, float | None] = {}
        self.state = TrafficState(relative_accuracy, window_s, max_windows)
        if self.state_path is not None and self.state_path.exists():
            try:
                loaded = TrafficState.load(self.state_path)
            except TrafficStateError as error:  # keep serving; do not overwrite the file we could not read
                LOGGER.error("traffic state not loaded, starting empty: %s", error)
                self.state_path = self.state_path.with_name(self.state_path.name + ".new")
            else:
                if loaded.relative_accuracy != relative_accuracy:
                    LOGGER.warning("traffic state %s has relative accuracy %s (setting: %s); keeping the file's",
                                   self.state_path, loaded.relative_accuracy, relative_accuracy)
                loaded.window_s, loaded.max_windows = float(window_s), int(max_windows)
                loaded.prune()
                self.state = loaded
                LOGGER.info("traffic state loaded from %s: %d series, %d scores", self.state_path,
                            len(loaded.series), sum(s.count for s in loaded.series.values()))
        self._task: asyncio.Task | None = None
        self._dirty = False

    # -- request path (must be fast: a few sketch inserts per input) --
    def observe(self, scored: ScoredRequest) -> dict[str, str | float | bool]:
        ctx = scored.context
        fresh = self.state.get(ctx.model, scored.calibration_id) is None
        added = self.state.add(ctx.model, ctx.version, scored.calibration_id, scored.threshold,
                               self.target_fpr(scored.calibration_id), scored.scores)
        self._dirty = True
        if self.metrics is not None and added:
            self.metrics.traffic_scores.labels(ctx.model, ctx.version).inc(added)
            if fresh:  # the gauges exist from a series' first score; flushes keep them current
                self._publish_series(self.state.get(ctx.model, scored.calibration_id))
        if self._task is None and (self.state_path is not None or self.metrics is not None):
            self._task = asyncio.get_running_loop().create_task(self._flush_loop())
        return {}

    def target_fpr(self, calibration_id: str | None) -> float | None:
        """The ``target_fpr`` of the artifact with this id (read once per new id: after a hot reload)."""
        if not calibration_id:
            return None
        if calibration_id not in self._targets:
            from detector.calibration import CalibrationArtifact, CalibrationError
            from detector.detector import DEFAULT_ARTIFACT

            found = {DEFAULT_ARTIFACT.id: DEFAULT_ARTIFACT.target_fpr}
            for path in self._calibration_paths:
                try:
                    artifact = CalibrationArtifact.load(path)
                except CalibrationError:
                    continue
                found[artifact.id] = artifact.target_fpr
            self._targets.update(found)
            self._targets.setdefault(calibration_id, None)
        target = self._targets[calibration_id]
        return None if target is None else float(target)

    # -- reading --
    def summary(self, model: str, calibration_id: str | None, threshold: float | None) -> TrafficSummary:
        series = self.state.get(model, calibration_id)
        if series is None:
            return TrafficSummary(0, None, None, None)
        implied = None
        if threshold is not None:
            implied = fraction_above(series.merged(self.state.relative_accuracy), threshold)
        return TrafficSummary(series.count, implied, series.first_seen, series.last_seen)

    def state_json(self, model: str | None = None) -> bytes:
        """The state document (all models, or one), as written to the state file."""
        if model is None:
            return self.state.to_json()
        part = TrafficState(self.state.relative_accuracy, self.state.window_s, self.state.max_windows)
        part.series = {key: series for key, series in self.state.series.items() if key[0] == model}
        return part.to_json()

    # -- background --
    def publish(self) -> None:
        """Set ``advsentry_traffic_implied_fpr`` / ``_target_fpr`` (NaN: unknown) per model.

        The gauges are per (model, version) while series are per (model,
        calibration): the series that saw the latest score (the calibration in
        force, also right after a hot reload) is the one published.
        """
        newest: dict[str, TrafficSeries] = {}
        for series in self.state.series.values():
            current = newest.get(series.model)
            if series.windows and (current is None or (series.last_seen or 0) > (current.last_seen or 0)):
                newest[series.model] = series
        for series in newest.values():
            self._publish_series(series)

    def _publish_series(self, series: TrafficSeries) -> None:
        if self.metrics is None or series.threshold is None or not series.windows:
            return
        implied = fraction_above(series.merged(self.state.relative_accuracy), series.threshold)
        target = math.nan if series.target_fpr is None else series.target_fpr
        for version in series.versions or {""}:
            self.metrics.traffic_implied_fpr.labels(series.model, version).set(math.nan if implied is None else implied)
            self.metrics.traffic_target_fpr.labels(series.model, version).set(target)

    async def flush(self) -> None:
        """Publish the gauges and write the state file (atomically, off the event loop)."""
        self.state.prune()
        self.publish()
        if self.state_path is not None and self._dirty:
            self._dirty = False
            data = self.state.to_json()
            await asyncio.to_thread(write_atomic, self.state_path, data)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 - a failed write is retried at the next flush
                LOGGER.exception("traffic state flush failed")
                self._dirty = True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._dirty = self._dirty or bool(self.state.series)
        await self.flush()


def traffic_hook(settings, metrics) -> TrafficHook | None:  # type: ignore[no-untyped-def]
    """The hook ``request_hooks`` installs (None when ``traffic_sketch`` is off)."""
    if not settings.traffic_sketch:
        return None
    paths = [settings.calibration] + [m.calibration for m in settings.models.values()]
    return TrafficHook(settings.traffic_state_path, flush_s=settings.traffic_flush_s, window_s=settings.traffic_window_s,
                       max_windows=settings.traffic_max_windows, relative_accuracy=settings.traffic_relative_accuracy,
                       calibration_paths=[p for p in paths if p], metrics=metrics)


class TrafficMetrics:
    """The traffic sketch's series (registered by :meth:`service.metrics.SidecarMetrics.part`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.traffic_scores = Counter(
            "advsentry_traffic_scores",
            "Scores added to the traffic sketch (finite scores of every policy, shadow included).",
            LABELS, registry=registry,
        )
        self.traffic_implied_fpr = Gauge(
            "advsentry_traffic_implied_fpr",
            "Share of the sketched traffic (retained windows) scoring above the threshold in force: its false "
            "positive rate on this traffic if the traffic is clean (attacks count too). Updated on each flush.",
            LABELS, registry=registry,
        )
        self.traffic_target_fpr = Gauge(
            "advsentry_traffic_target_fpr",
            "target_fpr of the calibration artifact in force, NaN when it has none (compare with "
            "advsentry_traffic_implied_fpr).",
            LABELS, registry=registry,
        )


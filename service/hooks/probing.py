"""Stateful probing detection (Chen, Carlini & Wagner 2020): flag clients whose queries sit too close together.

Black-box attacks (Square, HopSkipJump, boundary, one-pixel) send the served
model hundreds of near-duplicates of one image. Per-image scores catch them
poorly; the sequence of one client's queries does not. For every request the
exported Triton model also returns ``advsentry_embedding`` (``[B, D]`` unit
vectors, :mod:`detector.embedding`); :class:`ProbingDetector` keeps, per client
(:class:`~service.hooks.base.ClientIdentity` ``key``), a ring of its last
``history`` embeddings and computes each new query's mean L2 distance to its
``k`` nearest previous ones (brute force in numpy: at most ``history`` rows).
Below ``threshold`` (chosen on clean corpus traffic, ``benchmarks/probing.py``)
the client is flagged for ``cooldown_s``, and its history is cleared (as in
Chen et al., so each detection counts a fresh run of near-duplicates).

Memory is bounded: ``history x D`` floats per client and an LRU over at most
``max_clients`` clients. :class:`ProbingHook` is the request hook
(``service/hooks/base.py``) that applies the policy: ``shadow`` (metrics only),
``annotate`` (response parameter ``advsentry_probing`` while flagged) or
``reject`` (``PERMISSION_DENIED`` from :meth:`ProbingHook.admit` during the
cool-down; the request that triggered the detection itself is served).
Allow-listed clients (``probing_allow_clients``) are never tracked: benign
bursts of near-duplicates (consecutive video frames) look exactly like probing.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
import numpy as np

from detector.embedding import EMBEDDING_OUTPUT

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..metrics import SidecarMetrics
from ..settings import ProbingPolicy, Settings
from .base import RequestContext, RequestHook, ScoredRequest

#: Response parameter set (``True``) on responses to a flagged client under ``annotate``.
PARAM_PROBING = "advsentry_probing"


def knn_mean_distance(history: np.ndarray, query: np.ndarray, k: int) -> float:
    """Mean L2 distance from ``query [D]`` to its ``min(k, len(history))`` nearest rows of ``history [N, D]``."""
    if len(history) == 0:
        raise ValueError("empty history")
    distances = np.sqrt(np.maximum(((history - query) ** 2).sum(axis=1), 0.0))
    k = min(k, len(distances))
    nearest = np.partition(distances, k - 1)[:k] if k < len(distances) else distances
    return float(nearest.mean())


class _History:
    """A ring of a client's last ``capacity`` embeddings."""

    __slots__ = ("rows", "count", "position", "flagged_until")

    def __init__(self, capacity: int, dim: int) -> None:
        self.rows = np.empty((capacity, dim), dtype=np.float32)
        self.count = 0
        self.position = 0
        self.flagged_until = 0.0

    def view(self) -> np.ndarray:
        return self.rows[: self.count]

    def add(self, embedding: np.ndarray) -> None:
        self.rows[self.position] = embedding
        self.position = (self.position + 1) % len(self.rows)
        self.count = min(self.count + 1, len(self.rows))

    def clear(self) -> None:
        self.count = 0
        self.position = 0


@dataclass(frozen=True)
class Observation:
    """What :meth:`ProbingDetector.observe` found for one query."""

    distance: float | None  # None: too few previous queries
    detected: bool  # this query triggered a detection
    flagged: bool  # the client is flagged (now or still in its cool-down)


class ProbingDetector:
    """Per-client query histories and the kNN-distance rule (pure: no gRPC, no metrics; thread-safe)."""

    def __init__(self, *, threshold: float, k: int = 8, min_queries: int = 3, history: int = 100,
                 max_clients: int = 1024, cooldown_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if k < 1 or history < 1 or max_clients < 1 or min_queries < 1:
            raise ValueError("k, min_queries, history and max_clients must be positive")
        self.threshold = float(threshold)
        self.k = k
        self.min_queries = min_queries
        self.history = history
        self.max_clients = max_clients
        self.cooldown_s = cooldown_s
        self.clock = clock
        self._clients: OrderedDict[str, _History] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def clients(self) -> list[str]:
        """Tracked client keys, least recently seen first."""
        with self._lock:
            return list(self._clients)

    def history_of(self, client: str) -> np.ndarray:
        """A copy of a client's kept embeddings (oldest first is not guaranteed: ring order)."""
        with self._lock:
            entry = self._clients.get(client)
            return entry.view().copy() if entry is not None else np.empty((0, 0), np.float32)

    def flagged(self, client: str) -> bool:
        """Whether a client is in its cool-down (does not touch its LRU position)."""
        with self._lock:
            entry = self._clients.get(client)
            return entry is not None and entry.flagged_until > self.clock()

    def _entry(self, client: str, dim: int) -> _History:
        entry = self._clients.get(client)
        if entry is None or entry.rows.shape[1] != dim:
            entry = _History(self.history, dim)
            self._clients[client] = entry
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)  # least recently seen
        else:
            self._clients.move_to_end(client)
        return entry

    def observe(self, client: str, embeddings: np.ndarray) -> list[Observation]:
        """Score each embedding ``[B, D]`` (in order) against the client's history, then add it."""
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim == 1:
            embeddings = embeddings[None]
        results = []
        with self._lock:
            entry = self._entry(client, int(embeddings.shape[1]))
            for embedding in embeddings:
                distance = None
                detected = False
                if entry.count >= self.min_queries:
                    distance = knn_mean_distance(entry.view(), embedding, self.k)
                    detected = distance < self.threshold
                now = self.clock()
                if detected:
                    entry.flagged_until = now + self.cooldown_s
                    entry.clear()
                entry.add(embedding)
                results.append(Observation(distance, detected, entry.flagged_until > now))
        return results


class ProbingHook(RequestHook):
    """The request hook: embeddings in from Triton, policy out (see the module docstring)."""

    name = "probing"

    def __init__(self, detector: ProbingDetector, policy: ProbingPolicy, metrics: SidecarMetrics,
                 allow_clients: Iterable[str] = ()) -> None:
        self.detector = detector
        self.policy = policy
        self.metrics = metrics.part(ProbingMetrics)
        self.allow = frozenset(allow_clients)

    def extra_outputs(self, model: str) -> tuple[str, ...]:
        return (EMBEDDING_OUTPUT,)

    async def admit(self, ctx: RequestContext) -> None:
        if self.policy is ProbingPolicy.reject and ctx.client.key not in self.allow and \
                self.detector.flagged(ctx.client.key):
            from ..core.requests import RequestError

            self.metrics.probing_rejected.inc()
            raise RequestError(
                grpc.StatusCode.PERMISSION_DENIED,
                "advsentry: this client's recent queries look like a black-box attack (many near-duplicate "
                f"inputs); refused for up to {self.detector.cooldown_s:g}s",
                (("advsentry-probing", "true"),),
            )

    def observe(self, scored: ScoredRequest) -> dict[str, str | float | bool]:
        embeddings = scored.extra_outputs.get(EMBEDDING_OUTPUT)
        client = scored.context.client.key
        if embeddings is None or client in self.allow:
            return {}
        results = self.detector.observe(client, embeddings)
        self.metrics.probing_clients.set(self.detector.client_count)
        for result in results:
            if result.distance is not None:
                self.metrics.probing_knn_distance.observe(result.distance)
            if result.detected:
                self.metrics.probing_flagged_clients.inc()
                self.metrics.probing_detections.labels(self.policy.value).inc()
        if self.policy is ProbingPolicy.shadow:
            return {}
        return {PARAM_PROBING: bool(results and results[-1].flagged)}


def probing_hook_from_settings(settings: Settings, metrics: SidecarMetrics) -> ProbingHook | None:
    """The hook for ``settings`` (None when ``probing_policy`` is off)."""
    if settings.probing_policy is ProbingPolicy.off:
        return None
    detector = ProbingDetector(
        threshold=settings.probing_threshold, k=settings.probing_k, min_queries=settings.probing_min_queries,
        history=settings.probing_history, max_clients=settings.probing_max_clients,
        cooldown_s=settings.probing_cooldown_s,
    )
    return ProbingHook(detector, settings.probing_policy, metrics, settings.probing_allow_clients)


class ProbingMetrics:
    """The probing detector's series (registered by :meth:`service.metrics.SidecarMetrics.part`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.probing_flagged_clients = Counter(
            "advsentry_probing_flagged_clients",
            "Times a client was flagged as probing (its recent queries sit too close together).",
            registry=registry,
        )
        self.probing_detections = Counter(
            "advsentry_probing_detections",
            "Probing detections by policy (shadow: metrics only; annotate; reject: cool-down refusals follow).",
            ("policy",), registry=registry,
        )
        for policy in ("shadow", "annotate", "reject"):
            self.probing_detections.labels(policy)
        self.probing_rejected = Counter(
            "advsentry_probing_rejected",
            "Requests refused with PERMISSION_DENIED during a flagged client's cool-down.",
            registry=registry,
        )
        self.probing_clients = Gauge(
            "advsentry_probing_clients", "Clients whose query history the probing detector holds.", registry=registry
        )
        self.probing_knn_distance = Histogram(
            "advsentry_probing_knn_distance",
            "Mean distance of a query's embedding to its client's k nearest previous queries (unit vectors, 0..2).",
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0),
            registry=registry,
        )


"""Micro-batching: concurrent requests' feature maps are scored in one detector call.

Modelled on Triton's dynamic batcher and MLServer's adaptive batching: the first
waiting request opens a batch; the batch is closed when it holds
``max_batch_size`` inputs or ``max_batch_delay_ms`` has passed since it opened,
whichever comes first. While one batch is being scored (in a worker thread, so
the event loop keeps accepting requests), the next one fills up, so under load
batches grow on their own.

A batch is also closed at once when no other request is *on its way*: callers
wrap their upstream call in :meth:`MicroBatcher.incoming`, so the batcher knows
how many requests may still join. With none in flight upstream, waiting could
only add latency (a lone request at concurrency 1 is scored immediately, not
after the delay); the delay is spent only when there is someone to wait for.

Requests are grouped by a *key* (the model and the shapes of its maps): only
maps that the same detector scores and that can be concatenated share a batch.
A request larger than ``max_batch_size`` is scored alone, never split.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

LOGGER = logging.getLogger(__name__)

#: ``(key, {output name: array [N, ...]}) -> scores [N]``; runs in a worker thread.
ScoreFunction = Callable[[Hashable, Mapping[str, np.ndarray]], np.ndarray]
#: Called after each detector call with (key, inputs in batch, requests in batch, seconds).
BatchObserver = Callable[[Hashable, int, int, float], None]


@dataclass
class _Pending:
    key: Hashable
    maps: Mapping[str, np.ndarray]
    size: int
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Collects :meth:`score` calls into batched calls of ``score_fn``."""

    def __init__(
        self,
        score_fn: ScoreFunction,
        *,
        max_batch_size: int = 16,
        max_batch_delay_ms: float = 2.0,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._score_fn = score_fn
        self.max_batch_size = max_batch_size
        self.max_batch_delay = max(0.0, max_batch_delay_ms) / 1000.0
        self._observer = observer
        self._queue: deque[_Pending] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        # One thread: torch parallelizes inside a call; two concurrent calls would only contend.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="advsentry-score")
        self._closed = False
        self._incoming = 0  # requests inside incoming(): may still join a batch

    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Wrap a request's upstream call: while inside, the batcher may wait for it to join a batch."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            if self._wakeup is not None:
                self._wakeup.set()  # a waiting batch may now be complete

    async def score(self, key: Hashable, maps: Mapping[str, np.ndarray]) -> np.ndarray:
        """Scores ``[N]`` for one request's maps (each ``[N, ...]``), batched with concurrent calls."""
        if self._closed:
            raise RuntimeError("batcher is closed")
        sizes = {int(array.shape[0]) for array in maps.values()}
        if len(sizes) != 1:
            raise ValueError(f"feature maps disagree on the batch size: {sorted(sizes)}")
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._run(), name="advsentry-batcher")
        pending = _Pending(key, maps, sizes.pop(), loop.create_future())
        self._queue.append(pending)
        assert self._wakeup is not None
        self._wakeup.set()
        return await pending.future

    def _take_batch(self) -> list[_Pending]:
        """The oldest request plus queued requests of the same key that still fit."""
        first = self._queue.popleft()
        batch, total, kept = [first], first.size, deque()
        while self._queue:
            item = self._queue.popleft()
            if item.key == first.key and total + item.size <= self.max_batch_size:
                batch.append(item)
                total += item.size
            else:
                kept.append(item)
        self._queue.extendleft(reversed(kept))
        return batch

    def _batch_is_full(self) -> bool:
        first = self._queue[0]
        total = sum(item.size for item in self._queue if item.key == first.key)
        return total >= self.max_batch_size

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline = loop.time() + self.max_batch_delay
            while self._incoming > 0 and not self._batch_is_full():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take_batch()
            batch = [item for item in batch if not item.future.done()]  # caller gone (cancelled)
            if batch:
                await self._score_batch(batch)

    async def _score_batch(self, batch: list[_Pending]) -> None:
        key = batch[0].key
        names = list(batch[0].maps)
        started = time.perf_counter()
        try:
            if len(batch) == 1:
                merged = batch[0].maps
            else:
                merged = {name: np.concatenate([item.maps[name] for item in batch]) for name in names}
            loop = asyncio.get_running_loop()
            scores = await loop.run_in_executor(self._executor, self._score_fn, key, merged)
            scores = np.asarray(scores, dtype=np.float64).reshape(-1)
            total = sum(item.size for item in batch)
            if scores.shape[0] != total:
                raise RuntimeError(f"detector returned {scores.shape[0]} scores for {total} inputs")
        except Exception as error:  # noqa: BLE001 - every waiter must get an answer
            LOGGER.exception("batched scoring failed for %s", key)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        elapsed = time.perf_counter() - started
        if self._observer is not None:
            self._observer(key, total, len(batch), elapsed)
        offset = 0
        for item in batch:
            if not item.future.done():
                item.future.set_result(scores[offset : offset + item.size])
            offset += item.size

    async def close(self) -> None:
        """Stop the worker; queued callers get ``RuntimeError``."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(RuntimeError("batcher closed"))
        self._executor.shutdown(wait=False, cancel_futures=True)

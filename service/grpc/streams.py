"""Ordered, bounded, cancellable handling of a bidirectional stream (ModelStreamInfer, DetectStream).

Every streaming entry point answers through :func:`ordered_responses`:

- each message is handled as its own task, so the messages of one stream are
  scored in the same micro-batches as concurrent traffic;
- answers go out strictly in request order, each message exactly once;
- at most ``max_in_flight`` messages are in progress or waiting to be written
  (``stream_max_in_flight``): the next message is *read* only when a slot
  frees, so a fast writer's backlog stays in its own flow-control window, not
  in the sidecar;
- when the caller cancels or disconnects, every pending message is cancelled
  and awaited before the handler returns, so nothing of that stream is sent
  upstream afterwards (issue 20: a DetectStream went on scoring and sending
  36 queued messages after its client had gone).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TypeVar

Message = TypeVar("Message")
Answer = TypeVar("Answer")


async def ordered_responses(
    messages: AsyncIterable[Message],
    handle: Callable[[Message], Awaitable[Answer]],
    max_in_flight: int,
) -> AsyncIterator[Answer]:
    """Yield ``handle(message)`` for each message, in order, with at most ``max_in_flight`` outstanding.

    ``handle`` must answer every message itself (errors as answers); an
    exception it raises ends the stream. An error of the incoming stream
    surfaces after the answers to what was read before it.
    """
    if max_in_flight < 1:
        raise ValueError("max_in_flight must be >= 1")
    slots = asyncio.Semaphore(max_in_flight)
    order: asyncio.Queue[asyncio.Task | None] = asyncio.Queue()
    outstanding: set[asyncio.Task] = set()

    async def read() -> None:
        try:
            async for message in messages:
                await slots.acquire()  # released when this message's answer is written
                task = asyncio.ensure_future(handle(message))
                outstanding.add(task)
                task.add_done_callback(outstanding.discard)
                order.put_nowait(task)
        finally:
            order.put_nowait(None)

    reader = asyncio.ensure_future(read())
    try:
        while (task := await order.get()) is not None:
            try:
                answer = await task
            finally:
                slots.release()
            yield answer
        await reader  # surfaces a broken client stream
    finally:
        reader.cancel()
        pending = [reader, *outstanding]
        for task in pending:
            task.cancel()
        # wait until each has really stopped: none of them may reach upstream after the stream is gone
        await asyncio.gather(*pending, return_exceptions=True)

"""Natural batching: callers await one item each; a worker flushes whatever has queued up since
its last flush in one call. Idle, an item is flushed at once (no added latency); under load the
batches grow by themselves, so many acks or completions cost one statement instead of many."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741
O = TypeVar("O")  # noqa: E741

Flush = Callable[[list[I]], Awaitable[Sequence[O | BaseException]]]


class Batcher(Generic[I, O]):
    def __init__(self, name: str, flush: Flush[I, O], *, max_batch: int = 500, workers: int = 2):
        self._name = name
        self._flush = flush
        self._max_batch = max_batch
        self._workers = workers
        self._queue: asyncio.Queue[tuple[I, asyncio.Future[O]]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.batches = 0
        self.items = 0
        self.busy_seconds = 0.0  # time spent in flushes

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._work(), name=f"{self._name}-{i}")
            for i in range(self._workers)
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        while not self._queue.empty():
            _, future = self._queue.get_nowait()
            future.cancel()

    async def submit(self, item: I) -> O:
        """Queue one item and wait for its result (or its exception)."""
        future: asyncio.Future[O] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _work(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            started = time.perf_counter()
            try:
                results = await self._flush([item for item, _ in batch])
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            self.items += len(batch)
            self.busy_seconds += time.perf_counter() - started
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

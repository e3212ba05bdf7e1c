from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import datetime
from typing import Any

import pytest

from server.domain import Unavailable
from server.liveness import HeartbeatBatcher

Row = tuple[str, uuid.UUID, datetime]


class FakeStore:
    def __init__(self) -> None:
        self.calls: list[list[Row]] = []
        self.failures = 0  # how many next calls raise Unavailable
        self.gate: asyncio.Event | None = None  # when set, calls wait for it

    async def flush_heartbeats(self, seen: list[Row]) -> int:
        self.calls.append(list(seen))
        if self.gate is not None:
            await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise Unavailable("database down")
        return len(seen)


def make_batcher(store: FakeStore, interval: float = 60.0) -> HeartbeatBatcher:
    fake: Any = store
    return HeartbeatBatcher(fake, flush_interval=interval)


def by_agent(rows: list[Row]) -> dict[str, tuple[uuid.UUID, datetime]]:
    return {agent: (session, seen) for agent, session, seen in rows}


async def test_flush_without_touches_does_nothing() -> None:
    store = FakeStore()
    batcher = make_batcher(store)
    assert await batcher.flush() == 0
    assert store.calls == []
    assert batcher.flushes == 0


async def test_many_touches_give_one_row_per_agent_in_one_call() -> None:
    store = FakeStore()
    batcher = make_batcher(store)
    session_a, session_b = uuid.uuid4(), uuid.uuid4()
    last_a = last_b = None
    for _ in range(50):
        last_a = batcher.touch("a", session_a)
        last_b = batcher.touch("b", session_b)
    assert batcher.heartbeats == 100

    assert await batcher.flush() == 2
    assert len(store.calls) == 1
    (rows,) = store.calls
    assert len(rows) == 2
    assert by_agent(rows) == {"a": (session_a, last_a), "b": (session_b, last_b)}
    assert batcher.flushes == 1

    # Nothing left to write.
    assert await batcher.flush() == 0
    assert len(store.calls) == 1


async def test_touch_returns_an_aware_time_that_does_not_go_back() -> None:
    batcher = make_batcher(FakeStore())
    first = batcher.touch("a", uuid.uuid4())
    second = batcher.touch("a", uuid.uuid4())
    assert first.tzinfo is not None
    assert second >= first


async def test_unavailable_keeps_rows_for_next_flush() -> None:
    store = FakeStore()
    batcher = make_batcher(store)
    session = uuid.uuid4()
    seen = batcher.touch("a", session)
    store.failures = 1
    with pytest.raises(Unavailable):
        await batcher.flush()
    assert batcher.flushes == 0

    assert await batcher.flush() == 1
    assert by_agent(store.calls[-1]) == {"a": (session, seen)}
    assert batcher.flushes == 1


async def test_after_failure_newest_value_wins() -> None:
    store = FakeStore()
    batcher = make_batcher(store)
    old_session, new_session = uuid.uuid4(), uuid.uuid4()
    batcher.touch("a", old_session)
    b_seen = batcher.touch("b", old_session)
    store.failures = 1
    with pytest.raises(Unavailable):
        await batcher.flush()

    a_seen = batcher.touch("a", new_session)
    await batcher.flush()
    assert by_agent(store.calls[-1]) == {"a": (new_session, a_seen), "b": (old_session, b_seen)}


async def test_touch_during_failed_flush_is_not_overwritten_by_older_row() -> None:
    store = FakeStore()
    store.gate = asyncio.Event()
    store.failures = 1
    batcher = make_batcher(store)
    old_session, new_session = uuid.uuid4(), uuid.uuid4()
    batcher.touch("a", old_session)
    flushing = asyncio.create_task(batcher.flush())
    await asyncio.sleep(0)
    assert len(store.calls) == 1  # the flush is waiting on the store
    newer = batcher.touch("a", new_session)
    store.gate.set()
    with pytest.raises(Unavailable):
        await flushing

    store.gate = None
    await batcher.flush()
    assert by_agent(store.calls[-1]) == {"a": (new_session, newer)}


async def test_touch_during_successful_flush_goes_to_the_next_one() -> None:
    store = FakeStore()
    store.gate = asyncio.Event()
    batcher = make_batcher(store)
    batcher.touch("a", uuid.uuid4())
    flushing = asyncio.create_task(batcher.flush())
    await asyncio.sleep(0)
    session = uuid.uuid4()
    seen = batcher.touch("b", session)
    store.gate.set()
    assert await flushing == 1
    assert [agent for agent, _, _ in store.calls[0]] == ["a"]

    store.gate = None
    assert await batcher.flush() == 1
    assert by_agent(store.calls[1]) == {"b": (session, seen)}


async def test_run_survives_unavailable() -> None:
    store = FakeStore()
    store.failures = 1
    batcher = make_batcher(store, interval=0.001)
    batcher.touch("a", uuid.uuid4())
    task = asyncio.create_task(batcher.run())
    try:
        for _ in range(2000):
            if batcher.flushes:
                break
            await asyncio.sleep(0.001)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert batcher.flushes == 1
    assert len(store.calls) == 2  # one failed, one written
    assert [row[0] for row in store.calls[1]] == ["a"]

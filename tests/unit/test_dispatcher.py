from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from server.dispatcher import Dispatcher
from server.domain import ClaimFor, CommandToSend, Hello, ProfilingMode, ProfilingSpec, Unavailable
from server.sessions import AgentSession, CloseReason, StopRequest


def make_session(agent_id: str = "agent-1", limit: int = 64) -> AgentSession:
    hello = Hello(
        agent_id=agent_id,
        hostname=f"host-{agent_id}",
        ip_address="",
        service_name="checkout",
        labels={},
        agent_version="0.1.0",
        supported_modes=(ProfilingMode.CPU,),
    )
    return AgentSession(hello, uuid.uuid4(), outbound_limit=limit)


def make_command() -> CommandToSend:
    return CommandToSend(
        command_id=uuid.uuid4(),
        request_id=uuid.uuid4(),
        spec=ProfilingSpec(duration_seconds=5, frequency_hz=11, mode=ProfilingMode.CPU),
        expires_at=datetime(2030, 1, 1, tzinfo=UTC),
    )


class FakeStore:
    def __init__(self) -> None:
        self.calls: list[tuple[str, uuid.UUID, str, str, int]] = []
        self.batches: list[int] = []
        self.results: dict[str, tuple[list[CommandToSend], list[uuid.UUID]]] = {}
        self.fail_with: Exception | None = None

    async def claim_batch(
        self, sessions: list[ClaimFor], limit: int
    ) -> dict[str, tuple[list[CommandToSend], list[uuid.UUID]]]:
        self.batches.append(len(sessions))
        for s in sessions:
            self.calls.append((s.agent_id, s.session_id, s.service_name, s.hostname, limit))
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            raise error
        return {
            s.agent_id: self.results.pop(s.agent_id) for s in sessions if s.agent_id in self.results
        }


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
async def make_dispatcher(store: FakeStore) -> AsyncIterator[Callable[..., Dispatcher]]:
    created: list[Dispatcher] = []

    def factory(**kwargs: Any) -> Dispatcher:
        fake: Any = store
        dispatcher = Dispatcher(fake, **kwargs)
        created.append(dispatcher)
        return dispatcher

    yield factory
    for dispatcher in created:
        await dispatcher.stop()


async def until(condition: Callable[[], bool]) -> None:
    """Poll `condition` every millisecond for up to about two seconds."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition not met in time")


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_many_wakes_before_workers_run_cause_one_claim(
    store: FakeStore, make_dispatcher: Callable[..., Dispatcher]
) -> None:
    dispatcher = make_dispatcher(workers=4, per_agent=3)
    session = make_session()
    for _ in range(100):
        dispatcher.wake(session)
    assert session.dispatch_queued
    dispatcher.start()
    await until(lambda: dispatcher.claims == 1)
    await settle()
    assert dispatcher.claims == 1
    assert store.calls == [("agent-1", session.session_id, "checkout", "host-agent-1", 3)]
    assert session.dispatch_queued is False


async def test_wake_after_a_claim_claims_again(
    store: FakeStore, make_dispatcher: Callable[..., Dispatcher]
) -> None:
    dispatcher = make_dispatcher(workers=2)
    dispatcher.start()
    session = make_session()
    dispatcher.wake(session)
    await until(lambda: dispatcher.claims == 1)
    dispatcher.wake(session)
    await until(lambda: dispatcher.claims == 2)
    assert len(store.calls) == 2


async def test_sessions_queued_together_are_claimed_in_one_batch_each_once(
    store: FakeStore, make_dispatcher: Callable[..., Dispatcher]
) -> None:
    dispatcher = make_dispatcher(workers=2)
    sessions = [make_session(f"agent-{i}") for i in range(5)]
    for _ in range(3):
        for session in sessions:
            dispatcher.wake(session)
    dispatcher.start()
    await until(lambda: dispatcher.claimed_sessions == 5)
    await settle()
    assert store.batches == [5]
    assert sorted(call[0] for call in store.calls) == [f"agent-{i}" for i in range(5)]


async def test_batches_never_exceed_their_limit(
    store: FakeStore, make_dispatcher: Callable[..., Dispatcher]
) -> None:
    dispatcher = make_dispatcher(workers=1, max_batch=3)
    for i in range(7):
        dispatcher.wake(make_session(f"agent-{i}"))
    dispatcher.start()
    await until(lambda: dispatcher.claimed_sessions == 7)
    assert store.batches == [3, 3, 1]


async def test_claimed_commands_and_stops_are_pushed(
    store: FakeStore, make_dispatcher: Callable[..., Dispatcher]
) -> None:
    dispatcher = make_dispatcher()
    session = make_session()
    commands = [make_command(), make_command()]
    stop_id = uuid.uuid4()
    store.results["agent-1"] = (commands, [stop_id])
    dispatcher.start()
    dispatcher.wake(session)
    await until(lambda: dispatcher.claims == 1)

    received = [await asyncio.wait_for(session.next_outbound(), 1) for _ in range(3)]
    assert received[0] == StopRequest(stop_id, "cancelled by operator")
    assert received[1:] == commands
    assert dispatcher.pushed == 2


async def test_closed_session_is_not_claimed(
    store: FakeStore, make_dispatcher: Callable[..., Dispatcher]
) -> None:
    dispatcher = make_dispatcher()
    session = make_session()
    session.close(CloseReason.CLIENT)
    dispatcher.wake(session)
    assert session.dispatch_queued is False

    other = make_session("agent-2")
    dispatcher.wake(other)
    other.close(CloseReason.CLIENT)  # closed while queued
    dispatcher.start()
    await settle()
    await asyncio.sleep(0.005)
    assert store.calls == []
    assert dispatcher.claims == 0


async def test_push_into_full_queue_counts_only_what_was_queued(
    store: FakeStore, make_dispatcher: Callable[..., Dispatcher]
) -> None:
    dispatcher = make_dispatcher()
    session = make_session(limit=1)
    store.results["agent-1"] = ([make_command(), make_command()], [])
    dispatcher.start()
    dispatcher.wake(session)
    await until(lambda: dispatcher.claims == 1)
    assert dispatcher.pushed == 1
    assert session.closed


@pytest.mark.parametrize("error", [Unavailable("db down"), RuntimeError("boom")])
async def test_worker_survives_store_errors(
    store: FakeStore, make_dispatcher: Callable[..., Dispatcher], error: Exception
) -> None:
    dispatcher = make_dispatcher(workers=1)
    session = make_session()
    store.fail_with = error
    dispatcher.start()
    dispatcher.wake(session)
    await until(lambda: len(store.calls) == 1)
    await settle()
    assert dispatcher.claims == 0
    assert session.dispatch_queued is False

    command = make_command()
    store.results["agent-1"] = ([command], [])
    dispatcher.wake(session)
    await until(lambda: dispatcher.claims == 1)
    assert await asyncio.wait_for(session.next_outbound(), 1) == command


async def test_stop_cancels_workers(make_dispatcher: Callable[..., Dispatcher]) -> None:
    dispatcher = make_dispatcher(workers=3)
    dispatcher.start()
    tasks = list(dispatcher._tasks)
    assert len(tasks) == 3
    await dispatcher.stop()
    assert all(task.done() for task in tasks)
    assert dispatcher._tasks == []

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

from server.domain import Hello
from server.sessions import AgentSession, CloseReason, DrainRequest, SessionRegistry, StopRequest


def make_hello(agent_id: str = "agent-1", service: str = "checkout", host: str = "web-1") -> Hello:
    return Hello(
        agent_id=agent_id,
        hostname=host,
        ip_address="10.0.0.1",
        service_name=service,
        labels={},
        agent_version="0.1.0",
        supported_modes=(),
    )


def make_session(
    agent_id: str = "agent-1", service: str = "checkout", host: str = "web-1", limit: int = 64
) -> AgentSession:
    return AgentSession(make_hello(agent_id, service, host), uuid.uuid4(), outbound_limit=limit)


def stop(n: int = 0) -> StopRequest:
    return StopRequest(uuid.UUID(int=n), "test")


# --- AgentSession --------------------------------------------------------------------------------


async def test_push_then_next_outbound_in_order() -> None:
    session = make_session()
    messages = [stop(1), DrainRequest(timedelta(seconds=1)), stop(2)]
    for message in messages:
        assert session.push(message) is True
    received = [await session.next_outbound() for _ in messages]
    assert received == messages
    assert not session.closed
    assert session.agent_id == "agent-1"


async def test_full_queue_closes_instead_of_blocking() -> None:
    session = make_session(limit=2)
    assert session.push(stop(1))
    assert session.push(stop(2))
    assert session.push(stop(3)) is False
    assert session.closed
    assert session.close_reason is not None
    assert "outbound queue full" in session.close_reason
    assert await asyncio.wait_for(session.next_outbound(), 0.5) is None


async def test_push_after_close_is_refused() -> None:
    session = make_session()
    session.close(CloseReason.CLIENT)
    assert session.push(stop(1)) is False
    assert await session.next_outbound() is None


async def test_close_drops_queued_messages() -> None:
    session = make_session()
    session.push(stop(1))
    session.close(CloseReason.SHUTDOWN)
    assert await asyncio.wait_for(session.next_outbound(), 0.5) is None


async def test_close_wakes_a_waiting_reader() -> None:
    session = make_session()
    reader = asyncio.create_task(session.next_outbound())
    await asyncio.sleep(0)
    assert not reader.done()
    session.close(CloseReason.SILENT)
    assert await asyncio.wait_for(reader, 0.5) is None


async def test_close_wakes_reader_even_when_full() -> None:
    session = make_session(limit=1)
    session.push(stop(1))
    session.close(CloseReason.SHUTDOWN)  # must not raise QueueFull
    assert session.closed
    assert await asyncio.wait_for(session.next_outbound(), 0.5) is None


async def test_close_keeps_the_first_reason() -> None:
    session = make_session()
    session.close(CloseReason.SUPERSEDED)
    session.close(CloseReason.SHUTDOWN)
    assert session.close_reason == CloseReason.SUPERSEDED


async def test_waiting_reader_gets_pushed_message() -> None:
    session = make_session()
    reader = asyncio.create_task(session.next_outbound())
    await asyncio.sleep(0)
    session.push(stop(7))
    assert await asyncio.wait_for(reader, 0.5) == stop(7)


# --- SessionRegistry -----------------------------------------------------------------------------


async def test_add_and_lookup() -> None:
    registry = SessionRegistry()
    a = make_session("a", "checkout", "web-1")
    b = make_session("b", "checkout", "web-2")
    c = make_session("c", "search", "web-1")
    for session in (a, b, c):
        assert registry.add(session) is None
    assert len(registry) == 3
    assert set(registry.all()) == {a, b, c}
    assert registry.by_agent("a") is a
    assert registry.by_agent("nobody") is None
    assert registry.by_host("checkout", "web-1") == [a]
    assert registry.by_host("search", "web-1") == [c]
    assert registry.by_host("checkout", "web-9") == []
    assert set(registry.by_service("checkout")) == {a, b}
    assert registry.by_service("unknown") == []


async def test_add_returns_replaced_session() -> None:
    registry = SessionRegistry()
    old = make_session("a", "checkout", "web-1")
    new = make_session("a", "checkout", "web-1")
    assert registry.add(old) is None
    assert registry.add(new) is old
    assert len(registry) == 1
    assert registry.by_agent("a") is new
    assert registry.by_host("checkout", "web-1") == [new]
    assert registry.by_service("checkout") == [new]


async def test_replacement_moving_service_cleans_old_indexes() -> None:
    registry = SessionRegistry()
    old = make_session("a", "checkout", "web-1")
    new = make_session("a", "search", "web-2")
    registry.add(old)
    assert registry.add(new) is old
    assert registry.by_service("checkout") == []
    assert registry.by_host("checkout", "web-1") == []
    assert registry.by_host("search", "web-2") == [new]
    assert "checkout" not in registry._by_service
    assert ("checkout", "web-1") not in registry._by_host


async def test_removing_a_replaced_session_keeps_the_new_one() -> None:
    registry = SessionRegistry()
    old = make_session("a")
    new = make_session("a")
    registry.add(old)
    registry.add(new)
    registry.remove(old)
    assert registry.by_agent("a") is new
    assert registry.by_host("checkout", "web-1") == [new]
    assert registry.by_service("checkout") == [new]


async def test_remove_cleans_empty_index_entries() -> None:
    registry = SessionRegistry()
    a = make_session("a", "checkout", "web-1")
    b = make_session("b", "checkout", "web-1")
    registry.add(a)
    registry.add(b)
    registry.remove(a)
    assert registry.by_host("checkout", "web-1") == [b]
    assert ("checkout", "web-1") in registry._by_host
    registry.remove(b)
    assert len(registry) == 0
    assert registry._by_agent == {}
    assert dict(registry._by_host) == {}
    assert dict(registry._by_service) == {}
    registry.remove(b)  # removing twice is harmless and leaves nothing behind
    assert dict(registry._by_host) == {}
    assert dict(registry._by_service) == {}


async def test_matching_by_agent_and_host_without_duplicates() -> None:
    registry = SessionRegistry()
    a = make_session("a", "checkout", "web-1")
    b = make_session("b", "checkout", "web-2")
    c = make_session("c", "search", "web-1")
    for session in (a, b, c):
        registry.add(session)
    found = registry.matching({"a", "ghost"}, {("checkout", "web-1"), ("search", "web-1")})
    assert sorted(s.agent_id for s in found) == ["a", "c"]
    assert registry.matching(set(), set()) == []
    assert registry.matching(set(), {("checkout", "web-2")}) == [b]

"""The store on a real PostgreSQL: migrations, claim limits, guarded transitions."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from db import migrate
from db.engine import create_engine
from db.store import Store
from server.domain import (
    Ack,
    ClaimFor,
    Completion,
    Hello,
    NotFound,
    Outcome,
    PermissionDenied,
    ProfilingMode,
    ProfilingSpec,
    SessionOpen,
    SubmitRequest,
)
from server.lifecycle import CommandState

SPEC = ProfilingSpec(duration_seconds=1, frequency_hz=11, mode=ProfilingMode.CPU)


def _request(hosts: tuple[str, ...], key: str | None = None) -> SubmitRequest:
    return SubmitRequest("svc", hosts, SPEC, max_hosts=0, ttl_seconds=60, idempotency_key=key)


def _hello(agent_id: str, hostname: str = "h1") -> Hello:
    return Hello(agent_id, hostname, "", "svc", {}, "test", (ProfilingMode.CPU,))


async def test_migrations_apply_once_and_refuse_unknown_versions(
    empty_database_url: str, tmp_path: Path
) -> None:
    engine = create_engine(empty_database_url, pool_size=2)
    try:
        assert await migrate.applied_versions(engine) == []
        applied = await migrate.upgrade(engine)
        assert applied == [m.version for m in migrate.available()]
        assert await migrate.upgrade(engine) == []  # idempotent
        # Two servers starting at once: the advisory lock serialises them.
        again = await asyncio.gather(migrate.upgrade(engine), migrate.upgrade(engine))
        assert again == [[], []]
        async with engine.begin() as conn:
            tables = await conn.scalar(
                text("SELECT count(*) FROM pg_tables WHERE tablename IN "
                     "('agents', 'profile_requests', 'commands')")
            )  # fmt: skip
            assert tables == 3
            await conn.execute(
                text("INSERT INTO schema_migrations (version, name) VALUES (999, 'future')")
            )
        with pytest.raises(RuntimeError, match="999"):
            await migrate.upgrade(engine)
    finally:
        await engine.dispose()
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0003_c.sql").write_text("SELECT 1;")
    with pytest.raises(ValueError, match="without gaps"):
        migrate.available(tmp_path)


async def test_claim_never_takes_more_than_its_limit(store: Store) -> None:
    session = uuid.uuid4()
    await store.open_session(_hello("a1"), session, "srv", timedelta(seconds=10))
    for _ in range(30):
        await store.submit(_request(("h1",)))
    # An agent with nothing in flight takes exactly `limit` commands, oldest first.
    commands, stops = await store.claim("a1", session, "svc", "h1", limit=3)
    assert len(commands) == 3 and stops == []
    # While those are in flight the agent is busy: nothing more is claimed.
    assert (await store.claim("a1", session, "svc", "h1", limit=3))[0] == []
    async with store.engine.connect() as conn:
        states = dict(
            (await conn.execute(text("SELECT state, count(*) FROM commands GROUP BY state"))).all()
        )
    assert states == {"sent": 3, "pending": 27}


async def test_concurrent_claims_for_one_agent_hand_out_one_command(store: Store) -> None:
    session = uuid.uuid4()
    await store.open_session(_hello("a1"), session, "srv", timedelta(seconds=10))
    for _ in range(5):
        await store.submit(_request(("h1",)))
    results = await asyncio.gather(*(store.claim("a1", session, "svc", "h1") for _ in range(8)))
    claimed = [c for commands, _ in results for c in commands]
    assert len(claimed) == 1


async def test_stale_session_cannot_claim(store: Store) -> None:
    old, new = uuid.uuid4(), uuid.uuid4()
    await store.open_session(_hello("a1"), old, "srv-a", timedelta(seconds=10))
    await store.open_session(_hello("a1"), new, "srv-b", timedelta(seconds=10))
    await store.submit(_request(("h1",)))
    assert await store.claim("a1", old, "svc", "h1") == ([], [])
    commands, _ = await store.claim("a1", new, "svc", "h1")
    assert len(commands) == 1


async def test_reopening_a_session_requeues_unacknowledged_commands(store: Store) -> None:
    first = uuid.uuid4()
    await store.open_session(_hello("a1"), first, "srv", timedelta(seconds=10))
    await store.submit(_request(("h1",)))
    (sent,), _ = await store.claim("a1", first, "svc", "h1")
    second = uuid.uuid4()
    await store.open_session(_hello("a1"), second, "srv", timedelta(seconds=10))
    (again,), _ = await store.claim("a1", second, "svc", "h1")
    assert again.command_id == sent.command_id
    view = await store.get_request(again.request_id)
    assert view.targets[0].attempts == 2


async def test_completion_is_recorded_once_and_only_for_the_owner(store: Store) -> None:
    session = uuid.uuid4()
    await store.open_session(_hello("a1"), session, "srv", timedelta(seconds=10))
    await store.submit(_request(("h1",)))
    (command,), _ = await store.claim("a1", session, "svc", "h1")
    ack = await store.record_ack("a1", command.command_id, True, "")
    assert ack.state == CommandState.RUNNING

    def completion(agent: str, outcome: Outcome) -> Completion:
        return Completion(agent, command.command_id, outcome, None, None, "", "/p", 5, 10)

    assert await store.record_completion(completion("a1", Outcome.SUCCEEDED)) == "succeeded"
    assert await store.record_completion(completion("a1", Outcome.FAILED)) == "succeeded"
    with pytest.raises(PermissionDenied):
        await store.record_completion(completion("a2", Outcome.SUCCEEDED))
    # An ack arriving after the completion changes nothing.
    assert (await store.record_ack("a1", command.command_id, False, "late")).state == "succeeded"


async def test_sweeps_are_bounded_and_guarded(store: Store) -> None:
    await store.submit(SubmitRequest("svc", ("x", "y", "z"), SPEC, 0, 1, None))
    async with store.engine.begin() as conn:
        await conn.execute(text("UPDATE commands SET expires_at = now() - interval '1 s'"))
    assert await store.expire_due(limit=2) == 2
    assert await store.expire_due(limit=2) == 1
    assert await store.expire_due() == 0
    assert await store.time_out_due() == 0


async def test_batched_claim_serves_each_owning_idle_agent_once(store: Store) -> None:
    sessions = {f"a{i}": uuid.uuid4() for i in range(4)}
    for agent, session in sessions.items():
        await store.open_session(_hello(agent, f"h-{agent}"), session, "srv", timedelta(seconds=10))
    for _ in range(2):
        await store.submit(SubmitRequest("svc", (), SPEC, 0, 60, None))  # every online agent
    # a3 is busy with a command claimed earlier; a2 asks with a stale session.
    (busy,), _ = await store.claim("a3", sessions["a3"], "svc", "h-a3")
    batch = [
        ClaimFor(agent, uuid.uuid4() if agent == "a2" else session, "svc", f"h-{agent}")
        for agent, session in sessions.items()
    ]
    claimed = await store.claim_batch(batch)
    assert sorted(claimed) == ["a0", "a1"]
    assert all(len(commands) == 1 and not stops for commands, stops in claimed.values())
    handed_out = {command.command_id for commands, _ in claimed.values() for command in commands}
    assert busy.command_id not in handed_out and len(handed_out) == 2


async def test_batched_acks_and_completions_report_per_item(store: Store) -> None:
    session = uuid.uuid4()
    await store.open_session(_hello("a1"), session, "srv", timedelta(seconds=10))
    await store.submit(_request(("h1",)))
    (command,), _ = await store.claim("a1", session, "svc", "h1")
    unknown = uuid.uuid4()
    outcomes = await store.record_acks(
        [
            Ack("a1", command.command_id, True, ""),
            Ack("a1", command.command_id, True, ""),  # duplicate in the same batch
            Ack("a2", command.command_id, True, ""),
            Ack("a1", unknown, True, ""),
        ]
    )
    assert [getattr(o, "state", None) for o in outcomes[:2]] == ["running", "running"]
    assert isinstance(outcomes[2], PermissionDenied)
    assert isinstance(outcomes[3], NotFound)

    done = Completion("a1", command.command_id, Outcome.SUCCEEDED, None, None, "", "/p", 1, 2)
    results = await store.record_completions([done, done, replace(done, agent_id="a2")])
    assert [getattr(r, "state", None) for r in results[:2]] == ["succeeded", "succeeded"]
    assert not any(getattr(r, "more_work", True) for r in results[:2])  # nothing else queued
    assert isinstance(results[2], PermissionDenied)


async def test_batched_session_opens_handle_repeats_of_one_agent(store: Store) -> None:
    first, second, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    interval = timedelta(seconds=10)
    await store.submit(_request(("h1",)))
    results = await store.open_sessions(
        [
            SessionOpen(_hello("a1"), first, interval),
            SessionOpen(_hello("b1", "h2"), other, interval),
            SessionOpen(_hello("a1"), second, interval),  # the later session wins
        ],
        "srv",
    )
    assert results == [[], [], []]
    assert await store.claim("a1", first, "svc", "h1") == ([], [])
    commands, _ = await store.claim("a1", second, "svc", "h1")
    assert len(commands) == 1
    agents = {a.agent_id: a for a in await store.list_agents(service_name="svc", online_only=True)}
    assert set(agents) == {"a1", "b1"}

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.state import AgentState, PendingReport


@pytest.fixture
def state(tmp_path: Path) -> Iterator[AgentState]:
    s = AgentState(tmp_path / "state")
    yield s
    s.close()


def reopen(state: AgentState) -> AgentState:
    state.close()
    return AgentState(state.directory)


def test_agent_id_is_a_stable_uuid(tmp_path: Path) -> None:
    first = AgentState(tmp_path / "nested" / "dir")
    agent_id = first.agent_id()
    assert uuid.UUID(agent_id)
    assert first.agent_id() == agent_id
    first.close()

    second = AgentState(tmp_path / "nested" / "dir")
    assert second.agent_id() == agent_id
    second.close()
    assert (tmp_path / "nested" / "dir" / "agent_id").read_text().strip() == agent_id


def test_agent_id_differs_between_directories(tmp_path: Path) -> None:
    a, b = AgentState(tmp_path / "a"), AgentState(tmp_path / "b")
    try:
        assert a.agent_id() != b.agent_id()
    finally:
        a.close()
        b.close()


def test_empty_agent_id_file_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "agent_id").write_text("  \n")
    state = AgentState(tmp_path)
    try:
        agent_id = state.agent_id()
        assert uuid.UUID(agent_id)
        assert state.agent_id() == agent_id
    finally:
        state.close()


def test_mark_started_once(state: AgentState) -> None:
    assert not state.has_run("c1")
    assert state.mark_started("c1") is True
    assert state.has_run("c1")
    assert state.mark_started("c1") is False
    assert state.mark_started("c2") is True


def test_mark_started_never_twice_across_restarts(state: AgentState) -> None:
    assert state.mark_started("c1") is True
    state = reopen(state)
    try:
        assert state.has_run("c1")
        assert state.mark_started("c1") is False
        assert state.mark_started("c2") is True
    finally:
        state.close()


def test_interrupted_lists_started_but_unfinished(state: AgentState) -> None:
    state.mark_started("c1")
    state.mark_started("c2")
    state.mark_started("c3")
    state.mark_finished("c2", {"outcome": "succeeded"})
    assert state.interrupted() == ["c1", "c3"]
    state = reopen(state)
    try:
        assert state.interrupted() == ["c1", "c3"]
    finally:
        state.close()


def test_unreported_until_reported(state: AgentState) -> None:
    state.mark_started("c1")
    state.mark_started("c2")
    assert state.unreported() == []
    completion: dict[str, object] = {"command_id": "c1", "outcome": "failed", "samples": 0}
    state.mark_finished("c1", completion)
    state.mark_finished("c2", {"command_id": "c2", "outcome": "succeeded"})
    assert state.unreported() == [
        PendingReport("c1", completion),
        PendingReport("c2", {"command_id": "c2", "outcome": "succeeded"}),
    ]
    assert set(state.recently_finished()) == {"c1", "c2"}

    state.mark_reported("c1")
    assert [r.command_id for r in state.unreported()] == ["c2"]
    assert state.has_run("c1")  # a reported command is still never run again
    assert state.mark_started("c1") is False


def test_unreported_survives_restart(state: AgentState) -> None:
    state.mark_started("c1")
    state.mark_finished("c1", {"outcome": "cancelled", "error_message": "stop"})
    state = reopen(state)
    try:
        assert state.unreported() == [
            PendingReport("c1", {"outcome": "cancelled", "error_message": "stop"})
        ]
        assert state.interrupted() == []
        state.mark_reported("c1")
        assert state.unreported() == []
    finally:
        state.close()


def test_recently_finished_limit(state: AgentState) -> None:
    for i in range(5):
        state.mark_started(f"c{i}")
        state.mark_finished(f"c{i}", {"outcome": "succeeded"})
    assert len(state.recently_finished(limit=3)) == 3
    assert set(state.recently_finished()) == {f"c{i}" for i in range(5)}


def test_reported_records_are_kept_while_a_command_could_still_be_resent(
    state: AgentState, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.state as module

    state.mark_started("old")
    state.mark_finished("old", {"outcome": "succeeded"})
    state.mark_started("recent")
    state.mark_finished("recent", {"outcome": "succeeded"})
    state.mark_reported("recent")
    state.mark_reported("old")
    assert state.has_run("old") and state.has_run("recent")

    # Far in the future, past any command's TTL, the old records may go.
    later = module.time.time() + module.KEEP_REPORTED_SECONDS + 60
    monkeypatch.setattr(module.time, "time", lambda: later)
    state.mark_reported("recent")
    assert not state.has_run("old") and not state.has_run("recent")
    state.mark_started("unfinished")
    assert state.has_run("unfinished")

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from server.lifecycle import (
    BUSY,
    COMPLETION_EVENTS,
    TERMINAL,
    TRANSITIONS,
    CommandState,
    Event,
    RequestState,
    completion_event,
    next_state,
    request_state,
    sources,
    target,
)

S = CommandState

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    # Hypothesis caches into ./.hypothesis by default; keep the repository clean.
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "pulse-unit-hypothesis")


# --- the command state machine -------------------------------------------------------------------


@pytest.mark.parametrize("state", sorted(TERMINAL))
@pytest.mark.parametrize("event", list(Event))
def test_terminal_states_absorb_every_event(state: CommandState, event: Event) -> None:
    assert next_state(state, event) is None


def test_terminal_and_busy_sets() -> None:
    assert {S.PENDING, S.SENT, S.RUNNING}.isdisjoint(TERMINAL)
    assert set(CommandState) - TERMINAL == {S.PENDING, S.SENT, S.RUNNING}
    assert {S.SENT, S.RUNNING} == BUSY
    assert BUSY.isdisjoint(TERMINAL)


def test_no_transition_leaves_a_terminal_state() -> None:
    assert all(state not in TERMINAL for state, _ in TRANSITIONS)


@pytest.mark.parametrize("event", list(Event))
def test_every_event_has_exactly_one_target_state(event: Event) -> None:
    targets = {to for (_, ev), to in TRANSITIONS.items() if ev == event}
    assert len(targets) == 1
    assert target(event) == targets.pop()


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (Event.DISPATCH, S.SENT),
        (Event.ACK_ACCEPTED, S.RUNNING),
        (Event.ACK_REJECTED, S.REJECTED),
        (Event.STREAM_LOST, S.PENDING),
        (Event.COMPLETE_SUCCEEDED, S.SUCCEEDED),
        (Event.COMPLETE_FAILED, S.FAILED),
        (Event.COMPLETE_CANCELLED, S.CANCELLED),
        (Event.CANCEL, S.CANCELLED),
        (Event.EXPIRE, S.EXPIRED),
        (Event.TIME_OUT, S.TIMED_OUT),
    ],
)
def test_target_of_each_event(event: Event, expected: CommandState) -> None:
    assert target(event) is expected


@pytest.mark.parametrize("event", list(Event))
def test_sources_agree_with_next_state(event: Event) -> None:
    from_next_state = {
        state
        for state in CommandState
        for delivered in (False, True)
        if next_state(state, event, delivered=delivered) is not None
    }
    assert sources(event) == from_next_state
    assert sources(event), f"{event} applies in no state"
    for state in sources(event):
        moved = {next_state(state, event, delivered=d) for d in (False, True)} - {None}
        assert moved == {target(event)}


@pytest.mark.parametrize(
    "event",
    [Event.ACK_ACCEPTED, Event.ACK_REJECTED, *sorted(COMPLETION_EVENTS)],
)
def test_pending_takes_agent_events_only_once_delivered(event: Event) -> None:
    assert next_state(S.PENDING, event) is None
    assert next_state(S.PENDING, event, delivered=True) == target(event)


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (Event.DISPATCH, {S.PENDING}),
        (Event.ACK_ACCEPTED, {S.PENDING, S.SENT}),
        (Event.STREAM_LOST, {S.SENT}),
        (Event.COMPLETE_SUCCEEDED, {S.PENDING, S.SENT, S.RUNNING}),
        (Event.CANCEL, {S.PENDING, S.SENT}),
        (Event.EXPIRE, {S.PENDING}),
        (Event.TIME_OUT, {S.PENDING, S.RUNNING}),
    ],
)
def test_sources_of_selected_events(event: Event, expected: set[CommandState]) -> None:
    assert sources(event) == expected


def test_refused_transitions_return_none() -> None:
    assert next_state(S.PENDING, Event.ACK_ACCEPTED) is None
    assert (
        next_state(S.RUNNING, Event.CANCEL) is None
    )  # a running command is stopped, not cancelled
    assert next_state(S.RUNNING, Event.EXPIRE) is None
    assert next_state(S.PENDING, Event.COMPLETE_SUCCEEDED) is None
    assert next_state(S.SENT, Event.TIME_OUT) is None


def test_pending_commands_delivered_before_complete_or_time_out_but_never_expire() -> None:
    # The stream was lost after the agent started the command but before its ack was recorded.
    assert next_state(S.PENDING, Event.COMPLETE_SUCCEEDED, delivered=True) is S.SUCCEEDED
    assert next_state(S.PENDING, Event.TIME_OUT, delivered=True) is S.TIMED_OUT
    assert next_state(S.PENDING, Event.EXPIRE, delivered=True) is None
    # Never delivered: no completion can be genuine, and it expires.
    assert next_state(S.PENDING, Event.COMPLETE_FAILED, delivered=False) is None
    assert next_state(S.PENDING, Event.TIME_OUT, delivered=False) is None
    assert next_state(S.PENDING, Event.EXPIRE, delivered=False) is S.EXPIRED


@pytest.mark.parametrize("outcome", ["succeeded", "failed", "cancelled"])
def test_completion_event(outcome: str) -> None:
    event = completion_event(outcome)
    assert event in COMPLETION_EVENTS
    assert target(event) == CommandState(outcome)


def test_completion_event_refuses_unknown_outcome() -> None:
    with pytest.raises(ValueError):
        completion_event("exploded")


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.sampled_from(list(Event)), max_size=40))
def test_random_event_sequences_respect_the_rules(events: list[Event]) -> None:
    state = S.PENDING
    history = [state]
    for event in events:
        after = next_state(state, event)
        if after is None:
            continue  # refused: nothing changes
        if state in TERMINAL:
            pytest.fail(f"{state} moved to {after} on {event}")
        if after is S.RUNNING:
            assert state is S.SENT
        state = after
        history.append(state)

    reached_terminal = next((i for i, s in enumerate(history) if s in TERMINAL), None)
    if reached_terminal is not None:
        assert history[reached_terminal:] == [history[reached_terminal]]
        assert reached_terminal == len(history) - 1
    if S.RUNNING in history:
        first_running = history.index(S.RUNNING)
        assert history[first_running - 1] is S.SENT
        assert S.EXPIRED not in history[first_running:]
        assert S.PENDING not in history[first_running:]


# --- request states ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "cancelled", "expected"),
    [
        ({S.PENDING: 3}, False, RequestState.PENDING),
        ({S.PENDING: 3}, True, RequestState.PENDING),
        ({S.PENDING: 2, S.SENT: 1}, False, RequestState.RUNNING),
        ({S.PENDING: 1, S.RUNNING: 1}, False, RequestState.RUNNING),
        ({S.RUNNING: 1, S.SUCCEEDED: 2}, False, RequestState.RUNNING),
        ({S.SUCCEEDED: 3}, False, RequestState.SUCCEEDED),
        ({S.SUCCEEDED: 2, S.FAILED: 1}, False, RequestState.PARTIALLY_SUCCEEDED),
        ({S.SUCCEEDED: 1, S.EXPIRED: 1, S.TIMED_OUT: 1}, False, RequestState.PARTIALLY_SUCCEEDED),
        ({S.FAILED: 1, S.REJECTED: 1, S.EXPIRED: 1}, False, RequestState.FAILED),
        ({S.TIMED_OUT: 2}, False, RequestState.FAILED),
        ({S.CANCELLED: 2}, False, RequestState.FAILED),
        ({S.CANCELLED: 2, S.SUCCEEDED: 1}, True, RequestState.CANCELLED),
        ({S.CANCELLED: 3}, True, RequestState.CANCELLED),
        ({S.CANCELLED: 1, S.RUNNING: 1}, True, RequestState.RUNNING),
        ({S.CANCELLED: 1, S.SENT: 1}, True, RequestState.RUNNING),
        # zero counts do not count as targets
        ({S.SUCCEEDED: 2, S.PENDING: 0, S.FAILED: 0}, False, RequestState.SUCCEEDED),
    ],
)
def test_request_state(
    counts: dict[CommandState, int], cancelled: bool, expected: RequestState
) -> None:
    assert request_state(counts, cancelled) is expected


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.dictionaries(st.sampled_from(list(CommandState)), st.integers(0, 5), min_size=1),
    st.booleans(),
)
def test_request_state_properties(counts: dict[CommandState, int], cancelled: bool) -> None:
    total = sum(counts.values())
    if total == 0:
        return
    state = request_state(counts, cancelled)
    unfinished = sum(n for s, n in counts.items() if s not in TERMINAL)
    if unfinished:
        assert state in {RequestState.PENDING, RequestState.RUNNING}
        assert (state is RequestState.PENDING) == (counts.get(S.PENDING, 0) == total)
    elif cancelled:
        assert state is RequestState.CANCELLED
    else:
        assert state in {
            RequestState.SUCCEEDED,
            RequestState.PARTIALLY_SUCCEEDED,
            RequestState.FAILED,
        }
        assert (state is RequestState.FAILED) == (counts.get(S.SUCCEEDED, 0) == 0)
        assert (state is RequestState.SUCCEEDED) == (counts.get(S.SUCCEEDED, 0) == total)

"""The command and request state machines, as plain rules.

No grpc, no SQL: the servicers and the store both ask this module what is allowed. The store turns
`sources(event)` into `UPDATE ... WHERE state = ANY(...)` so that a race between two servers cannot
skip a rule, and a repeated message finds the row already moved and changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class CommandState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    TIMED_OUT = "timed_out"


TERMINAL: frozenset[CommandState] = frozenset(
    {
        CommandState.SUCCEEDED,
        CommandState.FAILED,
        CommandState.REJECTED,
        CommandState.CANCELLED,
        CommandState.EXPIRED,
        CommandState.TIMED_OUT,
    }
)

# Commands that occupy their agent: the server sends one profiling session at a time.
BUSY: frozenset[CommandState] = frozenset({CommandState.SENT, CommandState.RUNNING})


class Event(StrEnum):
    DISPATCH = "dispatch"  # written to the agent's stream
    ACK_ACCEPTED = "ack_accepted"
    ACK_REJECTED = "ack_rejected"
    STREAM_LOST = "stream_lost"  # the stream ended (or the ack timed out) before the ack
    COMPLETE_SUCCEEDED = "complete_succeeded"
    COMPLETE_FAILED = "complete_failed"
    COMPLETE_CANCELLED = "complete_cancelled"
    CANCEL = "cancel"  # operator cancel of a command that has not started
    EXPIRE = "expire"  # TTL passed while undelivered
    TIME_OUT = "time_out"  # no completion by start + duration + grace


_S = CommandState
TRANSITIONS: Mapping[tuple[CommandState, Event], CommandState] = {
    (_S.PENDING, Event.DISPATCH): _S.SENT,
    (_S.SENT, Event.ACK_ACCEPTED): _S.RUNNING,
    (_S.SENT, Event.ACK_REJECTED): _S.REJECTED,
    (_S.SENT, Event.STREAM_LOST): _S.PENDING,
    # An agent may finish before its ack is recorded (ack lost): sent -> terminal is allowed.
    (_S.SENT, Event.COMPLETE_SUCCEEDED): _S.SUCCEEDED,
    (_S.SENT, Event.COMPLETE_FAILED): _S.FAILED,
    (_S.SENT, Event.COMPLETE_CANCELLED): _S.CANCELLED,
    (_S.RUNNING, Event.COMPLETE_SUCCEEDED): _S.SUCCEEDED,
    (_S.RUNNING, Event.COMPLETE_FAILED): _S.FAILED,
    (_S.RUNNING, Event.COMPLETE_CANCELLED): _S.CANCELLED,
    (_S.PENDING, Event.CANCEL): _S.CANCELLED,
    (_S.SENT, Event.CANCEL): _S.CANCELLED,
    (_S.PENDING, Event.EXPIRE): _S.EXPIRED,
    (_S.RUNNING, Event.TIME_OUT): _S.TIMED_OUT,
    # A pending command that was delivered before (its stream was lost before the ack was
    # recorded) may be running on its agent: its late ack and its completion count, and it times
    # out rather than expires. See GUARDS.
    (_S.PENDING, Event.ACK_ACCEPTED): _S.RUNNING,
    (_S.PENDING, Event.ACK_REJECTED): _S.REJECTED,
    (_S.PENDING, Event.COMPLETE_SUCCEEDED): _S.SUCCEEDED,
    (_S.PENDING, Event.COMPLETE_FAILED): _S.FAILED,
    (_S.PENDING, Event.COMPLETE_CANCELLED): _S.CANCELLED,
    (_S.PENDING, Event.TIME_OUT): _S.TIMED_OUT,
}

# Transitions out of PENDING that depend on whether the command was ever delivered (written to
# an agent's stream; the store's `attempts > 0`): the value is the `delivered` they require.
# So an EXPIRED command never reached an agent, and a completion for a command that never did
# is refused.
GUARDS: Mapping[tuple[CommandState, Event], bool] = {
    (_S.PENDING, Event.EXPIRE): False,
    (_S.PENDING, Event.ACK_ACCEPTED): True,
    (_S.PENDING, Event.ACK_REJECTED): True,
    (_S.PENDING, Event.COMPLETE_SUCCEEDED): True,
    (_S.PENDING, Event.COMPLETE_FAILED): True,
    (_S.PENDING, Event.COMPLETE_CANCELLED): True,
    (_S.PENDING, Event.TIME_OUT): True,
}

COMPLETION_EVENTS: frozenset[Event] = frozenset(
    {Event.COMPLETE_SUCCEEDED, Event.COMPLETE_FAILED, Event.COMPLETE_CANCELLED}
)


def next_state(
    state: CommandState, event: Event, *, delivered: bool = False
) -> CommandState | None:
    """The state after `event`, or None when the event does not apply in `state`; `delivered`
    tells whether the command was ever written to an agent (it matters for PENDING only)."""
    required = GUARDS.get((state, event))
    if required is not None and required != delivered:
        return None
    return TRANSITIONS.get((state, event))


def sources(event: Event) -> frozenset[CommandState]:
    """Every state from which `event` may move a command (subject to GUARDS)."""
    return frozenset(state for (state, ev), _ in TRANSITIONS.items() if ev == event)


def target(event: Event) -> CommandState:
    """The single state an event leads to (every event has exactly one)."""
    (result,) = {to for (_, ev), to in TRANSITIONS.items() if ev == event}
    return result


class RequestState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIALLY_SUCCEEDED = "partially_succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# A request in one of these states will not change again (every target has finished).
FINISHED_REQUEST: frozenset[RequestState] = frozenset(
    {
        RequestState.SUCCEEDED,
        RequestState.PARTIALLY_SUCCEEDED,
        RequestState.FAILED,
        RequestState.CANCELLED,
    }
)


def request_state(counts: Mapping[CommandState, int], cancelled: bool) -> RequestState:
    """Derive a request's state from how many of its targets are in each command state."""
    total = sum(counts.values())
    finished = sum(n for state, n in counts.items() if state in TERMINAL)
    if finished < total:
        untouched = counts.get(CommandState.PENDING, 0)
        return RequestState.PENDING if untouched == total else RequestState.RUNNING
    if cancelled:
        return RequestState.CANCELLED
    succeeded = counts.get(CommandState.SUCCEEDED, 0)
    if succeeded == total:
        return RequestState.SUCCEEDED
    return RequestState.PARTIALLY_SUCCEEDED if succeeded else RequestState.FAILED


def completion_event(outcome: str) -> Event:
    """Map an agent-reported outcome ('succeeded', 'failed', 'cancelled') to its event."""
    return Event(f"complete_{outcome}")

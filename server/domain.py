"""Domain objects and errors shared by the servicers, the dispatcher and the store (no grpc)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from server.lifecycle import CommandState, RequestState


class ProfilingMode(StrEnum):
    CPU = "cpu"
    ALLOCATION = "allocation"
    NONE = "none"


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# --- errors: each maps to one gRPC status code in the transport layer ---------------------------


class PulseError(Exception):
    """Base of the errors the servicers turn into gRPC statuses."""


class InvalidArgument(PulseError):
    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


class NotFound(PulseError):
    pass


class PermissionDenied(PulseError):
    pass


class FailedPrecondition(PulseError):
    pass


class Unavailable(PulseError):
    pass


class Superseded(PulseError):
    """A newer session of the same agent took over this one."""


class Unauthenticated(PulseError):
    """No credential, or one that is unknown or expired."""


class ResourceExhausted(PulseError):
    """A limit was hit; `retry_after_seconds` (when > 0) says when trying again can succeed."""

    def __init__(self, message: str, retry_after_seconds: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


# --- values --------------------------------------------------------------------------------------


def new_id() -> uuid.UUID:
    return uuid.uuid4()


@dataclass(frozen=True)
class ProfilingSpec:
    duration_seconds: int
    frequency_hz: int
    mode: ProfilingMode
    pids: tuple[int, ...] = ()
    additional_args: dict[str, str] = field(default_factory=dict)
    continuous: bool = False


@dataclass(frozen=True)
class SubmitRequest:
    service_name: str
    hostnames: tuple[str, ...]
    spec: ProfilingSpec
    max_hosts: int
    ttl_seconds: int
    idempotency_key: str | None


@dataclass(frozen=True)
class Target:
    command_id: uuid.UUID
    agent_id: str | None
    hostname: str
    state: CommandState
    error_message: str = ""
    result_location: str = ""
    result_samples: int = 0
    result_bytes: int = 0
    attempts: int = 0
    sent_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    expires_at: datetime | None = None


@dataclass(frozen=True)
class RequestView:
    request_id: uuid.UUID
    service_name: str
    hostnames: tuple[str, ...]
    spec: ProfilingSpec
    max_hosts: int
    ttl_seconds: int
    idempotency_key: str | None
    created_at: datetime
    cancelled_at: datetime | None
    counts: dict[CommandState, int]
    state: RequestState
    targets: tuple[Target, ...] = ()


@dataclass(frozen=True)
class SubmitResult:
    request_id: uuid.UUID
    targets: tuple[Target, ...]
    deduplicated: bool


@dataclass(frozen=True)
class Hello:
    agent_id: str
    hostname: str
    ip_address: str
    service_name: str
    labels: dict[str, str]
    agent_version: str
    supported_modes: tuple[ProfilingMode, ...]
    running_command_ids: tuple[str, ...] = ()
    finished_command_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class AgentView:
    agent_id: str
    hostname: str
    ip_address: str
    service_name: str
    labels: dict[str, str]
    agent_version: str
    supported_modes: tuple[ProfilingMode, ...]
    online: bool
    last_seen_at: datetime | None
    connected_at: datetime | None
    server_id: str | None
    running_command_ids: tuple[uuid.UUID, ...]


@dataclass(frozen=True)
class CommandToSend:
    """A command claimed for an agent's stream."""

    command_id: uuid.UUID
    request_id: uuid.UUID
    spec: ProfilingSpec
    expires_at: datetime


@dataclass(frozen=True)
class Completion:
    agent_id: str
    command_id: uuid.UUID
    outcome: Outcome
    started_at: datetime | None
    finished_at: datetime | None
    error_message: str
    result_location: str
    result_samples: int
    result_bytes: int


@dataclass(frozen=True)
class SessionOpen:
    """A new stream asking to become its agent's live session."""

    hello: Hello
    session_id: uuid.UUID
    interval: timedelta


@dataclass(frozen=True)
class SessionClose:
    """A stream that ended."""

    agent_id: str
    session_id: uuid.UUID
    last_seen: datetime | None


@dataclass(frozen=True)
class ClaimFor:
    """A live session asking for its agent's next commands."""

    agent_id: str
    session_id: uuid.UUID
    service_name: str
    hostname: str


@dataclass(frozen=True)
class Ack:
    agent_id: str
    command_id: uuid.UUID
    accepted: bool
    reason: str


@dataclass(frozen=True)
class CompletionResult:
    """The command's state after a completion; `more_work` when its agent has queued commands."""

    state: CommandState
    more_work: bool = False


@dataclass(frozen=True)
class AckOutcome:
    """What the store did with an ack; `stop` asks the session to stop a cancelled command."""

    state: CommandState | None
    stop: bool = False
    # Seconds from submit to this ack, when the ack moved the command (for the latency metric).
    dispatch_seconds: float | None = None


@dataclass(frozen=True)
class StopResult:
    cancelled: int
    stopping: int


@dataclass(frozen=True)
class Page:
    requests: tuple[RequestView, ...]
    next_token: str = ""


@dataclass(frozen=True)
class Candidate:
    """A target a dry-run submit resolved: the host, and the agent known there (if any)."""

    hostname: str
    agent_id: str | None
    online: bool
    supported_modes: tuple[ProfilingMode, ...]


@dataclass(frozen=True)
class AuditEvent:
    """One row of the audit trail: a state change of a request or of one of its commands."""

    event_id: int
    occurred_at: datetime
    actor: str  # `operator:<name>`, `agent:<id>`, `anonymous` (no tokens configured) or `system`
    request_id: uuid.UUID
    command_id: uuid.UUID | None  # None for request-level events
    hostname: str
    agent_id: str
    action: str  # submitted | cancelled | created | state_changed | stop_requested
    from_state: str
    to_state: str
    detail: str

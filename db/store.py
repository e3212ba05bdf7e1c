"""The store: every SQL statement of Pulse, behind methods that speak domain terms.

Each state change is one statement guarded by the states the lifecycle allows it from, so two
servers racing (or one message arriving twice) cannot skip a rule. Wake-ups are one NOTIFY on
channel `pulse_events`, sent from the same transaction as the change they announce:

- `r:<request_id>`: targets of this request need dispatch (new, or a stop to deliver);
- `a:<agent_id>`: this agent may be free for its next command;
- `v:<service_name>`: stops to deliver to agents of this service;
- `s:<agent_id>:<session_id>`: this session now owns the agent; older sessions must close.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import random
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from server import lifecycle
from server.domain import (
    AckOutcome,
    AgentView,
    CommandToSend,
    Completion,
    FailedPrecondition,
    Hello,
    InvalidArgument,
    NotFound,
    Page,
    PermissionDenied,
    ProfilingMode,
    ProfilingSpec,
    RequestView,
    StopResult,
    SubmitRequest,
    SubmitResult,
    Target,
    Unavailable,
    new_id,
)
from server.lifecycle import CommandState, Event

CHANNEL = "pulse_events"
_S = CommandState
_P = ParamSpec("_P")
_T = TypeVar("_T")
_TRANSIENT_SQLSTATES = {"40001", "40P01"}  # serialization failure, deadlock


def _states(states: Iterable[CommandState]) -> list[str]:
    return sorted(s.value for s in states)


def database_errors(fn: Callable[_P, Awaitable[_T]]) -> Callable[_P, Awaitable[_T]]:
    """Turn a lost or unreachable database into `Unavailable`; retry deadlocks a few times."""

    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        for attempt in range(3):
            try:
                return await fn(*args, **kwargs)
            except DBAPIError as exc:
                sqlstate = getattr(exc.orig, "sqlstate", None)
                if sqlstate in _TRANSIENT_SQLSTATES and attempt < 2:
                    continue
                if (
                    isinstance(exc, OperationalError | InterfaceError)
                    or exc.connection_invalidated
                    or (sqlstate or "").startswith(("08", "57"))
                ):
                    raise Unavailable(f"database unavailable: {type(exc.orig).__name__}") from exc
                raise
            except (PoolTimeout, OSError) as exc:
                raise Unavailable(f"database unavailable: {exc}") from exc
        raise AssertionError("unreachable")

    return wrapper


def fingerprint(request: SubmitRequest) -> str:
    """A stable hash of what was asked, to compare retries that reuse an idempotency key."""
    payload = asdict(request)
    payload.pop("idempotency_key")
    blob = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _spec(row: Row[Any]) -> ProfilingSpec:
    return ProfilingSpec(
        duration_seconds=row.duration_seconds,
        frequency_hz=row.frequency_hz,
        mode=ProfilingMode(row.profiling_mode),
        pids=tuple(row.pids),
        additional_args=dict(row.additional_args),
        continuous=row.continuous,
    )


def _target(row: Row[Any]) -> Target:
    return Target(
        command_id=row.command_id,
        agent_id=row.agent_id,
        hostname=row.hostname,
        state=CommandState(row.state),
        error_message=row.error_message,
        result_location=row.result_location,
        result_samples=row.result_samples,
        result_bytes=row.result_bytes,
        attempts=row.attempts,
        sent_at=row.sent_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        expires_at=row.expires_at,
    )


_COUNT_COLUMNS = ", ".join(
    f"count(*) FILTER (WHERE c.state = '{state.value}') AS n_{state.value}"
    for state in CommandState
)
_REQUEST_WITH_COUNTS = f"""
    SELECT r.*, k.*
    FROM profile_requests r
    CROSS JOIN LATERAL (
        SELECT {_COUNT_COLUMNS} FROM commands c WHERE c.request_id = r.request_id
    ) k
"""
_TARGET_COLUMNS = """
    command_id, agent_id, hostname, state, error_message, result_location, result_samples,
    result_bytes, attempts, sent_at, started_at, finished_at, expires_at
"""


def _request_view(row: Row[Any], targets: Sequence[Target] = ()) -> RequestView:
    counts = {state: getattr(row, f"n_{state.value}") for state in CommandState}
    counts = {state: n for state, n in counts.items() if n}
    cancelled = row.cancelled_at is not None
    return RequestView(
        request_id=row.request_id,
        service_name=row.service_name,
        hostnames=tuple(row.hostnames),
        spec=_spec(row),
        max_hosts=row.max_hosts,
        ttl_seconds=row.ttl_seconds,
        idempotency_key=row.idempotency_key,
        created_at=row.created_at,
        cancelled_at=row.cancelled_at,
        counts=counts,
        state=lifecycle.request_state(counts, cancelled),
        targets=tuple(targets),
    )


def encode_page_token(created_at: datetime, request_id: uuid.UUID) -> str:
    raw = f"{created_at.isoformat()}|{request_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        created, request_id = raw.split("|")
        return datetime.fromisoformat(created), uuid.UUID(request_id)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument("page_token", "not a token returned by this server") from exc


class Store:
    """All persistence of Pulse. Methods are safe to call concurrently from many servers."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        liveness_intervals: int = 3,
        completion_grace: timedelta = timedelta(seconds=30),
    ) -> None:
        self.engine = engine
        self.liveness_intervals = liveness_intervals
        self.completion_grace = completion_grace

    # --- helpers --------------------------------------------------------------------------------

    def _online(self, alias: str = "a") -> str:
        """SQL condition: the agent holds a stream and its heartbeats are recent enough."""
        return (
            f"({alias}.session_id IS NOT NULL AND {alias}.last_seen_at > now() - "
            f"{alias}.heartbeat_interval_ms * {int(self.liveness_intervals)} * interval '1 ms')"
        )

    @staticmethod
    async def _notify(conn: AsyncConnection, payload: str) -> None:
        await conn.execute(text("SELECT pg_notify(:ch, :p)"), {"ch": CHANNEL, "p": payload})

    @database_errors
    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    # --- operators --------------------------------------------------------------------------------

    @database_errors
    async def submit(self, request: SubmitRequest) -> SubmitResult:
        """Store a request and one command per resolved target; wake the servers holding them."""
        digest = fingerprint(request)
        async with self.engine.begin() as conn:
            if request.idempotency_key:
                existing = await self._find_by_key(conn, request.idempotency_key, digest)
                if existing is not None:
                    return existing
            targets = await self._resolve_targets(conn, request)
            request_id = new_id()
            inserted = await conn.execute(
                text(
                    """
                    INSERT INTO profile_requests (request_id, service_name, hostnames,
                        duration_seconds, frequency_hz, profiling_mode, pids, additional_args,
                        continuous, max_hosts, ttl_seconds, idempotency_key, fingerprint)
                    VALUES (:id, :service, :hostnames, :duration, :frequency, :mode, :pids,
                        CAST(:args AS jsonb), :continuous, :max_hosts, :ttl, :key, :fingerprint)
                    ON CONFLICT (idempotency_key) DO NOTHING
                    RETURNING created_at
                    """
                ),
                {
                    "id": request_id,
                    "service": request.service_name,
                    "hostnames": list(request.hostnames),
                    "duration": request.spec.duration_seconds,
                    "frequency": request.spec.frequency_hz,
                    "mode": request.spec.mode.value,
                    "pids": list(request.spec.pids),
                    "args": json.dumps(request.spec.additional_args),
                    "continuous": request.spec.continuous,
                    "max_hosts": request.max_hosts,
                    "ttl": request.ttl_seconds,
                    "key": request.idempotency_key,
                    "fingerprint": digest,
                },
            )
            if inserted.first() is None:
                # A concurrent submit with the same key committed first (ON CONFLICT waited for it).
                assert request.idempotency_key
                existing = await self._find_by_key(conn, request.idempotency_key, digest)
                assert existing is not None
                return existing
            rows = await conn.execute(
                text(
                    f"""
                    INSERT INTO commands (command_id, request_id, service_name, hostname, agent_id,
                        state, expires_at)
                    SELECT t.command_id, :request_id, :service, t.hostname, t.agent_id,
                        'pending', clock_timestamp() + :ttl * interval '1 second'
                    FROM unnest(CAST(:command_ids AS uuid[]), CAST(:hostnames AS text[]),
                                CAST(:agent_ids AS text[]))
                        WITH ORDINALITY AS t(command_id, hostname, agent_id, ord)
                    ORDER BY t.ord
                    RETURNING {_TARGET_COLUMNS}
                    """
                ),
                {
                    "request_id": request_id,
                    "service": request.service_name,
                    "ttl": request.ttl_seconds,
                    "command_ids": [new_id() for _ in targets],
                    "hostnames": [host for host, _ in targets],
                    "agent_ids": [agent for _, agent in targets],
                },
            )
            created = tuple(_target(row) for row in rows)
            await self._notify(conn, f"r:{request_id}")
        return SubmitResult(request_id=request_id, targets=created, deduplicated=False)

    async def _find_by_key(
        self, conn: AsyncConnection, key: str, digest: str
    ) -> SubmitResult | None:
        row = (
            await conn.execute(
                text(
                    "SELECT request_id, fingerprint FROM profile_requests "
                    "WHERE idempotency_key = :key"
                ),
                {"key": key},
            )
        ).first()
        if row is None:
            return None
        if row.fingerprint != digest:
            raise FailedPrecondition(
                "idempotency_key was already used for a request with different parameters"
            )
        targets = await self._targets(conn, row.request_id)
        return SubmitResult(request_id=row.request_id, targets=targets, deduplicated=True)

    async def _resolve_targets(
        self, conn: AsyncConnection, request: SubmitRequest
    ) -> list[tuple[str, str | None]]:
        """(hostname, agent_id) pairs. Named hosts stay unbound until an agent there takes them."""
        if request.hostnames:
            chosen: list[tuple[str, str | None]] = [(host, None) for host in request.hostnames]
        else:
            rows = await conn.execute(
                text(
                    f"SELECT a.agent_id, a.hostname FROM agents a "
                    f"WHERE a.service_name = :service AND {self._online()} ORDER BY a.agent_id"
                ),
                {"service": request.service_name},
            )
            chosen = [(row.hostname, row.agent_id) for row in rows]
            if not chosen:
                raise FailedPrecondition(
                    f"no online agent of service {request.service_name!r}; name hostnames to "
                    "queue a request for agents that have not connected yet"
                )
        if 0 < request.max_hosts < len(chosen):
            chosen = random.sample(chosen, request.max_hosts)
        return chosen

    async def _targets(self, conn: AsyncConnection, request_id: uuid.UUID) -> tuple[Target, ...]:
        rows = await conn.execute(
            text(
                f"SELECT {_TARGET_COLUMNS} FROM commands WHERE request_id = :id "
                "ORDER BY hostname, seq"
            ),
            {"id": request_id},
        )
        return tuple(_target(row) for row in rows)

    @database_errors
    async def get_request(self, request_id: uuid.UUID) -> RequestView:
        async with self.engine.connect() as conn:
            return await self._get_request(conn, request_id)

    async def _get_request(self, conn: AsyncConnection, request_id: uuid.UUID) -> RequestView:
        row = (
            await conn.execute(
                text(f"{_REQUEST_WITH_COUNTS} WHERE r.request_id = :id"), {"id": request_id}
            )
        ).first()
        if row is None:
            raise NotFound(f"profile request {request_id} not found")
        return _request_view(row, await self._targets(conn, request_id))

    @database_errors
    async def list_requests(
        self,
        *,
        service_name: str | None,
        state: lifecycle.RequestState | None,
        page_size: int,
        page_token: str,
        scan_limit: int = 5000,
    ) -> Page:
        """Newest first. The state is derived, so rows are filtered here; one call scans at most
        `scan_limit` requests and may return a short page with a token to continue."""
        after = decode_page_token(page_token) if page_token else None
        found: list[RequestView] = []
        scanned = 0
        last: tuple[datetime, uuid.UUID] | None = None
        async with self.engine.connect() as conn:
            while len(found) < page_size and scanned < scan_limit:
                batch = page_size if state is None else max(page_size * 4, 200)
                conditions = ["(CAST(:service AS text) IS NULL OR r.service_name = :service)"]
                if after is not None:
                    conditions.append("(r.created_at, r.request_id) < (:after_ts, :after_id)")
                rows = (
                    await conn.execute(
                        text(
                            f"{_REQUEST_WITH_COUNTS} WHERE {' AND '.join(conditions)} "
                            "ORDER BY r.created_at DESC, r.request_id DESC LIMIT :n"
                        ),
                        {
                            "service": service_name,
                            "after_ts": after[0] if after else None,
                            "after_id": after[1] if after else None,
                            "n": batch,
                        },
                    )
                ).all()
                for row in rows:
                    scanned += 1
                    last = (row.created_at, row.request_id)
                    view = _request_view(row)
                    if state is None or view.state == state:
                        found.append(view)
                        if len(found) == page_size:
                            break
                if len(rows) < batch and len(found) < page_size:
                    return Page(tuple(found), "")
                after = last
        return Page(tuple(found), encode_page_token(*last) if last else "")

    @database_errors
    async def cancel_request(self, request_id: uuid.UUID) -> RequestView:
        """Queued targets become cancelled; running ones get a stop. A request whose targets
        have all finished keeps its outcome: cancelling it changes nothing."""
        async with self.engine.begin() as conn:
            found = await conn.execute(
                text("SELECT 1 FROM profile_requests WHERE request_id = :id FOR UPDATE"),
                {"id": request_id},
            )
            if found.first() is None:
                raise NotFound(f"profile request {request_id} not found")
            await conn.execute(
                text(
                    "UPDATE profile_requests SET cancelled_at = coalesce(cancelled_at, now()) "
                    "WHERE request_id = :id AND EXISTS (SELECT 1 FROM commands "
                    "WHERE request_id = :id AND NOT state = ANY(:terminal))"
                ),
                {"id": request_id, "terminal": _states(lifecycle.TERMINAL)},
            )
            _, stopping = await self._cancel_commands(
                conn, "request_id = :id", {"id": request_id}, "cancelled by operator"
            )
            if stopping:
                await self._notify(conn, f"r:{request_id}")
            return await self._get_request(conn, request_id)

    @database_errors
    async def stop_profiling(self, service_name: str, hostnames: Sequence[str]) -> StopResult:
        """Cancel every queued and running command of a service, or of some of its hosts."""
        condition = "service_name = :service"
        params: dict[str, Any] = {"service": service_name}
        if hostnames:
            condition += " AND hostname = ANY(:hosts)"
            params["hosts"] = list(hostnames)
        async with self.engine.begin() as conn:
            cancelled, stopping = await self._cancel_commands(
                conn, condition, params, "stopped by operator (host-level stop)"
            )
            if stopping:
                await self._notify(conn, f"v:{service_name}")
        return StopResult(cancelled=cancelled, stopping=stopping)

    async def _cancel_commands(
        self, conn: AsyncConnection, condition: str, params: dict[str, Any], reason: str
    ) -> tuple[int, int]:
        cancelled = await conn.execute(
            text(
                f"UPDATE commands SET state = 'cancelled', finished_at = now(), "
                f"error_message = :reason WHERE {condition} AND state = ANY(:from)"
            ),
            {**params, "reason": reason, "from": _states(lifecycle.sources(Event.CANCEL))},
        )
        stopping = await conn.execute(
            text(
                f"UPDATE commands SET stop_requested = true, error_message = :reason "
                f"WHERE {condition} AND state = 'running' AND NOT stop_requested"
            ),
            {**params, "reason": reason},
        )
        return cancelled.rowcount, stopping.rowcount

    @database_errors
    async def list_agents(self, *, service_name: str | None, online_only: bool) -> list[AgentView]:
        conditions = ["(CAST(:service AS text) IS NULL OR a.service_name = :service)"]
        if online_only:
            conditions.append(self._online())
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                text(
                    f"""
                    SELECT a.*, {self._online()} AS online,
                        ARRAY(SELECT c.command_id FROM commands c
                              WHERE c.agent_id = a.agent_id AND c.state IN ('sent', 'running')
                              ORDER BY c.seq) AS busy
                    FROM agents a WHERE {" AND ".join(conditions)}
                    ORDER BY a.service_name, a.hostname, a.agent_id
                    """
                ),
                {"service": service_name},
            )
            return [
                AgentView(
                    agent_id=row.agent_id,
                    hostname=row.hostname,
                    ip_address=row.ip_address,
                    service_name=row.service_name,
                    labels=dict(row.labels),
                    agent_version=row.agent_version,
                    supported_modes=tuple(ProfilingMode(m) for m in row.supported_modes),
                    online=row.online,
                    last_seen_at=row.last_seen_at,
                    connected_at=row.connected_at,
                    server_id=row.server_id if row.session_id else None,
                    running_command_ids=tuple(row.busy),
                )
                for row in rows
            ]

    # --- agent sessions -------------------------------------------------------------------------

    @database_errors
    async def open_session(
        self, hello: Hello, session_id: uuid.UUID, server_id: str, interval: timedelta
    ) -> list[uuid.UUID]:
        """Make this session the agent's one live session.

        Commands sent on earlier sessions and never acknowledged go back to pending (they will be
        re-sent with the same id); stops not yet confirmed will be sent again. Returns the commands
        the agent says it runs that were cancelled meanwhile (the caller stops them).
        """
        async with self.engine.begin() as conn:
            await conn.execute(
                text(
                    """
                    INSERT INTO agents (agent_id, service_name, hostname, ip_address, labels,
                        agent_version, supported_modes, session_id, server_id,
                        heartbeat_interval_ms, connected_at, last_seen_at)
                    VALUES (:agent, :service, :hostname, :ip, CAST(:labels AS jsonb), :version,
                        :modes, :session, :server, :interval_ms, now(), now())
                    ON CONFLICT (agent_id) DO UPDATE SET
                        service_name = EXCLUDED.service_name, hostname = EXCLUDED.hostname,
                        ip_address = EXCLUDED.ip_address, labels = EXCLUDED.labels,
                        agent_version = EXCLUDED.agent_version,
                        supported_modes = EXCLUDED.supported_modes,
                        session_id = EXCLUDED.session_id, server_id = EXCLUDED.server_id,
                        heartbeat_interval_ms = EXCLUDED.heartbeat_interval_ms,
                        connected_at = now(), last_seen_at = now(), disconnected_at = NULL
                    """
                ),
                {
                    "agent": hello.agent_id,
                    "service": hello.service_name,
                    "hostname": hello.hostname,
                    "ip": hello.ip_address,
                    "labels": json.dumps(hello.labels),
                    "version": hello.agent_version,
                    "modes": [m.value for m in hello.supported_modes],
                    "session": session_id,
                    "server": server_id,
                    "interval_ms": int(interval.total_seconds() * 1000),
                },
            )
            await conn.execute(
                text(
                    "UPDATE commands SET state = 'pending', session_id = NULL "
                    "WHERE agent_id = :agent AND state = ANY(:from)"
                ),
                {"agent": hello.agent_id, "from": _states(lifecycle.sources(Event.STREAM_LOST))},
            )
            await conn.execute(
                text(
                    "UPDATE commands SET stop_sent_at = NULL WHERE agent_id = :agent "
                    "AND state = 'running' AND stop_requested"
                ),
                {"agent": hello.agent_id},
            )
            running = [_uuid_or_none(i) for i in hello.running_command_ids]
            cancelled = await conn.execute(
                text(
                    "SELECT command_id FROM commands WHERE command_id = ANY(:ids) "
                    "AND agent_id = :agent AND state = 'cancelled'"
                ),
                {"ids": [i for i in running if i], "agent": hello.agent_id},
            )
            stops = [row.command_id for row in cancelled]
            await self._notify(conn, f"s:{hello.agent_id}:{session_id}")
        return stops

    @database_errors
    async def close_session(
        self, agent_id: str, session_id: uuid.UUID, last_seen: datetime | None
    ) -> None:
        """The stream ended: the agent is offline and what it never acknowledged is queued again."""
        async with self.engine.begin() as conn:
            await conn.execute(
                text(
                    "UPDATE agents SET session_id = NULL, server_id = NULL,"
                    " disconnected_at = now(), last_seen_at = greatest(last_seen_at, :seen) "
                    "WHERE agent_id = :agent AND session_id = :session"
                ),
                {"agent": agent_id, "session": session_id, "seen": last_seen},
            )
            requeued = await conn.execute(
                text(
                    "UPDATE commands SET state = 'pending', session_id = NULL "
                    "WHERE agent_id = :agent AND session_id = :session AND state = ANY(:from)"
                ),
                {
                    "agent": agent_id,
                    "session": session_id,
                    "from": _states(lifecycle.sources(Event.STREAM_LOST)),
                },
            )
            if requeued.rowcount:
                await self._notify(conn, f"a:{agent_id}")

    @database_errors
    async def claim(
        self, agent_id: str, session_id: uuid.UUID, service_name: str, hostname: str, limit: int = 1
    ) -> tuple[list[CommandToSend], list[uuid.UUID]]:
        """Claim what this session must write now: stops to deliver, and the agent's next
        commands (oldest first) when it has none sent or running.

        Locking the agent's row serialises claims for one agent across servers; the claim itself
        is the one-statement MATERIALIZED ... FOR UPDATE SKIP LOCKED pattern, which never takes more
        than `limit` rows.
        """
        async with self.engine.begin() as conn:
            owner = await conn.execute(
                text(
                    "SELECT 1 FROM agents WHERE agent_id = :agent AND session_id = :session "
                    "FOR UPDATE"
                ),
                {"agent": agent_id, "session": session_id},
            )
            if owner.first() is None:
                return [], []  # superseded: a newer session owns the agent
            stops = await conn.execute(
                text(
                    "UPDATE commands SET stop_sent_at = now() WHERE agent_id = :agent "
                    "AND state = 'running' AND stop_requested AND stop_sent_at IS NULL "
                    "RETURNING command_id"
                ),
                {"agent": agent_id},
            )
            stop_ids = [row.command_id for row in stops]
            rows = await conn.execute(
                text(
                    """
                    WITH c AS MATERIALIZED (
                        SELECT command_id FROM commands
                        WHERE state = 'pending' AND expires_at > now()
                          AND (agent_id = :agent
                               OR (agent_id IS NULL AND service_name = :service
                                   AND hostname = :hostname))
                          AND NOT EXISTS (SELECT 1 FROM commands b WHERE b.agent_id = :agent
                                          AND b.state IN ('sent', 'running'))
                        ORDER BY seq
                        LIMIT :limit
                        FOR UPDATE SKIP LOCKED
                    )
                    UPDATE commands m SET state = 'sent', agent_id = :agent,
                        session_id = :session, sent_at = now(), attempts = m.attempts + 1
                    FROM c, profile_requests r
                    WHERE m.command_id = c.command_id AND r.request_id = m.request_id
                    RETURNING m.command_id, m.request_id, m.expires_at, r.duration_seconds,
                        r.frequency_hz, r.profiling_mode, r.pids, r.additional_args, r.continuous
                    """
                ),
                {
                    "agent": agent_id,
                    "session": session_id,
                    "service": service_name,
                    "hostname": hostname,
                    "limit": limit,
                },
            )
            commands = [
                CommandToSend(
                    command_id=row.command_id,
                    request_id=row.request_id,
                    spec=_spec(row),
                    expires_at=row.expires_at,
                )
                for row in rows
            ]
        return commands, stop_ids

    @database_errors
    async def record_ack(
        self, agent_id: str, command_id: uuid.UUID, accepted: bool, reason: str
    ) -> AckOutcome:
        """sent -> running (accepted) or rejected. A repeat, or an ack for a command that moved on
        meanwhile, changes nothing; an accepted ack of a cancelled command asks for a stop."""
        async with self.engine.begin() as conn:
            if accepted:
                moved = await conn.execute(
                    text(
                        """
                        UPDATE commands m SET state = 'running', started_at = now(),
                            deadline_at = CASE WHEN r.continuous THEN NULL
                                ELSE now() + (r.duration_seconds + :grace) * interval '1 second'
                            END
                        FROM profile_requests r
                        WHERE m.command_id = :id AND m.agent_id = :agent
                          AND m.state = ANY(:from) AND r.request_id = m.request_id
                        RETURNING m.state
                        """
                    ),
                    {
                        "id": command_id,
                        "agent": agent_id,
                        "grace": self.completion_grace.total_seconds(),
                        "from": _states(lifecycle.sources(Event.ACK_ACCEPTED)),
                    },
                )
            else:
                moved = await conn.execute(
                    text(
                        "UPDATE commands SET state = 'rejected', finished_at = now(), "
                        "error_message = :reason WHERE command_id = :id AND agent_id = :agent "
                        "AND state = ANY(:from) RETURNING state"
                    ),
                    {
                        "id": command_id,
                        "agent": agent_id,
                        "reason": reason or "rejected by agent",
                        "from": _states(lifecycle.sources(Event.ACK_REJECTED)),
                    },
                )
            row = moved.first()
            if row is not None:
                return AckOutcome(state=CommandState(row.state))
            current = await self._command_owner(conn, command_id, agent_id)
            stop = accepted and current == CommandState.CANCELLED
            return AckOutcome(state=current, stop=stop)

    async def _command_owner(
        self, conn: AsyncConnection, command_id: uuid.UUID, agent_id: str
    ) -> CommandState:
        row = (
            await conn.execute(
                text("SELECT state, agent_id FROM commands WHERE command_id = :id"),
                {"id": command_id},
            )
        ).first()
        if row is None:
            raise NotFound(f"command {command_id} not found")
        if row.agent_id != agent_id:
            raise PermissionDenied(f"command {command_id} does not belong to agent {agent_id}")
        return CommandState(row.state)

    @database_errors
    async def record_completion(self, completion: Completion) -> CommandState:
        """Record the agent's outcome once; a repeat returns the state recorded first."""
        event = lifecycle.completion_event(completion.outcome.value)
        async with self.engine.begin() as conn:
            moved = await conn.execute(
                text(
                    """
                    UPDATE commands SET state = :to, finished_at = now(),
                        started_at = coalesce(started_at, :started),
                        error_message = CASE WHEN :error <> '' THEN :error ELSE error_message END,
                        result_location = :location, result_samples = :samples,
                        result_bytes = :bytes
                    WHERE command_id = :id AND agent_id = :agent AND state = ANY(:from)
                      AND (state <> 'pending' OR attempts > 0)
                    RETURNING state
                    """
                ),
                {
                    "to": lifecycle.target(event).value,
                    "started": completion.started_at,
                    "error": completion.error_message,
                    "location": completion.result_location,
                    "samples": completion.result_samples,
                    "bytes": completion.result_bytes,
                    "id": completion.command_id,
                    "agent": completion.agent_id,
                    "from": _states(lifecycle.sources(event)),
                },
            )
            row = moved.first()
            if row is not None:
                await self._notify(conn, f"a:{completion.agent_id}")
                return CommandState(row.state)
            current = await self._command_owner(conn, completion.command_id, completion.agent_id)
            if current == CommandState.PENDING:
                raise FailedPrecondition(
                    f"command {completion.command_id} was never delivered to this agent"
                )
            return current

    @database_errors
    async def flush_heartbeats(self, seen: Sequence[tuple[str, uuid.UUID, datetime]]) -> int:
        """Write many agents' last-seen times in one statement."""
        if not seen:
            return 0
        async with self.engine.begin() as conn:
            result = await conn.execute(
                text(
                    """
                    UPDATE agents a SET last_seen_at = v.seen
                    FROM unnest(CAST(:agents AS text[]), CAST(:sessions AS uuid[]),
                                CAST(:seen AS timestamptz[])) AS v(agent_id, session_id, seen)
                    WHERE a.agent_id = v.agent_id AND a.session_id = v.session_id
                      AND a.last_seen_at < v.seen
                    """
                ),
                {
                    "agents": [s[0] for s in seen],
                    "sessions": [s[1] for s in seen],
                    "seen": [s[2] for s in seen],
                },
            )
            return result.rowcount

    # --- sweeps ---------------------------------------------------------------------------------

    @database_errors
    async def expire_due(self, limit: int = 5000) -> int:
        """Pending commands never delivered whose TTL passed become expired: they never run late.
        (One delivered before may be running on its agent: it times out instead.)"""
        return await self._sweep(
            Event.EXPIRE,
            "expires_at <= now() AND attempts = 0",
            "not delivered to an agent within ttl_seconds",
            limit,
        )

    @database_errors
    async def time_out_due(self, limit: int = 5000) -> int:
        """Running commands with no completion by start + duration + grace become timed out;
        continuous ones when their agent has been offline for longer than the grace. So do
        commands delivered, sent back to pending (stream lost before the ack) and past their TTL,
        with no completion by the last send + duration + grace."""
        return await self._sweep(
            Event.TIME_OUT,
            f"""((state = 'running' AND (deadline_at <= now() OR (deadline_at IS NULL AND EXISTS (
                    SELECT 1 FROM agents a WHERE a.agent_id = commands.agent_id
                    AND NOT {self._online()}
                    AND coalesce(a.last_seen_at, a.connected_at)
                        < now() - :grace * interval '1 second'))))
                OR (state = 'pending' AND attempts > 0 AND expires_at <= now() AND EXISTS (
                    SELECT 1 FROM profile_requests r WHERE r.request_id = commands.request_id
                    AND commands.sent_at + (r.duration_seconds + :grace) * interval '1 second'
                        <= now())))""",
            "no completion from the agent by start + duration + grace",
            limit,
            {"grace": self.completion_grace.total_seconds()},
        )

    @database_errors
    async def requeue_unacknowledged(self, ack_timeout: timedelta, limit: int = 5000) -> int:
        """Commands sent longer than `ack_timeout` ago and never acknowledged are queued again."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                text(
                    """
                    WITH c AS MATERIALIZED (
                        SELECT command_id FROM commands
                        WHERE state = 'sent' AND sent_at < now() - :timeout * interval '1 second'
                        LIMIT :limit FOR UPDATE SKIP LOCKED)
                    UPDATE commands m SET state = 'pending', session_id = NULL
                    FROM c WHERE m.command_id = c.command_id
                    """
                ),
                {"timeout": ack_timeout.total_seconds(), "limit": limit},
            )
            if result.rowcount:
                await self._notify(conn, "*")
            return result.rowcount

    async def _sweep(
        self,
        event: Event,
        condition: str,
        reason: str,
        limit: int,
        params: dict[str, Any] | None = None,
    ) -> int:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                text(
                    f"""
                    WITH c AS MATERIALIZED (
                        SELECT command_id FROM commands
                        WHERE state = ANY(:from) AND {condition}
                        LIMIT :limit FOR UPDATE SKIP LOCKED)
                    UPDATE commands m SET state = :to, finished_at = now(),
                        error_message = CASE WHEN m.error_message = '' THEN :reason
                            ELSE m.error_message || '; ' || :reason END
                    FROM c WHERE m.command_id = c.command_id
                    """
                ),
                {
                    **(params or {}),
                    "from": _states(lifecycle.sources(event)),
                    "to": lifecycle.target(event).value,
                    "reason": reason,
                    "limit": limit,
                },
            )
            return result.rowcount

    @database_errors
    async def agents_with_work(
        self, request_id: uuid.UUID | None = None
    ) -> tuple[set[str], set[tuple[str, str]]]:
        """Who has something to receive: agent ids, and (service, hostname) of unbound targets.

        With a request id, only that request's targets (the NOTIFY path); without, everything
        (the periodic sweep that covers lost notifications)."""
        scope = "AND request_id = :request" if request_id else ""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                text(
                    f"""
                    SELECT DISTINCT agent_id, service_name, hostname FROM commands
                    WHERE ((state = 'pending' AND expires_at > now())
                           OR (state = 'running' AND stop_requested AND stop_sent_at IS NULL))
                    {scope}
                    """
                ),
                {"request": request_id},
            )
            agents: set[str] = set()
            hosts: set[tuple[str, str]] = set()
            for row in rows:
                if row.agent_id is None:
                    hosts.add((row.service_name, row.hostname))
                else:
                    agents.add(row.agent_id)
            return agents, hosts


def _uuid_or_none(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None

"""The store: every SQL statement of Pulse, behind methods that speak domain terms.

Each state change is one statement guarded by the states the lifecycle allows it from, so two
servers racing (or one message arriving twice) cannot skip a rule. Wake-ups are one NOTIFY on
channel `pulse_events`, sent from the same transaction as the change they announce:

- `r:<request_id>`: targets of this request need dispatch (new, or a stop to deliver);
- `t:<service>|<agent_id>,...|<hostname>,...`: the same for a small new request, naming its
  targets so that listeners need no query to find them;
- `a:<agent_id>,...`: these agents may be free for their next command;
- `v:<service_name>`: stops to deliver to agents of this service;
- `s:<agent_id>:<session_id>,...`: these sessions now own their agents; older ones must close.
"""

from __future__ import annotations

import base64
import collections
import functools
import hashlib
import json
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import event, text
from sqlalchemy.engine import Row
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from server import lifecycle
from server.domain import (
    Ack,
    AckOutcome,
    AgentView,
    AuditEvent,
    Candidate,
    ClaimFor,
    CommandToSend,
    Completion,
    CompletionResult,
    FailedPrecondition,
    Hello,
    InvalidArgument,
    NotFound,
    Page,
    PermissionDenied,
    ProfilingMode,
    ProfilingSpec,
    PulseError,
    RequestView,
    SessionClose,
    SessionOpen,
    StopResult,
    SubmitRequest,
    SubmitResult,
    Target,
    Unavailable,
    new_id,
)
from server.lifecycle import CommandState, Event

CHANNEL = "pulse_events"
SYSTEM_ACTOR = "system"
# Batched agent statements change many agents' commands at once: the audit triggers attribute
# each row to its own agent (`agent:<agent_id>`) when the transaction's actor is this marker.
AGENTS_ACTOR = "agents"
log = logging.getLogger(__name__)
_S = CommandState
_P = ParamSpec("_P")
_T = TypeVar("_T")
_TRANSIENT_SQLSTATES = {"40001", "40P01"}  # serialization failure, deadlock


def _states(states: Iterable[CommandState]) -> list[str]:
    return sorted(s.value for s in states)


# Database errors seen by this process, by kind ("unavailable", "retried", "other"); the metrics
# endpoint exports them.
DATABASE_ERRORS: collections.Counter[str] = collections.Counter()


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
                    DATABASE_ERRORS["retried"] += 1
                    continue
                if (
                    isinstance(exc, OperationalError | InterfaceError)
                    or exc.connection_invalidated
                    or (sqlstate or "").startswith(("08", "57"))
                ):
                    DATABASE_ERRORS["unavailable"] += 1
                    raise Unavailable(f"database unavailable: {type(exc.orig).__name__}") from exc
                DATABASE_ERRORS["other"] += 1
                raise
            except (PoolTimeout, OSError) as exc:
                DATABASE_ERRORS["unavailable"] += 1
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
        max_targets_per_request: int = 0,
        max_concurrent_per_service: int = 0,
    ) -> None:
        self.engine = engine
        self.liveness_intervals = liveness_intervals
        self.completion_grace = completion_grace
        # 0 = no limit.
        self.max_targets_per_request = max_targets_per_request
        self.max_concurrent_per_service = max_concurrent_per_service
        self.statements = 0  # SQL statements sent, for the benchmark and stats
        event.listen(engine.sync_engine, "before_cursor_execute", self._count_statement)

    def _count_statement(self, *_: object) -> None:
        self.statements += 1

    # --- helpers --------------------------------------------------------------------------------

    def _online(self, alias: str = "a") -> str:
        """SQL condition: the agent holds a stream and its heartbeats are recent enough."""
        return (
            f"({alias}.session_id IS NOT NULL AND {alias}.last_seen_at > now() - "
            f"{alias}.heartbeat_interval_ms * {int(self.liveness_intervals)} * interval '1 ms')"
        )

    @staticmethod
    async def _act_as(conn: AsyncConnection, actor: str) -> None:
        """Name who causes this transaction's changes: the audit triggers record it
        (transaction-local, so a pooled connection never carries it over)."""
        await conn.execute(text("SELECT set_config('pulse.actor', :actor, true)"), {"actor": actor})

    @staticmethod
    async def _notify(conn: AsyncConnection, payload: str) -> None:
        await conn.execute(text("SELECT pg_notify(:ch, :p)"), {"ch": CHANNEL, "p": payload})

    @database_errors
    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    # --- operators --------------------------------------------------------------------------------

    @database_errors
    async def submit(self, request: SubmitRequest, actor: str = SYSTEM_ACTOR) -> SubmitResult:
        """Store a request and one command per resolved target; wake the servers holding them."""
        digest = fingerprint(request)
        async with self.engine.begin() as conn:
            await self._act_as(conn, actor)
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
            await self._notify(conn, _targets_payload(request_id, request.service_name, created))
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
        cap = self.max_targets_per_request
        if cap and len(chosen) > cap:
            field_name = "hostnames" if request.hostnames else "max_hosts"
            raise InvalidArgument(
                field_name,
                f"the request resolves to {len(chosen)} targets, more than the limit of {cap} "
                "per request (name fewer hosts or set max_hosts)",
            )
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
        row = await self._request_row(conn, request_id)
        return _request_view(row, await self._targets(conn, request_id))

    @staticmethod
    async def _request_row(conn: AsyncConnection, request_id: uuid.UUID) -> Row[Any]:
        row = (
            await conn.execute(
                text(f"{_REQUEST_WITH_COUNTS} WHERE r.request_id = :id"), {"id": request_id}
            )
        ).first()
        if row is None:
            raise NotFound(f"profile request {request_id} not found")
        return row

    @database_errors
    async def request_summary(self, request_id: uuid.UUID) -> RequestView:
        """The request with its state and counts, without its targets (cheap enough to poll)."""
        async with self.engine.connect() as conn:
            return _request_view(await self._request_row(conn, request_id))

    @database_errors
    async def preview_targets(self, request: SubmitRequest) -> list[Candidate]:
        """What `submit` would target, creating nothing: every online agent of the service, or
        for each named host the agents known there (one entry with no agent when none is)."""
        async with self.engine.connect() as conn:
            if not request.hostnames:
                rows = await conn.execute(
                    text(
                        f"SELECT a.agent_id, a.hostname, a.supported_modes, true AS online "
                        f"FROM agents a WHERE a.service_name = :service AND {self._online()} "
                        f"ORDER BY a.hostname, a.agent_id"
                    ),
                    {"service": request.service_name},
                )
                found = [_candidate(row) for row in rows]
                if not found:
                    raise FailedPrecondition(
                        f"no online agent of service {request.service_name!r}; name hostnames to "
                        "queue a request for agents that have not connected yet"
                    )
                return found
            rows = await conn.execute(
                text(
                    f"SELECT a.agent_id, a.hostname, a.supported_modes, {self._online()} AS online "
                    f"FROM agents a WHERE a.service_name = :service AND a.hostname = ANY(:hosts) "
                    f"ORDER BY a.hostname, a.agent_id"
                ),
                {"service": request.service_name, "hosts": list(request.hostnames)},
            )
            by_host: dict[str, list[Candidate]] = {}
            for row in rows:
                by_host.setdefault(row.hostname, []).append(_candidate(row))
        return [
            candidate
            for host in request.hostnames
            for candidate in by_host.get(host) or [Candidate(host, None, False, ())]
        ]

    @database_errors
    async def command_counts(self) -> dict[CommandState, int]:
        """How many commands are in each state, over the whole database (for metrics)."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(text("SELECT state, count(*) AS n FROM commands GROUP BY 1"))
            counts = {state: 0 for state in CommandState}
            for row in rows:
                counts[CommandState(row.state)] = row.n
            return counts

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
    async def cancel_request(self, request_id: uuid.UUID, actor: str = SYSTEM_ACTOR) -> RequestView:
        """Queued targets become cancelled; running ones get a stop. A request whose targets
        have all finished keeps its outcome: cancelling it changes nothing."""
        async with self.engine.begin() as conn:
            await self._act_as(conn, actor)
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
    async def stop_profiling(
        self, service_name: str, hostnames: Sequence[str], actor: str = SYSTEM_ACTOR
    ) -> StopResult:
        """Cancel every queued and running command of a service, or of some of its hosts."""
        condition = "service_name = :service"
        params: dict[str, Any] = {"service": service_name}
        if hostnames:
            condition += " AND hostname = ANY(:hosts)"
            params["hosts"] = list(hostnames)
        async with self.engine.begin() as conn:
            await self._act_as(conn, actor)
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
                f"error_message = :reason WHERE {condition} AND state = ANY(:from) "
                f"RETURNING {_MOVED}"
            ),
            {**params, "reason": reason, "from": _states(lifecycle.sources(Event.CANCEL))},
        )
        cancelled_rows = cancelled.all()
        _log_moved(cancelled_rows, CommandState.CANCELLED, reason)
        stopping = await conn.execute(
            text(
                f"UPDATE commands SET stop_requested = true, error_message = :reason "
                f"WHERE {condition} AND state = 'running' AND NOT stop_requested"
            ),
            {**params, "reason": reason},
        )
        return len(cancelled_rows), stopping.rowcount

    @database_errors
    async def request_history(self, request_id: uuid.UUID) -> list[AuditEvent]:
        """The audit trail of one request and its commands, oldest first."""
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    text("SELECT * FROM audit_events WHERE request_id = :id ORDER BY event_id"),
                    {"id": request_id},
                )
            ).all()
            if not rows:
                exists = await conn.scalar(
                    text("SELECT 1 FROM profile_requests WHERE request_id = :id"),
                    {"id": request_id},
                )
                if not exists:
                    raise NotFound(f"profile request {request_id} not found")
        return [
            AuditEvent(
                event_id=row.event_id,
                occurred_at=row.occurred_at,
                actor=row.actor,
                request_id=row.request_id,
                command_id=row.command_id,
                hostname=row.hostname,
                agent_id=row.agent_id,
                action=row.action,
                from_state=row.from_state,
                to_state=row.to_state,
                detail=row.detail,
            )
            for row in rows
        ]

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

    async def open_session(
        self, hello: Hello, session_id: uuid.UUID, server_id: str, interval: timedelta
    ) -> list[uuid.UUID]:
        """`open_sessions` for one session."""
        (stops,) = await self.open_sessions([SessionOpen(hello, session_id, interval)], server_id)
        return stops

    @database_errors
    async def open_sessions(
        self, opens: Sequence[SessionOpen], server_id: str
    ) -> list[list[uuid.UUID]]:
        """Make each session its agent's one live session, for many sessions in one transaction.

        Commands sent on earlier sessions and never acknowledged go back to pending (they will be
        re-sent with the same id); stops not yet confirmed will be sent again. Returns, per
        session, the commands its agent says it runs that were cancelled meanwhile (the caller
        stops them). Servers holding an older session of an agent are told with one NOTIFY.
        """
        results: list[list[uuid.UUID]] = [[] for _ in opens]
        async with self.engine.begin() as conn:
            await self._act_as(conn, AGENTS_ACTOR)
            for round_ in _rounds_of_distinct_agents(opens):
                await self._open_round(conn, [opens[i] for i in round_], server_id)
            running = {
                (o.hello.agent_id, command_id): i
                for i, o in enumerate(opens)
                for command_id in map(_uuid_or_none, o.hello.running_command_ids)
                if command_id
            }
            if running:
                cancelled = await conn.execute(
                    text(
                        "SELECT agent_id, command_id FROM commands WHERE command_id = ANY(:ids) "
                        "AND state = 'cancelled'"
                    ),
                    {"ids": [command_id for _, command_id in running]},
                )
                for row in cancelled:
                    index = running.get((row.agent_id, row.command_id))
                    if index is not None:
                        results[index].append(row.command_id)
        return results

    async def _open_round(
        self, conn: AsyncConnection, opens: Sequence[SessionOpen], server_id: str
    ) -> None:
        agents = [o.hello.agent_id for o in opens]
        previous = await conn.execute(
            text(
                "SELECT agent_id, session_id FROM agents WHERE agent_id = ANY(:agents) "
                "ORDER BY agent_id FOR UPDATE"
            ),
            {"agents": agents},
        )
        replaced = {row.agent_id for row in previous if row.session_id is not None}
        await conn.execute(
            text(
                """
                INSERT INTO agents (agent_id, service_name, hostname, ip_address, labels,
                    agent_version, supported_modes, session_id, server_id,
                    heartbeat_interval_ms, connected_at, last_seen_at)
                SELECT v.agent_id, v.service_name, v.hostname, v.ip, CAST(v.labels AS jsonb),
                    v.version, string_to_array(v.modes, ','), v.session_id, :server,
                    v.interval_ms, now(), now()
                FROM unnest(CAST(:agents AS text[]), CAST(:services AS text[]),
                            CAST(:hostnames AS text[]), CAST(:ips AS text[]),
                            CAST(:labels AS text[]), CAST(:versions AS text[]),
                            CAST(:modes AS text[]), CAST(:sessions AS uuid[]),
                            CAST(:intervals AS integer[]))
                    AS v(agent_id, service_name, hostname, ip, labels, version, modes,
                         session_id, interval_ms)
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
                "agents": agents,
                "services": [o.hello.service_name for o in opens],
                "hostnames": [o.hello.hostname for o in opens],
                "ips": [o.hello.ip_address for o in opens],
                "labels": [json.dumps(o.hello.labels) for o in opens],
                "versions": [o.hello.agent_version for o in opens],
                "modes": [",".join(m.value for m in o.hello.supported_modes) for o in opens],
                "sessions": [o.session_id for o in opens],
                "intervals": [int(o.interval.total_seconds() * 1000) for o in opens],
                "server": server_id,
            },
        )
        # One statement: unacknowledged sends go back to pending, unconfirmed stops are re-sent.
        await conn.execute(
            text(
                """
                UPDATE commands SET
                    state = CASE WHEN state = ANY(:lost) THEN 'pending' ELSE state END,
                    session_id = CASE WHEN state = ANY(:lost) THEN NULL ELSE session_id END,
                    stop_sent_at = CASE WHEN state = 'running' THEN NULL ELSE stop_sent_at END
                WHERE agent_id = ANY(:agents)
                  AND (state = ANY(:lost) OR (state = 'running' AND stop_requested))
                """
            ),
            {"agents": agents, "lost": _states(lifecycle.sources(Event.STREAM_LOST))},
        )
        takeovers = [
            f"{o.hello.agent_id}:{o.session_id}" for o in opens if o.hello.agent_id in replaced
        ]
        for payload in _chunked_payloads("s", takeovers):
            await self._notify(conn, payload)

    @database_errors
    async def session_owner(self, agent_id: str) -> uuid.UUID | None:
        """The session that holds the agent now (None: offline or unknown)."""
        async with self.engine.connect() as conn:
            owner: uuid.UUID | None = await conn.scalar(
                text("SELECT session_id FROM agents WHERE agent_id = :agent"), {"agent": agent_id}
            )
            return owner

    async def close_session(
        self, agent_id: str, session_id: uuid.UUID, last_seen: datetime | None
    ) -> None:
        """`close_sessions` for one session."""
        await self.close_sessions([SessionClose(agent_id, session_id, last_seen)])

    @database_errors
    async def close_sessions(self, closes: Sequence[SessionClose]) -> list[None]:
        """Streams ended: their agents are offline (unless a newer session took over) and what
        they never acknowledged is queued again, for many sessions in one transaction."""
        params = {
            "agents": [c.agent_id for c in closes],
            "sessions": [c.session_id for c in closes],
            "seen": [c.last_seen for c in closes],
            "from": _states(lifecycle.sources(Event.STREAM_LOST)),
        }
        async with self.engine.begin() as conn:
            await self._act_as(conn, AGENTS_ACTOR)
            await conn.execute(
                text(
                    """
                    WITH v AS (
                        SELECT * FROM unnest(CAST(:agents AS text[]), CAST(:sessions AS uuid[]),
                                             CAST(:seen AS timestamptz[]))
                            AS v(agent_id, session_id, seen)
                    ),
                    locked AS MATERIALIZED (
                        SELECT a.agent_id FROM agents a JOIN v ON a.agent_id = v.agent_id
                        ORDER BY a.agent_id FOR UPDATE OF a
                    )
                    UPDATE agents a SET session_id = NULL, server_id = NULL,
                        disconnected_at = now(), last_seen_at = greatest(a.last_seen_at, v.seen)
                    FROM v JOIN locked USING (agent_id)
                    WHERE a.agent_id = v.agent_id AND a.session_id = v.session_id
                    """
                ),
                params,
            )
            requeued = await conn.execute(
                text(
                    """
                    UPDATE commands m SET state = 'pending', session_id = NULL
                    FROM unnest(CAST(:agents AS text[]), CAST(:sessions AS uuid[]))
                        AS v(agent_id, session_id)
                    WHERE m.agent_id = v.agent_id AND m.session_id = v.session_id
                      AND m.state = ANY(:from)
                    RETURNING m.command_id, m.request_id, m.agent_id
                    """
                ),
                params,
            )
            requeued_rows = requeued.all()
            _log_moved(requeued_rows, CommandState.PENDING, "stream closed before the ack")
            for payload in _chunked_payloads("a", sorted({row.agent_id for row in requeued_rows})):
                await self._notify(conn, payload)
        return [None] * len(closes)

    async def claim(
        self, agent_id: str, session_id: uuid.UUID, service_name: str, hostname: str, limit: int = 1
    ) -> tuple[list[CommandToSend], list[uuid.UUID]]:
        """`claim_batch` for one session."""
        claimed = await self.claim_batch(
            [ClaimFor(agent_id, session_id, service_name, hostname)], limit
        )
        return claimed.get(agent_id, ([], []))

    @database_errors
    async def claim_batch(
        self, sessions: Sequence[ClaimFor], limit: int = 1
    ) -> dict[str, tuple[list[CommandToSend], list[uuid.UUID]]]:
        """Claim, for many sessions in one transaction, what each must write now: stops to
        deliver, and the agent's next `limit` commands (oldest first) when it has none sent or
        running. Sessions that no longer own their agent get nothing.

        The agents' rows are locked first (in a fixed order, so servers never deadlock): that
        serialises claims for one agent across servers, and the claim statement, which runs
        after the lock with a fresh snapshot, sees every committed send. The claim is the
        MATERIALIZED ... FOR UPDATE SKIP LOCKED pattern, which never takes more than `limit` rows
        per agent.
        """
        if not sessions:
            return {}
        params = {
            "agents": [s.agent_id for s in sessions],
            "sessions": [s.session_id for s in sessions],
            "services": [s.service_name for s in sessions],
            "hosts": [s.hostname for s in sessions],
            "limit": limit,
        }
        result: dict[str, tuple[list[CommandToSend], list[uuid.UUID]]] = {}
        async with self.engine.begin() as conn:
            owned = await conn.execute(
                text(
                    """
                    SELECT a.agent_id FROM agents a
                    JOIN unnest(CAST(:agents AS text[]), CAST(:sessions AS uuid[]))
                        AS u(agent_id, session_id)
                      ON a.agent_id = u.agent_id AND a.session_id = u.session_id
                    ORDER BY a.agent_id
                    FOR UPDATE OF a
                    """
                ),
                params,
            )
            params["owned"] = [row.agent_id for row in owned]
            if not params["owned"]:
                return result
            stops = await conn.execute(
                text(
                    "UPDATE commands SET stop_sent_at = now() WHERE agent_id = ANY(:owned) "
                    "AND state = 'running' AND stop_requested AND stop_sent_at IS NULL "
                    "RETURNING agent_id, command_id"
                ),
                params,
            )
            for row in stops:
                result.setdefault(row.agent_id, ([], []))[1].append(row.command_id)
            budgets = await self._service_budgets(
                conn, sorted({s.service_name for s in sessions}), limit * len(sessions)
            )
            params["budget_services"] = list(budgets)
            params["budgets"] = list(budgets.values())
            rows = await conn.execute(
                text(
                    """
                    WITH a AS (
                        SELECT * FROM unnest(CAST(:agents AS text[]), CAST(:sessions AS uuid[]),
                                             CAST(:services AS text[]), CAST(:hosts AS text[]))
                            AS a(agent_id, session_id, service_name, hostname)
                        WHERE a.agent_id = ANY(:owned)
                          AND NOT EXISTS (SELECT 1 FROM commands b WHERE b.agent_id = a.agent_id
                                          AND b.state IN ('sent', 'running'))
                    ),
                    candidates AS MATERIALIZED (
                        SELECT a.agent_id, a.session_id, a.service_name, p.command_id, p.seq
                        FROM a CROSS JOIN LATERAL (
                            SELECT m.command_id, m.seq FROM commands m
                            WHERE m.state = 'pending' AND m.expires_at > now()
                              AND (m.agent_id = a.agent_id
                                   OR (m.agent_id IS NULL AND m.service_name = a.service_name
                                       AND m.hostname = a.hostname))
                            ORDER BY m.seq
                            LIMIT :limit
                            FOR UPDATE SKIP LOCKED
                        ) p
                    ),
                    c AS (
                        -- --max-concurrent-per-service: the oldest commands within each
                        -- service's remaining budget; the others stay pending.
                        SELECT k.* FROM (
                            SELECT candidates.*, row_number() OVER (
                                PARTITION BY service_name ORDER BY seq) AS rank
                            FROM candidates
                        ) k
                        JOIN unnest(CAST(:budget_services AS text[]), CAST(:budgets AS integer[]))
                            AS b(service_name, budget) ON b.service_name = k.service_name
                        WHERE k.rank <= b.budget
                    )
                    UPDATE commands m SET state = 'sent', agent_id = c.agent_id,
                        session_id = c.session_id, sent_at = clock_timestamp(),
                        attempts = m.attempts + 1
                    FROM c, profile_requests r
                    WHERE m.command_id = c.command_id AND r.request_id = m.request_id
                    RETURNING c.agent_id, m.command_id, m.request_id, m.expires_at,
                        r.duration_seconds, r.frequency_hz, r.profiling_mode, r.pids,
                        r.additional_args, r.continuous
                    """
                ),
                params,
            )
            for row in rows:
                result.setdefault(row.agent_id, ([], []))[0].append(
                    CommandToSend(
                        command_id=row.command_id,
                        request_id=row.request_id,
                        spec=_spec(row),
                        expires_at=row.expires_at,
                    )
                )
        return result

    async def record_ack(
        self, agent_id: str, command_id: uuid.UUID, accepted: bool, reason: str
    ) -> AckOutcome:
        """`record_acks` for one ack."""
        (outcome,) = await self.record_acks([Ack(agent_id, command_id, accepted, reason)])
        if isinstance(outcome, PulseError):
            raise outcome
        return outcome

    async def _service_budgets(
        self, conn: AsyncConnection, services: Sequence[str], limit: int
    ) -> dict[str, int]:
        """How many commands a claim may hand out per service under
        --max-concurrent-per-service (`limit` each when there is no cap).

        Per-service advisory locks, taken in name order, serialise the count-then-claim of every
        claim for a service across servers, so concurrent claims cannot overshoot the cap."""
        cap = self.max_concurrent_per_service
        if not cap:
            return {service: limit for service in services}
        budgets = {}
        for service in services:
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(hashtext('pulse.service:' || :service))"),
                {"service": service},
            )
            busy = await conn.scalar(
                text(
                    "SELECT count(*) FROM commands WHERE service_name = :service "
                    "AND state IN ('sent', 'running')"
                ),
                {"service": service},
            )
            budgets[service] = max(0, min(limit, cap - int(busy or 0)))
        return budgets

    @database_errors
    async def record_acks(self, acks: Sequence[Ack]) -> Sequence[AckOutcome | PulseError]:
        """sent -> running (accepted) or rejected, for many acks in one statement. A repeat, or an
        ack for a command that moved on meanwhile, changes nothing; an accepted ack of a cancelled
        command asks for a stop. Results are in the order of `acks`."""
        sources = lifecycle.sources(Event.ACK_ACCEPTED)
        assert sources == lifecycle.sources(Event.ACK_REJECTED)
        async with self.engine.begin() as conn:
            await self._act_as(conn, AGENTS_ACTOR)
            moved = await conn.execute(
                text(
                    """
                    UPDATE commands m SET
                        state = CASE WHEN v.accepted THEN 'running' ELSE 'rejected' END,
                        started_at = CASE WHEN v.accepted THEN clock_timestamp()
                            ELSE m.started_at END,
                        deadline_at = CASE WHEN v.accepted AND NOT r.continuous
                            THEN clock_timestamp()
                                 + (r.duration_seconds + :grace) * interval '1 second'
                            END,
                        finished_at = CASE WHEN v.accepted THEN NULL ELSE clock_timestamp() END,
                        error_message = CASE WHEN v.accepted THEN m.error_message
                            ELSE coalesce(nullif(v.reason, ''), 'rejected by agent') END
                    FROM unnest(CAST(:ids AS uuid[]), CAST(:agents AS text[]),
                                CAST(:accepted AS boolean[]), CAST(:reasons AS text[]))
                            AS v(command_id, agent_id, accepted, reason),
                         profile_requests r
                    WHERE m.command_id = v.command_id AND m.agent_id = v.agent_id
                      AND m.state = ANY(:from) AND r.request_id = m.request_id
                      AND (m.state <> 'pending' OR m.attempts > 0)
                    RETURNING m.command_id, m.agent_id, m.state,
                        extract(epoch FROM clock_timestamp() - m.created_at) AS waited
                    """
                ),
                {
                    "ids": [a.command_id for a in acks],
                    "agents": [a.agent_id for a in acks],
                    "accepted": [a.accepted for a in acks],
                    "reasons": [a.reason for a in acks],
                    "grace": self.completion_grace.total_seconds(),
                    "from": _states(sources),
                },
            )
            moved_rows = moved.all()
            moved_now = {
                row.command_id: (CommandState(row.state), row.agent_id) for row in moved_rows
            }
            waited = {row.command_id: float(row.waited) for row in moved_rows}
            current = await self._owners(
                conn, [a.command_id for a in acks if a.command_id not in moved_now]
            )
        current.update(moved_now)
        results: list[AckOutcome | PulseError] = []
        for ack in acks:
            checked = _owned_state(current, ack.command_id, ack.agent_id)
            if isinstance(checked, PulseError):
                results.append(checked)
            elif ack.command_id in moved_now:
                # Only the first ack of a command carries its dispatch latency (for the metrics).
                results.append(
                    AckOutcome(checked, dispatch_seconds=waited.pop(ack.command_id, None))
                )
            else:
                stop = ack.accepted and checked == CommandState.CANCELLED
                results.append(AckOutcome(state=checked, stop=stop))
        return results

    async def _owners(
        self, conn: AsyncConnection, command_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, tuple[CommandState, str | None]]:
        if not command_ids:
            return {}
        rows = await conn.execute(
            text("SELECT command_id, state, agent_id FROM commands WHERE command_id = ANY(:ids)"),
            {"ids": list(command_ids)},
        )
        return {row.command_id: (CommandState(row.state), row.agent_id) for row in rows}

    async def record_completion(self, completion: Completion, notify: bool = True) -> CommandState:
        """`record_completions` for one completion."""
        (outcome,) = await self.record_completions([completion], notify=notify)
        if isinstance(outcome, PulseError):
            raise outcome
        return outcome.state

    @database_errors
    async def record_completions(
        self, completions: Sequence[Completion], notify: bool | Sequence[bool] = True
    ) -> Sequence[CompletionResult | PulseError]:
        """Record agents' outcomes, each once; a repeat returns the state recorded first. Agents
        freed by a recorded completion that have queued commands are announced in one NOTIFY
        (when `notify` says the agent's stream is not held by the caller, which wakes it
        directly); `CompletionResult.more_work` tells the caller which to wake."""
        events = [lifecycle.completion_event(c.outcome.value) for c in completions]
        sources = {lifecycle.sources(e) for e in events}
        assert len(sources) <= 1, "every completion event moves from the same states"
        wanted = [notify] * len(completions) if isinstance(notify, bool) else list(notify)
        async with self.engine.begin() as conn:
            await self._act_as(conn, AGENTS_ACTOR)
            moved = await conn.execute(
                text(
                    """
                    UPDATE commands m SET state = v.target, finished_at = clock_timestamp(),
                        started_at = coalesce(m.started_at, v.started),
                        error_message = CASE WHEN v.error <> '' THEN v.error
                            ELSE m.error_message END,
                        result_location = v.location, result_samples = v.samples,
                        result_bytes = v.bytes
                    FROM unnest(CAST(:ids AS uuid[]), CAST(:agents AS text[]),
                                CAST(:targets AS text[]), CAST(:started AS timestamptz[]),
                                CAST(:errors AS text[]), CAST(:locations AS text[]),
                                CAST(:samples AS bigint[]), CAST(:bytes AS bigint[]))
                        AS v(command_id, agent_id, target, started, error, location, samples,
                             bytes)
                    WHERE m.command_id = v.command_id AND m.agent_id = v.agent_id
                      AND m.state = ANY(:from)
                      -- pending only if delivered before (its ack was lost)
                      AND (m.state <> 'pending' OR m.attempts > 0)
                    RETURNING m.command_id, m.agent_id, m.state, EXISTS (
                        SELECT 1 FROM commands q WHERE q.state = 'pending'
                          AND (q.agent_id = m.agent_id
                               OR (q.agent_id IS NULL AND q.service_name = m.service_name
                                   AND q.hostname = m.hostname))) AS more, m.service_name
                    """
                ),
                {
                    "ids": [c.command_id for c in completions],
                    "agents": [c.agent_id for c in completions],
                    "targets": [lifecycle.target(e).value for e in events],
                    "started": [c.started_at for c in completions],
                    "errors": [c.error_message for c in completions],
                    "locations": [c.result_location for c in completions],
                    "samples": [c.result_samples for c in completions],
                    "bytes": [c.result_bytes for c in completions],
                    "from": _states(next(iter(sources), frozenset())),
                },
            )
            rows = moved.all()
            states = {row.command_id: (CommandState(row.state), row.agent_id) for row in rows}
            more_work = {row.command_id for row in rows if row.more}
            # Only agents with queued commands need waking: the rest have nothing to receive.
            announce = sorted(
                {c.agent_id for c, w in zip(completions, wanted, strict=True)
                 if w and c.command_id in more_work}
            )  # fmt: skip
            for payload in _chunked_payloads("a", announce):
                await self._notify(conn, payload)
            if self.max_concurrent_per_service:
                # Slots of these services' budgets are free: other agents may be waiting.
                for service in sorted({row.service_name for row in rows}):
                    await self._notify(conn, f"v:{service}")
            current = await self._owners(
                conn, [c.command_id for c in completions if c.command_id not in states]
            )
        current.update(states)
        results: list[CompletionResult | PulseError] = []
        for completion in completions:
            checked = _owned_state(current, completion.command_id, completion.agent_id)
            if checked == CommandState.PENDING:
                checked = FailedPrecondition(
                    f"command {completion.command_id} was never delivered to this agent"
                )
            if isinstance(checked, PulseError):
                results.append(checked)
            else:
                results.append(CompletionResult(checked, completion.command_id in more_work))
        return results

    @database_errors
    async def flush_heartbeats(self, seen: Sequence[tuple[str, uuid.UUID, datetime]]) -> int:
        """Write many agents' last-seen times in one statement."""
        if not seen:
            return 0
        async with self.engine.begin() as conn:
            result = await conn.execute(
                text(
                    """
                    WITH v AS (
                        SELECT * FROM unnest(CAST(:agents AS text[]), CAST(:sessions AS uuid[]),
                                             CAST(:seen AS timestamptz[]))
                            AS v(agent_id, session_id, seen)
                    ),
                    locked AS MATERIALIZED (
                        -- Rows are locked in agent order, like every multi-agent statement,
                        -- so that batches from several servers never deadlock.
                        SELECT a.agent_id FROM agents a JOIN v ON a.agent_id = v.agent_id
                        ORDER BY a.agent_id FOR UPDATE OF a
                    )
                    UPDATE agents a SET last_seen_at = v.seen
                    FROM v JOIN locked USING (agent_id)
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
                    RETURNING m.command_id, m.request_id, m.agent_id
                    """
                ),
                {"timeout": ack_timeout.total_seconds(), "limit": limit},
            )
            rows = result.all()
            _log_moved(rows, CommandState.PENDING, "no ack within the ack timeout")
            if rows:
                await self._notify(conn, "*")
            return len(rows)

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
                    RETURNING m.command_id, m.request_id, m.agent_id
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
            rows = result.all()
            _log_moved(rows, lifecycle.target(event), reason)
            return len(rows)

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
                    SELECT DISTINCT agent_id, service_name, hostname FROM commands c
                    WHERE ((state = 'pending' AND expires_at > now()
                            -- an agent busy with another command is woken when it finishes
                            AND NOT EXISTS (SELECT 1 FROM commands b
                                            WHERE b.agent_id = c.agent_id
                                              AND b.state IN ('sent', 'running')))
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


def _owned_state(
    current: dict[uuid.UUID, tuple[CommandState, str | None]], command_id: uuid.UUID, agent_id: str
) -> CommandState | PulseError:
    """The command's state if `agent_id` owns it, else the error to answer with."""
    if command_id not in current:
        return NotFound(f"command {command_id} not found")
    state, owner = current[command_id]
    if owner != agent_id:
        return PermissionDenied(f"command {command_id} does not belong to agent {agent_id}")
    return state


def _targets_payload(
    request_id: uuid.UUID, service_name: str, targets: Sequence[Target], limit: int = 7900
) -> str:
    """`t:` naming the targets when they fit in one NOTIFY payload, else `r:<request_id>`."""
    agents = ",".join(t.agent_id for t in targets if t.agent_id)
    hosts = ",".join(t.hostname for t in targets if not t.agent_id)
    payload = f"t:{service_name}|{agents}|{hosts}"
    return payload if len(payload.encode()) <= limit else f"r:{request_id}"


def _chunked_payloads(kind: str, items: Sequence[str], limit: int = 7900) -> list[str]:
    """NOTIFY payloads `<kind>:<item>,<item>,...`, each under PostgreSQL's 8000-byte limit."""
    payloads: list[str] = []
    current: list[str] = []
    size = len(kind) + 1
    for item in items:
        if current and size + len(item) + 1 > limit:
            payloads.append(f"{kind}:" + ",".join(current))
            current, size = [], len(kind) + 1
        current.append(item)
        size += len(item) + 1
    if current:
        payloads.append(f"{kind}:" + ",".join(current))
    return payloads


def _rounds_of_distinct_agents(opens: Sequence[SessionOpen]) -> list[list[int]]:
    """Indexes of `opens` split so that no agent appears twice in one round (an upsert may not
    touch a row twice); later sessions of an agent come in later rounds and win."""
    rounds: list[list[int]] = []
    occurrences: dict[str, int] = {}
    for index, item in enumerate(opens):
        level = occurrences.get(item.hello.agent_id, 0)
        occurrences[item.hello.agent_id] = level + 1
        if level == len(rounds):
            rounds.append([])
        rounds[level].append(index)
    return rounds


# What a state-changing UPDATE returns so that each moved command gets its log line.
_MOVED = "command_id, request_id, agent_id"


def _log_moved(rows: Sequence[Row[Any]], state: CommandState, reason: str) -> None:
    """One INFO line per command a statement moved (sweeps, cancels, re-queues)."""
    for row in rows:
        log.info(
            "command %s of request %s -> %s: %s",
            row.command_id,
            row.request_id,
            state,
            reason,
            extra={
                "command_id": str(row.command_id),
                "request_id": str(row.request_id),
                **({"agent_id": row.agent_id} if row.agent_id else {}),
            },
        )


def _candidate(row: Row[Any]) -> Candidate:
    return Candidate(
        hostname=row.hostname,
        agent_id=row.agent_id,
        online=bool(row.online),
        supported_modes=tuple(ProfilingMode(m) for m in row.supported_modes),
    )


def _uuid_or_none(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None

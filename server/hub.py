"""The agent-facing core: sessions, wake-ups, acks, liveness and sweeps (plain Python, no grpc).

The servicers call `open_session`, `heartbeat`, `ack`, `complete` and `close_session`; the LISTEN
connection calls `on_notify`; a periodic task calls `sweep`. Acks and completions go through
batchers, so a burst of them (a fan-out) costs a few statements rather than one each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from db.store import Store
from server.batching import Batcher
from server.dispatcher import Dispatcher
from server.domain import (
    Ack,
    AckOutcome,
    Completion,
    CompletionResult,
    Hello,
    PulseError,
    SessionClose,
    SessionOpen,
    Unavailable,
    new_id,
)
from server.lifecycle import TERMINAL, CommandState
from server.liveness import HeartbeatBatcher
from server.logs import ids
from server.sessions import AgentSession, CloseReason, DrainRequest, SessionRegistry, StopRequest

if TYPE_CHECKING:
    from server.metrics import ServerMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubSettings:
    server_id: str
    heartbeat_interval: timedelta = timedelta(seconds=10)
    liveness_intervals: int = 3
    ack_timeout: timedelta = timedelta(seconds=30)
    sweep_interval: timedelta = timedelta(seconds=5)
    heartbeat_flush_interval: timedelta = timedelta(seconds=2)
    dispatch_workers: int = 2
    drain_spread: timedelta = timedelta(seconds=5)
    # Heartbeats per second this server is willing to receive: with more agents than
    # rate x interval, new sessions get a longer interval (rate-scaled, like Nomad's TTLs).
    max_heartbeat_rate: float = 1000.0
    completion_grace: timedelta = timedelta(seconds=30)

    def interval_for(self, sessions: int) -> timedelta:
        """The heartbeat interval for a new session when `sessions` are already connected."""
        scaled = timedelta(seconds=(sessions + 1) / self.max_heartbeat_rate)
        return max(self.heartbeat_interval, scaled)


class Hub:
    def __init__(self, store: Store, settings: HubSettings) -> None:
        self.store = store
        self.settings = settings
        self.sessions = SessionRegistry()
        self.dispatcher = Dispatcher(store, workers=settings.dispatch_workers)
        self.heartbeats = HeartbeatBatcher(store, settings.heartbeat_flush_interval.total_seconds())
        self.acks: Batcher[Ack, AckOutcome] = Batcher("acks", store.record_acks)
        self.opens: Batcher[SessionOpen, list[uuid.UUID]] = Batcher(
            "session-opens", self._open_sessions
        )
        self.closes: Batcher[SessionClose, None] = Batcher("session-closes", store.close_sessions)
        self.completions: Batcher[tuple[Completion, bool], CompletionResult] = Batcher(
            "completions", self._record_completions
        )
        self._batchers = (self.acks, self.opens, self.closes, self.completions)
        self._tasks: list[asyncio.Task[None]] = []
        self._wakeups: set[asyncio.Task[None]] = set()
        self.sweeps = 0
        self.sweep_wakeups = 0  # sessions a sweep found work for
        self.metrics: ServerMetrics | None = None
        self.draining = False
        # Completions cannot reach a server that is down or cut off from its database: time-outs
        # wait until agents have had the completion grace to report after either ends.
        self._time_outs_from = datetime.now(UTC) + settings.completion_grace

    # --- life of the hub ------------------------------------------------------------------------

    def start(self) -> None:
        self.dispatcher.start()
        for batcher in self._batchers:
            batcher.start()
        self._tasks = [
            asyncio.create_task(self.heartbeats.run(), name="heartbeat-flush"),
            asyncio.create_task(self._sweep_forever(), name="sweep"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.dispatcher.stop()
        for batcher in self._batchers:
            await batcher.stop()
        with contextlib.suppress(Unavailable):
            await self.heartbeats.flush()

    def drain(self) -> None:
        """Ask every agent to reconnect elsewhere, each after its own random delay."""
        self.draining = True
        spread = self.settings.drain_spread.total_seconds()
        for session in self.sessions.all():
            session.push(DrainRequest(timedelta(seconds=random.uniform(0, spread))))

    def close_all(self, reason: str) -> None:
        for session in self.sessions.all():
            session.close(reason)

    # --- sessions -------------------------------------------------------------------------------

    async def open_session(self, hello: Hello) -> AgentSession:
        if self.draining:
            raise Unavailable("server is shutting down; connect to another server")
        interval = self.settings.interval_for(len(self.sessions))
        session = AgentSession(hello, new_id(), interval)
        stops = await self.opens.submit(SessionOpen(hello, session.session_id, interval))
        session.last_seen = self.heartbeats.touch(hello.agent_id, session.session_id)
        previous = self.sessions.add(session)
        if previous is not None:
            previous.close(CloseReason.SUPERSEDED)
        for command_id in stops:
            session.push(StopRequest(command_id, "cancelled while the agent was away"))
        log.info(
            "agent %s (%s, service %s) connected, session %s",
            hello.agent_id,
            hello.hostname,
            hello.service_name,
            session.session_id,
            extra=ids(agent_id=hello.agent_id, session_id=session.session_id),
        )
        self.dispatcher.wake(session)
        return session

    def heartbeat(self, session: AgentSession) -> None:
        session.last_seen = self.heartbeats.touch(session.agent_id, session.session_id)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "heartbeat from agent %s", session.agent_id, extra=ids(agent_id=session.agent_id)
            )

    async def ack(
        self, session: AgentSession, command_id: uuid.UUID, accepted: bool, reason: str
    ) -> None:
        session.last_seen = self.heartbeats.touch(session.agent_id, session.session_id)
        outcome = await self.acks.submit(Ack(session.agent_id, command_id, accepted, reason))
        log.info(
            "agent %s %s command %s -> %s",
            session.agent_id,
            "accepted" if accepted else f"rejected ({reason})",
            command_id,
            outcome.state,
            extra=ids(agent_id=session.agent_id, command_id=command_id),
        )
        if self.metrics is not None:
            self.metrics.acked(outcome)
        if outcome.stop:
            session.push(StopRequest(command_id, "cancelled before it started"))
        if outcome.state in TERMINAL:
            self.dispatcher.wake(session)  # the agent is free for its next command

    async def complete(self, completion: Completion) -> CommandState:
        """Record an agent's outcome; the agent, now free, is woken for its next command (directly
        when its stream is held here, else through a NOTIFY to whichever server holds it)."""
        local = self.sessions.by_agent(completion.agent_id)
        result = await self.completions.submit((completion, local is None))
        if local is not None and result.more_work:
            self.dispatcher.wake(local)
        return result.state

    async def _open_sessions(self, opens: list[SessionOpen]) -> list[list[uuid.UUID]]:
        return await self.store.open_sessions(opens, self.settings.server_id)

    async def _record_completions(
        self, items: list[tuple[Completion, bool]]
    ) -> Sequence[CompletionResult | PulseError]:
        return await self.store.record_completions(
            [c for c, _ in items], notify=[notify for _, notify in items]
        )

    async def close_session(self, session: AgentSession) -> None:
        self.sessions.remove(session)
        if session.close_reason is None:
            session.close(CloseReason.CLIENT)
        log.info(
            "agent %s session %s closed: %s",
            session.agent_id,
            session.session_id,
            session.close_reason,
            extra=ids(agent_id=session.agent_id, session_id=session.session_id),
        )
        await self.closes.submit(
            SessionClose(session.agent_id, session.session_id, session.last_seen)
        )

    # --- wake-ups -------------------------------------------------------------------------------

    def on_notify(self, payload: str) -> None:
        """Handle one NOTIFY payload (see db.store for the format)."""
        kind, _, rest = payload.partition(":")
        if kind == "a":
            for agent_id in rest.split(","):
                session = self.sessions.by_agent(agent_id)
                if session is not None:
                    self.dispatcher.wake(session)
        elif kind == "r":
            try:
                request_id = uuid.UUID(rest)
            except ValueError:
                return
            self._spawn(self._wake_request(request_id))
        elif kind == "t":
            service, agents, hosts = rest.split("|")
            targets = self.sessions.matching(
                set(filter(None, agents.split(","))),
                {(service, host) for host in hosts.split(",") if host},
            )
            for session in targets:
                self.dispatcher.wake(session)
        elif kind == "v":
            for session in self.sessions.by_service(rest):
                self.dispatcher.wake(session)
        elif kind == "s":
            for takeover in rest.split(","):
                agent_id, _, session_id = takeover.rpartition(":")
                session = self.sessions.by_agent(agent_id)
                if session is not None and str(session.session_id) != session_id:
                    # The notification may be older than the local session (the agent
                    # reconnected here meanwhile): the database says which session owns it now.
                    self._spawn(self._close_if_superseded(session))
        elif kind == "*":
            for session in self.sessions.all():
                self.dispatcher.wake(session)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._wakeups.add(task)
        task.add_done_callback(self._wakeups.discard)

    async def _close_if_superseded(self, session: AgentSession) -> None:
        try:
            owner = await self.store.session_owner(session.agent_id)
        except Unavailable as exc:
            log.warning("cannot check the session of agent %s: %s", session.agent_id, exc)
            return
        if owner != session.session_id:
            session.close(CloseReason.SUPERSEDED)

    async def _wake_request(self, request_id: uuid.UUID) -> None:
        if not len(self.sessions):
            return
        try:
            agents, hosts = await self.store.agents_with_work(request_id)
        except Unavailable as exc:
            log.warning("wake-up for request %s failed: %s", request_id, exc)
            return
        for session in self.sessions.matching(agents, hosts):
            self.dispatcher.wake(session)

    # --- sweeps ---------------------------------------------------------------------------------

    async def sweep(self) -> None:
        """Expire, time out, re-queue unacknowledged sends, close silent streams, and wake every
        local session that has work: the fallback for lost notifications."""
        expired = await self.store.expire_due()
        timed_out = 0
        if datetime.now(UTC) >= self._time_outs_from:
            timed_out = await self.store.time_out_due()
        requeued = await self.store.requeue_unacknowledged(self.settings.ack_timeout)
        if expired or timed_out or requeued:
            log.info("sweep: %d expired, %d timed out, %d re-queued", expired, timed_out, requeued)
        self._close_silent()
        if len(self.sessions):
            agents, hosts = await self.store.agents_with_work()
            for session in self.sessions.matching(agents, hosts):
                self.sweep_wakeups += 1
                self.dispatcher.wake(session)
        self.sweeps += 1

    def database_unreachable(self) -> None:
        """The database failed: completions may be failing too, so defer time-outs."""
        self._time_outs_from = datetime.now(UTC) + self.settings.completion_grace

    def _close_silent(self) -> None:
        """Close streams silent for longer than the liveness threshold (their agents are offline;
        their unacknowledged commands go back to pending when the session closes)."""
        now = datetime.now(UTC)
        for session in self.sessions.all():
            limit = session.interval * self.settings.liveness_intervals
            if session.last_seen is not None and now - session.last_seen > limit:
                session.close(CloseReason.SILENT)

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except Unavailable as exc:
                self.database_unreachable()
                log.warning("sweep failed: %s", exc)
            except Exception:
                log.exception("sweep failed")
            await asyncio.sleep(self.settings.sweep_interval.total_seconds())

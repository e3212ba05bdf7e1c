"""The agent-facing core: sessions, wake-ups, acks, liveness and sweeps (plain Python, no grpc).

The servicer calls `open_session`, `heartbeat`, `ack` and `close_session`; the LISTEN connection
calls `on_notify`; a periodic task calls `sweep`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from db.store import Store
from server.dispatcher import Dispatcher
from server.domain import Hello, Unavailable, new_id
from server.lifecycle import TERMINAL
from server.liveness import HeartbeatBatcher
from server.sessions import AgentSession, CloseReason, DrainRequest, SessionRegistry, StopRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubSettings:
    server_id: str
    heartbeat_interval: timedelta = timedelta(seconds=10)
    liveness_intervals: int = 3
    ack_timeout: timedelta = timedelta(seconds=30)
    sweep_interval: timedelta = timedelta(seconds=5)
    heartbeat_flush_interval: timedelta = timedelta(seconds=2)
    dispatch_workers: int = 4
    drain_spread: timedelta = timedelta(seconds=5)
    completion_grace: timedelta = timedelta(seconds=30)

    @property
    def silence_limit(self) -> timedelta:
        """A stream with no message for this long is closed (the agent is offline)."""
        return self.heartbeat_interval * self.liveness_intervals


class Hub:
    def __init__(self, store: Store, settings: HubSettings) -> None:
        self.store = store
        self.settings = settings
        self.sessions = SessionRegistry()
        self.dispatcher = Dispatcher(store, workers=settings.dispatch_workers)
        self.heartbeats = HeartbeatBatcher(store, settings.heartbeat_flush_interval.total_seconds())
        self._tasks: list[asyncio.Task[None]] = []
        self._wakeups: set[asyncio.Task[None]] = set()
        self.sweeps = 0
        self.draining = False
        # Completions cannot reach a server that is down or cut off from its database: time-outs
        # wait until agents have had the completion grace to report after either ends.
        self._time_outs_from = datetime.now(UTC) + settings.completion_grace

    # --- life of the hub ------------------------------------------------------------------------

    def start(self) -> None:
        self.dispatcher.start()
        self._tasks = [
            asyncio.create_task(self.heartbeats.run(), name="heartbeat-flush"),
            asyncio.create_task(self._sweep_forever(), name="sweep"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.dispatcher.stop()
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
        session = AgentSession(hello, new_id())
        stops = await self.store.open_session(
            hello, session.session_id, self.settings.server_id, self.settings.heartbeat_interval
        )
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
        )
        self.dispatcher.wake(session)
        return session

    def heartbeat(self, session: AgentSession) -> None:
        session.last_seen = self.heartbeats.touch(session.agent_id, session.session_id)

    async def ack(
        self, session: AgentSession, command_id: uuid.UUID, accepted: bool, reason: str
    ) -> None:
        session.last_seen = self.heartbeats.touch(session.agent_id, session.session_id)
        outcome = await self.store.record_ack(session.agent_id, command_id, accepted, reason)
        log.info(
            "agent %s %s command %s -> %s",
            session.agent_id,
            "accepted" if accepted else f"rejected ({reason})",
            command_id,
            outcome.state,
        )
        if outcome.stop:
            session.push(StopRequest(command_id, "cancelled before it started"))
        if outcome.state in TERMINAL:
            self.dispatcher.wake(session)  # the agent is free for its next command

    async def close_session(self, session: AgentSession) -> None:
        self.sessions.remove(session)
        if session.close_reason is None:
            session.close(CloseReason.CLIENT)
        log.info(
            "agent %s session %s closed: %s",
            session.agent_id,
            session.session_id,
            session.close_reason,
        )
        await self.store.close_session(session.agent_id, session.session_id, session.last_seen)

    # --- wake-ups -------------------------------------------------------------------------------

    def on_notify(self, payload: str) -> None:
        """Handle one NOTIFY payload (see db.store for the format)."""
        kind, _, rest = payload.partition(":")
        if kind == "a":
            session = self.sessions.by_agent(rest)
            if session is not None:
                self.dispatcher.wake(session)
        elif kind == "r":
            try:
                request_id = uuid.UUID(rest)
            except ValueError:
                return
            task = asyncio.create_task(self._wake_request(request_id))
            self._wakeups.add(task)
            task.add_done_callback(self._wakeups.discard)
        elif kind == "v":
            for session in self.sessions.by_service(rest):
                self.dispatcher.wake(session)
        elif kind == "s":
            agent_id, _, session_id = rest.rpartition(":")
            session = self.sessions.by_agent(agent_id)
            if session is not None and str(session.session_id) != session_id:
                session.close(CloseReason.SUPERSEDED)
        elif kind == "*":
            for session in self.sessions.all():
                self.dispatcher.wake(session)

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
                self.dispatcher.wake(session)
        self.sweeps += 1

    def database_unreachable(self) -> None:
        """The database failed: completions may be failing too, so defer time-outs."""
        self._time_outs_from = datetime.now(UTC) + self.settings.completion_grace

    def _close_silent(self) -> None:
        limit = self.settings.silence_limit
        now = datetime.now(UTC)
        for session in self.sessions.all():
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

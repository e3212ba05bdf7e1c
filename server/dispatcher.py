"""Dispatch: a wake-up (NOTIFY, sweep, ack, connect) schedules a claim for one session; a few
workers run the claims against the store and push what was claimed onto the session's stream.

The number of workers bounds the database connections dispatch can use, and a session is never
queued twice, so a storm of wake-ups costs at most one claim per session.
"""

from __future__ import annotations

import asyncio
import logging

from db.store import Store
from server.domain import Unavailable
from server.logs import ids
from server.sessions import AgentSession, StopRequest

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, store: Store, *, workers: int = 4, batch: int = 1) -> None:
        self._store = store
        self._workers = workers
        self._batch = batch
        self._queue: asyncio.Queue[AgentSession] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.claims = 0
        self.pushed = 0

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._work(), name=f"dispatch-{i}") for i in range(self._workers)
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def wake(self, session: AgentSession) -> None:
        """Schedule a claim for this session (no-op if one is already scheduled)."""
        if session.closed or session.dispatch_queued:
            return
        session.dispatch_queued = True
        self._queue.put_nowait(session)

    async def _work(self) -> None:
        while True:
            session = await self._queue.get()
            session.dispatch_queued = False
            if session.closed:
                continue
            try:
                await self.dispatch(session)
            except Unavailable as exc:
                # The periodic sweep (run again once the database is back) retries.
                log.warning("dispatch for agent %s failed: %s", session.agent_id, exc)
            except Exception:
                log.exception("dispatch for agent %s failed", session.agent_id)

    async def dispatch(self, session: AgentSession) -> None:
        hello = session.hello
        commands, stops = await self._store.claim(
            hello.agent_id, session.session_id, hello.service_name, hello.hostname, self._batch
        )
        self.claims += 1
        for command_id in stops:
            session.push(StopRequest(command_id, "cancelled by operator"))
        for command in commands:
            log.info(
                "sending command %s of request %s to agent %s",
                command.command_id,
                command.request_id,
                hello.agent_id,
                extra=ids(
                    request_id=command.request_id,
                    command_id=command.command_id,
                    agent_id=hello.agent_id,
                ),
            )
            if session.push(command):
                self.pushed += 1

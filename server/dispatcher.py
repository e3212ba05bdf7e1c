"""Dispatch: a wake-up (NOTIFY, sweep, ack, connect) schedules a claim for one session; workers
claim for every session queued since their last round in one transaction (`Store.claim_batch`)
and push what was claimed onto each session's stream.

A session is never queued twice, so a storm of wake-ups costs at most one claim per session, and
a fan-out to thousands of agents costs a few set-based statements per few hundred agents.
"""

from __future__ import annotations

import asyncio
import logging
import time

from db.store import Store
from server.domain import ClaimFor, Unavailable
from server.logs import ids
from server.sessions import AgentSession, StopRequest

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(
        self, store: Store, *, workers: int = 2, max_batch: int = 500, per_agent: int = 1
    ) -> None:
        self._store = store
        self._workers = workers
        self._max_batch = max_batch
        self._per_agent = per_agent
        self._queue: asyncio.Queue[AgentSession] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.claims = 0  # claim transactions
        self.claimed_sessions = 0
        self.pushed = 0
        self.busy_seconds = 0.0  # time spent claiming

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

    def _next_batch(self, first: AgentSession) -> list[AgentSession]:
        batch = [first]
        while len(batch) < self._max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        for session in batch:
            session.dispatch_queued = False
        return [s for s in batch if not s.closed]

    async def _work(self) -> None:
        while True:
            batch = self._next_batch(await self._queue.get())
            if not batch:
                continue
            started = time.perf_counter()
            try:
                await self.dispatch(batch)
            except Unavailable as exc:
                # The periodic sweep (run again once the database is back) retries.
                log.warning("dispatch for %d sessions failed: %s", len(batch), exc)
            except Exception:
                log.exception("dispatch for %d sessions failed", len(batch))
            self.busy_seconds += time.perf_counter() - started

    async def dispatch(self, sessions: list[AgentSession]) -> None:
        by_agent = {s.agent_id: s for s in sessions}
        claimed = await self._store.claim_batch(
            [
                ClaimFor(s.agent_id, s.session_id, s.hello.service_name, s.hello.hostname)
                for s in by_agent.values()
            ],
            self._per_agent,
        )
        self.claims += 1
        self.claimed_sessions += len(by_agent)
        for agent_id, (commands, stops) in claimed.items():
            session = by_agent[agent_id]
            for command_id in stops:
                session.push(StopRequest(command_id, "cancelled by operator"))
            for command in commands:
                log.info(
                    "sending command %s of request %s to agent %s",
                    command.command_id,
                    command.request_id,
                    agent_id,
                    extra=ids(
                        request_id=command.request_id,
                        command_id=command.command_id,
                        agent_id=agent_id,
                    ),
                )
                if session.push(command):
                    self.pushed += 1

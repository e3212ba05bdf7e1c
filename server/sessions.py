"""Live agent sessions held by this process: one per open heartbeat stream (no grpc here).

A session owns a bounded outbound queue that the transport drains onto the stream. The registry
indexes sessions by agent, by (service, hostname) and by service so that a wake-up costs O(1).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from server.domain import CommandToSend, Hello


@dataclass(frozen=True)
class StopRequest:
    command_id: uuid.UUID
    reason: str


@dataclass(frozen=True)
class DrainRequest:
    reconnect_after: timedelta


Outbound = CommandToSend | StopRequest | DrainRequest


class CloseReason:
    SUPERSEDED = "superseded by a newer session of the same agent"
    SILENT = "no heartbeat within the liveness threshold"
    SHUTDOWN = "server shutting down"
    CLIENT = "agent closed the stream"


class AgentSession:
    def __init__(
        self,
        hello: Hello,
        session_id: uuid.UUID,
        interval: timedelta = timedelta(seconds=10),
        outbound_limit: int = 64,
    ) -> None:
        self.hello = hello
        self.session_id = session_id
        self.interval = interval  # the heartbeat interval this session was given
        self.last_seen: datetime | None = None
        self.close_reason: str | None = None
        self._outbound: asyncio.Queue[Outbound | None] = asyncio.Queue(outbound_limit)
        self.dispatch_queued = False  # set while a claim for this session is scheduled

    @property
    def agent_id(self) -> str:
        return self.hello.agent_id

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    def push(self, message: Outbound) -> bool:
        """Queue a message for the stream; False (and the session closes) if the agent is too
        slow to read: its unacknowledged commands are re-sent on its next session."""
        if self.closed:
            return False
        try:
            self._outbound.put_nowait(message)
        except asyncio.QueueFull:
            self.close("outbound queue full: agent is not reading its stream")
            return False
        return True

    async def next_outbound(self) -> Outbound | None:
        """The next message to write, or None once the session is closed."""
        if self.closed:
            return None
        message = await self._outbound.get()
        return None if self.closed else message

    def close(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
            # Wake the writer even when the queue is full.
            while True:
                try:
                    self._outbound.put_nowait(None)
                    break
                except asyncio.QueueFull:
                    self._outbound.get_nowait()


class SessionRegistry:
    def __init__(self) -> None:
        self._by_agent: dict[str, AgentSession] = {}
        self._by_host: dict[tuple[str, str], set[AgentSession]] = defaultdict(set)
        self._by_service: dict[str, set[AgentSession]] = defaultdict(set)

    def __len__(self) -> int:
        return len(self._by_agent)

    def all(self) -> list[AgentSession]:
        return list(self._by_agent.values())

    def add(self, session: AgentSession) -> AgentSession | None:
        """Register a session; returns the older session of the same agent it replaces."""
        previous = self._by_agent.get(session.agent_id)
        if previous is not None:
            self.remove(previous)
        self._by_agent[session.agent_id] = session
        self._by_host[(session.hello.service_name, session.hello.hostname)].add(session)
        self._by_service[session.hello.service_name].add(session)
        return previous

    def remove(self, session: AgentSession) -> None:
        if self._by_agent.get(session.agent_id) is session:
            del self._by_agent[session.agent_id]
        key = (session.hello.service_name, session.hello.hostname)
        self._by_host[key].discard(session)
        if not self._by_host[key]:
            del self._by_host[key]
        self._by_service[session.hello.service_name].discard(session)
        if not self._by_service[session.hello.service_name]:
            del self._by_service[session.hello.service_name]

    def by_agent(self, agent_id: str) -> AgentSession | None:
        return self._by_agent.get(agent_id)

    def by_host(self, service_name: str, hostname: str) -> list[AgentSession]:
        return list(self._by_host.get((service_name, hostname), ()))

    def by_service(self, service_name: str) -> list[AgentSession]:
        return list(self._by_service.get(service_name, ()))

    def matching(self, agents: set[str], hosts: set[tuple[str, str]]) -> list[AgentSession]:
        """Local sessions of the given agents or of agents on the given (service, host) pairs."""
        found: dict[str, AgentSession] = {}
        for agent_id in agents:
            session = self._by_agent.get(agent_id)
            if session is not None:
                found[agent_id] = session
        for service_name, hostname in hosts:
            for session in self.by_host(service_name, hostname):
                found[session.agent_id] = session
        return list(found.values())

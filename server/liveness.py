"""Heartbeats touch memory only; last-seen times are written in one batched statement."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime

from db.store import Store
from server.domain import Unavailable

log = logging.getLogger(__name__)


class HeartbeatBatcher:
    def __init__(self, store: Store, flush_interval: float) -> None:
        self._store = store
        self._flush_interval = flush_interval
        self._dirty: dict[str, tuple[uuid.UUID, datetime]] = {}
        self.heartbeats = 0
        self.flushes = 0

    def touch(self, agent_id: str, session_id: uuid.UUID) -> datetime:
        now = datetime.now(UTC)
        self._dirty[agent_id] = (session_id, now)
        self.heartbeats += 1
        return now

    async def flush(self) -> int:
        if not self._dirty:
            return 0
        batch, self._dirty = self._dirty, {}
        try:
            written = await self._store.flush_heartbeats(
                [(agent, session, seen) for agent, (session, seen) in batch.items()]
            )
        except Unavailable:
            # Keep the newest value of each agent for the next try.
            for agent, value in batch.items():
                self._dirty.setdefault(agent, value)
            raise
        self.flushes += 1
        return written

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval)
            try:
                await self.flush()
            except Unavailable as exc:
                log.warning("heartbeat flush failed: %s", exc)

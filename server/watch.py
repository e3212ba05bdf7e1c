"""Following one request for WatchProfileRequest: re-read it on wake-ups (any NOTIFY this server
hears) and at least every `poll_interval`, yielding a snapshot only when state or counts moved.

Not every transition sends a NOTIFY (acks do not), hence the periodic re-read; a wake-up storm
costs at most one re-read per `min_interval` per watcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

from db.store import Store
from server.domain import RequestView
from server.lifecycle import FINISHED_REQUEST, RequestState


class RequestWatch:
    def __init__(
        self, store: Store, *, poll_interval: float = 1.0, min_interval: float = 0.1
    ) -> None:
        self._store = store
        self._poll_interval = poll_interval
        self._min_interval = min_interval
        self._changed = asyncio.Event()
        self.watchers = 0

    def wake(self, payload: str = "") -> None:
        """Something changed somewhere (a NOTIFY payload, unused): every watcher re-reads."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _wait(self) -> None:
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), self._poll_interval)
        await asyncio.sleep(self._min_interval)

    async def follow(self, request_id: uuid.UUID) -> AsyncIterator[RequestView]:
        """Snapshots of the request: the current one, then one per change, ending after the
        first terminal one. NotFound (or Unavailable) propagate to the caller."""
        self.watchers += 1
        try:
            last: tuple[RequestState, tuple[tuple[str, int], ...]] | None = None
            while True:
                view = await self._store.request_summary(request_id)
                seen = (view.state, tuple(sorted((s.value, n) for s, n in view.counts.items())))
                if seen != last:
                    last = seen
                    yield view
                if view.state in FINISHED_REQUEST:
                    return
                await self._wait()
        finally:
            self.watchers -= 1

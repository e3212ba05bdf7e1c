"""A dedicated LISTEN connection that turns NOTIFY payloads into callbacks, reconnecting for ever.

NOTIFYs sent while the connection is down are lost, so every (re)connect calls `on_connect`,
which the server uses to run a catch-up sweep.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import psycopg
from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from db.engine import libpq_url
from db.store import CHANNEL

log = logging.getLogger(__name__)


class Listener:
    def __init__(
        self,
        url: str,
        on_notify: Callable[[str], None],
        on_connect: Callable[[], Awaitable[None]],
        *,
        max_backoff: float = 5.0,
        probe_interval: float = 15.0,
    ) -> None:
        self._probe_interval = probe_interval
        self._url = libpq_url(url)
        self._on_notify = on_notify
        self._on_connect = on_connect
        self._max_backoff = max_backoff
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Listen until cancelled; connection errors are retried with jittered backoff."""
        while True:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type((psycopg.Error, OSError)),
                wait=wait_random_exponential(multiplier=0.1, max=self._max_backoff),
                reraise=True,
            ):
                with attempt:
                    await self._listen_once()

    async def _listen_once(self) -> None:
        try:
            async with await psycopg.AsyncConnection.connect(
                self._url, autocommit=True, connect_timeout=5
            ) as conn:
                await conn.execute(f"LISTEN {CHANNEL}")
                self.connected.set()
                log.info("listening for %s notifications", CHANNEL)
                await self._on_connect()
                while True:
                    async for notify in conn.notifies(timeout=self._probe_interval):
                        self._on_notify(notify.payload)
                    # Quiet for a while: make sure the connection is still alive (a silently
                    # dropped connection would otherwise wait for ever).
                    await conn.execute("SELECT 1")
        except (psycopg.Error, OSError) as exc:
            if self.connected.is_set():
                log.warning("LISTEN connection lost (%s); reconnecting", exc)
            raise
        finally:
            self.connected.clear()

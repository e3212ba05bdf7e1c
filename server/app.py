"""Wiring: database, store, hub, LISTEN connection and the grpc.aio server with health,
reflection, keepalive and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from db import migrate
from db.engine import create_engine, start_embedded
from db.listener import Listener
from db.store import Store
from pulse.v1 import agent_service_pb2, profiling_service_pb2
from pulse.v1 import agent_service_pb2_grpc as apb_grpc
from pulse.v1 import profiling_service_pb2_grpc as ppb_grpc
from server.domain import Unavailable
from server.hub import Hub, HubSettings
from server.servicers import AgentServicer, ProfilingServicer
from server.sessions import CloseReason

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    profiling_service_pb2.DESCRIPTOR.services_by_name["ProfilingService"].full_name,
    agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
)


def default_server_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    database_url: str | None = None
    data_dir: Path = Path(".pulse")
    server_id: str = field(default_factory=default_server_id)
    heartbeat_interval: timedelta = timedelta(seconds=10)
    liveness_intervals: int = 3
    ack_timeout: timedelta = timedelta(seconds=30)
    completion_grace: timedelta = timedelta(seconds=30)
    sweep_interval: timedelta = timedelta(seconds=5)
    heartbeat_flush_interval: timedelta = timedelta(seconds=2)
    shutdown_grace: timedelta = timedelta(seconds=10)
    drain_spread: timedelta = timedelta(seconds=5)
    max_message_bytes: int = 4 * 1024 * 1024
    keepalive_time: timedelta = timedelta(seconds=30)
    keepalive_timeout: timedelta = timedelta(seconds=10)
    max_connection_age: timedelta | None = None
    db_pool_size: int = 10
    dispatch_workers: int = 4
    migrate: bool = True

    def hub_settings(self) -> HubSettings:
        return HubSettings(
            server_id=self.server_id,
            heartbeat_interval=self.heartbeat_interval,
            liveness_intervals=self.liveness_intervals,
            ack_timeout=self.ack_timeout,
            sweep_interval=self.sweep_interval,
            heartbeat_flush_interval=min(self.heartbeat_flush_interval, self.heartbeat_interval),
            dispatch_workers=self.dispatch_workers,
            drain_spread=self.drain_spread,
            completion_grace=self.completion_grace,
        )

    def grpc_options(self) -> list[tuple[str, int]]:
        ms = lambda d: int(d.total_seconds() * 1000)  # noqa: E731
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", ms(self.keepalive_time)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout)),
            # Give up on an unanswered ping after keepalive_timeout (gRPC's default is 1 min).
            ("grpc.http2.ping_timeout_ms", ms(self.keepalive_timeout)),
            ("grpc.keepalive_permit_without_calls", 1),
            # Agents ping every 20 s or more; refuse clients that ping more often than every 5 s.
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ("grpc.http2.max_ping_strikes", 2),
        ]
        if self.max_connection_age is not None:
            options += [
                ("grpc.max_connection_age_ms", ms(self.max_connection_age)),
                ("grpc.max_connection_age_grace_ms", ms(self.shutdown_grace)),
            ]
        return options


def resolve_database_url(config: ServerConfig) -> str:
    if config.database_url:
        return config.database_url
    url = start_embedded(config.data_dir)
    log.warning(
        "no --database-url or PULSE_DATABASE_URL given: using an embedded PostgreSQL under %s "
        "(fine for trying Pulse, not for production)",
        config.data_dir / "pgdata",
    )
    return url


class PulseServer:
    """One Pulse server process (or one in-process server in tests)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._listener_task: asyncio.Task[None] | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        config = self.config
        url = await asyncio.to_thread(resolve_database_url, config)
        self.engine = create_engine(url, pool_size=config.db_pool_size)
        if config.migrate:
            applied = await migrate.upgrade(self.engine)
            if applied:
                log.info("applied migrations %s", applied)
        self.store = Store(
            self.engine,
            liveness_intervals=config.liveness_intervals,
            completion_grace=config.completion_grace,
        )
        self.hub = Hub(self.store, config.hub_settings())
        self.hub.start()
        self.listener = Listener(url, self.hub.on_notify, self._after_listen)
        self._listener_task = asyncio.create_task(self.listener.run(), name="listen")

        server = grpc.aio.server(options=config.grpc_options())
        ppb_grpc.add_ProfilingServiceServicer_to_server(ProfilingServicer(self.store), server)
        apb_grpc.add_AgentServiceServicer_to_server(AgentServicer(self.hub, self.store), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        self.port = server.add_insecure_port(config.listen)
        if not self.port:
            raise RuntimeError(f"cannot listen on {config.listen}")
        await server.start()
        self._server = server
        await self._set_serving(True)
        self._health_task = asyncio.create_task(self._watch_database(), name="health")
        log.info(
            "pulse server %s listening on %s (port %d)", config.server_id, config.listen, self.port
        )
        return self.port

    async def _after_listen(self) -> None:
        """Notifications may have been missed while the LISTEN connection was down: catch up."""
        await self.hub.sweep()

    async def _watch_database(self) -> None:
        """Health follows the database: NOT_SERVING while it cannot be reached, so that load
        balancers and agents' operators see the outage; SERVING again once a ping succeeds."""
        interval = min(self.config.sweep_interval.total_seconds(), 2.0)
        serving = True
        while not self._stopping:
            await asyncio.sleep(interval)
            try:
                await asyncio.wait_for(self.store.ping(), timeout=max(interval, 5.0))
                reachable = True
            except (Unavailable, TimeoutError) as exc:
                reachable = False
                self.hub.database_unreachable()
                if serving:
                    log.warning("database unreachable (%s): health is NOT_SERVING", exc)
            if reachable != serving and not self._stopping:
                serving = reachable
                if reachable:
                    log.info("database reachable again: health is SERVING")
                await self._set_serving(reachable)

    async def _set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, status)

    async def stop(self) -> None:
        """Graceful stop: NOT_SERVING, drain agents, let RPCs finish, then close everything."""
        if self._server is None:
            return
        server, self._server = self._server, None
        self._stopping = True
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        await self._set_serving(False)
        self.hub.drain()
        await asyncio.sleep(0.2)  # let the drain messages reach the streams
        self.hub.close_all(CloseReason.SHUTDOWN)
        await server.stop(self.config.shutdown_grace.total_seconds())
        if self._listener_task is not None:
            self._listener_task.cancel()
            await asyncio.gather(self._listener_task, return_exceptions=True)
        await self.hub.stop()
        await self.engine.dispose()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

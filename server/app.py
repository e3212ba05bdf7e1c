"""Wiring: database, store, hub, LISTEN connection and the grpc.aio server with health,
reflection, keepalive and graceful shutdown."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
import time
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
from server.auth import Authorizer, TokenFile
from server.domain import Unavailable
from server.gcstats import GcPauses
from server.hub import Hub, HubSettings
from server.metrics import ServerMetrics
from server.ratelimit import RateLimiter
from server.servicers import AgentServicer, ProfilingServicer
from server.sessions import CloseReason
from server.tls import RotatingCertificates, ServerTls, server_credentials
from server.watch import RequestWatch

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
    dispatch_workers: int = 2
    max_heartbeat_rate: float = 1000.0
    migrate: bool = True
    # When set, a JSON snapshot of the server's counters is written here every second.
    stats_file: Path | None = None
    # pulse-server freezes the collector's objects this often and thaws them this often.
    gc_freeze_interval: timedelta = timedelta(seconds=10)
    gc_thaw_interval: timedelta = timedelta(seconds=600)
    # host:port of the Prometheus endpoint; None: no endpoint and no RPC interceptor.
    metrics_listen: str | None = None
    # Security (see README "Security"); all off by default: local, insecure, open.
    tls: ServerTls | None = None
    tokens_file: Path | None = None
    submit_rate: float = 0.0  # submits per second per principal; 0 = unlimited
    submit_burst: int = 20
    max_targets_per_request: int = 0  # 0 = unlimited
    max_concurrent_per_service: int = 0  # 0 = unlimited

    def hub_settings(self) -> HubSettings:
        return HubSettings(
            server_id=self.server_id,
            heartbeat_interval=self.heartbeat_interval,
            liveness_intervals=self.liveness_intervals,
            ack_timeout=self.ack_timeout,
            sweep_interval=self.sweep_interval,
            heartbeat_flush_interval=min(self.heartbeat_flush_interval, self.heartbeat_interval),
            dispatch_workers=self.dispatch_workers,
            max_heartbeat_rate=self.max_heartbeat_rate,
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


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, "0.0.0.0" or "[::]": reachable from elsewhere


def warn_about_security(config: ServerConfig) -> None:
    if config.tls is None and not is_loopback(config.listen):
        log.warning(
            "listening on %s WITHOUT TLS: anyone who reaches this port can read and change "
            "everything; use --tls-cert/--tls-key (and --client-ca for agents)",
            config.listen,
        )
    elif config.tls is not None and not config.tls.mutual:
        log.warning("TLS without --client-ca: agents are not authenticated")
    if config.tokens_file is None:
        log.warning("no --tokens-file: operator RPCs are open to every client (local mode)")


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
        self.metrics_port: int | None = None
        self.metrics = ServerMetrics()
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._listener_task: asyncio.Task[None] | None = None
        self._stats_task: asyncio.Task[None] | None = None
        self.gc_pauses = GcPauses()
        self._health_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopped = asyncio.Event()
        self.certificates: RotatingCertificates | None = None

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
            max_targets_per_request=config.max_targets_per_request,
            max_concurrent_per_service=config.max_concurrent_per_service,
        )
        self.hub = Hub(self.store, config.hub_settings())
        self.hub.start()
        self.watch = RequestWatch(self.store)
        self.listener = Listener(url, self._on_notify, self._after_listen)
        self._listener_task = asyncio.create_task(self.listener.run(), name="listen")

        interceptors = []
        if config.metrics_listen:
            self.hub.metrics = self.metrics
            self.metrics.bind(
                self.hub, self.store, self.engine, self.watch, asyncio.get_running_loop()
            )
            interceptors.append(self.metrics.interceptor())
        server = grpc.aio.server(options=config.grpc_options(), interceptors=interceptors)
        tokens = TokenFile(config.tokens_file) if config.tokens_file else None
        profiling = ProfilingServicer(
            self.store,
            self.watch,
            Authorizer(tokens),
            RateLimiter(config.submit_rate, config.submit_burst),
        )
        mutual = config.tls is not None and config.tls.mutual
        ppb_grpc.add_ProfilingServiceServicer_to_server(profiling, server)
        apb_grpc.add_AgentServiceServicer_to_server(
            AgentServicer(self.hub, mutual_tls=mutual), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        if config.tls is not None:
            credentials, self.certificates = server_credentials(config.tls)
            self.port = server.add_secure_port(config.listen, credentials)
        else:
            self.port = server.add_insecure_port(config.listen)
        warn_about_security(config)
        if not self.port:
            raise RuntimeError(f"cannot listen on {config.listen}")
        await server.start()
        self._server = server
        if config.metrics_listen:
            self.metrics_port = self.metrics.serve(config.metrics_listen)
        await self._set_serving(True)
        if config.stats_file is not None:
            self.gc_pauses.install()
            self._stats_task = asyncio.create_task(self._write_stats(config.stats_file))
        self._health_task = asyncio.create_task(self._watch_database(), name="health")
        log.info(
            "pulse server %s listening on %s (port %d)", config.server_id, config.listen, self.port
        )
        return self.port

    def stats(self) -> dict[str, float]:
        """Counters of this process since start."""
        hub = self.hub
        return {
            "time": time.time(),
            "cpu_seconds": round(time.process_time(), 3),
            "sessions": len(hub.sessions),
            "heartbeats": hub.heartbeats.heartbeats,
            "heartbeat_flushes": hub.heartbeats.flushes,
            "statements": self.store.statements,
            "claim_batches": hub.dispatcher.claims,
            "claimed_sessions": hub.dispatcher.claimed_sessions,
            "commands_pushed": hub.dispatcher.pushed,
            "ack_batches": hub.acks.batches,
            "acks": hub.acks.items,
            "completion_batches": hub.completions.batches,
            "completions": hub.completions.items,
            "sweeps": hub.sweeps,
            "claim_seconds": round(hub.dispatcher.busy_seconds, 3),
            "ack_seconds": round(hub.acks.busy_seconds, 3),
            "completion_seconds": round(hub.completions.busy_seconds, 3),
            "session_open_batches": hub.opens.batches,
            "session_open_seconds": round(hub.opens.busy_seconds, 3),
            **self.gc_pauses.snapshot(),
        }

    async def _write_stats(self, path: Path) -> None:
        while True:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.stats()))
            tmp.replace(path)
            await asyncio.sleep(1.0)

    def _on_notify(self, payload: str) -> None:
        if self.hub.metrics is not None:
            self.hub.metrics.notified(payload)
        self.hub.on_notify(payload)
        self.watch.wake(payload)

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
        for task in (self._listener_task, self._stats_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.hub.stop()
        self.metrics.stop()
        await self.engine.dispose()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

"""Prometheus metrics of one Pulse server process (`--metrics-listen`), on its own registry.

Counters the hub already keeps (heartbeats, claims, pushes, sweeps) and the database pool are read
at scrape time by a custom collector; commands by state come from the database on scrape (at most
once per `counts_max_age`, shared by concurrent scrapes); RPCs are counted by a server interceptor;
latency and run time are histograms observed by the hub and the servicer.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from db.store import DATABASE_ERRORS
from server.domain import AckOutcome, Completion
from server.lifecycle import CommandState

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from db.store import Store
    from server.hub import Hub
    from server.watch import RequestWatch

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
RUN_TIME_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


def parse_listen(value: str) -> tuple[str, int]:
    """`host:port` (IPv6 hosts in brackets) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address must be host:port, not {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpcs = Counter(
            "pulse_rpcs",
            "RPCs handled, by full method name and final status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.notifications = Counter(
            "pulse_notify_wakeups",
            "NOTIFY payloads received on the LISTEN connection, by kind (r, a, v, s, *)",
            ["kind"],
            registry=self.registry,
        )
        self.dispatch_latency = Histogram(
            "pulse_dispatch_latency_seconds",
            "Time from submit to the agent's ack (accepted or rejected)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.run_time = Histogram(
            "pulse_command_run_seconds",
            "Run time of finished commands as the agent reported it (start to finish)",
            ["outcome"],
            buckets=RUN_TIME_BUCKETS,
            registry=self.registry,
        )
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # --- observations -------------------------------------------------------------------------

    def notified(self, payload: str) -> None:
        kind, _, _ = payload.partition(":")
        self.notifications.labels(
            kind=kind if kind in ("r", "t", "a", "v", "s", "*") else "?"
        ).inc()

    def acked(self, outcome: AckOutcome) -> None:
        if outcome.dispatch_seconds is not None:
            self.dispatch_latency.observe(max(outcome.dispatch_seconds, 0.0))

    def completed(self, completion: Completion) -> None:
        if completion.started_at is not None and completion.finished_at is not None:
            seconds = (completion.finished_at - completion.started_at).total_seconds()
            self.run_time.labels(outcome=completion.outcome.value).observe(max(seconds, 0.0))

    # --- wiring -------------------------------------------------------------------------------

    def bind(
        self,
        hub: Hub,
        store: Store,
        engine: AsyncEngine,
        watch: RequestWatch,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.registry.register(_ServerCollector(hub, store, engine, watch, loop))

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        return RpcMetricsInterceptor(self.rpcs)

    def serve(self, listen: str) -> int:
        """Start the HTTP endpoint in a thread; returns its port."""
        host, port = parse_listen(listen)
        self._http, self._thread = start_http_server(port, host, registry=self.registry)
        bound: int = self._http.server_port
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _ServerCollector(Collector):
    """Reads the hub's counters, the pool and the database at scrape time (HTTP thread)."""

    def __init__(
        self,
        hub: Hub,
        store: Store,
        engine: AsyncEngine,
        watch: RequestWatch,
        loop: asyncio.AbstractEventLoop,
        counts_max_age: float = 2.0,
    ) -> None:
        self._hub = hub
        self._store = store
        self._engine = engine
        self._watch = watch
        self._loop = loop
        self._counts_max_age = counts_max_age
        self._counts: dict[CommandState, int] | None = None
        self._counts_at = 0.0
        self._counts_lock = threading.Lock()
        self._count_failures = 0

    def describe(self) -> Iterable[Metric]:
        return []  # unknown until scraped: registering must not query the database

    def collect(self) -> Iterator[Metric]:
        hub = self._hub
        yield _gauge(
            "pulse_agents_connected", "Agent streams open on this server", len(hub.sessions)
        )
        yield _gauge("pulse_watchers", "WatchProfileRequest streams open", self._watch.watchers)
        yield _counter(
            "pulse_heartbeats",
            "Agent messages that refreshed liveness (heartbeats, acks and hellos)",
            hub.heartbeats.heartbeats,
        )
        yield _counter(
            "pulse_heartbeat_flushes", "Batched last-seen writes", hub.heartbeats.flushes
        )
        yield _counter(
            "pulse_dispatch_claims", "Claims run by the dispatcher", hub.dispatcher.claims
        )
        yield _counter(
            "pulse_commands_pushed", "Commands written to agent streams", hub.dispatcher.pushed
        )
        yield _counter("pulse_sweeps", "Periodic sweeps completed", hub.sweeps)
        yield _counter(
            "pulse_sweep_wakeups",
            "Sessions a sweep found work for (work a NOTIFY did not deliver, or a retry)",
            hub.sweep_wakeups,
        )
        errors = CounterMetricFamily(
            "pulse_database_errors", "Database errors by kind", labels=["kind"]
        )
        for kind in ("unavailable", "retried", "other"):
            errors.add_metric([kind], DATABASE_ERRORS[kind])
        yield errors
        yield from self._pool()
        yield from self._commands()

    def _pool(self) -> Iterator[Metric]:
        pool: Any = self._engine.pool
        size = GaugeMetricFamily(
            "pulse_db_pool_connections",
            "Database connections of this server's pool, by state",
            labels=["state"],
        )
        size.add_metric(["checked_out"], pool.checkedout())
        size.add_metric(["idle"], pool.checkedin())
        yield size
        yield _gauge(
            "pulse_db_pool_size", "Configured pool size (overflow comes on top)", pool.size()
        )

    def _commands(self) -> Iterator[Metric]:
        counts = self._fresh_counts()
        yield _counter(
            "pulse_command_count_failures",
            "Scrapes that could not read commands by state from the database",
            self._count_failures,
        )
        if counts is None:
            return
        family = GaugeMetricFamily(
            "pulse_commands", "Commands in the database by state", labels=["state"]
        )
        for state, n in counts.items():
            family.add_metric([state.value], n)
        yield family

    def _fresh_counts(self) -> dict[CommandState, int] | None:
        with self._counts_lock:
            if (
                self._counts is not None
                and time.monotonic() - self._counts_at < self._counts_max_age
            ):
                return self._counts
            try:
                self._counts = asyncio.run_coroutine_threadsafe(
                    _counts(self._store), self._loop
                ).result(timeout=10)
                self._counts_at = time.monotonic()
            except Exception as exc:
                self._count_failures += 1
                log.warning("metrics: commands by state unavailable: %s", exc)
                return None
            return self._counts


async def _counts(store: Store) -> dict[CommandState, int]:
    return await store.command_counts()


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


# --- RPC interceptor -------------------------------------------------------------------------


def _final_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # some versions keep the integer value
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
    if error is None:
        return "OK"
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    return "UNKNOWN"


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by method and final status code (OK, aborts, cancels, crashes)."""

    def __init__(self, rpcs: Counter) -> None:
        self._rpcs = rpcs

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        serde = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap(handler.unary_unary, method), **serde
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap(handler.unary_stream, method), **serde
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap(handler.stream_unary, method), **serde
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap(handler.stream_stream, method), **serde
        )

    def _record(
        self, method: str, context: grpc.aio.ServicerContext, error: BaseException | None
    ) -> None:
        self._rpcs.labels(method=method, code=_final_code(context, error)).inc()

    def _wrap(self, behavior: Any, method: str) -> Any:
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as error:
                    self._record(method, context, error)
                    raise
                self._record(method, context, None)

            return stream

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                response = await behavior(request, context)
            except BaseException as error:
                self._record(method, context, error)
                raise
            self._record(method, context, None)
            return response

        return call
